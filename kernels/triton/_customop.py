"""The torch.library plumbing that the attention-family Triton kernels share.

Each such kernel exposes a pair of custom ops, ``blockzoo::<name>_fwd`` returning ``(o, lse)`` and
``blockzoo::<name>_bwd`` returning one gradient per differentiable tensor input, with fake (meta)
kernels for ``torch.compile`` and the autograd formula registered on the forward op.
:func:`define_attention_ops` builds that pair from the two implementation functions and a short
description of the arguments, so a kernel module writes only its launches:

- forward ``fwd_impl(q, k, v, *grad_tensors, *aux_tensors, *params) -> (o, lse)``, ``o`` like ``q``
  and ``lse`` fp32 ``[B, Hq, Tq]``;
- backward ``bwd_impl(do, q, k, v, *grad_tensors, o, lse, *aux_tensors, *params)`` ->
  ``(dq, dk, dv, *d_grad_tensors)``, each gradient the shape of its input.

``grad_tensors`` are extra differentiable inputs (a memory bank, summary keys/values, the depth
stream), ``aux_tensors`` are inputs without gradient (routing tables), ``params`` the scalars
(``int``, ``float``, ``bool`` or ``str``). The gradient of ``lse`` is
not supported by these ops (a clear error names the component).

:func:`resolve_scale` gives the default ``1/sqrt(D)``. Every backward starts the same way:
:func:`bwd_outputs_like_q` (``o`` and ``do`` unit-stride and in ``q``'s dtype), then
:func:`bwd_row_stats` (the per-row ``delta = sum(o * do)`` and the base-2 log-sum-exp, from the
core's preprocessing kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton

from .attention import _alloc, _attn_bwd_pre_kernel, _unit_last

# schema types as torch.library infers them from annotations (int -> SymInt), so the ops keep the
# schemas they had when each module spelled them out
_SCHEMA_TYPES = {int: "SymInt", float: "float", bool: "bool", str: "str"}


class AttentionOps(NamedTuple):
    fwd: Callable
    bwd: Callable


def _schema(args: Sequence[str], params: Sequence[tuple[str, type]], n_out: int) -> str:
    parts = [f"Tensor {a}" for a in args]
    for pname, ptype in params:
        if ptype not in _SCHEMA_TYPES:
            raise TypeError(f"param {pname!r}: type {ptype!r} is not one of int, float, bool, str")
        parts.append(f"{_SCHEMA_TYPES[ptype]} {pname}")
    return f"({', '.join(parts)}) -> ({', '.join(['Tensor'] * n_out)})"


def define_attention_ops(name: str, label: str, fwd_impl: Callable, bwd_impl: Callable, *,
                         grad_tensors: Sequence[str] = (), aux_tensors: Sequence[str] = (),
                         params: Sequence[tuple[str, type]] = (("scale", float),)) -> AttentionOps:
    """Define (or fetch, when already defined) ``blockzoo::<name>_fwd`` / ``blockzoo::<name>_bwd``.

    ``label`` names the component in errors (e.g. ``"token.membank (triton)"``). See the module
    docstring for the argument order of ``fwd_impl`` and ``bwd_impl``.
    """
    ns = getattr(torch.ops, "blockzoo", None)
    if ns is not None and hasattr(ns, f"{name}_fwd") and hasattr(ns, f"{name}_bwd"):
        # already registered (module loaded twice, e.g. by path and as a package)
        return AttentionOps(getattr(ns, f"{name}_fwd"), getattr(ns, f"{name}_bwd"))

    grads = ("q", "k", "v", *grad_tensors)
    n_grad, n_aux = len(grads), len(aux_tensors)
    fwd_schema = _schema((*grads, *aux_tensors), params, 2)
    bwd_schema = _schema(("do", *grads, "o", "lse", *aux_tensors), params, n_grad)

    def fwd(*args):
        return fwd_impl(*args)

    def bwd(*args):
        return bwd_impl(*args)

    fwd_op = torch.library.custom_op(f"blockzoo::{name}_fwd", fwd, mutates_args=(), schema=fwd_schema)
    bwd_op = torch.library.custom_op(f"blockzoo::{name}_bwd", bwd, mutates_args=(), schema=bwd_schema)

    @fwd_op.register_fake
    def _(*args):
        q = args[0]
        B, Tq, Hq, D = q.shape
        return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)

    @bwd_op.register_fake
    def _(*args):
        return tuple(t.new_empty(t.shape) for t in args[1:1 + n_grad])

    def setup_context(ctx, inputs, output):
        o, lse = output
        ctx.save_for_backward(*inputs[:n_grad + n_aux], o, lse)
        ctx.set_materialize_grads(False)
        ctx.params = tuple(inputs[n_grad + n_aux:])

    def backward(ctx, do, dlse):
        saved = ctx.saved_tensors
        if dlse is not None:
            raise NotImplementedError(f"{label}: the gradient of lse is not supported")
        if do is None:
            return (None,) * (n_grad + n_aux + len(ctx.params))
        tensors, aux, (o, lse) = saved[:n_grad], saved[n_grad:n_grad + n_aux], saved[n_grad + n_aux:]
        dgrads = bwd_op(do, *tensors, o, lse, *aux, *ctx.params)
        return (*dgrads, *(None,) * (n_aux + len(ctx.params)))

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return AttentionOps(fwd_op, bwd_op)


def bwd_outputs_like_q(q: torch.Tensor, o: torch.Tensor, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, do)`` with unit stride along D and in ``q``'s dtype, as the backward kernels read them."""
    o, do = _unit_last(o), _unit_last(do)
    return (o if o.dtype == q.dtype else o.to(q.dtype)), (do if do.dtype == q.dtype else do.to(q.dtype))


def bwd_row_stats(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, BD: int):
    """``(delta, lse2)``, fp32 ``[B, Hq, Tq]``: ``delta = rowsum(o * do)``, ``lse2 = lse * log2(e)``.

    ``o`` and ``do`` are ``[B, Tq, Hq, D]`` with unit stride along D, ``lse`` the forward's fp32
    natural-log statistics; ``BD`` the padded head dim the kernels use.
    """
    B, Tq, Hq, D = o.shape
    lse = lse.contiguous().float()
    delta = _alloc((B, Hq, Tq), torch.float32, o.device)
    lse2 = _alloc((B, Hq, Tq), torch.float32, o.device)
    PRE_M = 64 if BD <= 128 else 32
    _attn_bwd_pre_kernel[(triton.cdiv(Tq, PRE_M), Hq, B)](
        o, do, lse, delta, delta, lse2,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Tq, D=D, BLOCK_D=BD, BLOCK_M=PRE_M, HAS_DLSE=False, num_warps=4)
    return delta, lse2


def resolve_scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale: ``1/sqrt(D)`` when ``scale`` is None."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
