"""Reference MLPs. x [..., d]; SwiGLU: w_in [2h, d] (gate rows then up rows), w_out [d, h];
GELU: w_in [h, d], w_out [d, h]. Matmuls in the input dtype, the activation in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_act_reference(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.to(torch.promote_types(gu.dtype, torch.float32)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gu.dtype)


def gelu_act_reference(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


def swiglu_reference(x, w_in, w_out, act=swiglu_act_reference):
    return F.linear(act(F.linear(x, w_in)), w_out)


def gelu_reference(x, w_in, w_out, act=gelu_act_reference):
    return F.linear(act(F.linear(x, w_in)), w_out)


def hidden_width(d_model: int, mult: float, multiple_of: int) -> int:
    h = int(mult * d_model)
    return max(multiple_of, (h + multiple_of - 1) // multiple_of * multiple_of)
