"""Reference ``example.shortconv``: plain PyTorch, autograd, accurate in fp32 (the oracle).

x ``[B, T, C]``, weight ``[C, K]`` (one K-tap filter per channel):

    z[b, t, c] = sum_{j < K} weight[c, j] * x[b, t - j, c]      (x[b, s, c] = 0 for s < 0)
    y = silu(z)  or  z                                           (params.activation)
"""

import torch
import torch.nn.functional as F


def check_shapes(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"example.shortconv: x must be [B, T, C], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"example.shortconv: weight must be [C, K] with C = x.shape[2] = {x.shape[2]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[1] != kernel_size:
        raise ValueError(f"example.shortconv: weight has {weight.shape[1]} taps but kernel_size={kernel_size}")


def shortconv_reference(x, weight, kernel_size: int = 4, activation: str = "silu"):
    check_shapes(x, weight, kernel_size)
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, wf = x.to(acc), weight.to(acc)
    t = x.shape[1]
    z = torch.zeros_like(xf)
    for j in range(kernel_size):
        if j < t:
            z[:, j:, :] = z[:, j:, :] + wf[:, j] * xf[:, : t - j, :]
    y = F.silu(z) if activation == "silu" else z
    return y.to(x.dtype)
