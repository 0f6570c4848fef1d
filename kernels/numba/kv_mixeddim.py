"""Decode attention over token.mixeddim's packed cache on the CPU with Numba: the same contract
as ``kernels/triton/kv_mixeddim.py`` (``pooled_decode``; layout in ``plugins/token/mixeddim.py``).

One parallel task per (batch, kv head) row, taken from a shared counter. A task holds the
``G * Tq`` query rows of its kv group (scale folded in), computes the logits of every token its
row holds (level ``l``: slots ``tok_off[l, r] .. tok_off[l, r] + count[l, r]``; the rest of the
row's slots are unused), pools first (level ``l``: ``qp[:w_l] . k[:w_l]``, rank order) then the tail
(``q . k``, bottom-right causal), into one ``[rows, n + t]`` scratch block, takes ONE exact
softmax over it (max, exp, sum) and accumulates ``p @ v`` into the pool output (value rank order,
first ``w_l`` channels) and the tail output (natural order). The per-token scores are the column
sums of the same probabilities (0 for the row's unused slots, which the task also writes).
float32 / float64 only (the caller upcasts bfloat16 / float16).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import (
    atomic_next,
    check_floats,
    empty,
    jitable,
    kernel,
    np_view,
    num_threads,
    prange,
    task_counter,
)

__all__ = ["pooled_decode", "check_pooled"]


def check_pooled(q, qp, kbuf, vbuf, tok_off, count, elem_base, step, tail_k, tail_v):
    """Shape checks shared with the Triton kernel (no device -> host copy: ``count``'s values
    are not checked here); returns B, Tq, Hq, D, Hk, levels."""
    if q.dim() != 4 or qp.shape != q.shape:
        raise ValueError(f"pooled_decode: q and qp must be [B, Tq, Hq, D] of one shape; got {tuple(q.shape)}, "
                         f"{tuple(qp.shape)}")
    b, tq, hq, d = q.shape
    if tail_k.dim() != 4 or tail_k.shape != tail_v.shape or tail_k.shape[0] != b or tail_k.shape[3] != d:
        raise ValueError(f"pooled_decode: tail k, v must be [B, Hk, t, D] matching q {tuple(q.shape)}; got "
                         f"{tuple(tail_k.shape)}, {tuple(tail_v.shape)}")
    hk = tail_k.shape[1]
    if hk == 0 or hq % hk:
        raise ValueError(f"pooled_decode: query heads ({hq}) must be a multiple of kv heads ({hk})")
    if tail_k.shape[2] < tq:
        raise ValueError(f"pooled_decode: the tail must hold the {tq} new tokens; it has {tail_k.shape[2]}")
    levels = tok_off.shape[0]
    if step * levels != d or tok_off.shape[1] != b * hk + 1 or elem_base.shape[0] != levels:
        raise ValueError(f"pooled_decode: tok_off {tuple(tok_off.shape)}, elem_base {tuple(elem_base.shape)} and "
                         f"step={step} do not describe {levels} levels of a head dim {d} over {b * hk} rows")
    if not isinstance(count, torch.Tensor):
        raise ValueError(f"pooled_decode: count must be a tensor [levels, R] = [{levels}, {b * hk}] (tokens held "
                         f"per (level, row)); got {type(count).__name__}")
    if (tuple(count.shape) != (levels, b * hk) or count.dtype == torch.bool or count.is_floating_point()
            or count.is_complex() or count.device != tok_off.device):
        raise ValueError(f"pooled_decode: count (tokens held per (level, row)) must be an integer tensor "
                         f"[levels, R] = [{levels}, {b * hk}] on tok_off's device ({tok_off.device}); got "
                         f"{tuple(count.shape)} {count.dtype} on {count.device}")
    if kbuf.shape != vbuf.shape or kbuf.dtype != tail_k.dtype:
        raise ValueError(f"pooled_decode: kbuf {tuple(kbuf.shape)} {kbuf.dtype} / vbuf {tuple(vbuf.shape)} must "
                         f"match each other and the tail's dtype {tail_k.dtype}")
    return b, tq, hq, d, hk, levels


@jitable
def _row_task(q, qp, kb, vb, tok, cnt, eb, step, tk, tv, scale, o_n, o_r, sp, st, b, hk, nhk):
    tq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    group = hq // nhk
    nrows = group * tq
    levels = tok.shape[0]
    r = b * nhk + hk
    tt = tk.shape[2]
    n = 0
    for lv in range(levels):
        n += cnt[lv, r]
    s = np.empty((nrows, n + tt), dtype=q.dtype)
    # logits: pools (the held slots; rank order, first w channels), then the tail (natural order, causal)
    j = 0
    for lv in range(levels):
        w = (lv + 1) * step
        tb = tok[lv, 0]
        for i in range(tok[lv, r], tok[lv, r] + cnt[lv, r]):
            base = eb[lv] + (i - tb) * w
            for row in range(nrows):
                h = hk * group + row // tq
                qi = row % tq
                acc = 0.0
                for c in range(w):
                    acc += qp[b, qi, h, c] * kb[base + c]
                s[row, j] = acc * scale
            j += 1
    diag = tt - tq
    for jt in range(tt):
        for row in range(nrows):
            h = hk * group + row // tq
            qi = row % tq
            if jt > qi + diag:
                s[row, n + jt] = -np.inf
                continue
            acc = 0.0
            for c in range(d):
                acc += q[b, qi, h, c] * tk[b, hk, jt, c]
            s[row, n + jt] = acc * scale
    # one softmax per row over every token of the row
    for row in range(nrows):
        m = -np.inf
        for jj in range(n + tt):
            if s[row, jj] > m:
                m = s[row, jj]
        tot = 0.0
        for jj in range(n + tt):
            e = math.exp(s[row, jj] - m)
            s[row, jj] = e
            tot += e
        inv = 1.0 / tot
        for jj in range(n + tt):
            s[row, jj] *= inv
    # outputs and scores
    for row in range(nrows):
        h = hk * group + row // tq
        qi = row % tq
        for c in range(d):
            o_n[b, qi, h, c] = 0.0
            o_r[b, qi, h, c] = 0.0
    j = 0
    for lv in range(levels):
        w = (lv + 1) * step
        tb = tok[lv, 0]
        for i in range(tok[lv, r] + cnt[lv, r], tok[lv, r + 1]):  # unused slots: no attention
            sp[i] = 0.0
        for i in range(tok[lv, r], tok[lv, r] + cnt[lv, r]):
            base = eb[lv] + (i - tb) * w
            colsum = 0.0
            for row in range(nrows):
                h = hk * group + row // tq
                qi = row % tq
                p = s[row, j]
                colsum += p
                for c in range(w):
                    o_r[b, qi, h, c] += p * vb[base + c]
            sp[i] = colsum
            j += 1
    for jt in range(tt):
        colsum = 0.0
        for row in range(nrows):
            h = hk * group + row // tq
            qi = row % tq
            p = s[row, n + jt]
            colsum += p
            for c in range(d):
                o_n[b, qi, h, c] += p * tv[b, hk, jt, c]
        st[b, hk, jt] = colsum


@kernel(parallel=True)
def _pooled_kernel(q, qp, kb, vb, tok, cnt, eb, step, tk, tv, scale, o_n, o_r, sp, st, counter, workers):
    nhk = tk.shape[1]
    ntask = q.shape[0] * nhk
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            _row_task(q, qp, kb, vb, tok, cnt, eb, step, tk, tv, scale, o_n, o_r, sp, st, t // nhk, t % nhk, nhk)
            t = atomic_next(counter)


def pooled_decode(q: torch.Tensor, qp: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, tok_off: torch.Tensor,
                  count: torch.Tensor, elem_base: torch.Tensor, step: int, tail_k: torch.Tensor,
                  tail_v: torch.Tensor, scale: float | None = None, scores: bool = True):
    """See ``kernels/triton/kv_mixeddim.pooled_decode``: (o_n, o_r) [B, Tq, Hq, D] (q's compute
    dtype, fp32 for bfloat16 / float16 inputs), and the pool [slots] (0 for unused slots) / tail
    [B, Hk, t] scores. ``count`` [levels, R]: tokens held per (level, row), each at most the
    row's slots in the level (checked: the tensors are on the CPU)."""
    b, tq, hq, d, hk, levels = check_pooled(q, qp, kbuf, vbuf, tok_off, count, elem_base, step, tail_k, tail_v)
    tok_off, count = tok_off.to(torch.int64), count.to(torch.int64)
    if bool(((count < 0) | (count > tok_off[:, 1:] - tok_off[:, :-1])).any()):
        raise ValueError("pooled_decode: count must be in [0, the row's slots in the level] "
                         "(tok_off[l, r + 1] - tok_off[l, r]) for every (level, row)")
    if q.dtype not in (torch.float32, torch.float64):  # the numba kernels are fp32 / fp64
        q, qp, kbuf, vbuf, tail_k, tail_v = (x.float() for x in (q, qp, kbuf, vbuf, tail_k, tail_v))
    dtype = check_floats("pooled_decode", q=q, qp=qp, kbuf=kbuf, vbuf=vbuf, tail_k=tail_k, tail_v=tail_v)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n_tok = int(tok_off[-1, -1])
    tt = tail_k.shape[2]
    o_n, o_r = empty((b, tq, hq, d), dtype), empty((b, tq, hq, d), dtype)
    sp, st = empty((n_tok,), dtype), empty((b, hk, tt), dtype)
    _pooled_kernel(np_view(q), np_view(qp.to(dtype)), np_view(kbuf), np_view(vbuf),
                   np_view(tok_off), np_view(count), np_view(elem_base.to(torch.int64)), int(step),
                   np_view(tail_k), np_view(tail_v), scale, o_n.numpy(), o_r.numpy(), sp.numpy(), st.numpy(),
                   task_counter(), num_threads())
    if not scores:
        return o_n, o_r, None, None
    return o_n, o_r, sp.float(), st.float()
