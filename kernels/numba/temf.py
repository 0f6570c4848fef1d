"""``token.temf`` on the CPU with Numba: the forward (no backward; training on the CPU uses the
reference backend, dispatch says so).

Layout as the reference (``plugins/token/temf/reference.py``): q [B, T, Hq, D], k/v
[B, T, Hk, D], summaries sk/sv [B, N, S, Hk, D], N = (T - 1) // C. Query row i of chunk
c = i // C sees its own chunk's keys up to itself and the summaries of chunks < c, one softmax.

The joint softmax splits exactly into two segments merged by their log-sum-exps:

* own chunk: the shared Numba attention core (:mod:`.attention`, blocked online softmax, causal)
  run on the chunks as a batch (q/k/v zero-padded to a whole number of chunks and viewed as
  [B * ceil(T/C), C, H, D]; padded keys sit after every real query of the last chunk, so the
  causal mask hides them);
* summaries: a parallel pass over (batch, position) scores the c*S summary rows of each
  (position, head) and merges: ``lse = logaddexp(lse_loc, lse_sum)``,
  ``o = o_loc * exp(lse_loc - lse) + sum_r exp(s_r - lse) sv_r``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import check_floats, empty, kernel, np_view, prange
from .attention import attention_fwd

__all__ = ["temf_attention"]


@kernel(parallel=True)
def _merge_summaries(q, o_loc, lse_loc, sk, sv, scale, chunk, S, o):
    """o [B, T, Hq, D] from the own-chunk (o_loc, lse_loc [B, Hq, T]) and the summaries
    sk/sv [B, N*S, Hk, D]."""
    B, T, Hq, D = q.shape
    Hk = sk.shape[2]
    G = Hq // Hk
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        nsum = (t // chunk) * S
        sc = np.empty(max(nsum, 1), dtype=np.float64)
        for h in range(Hq):
            hk = h // G
            m = lse_loc[b, h, t]
            for r in range(nsum):
                acc = 0.0
                for d in range(D):
                    acc += q[b, t, h, d] * sk[b, r, hk, d]
                sc[r] = acc * scale
                if sc[r] > m:
                    m = sc[r]
            # every row sees itself, so lse_loc is finite
            w_loc = math.exp(lse_loc[b, h, t] - m)
            tot = w_loc
            for r in range(nsum):
                sc[r] = math.exp(sc[r] - m)
                tot += sc[r]
            for d in range(D):
                acc = o_loc[b, t, h, d] * w_loc
                for r in range(nsum):
                    acc += sc[r] * sv[b, r, hk, d]
                o[b, t, h, d] = acc / tot


def _check(q, k, v, sk, sv, chunk, scale):
    from ...plugins.attention.reference import check_shapes
    from ...plugins.token.temf.reference import check_summaries
    dtype = check_floats("temf", q=q, k=k, v=v, sk=sk, sv=sv)
    check_shapes(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"temf: k/v must have q's length T={q.shape[1]}; got {k.shape[1]}")
    s_slots = check_summaries(q, k, sk, sv, chunk)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return dtype, s_slots, scale


def _chunk_batch(x: torch.Tensor, n_chunks: int, c_eff: int) -> torch.Tensor:
    """[B, T, H, D] -> [B * n_chunks, c_eff, H, D] (zero-padded to n_chunks * c_eff rows)."""
    b, t, h, d = x.shape
    pad = n_chunks * c_eff - t
    if pad:
        x = torch.cat([x, x.new_zeros(b, pad, h, d)], 1)
    return x.reshape(b * n_chunks, c_eff, h, d)


def _forward(q, k, v, sk, sv, chunk, scale):
    """o [B, T, Hq, D]."""
    dtype, S, scale = _check(q, k, v, sk, sv, chunk, scale)
    b, t, hq, d = q.shape
    o = empty((b, t, hq, d), dtype)
    if o.numel() == 0:
        return o
    q, k, v = (x.detach().contiguous() for x in (q, k, v))
    n_chunks = -(-t // chunk)
    c_eff = chunk if n_chunks > 1 else t
    o_loc, lse_loc = attention_fwd(_chunk_batch(q, n_chunks, c_eff), _chunk_batch(k, n_chunks, c_eff),
                                   _chunk_batch(v, n_chunks, c_eff), True, scale)
    o_loc = o_loc.reshape(b, n_chunks * c_eff, hq, d)[:, :t]
    lse_loc = lse_loc.reshape(b, n_chunks, hq, c_eff).permute(0, 2, 1, 3).reshape(b, hq, n_chunks * c_eff)[:, :, :t]
    n = sk.shape[1]
    skf = sk.detach().reshape(b, n * S, sk.shape[3], d)
    svf = sv.detach().reshape(b, n * S, sv.shape[3], d)
    o_loc, lse_loc = o_loc.contiguous(), lse_loc.contiguous()
    _merge_summaries(np_view(q), o_loc.numpy(), lse_loc.numpy(), np_view(skf), np_view(svf), scale,
                     int(chunk), int(S), o.numpy())
    return o


def temf_attention(q, k, v, sk, sv, chunk=256, scale=None):
    """token.temf forward; CPU float32/float64. No backward: raises if an input requires grad."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, sk, sv)):
        raise NotImplementedError("token.temf (numba) has no backward; use the reference or triton backend "
                                  "for training")
    return _forward(q, k, v, sk, sv, chunk, scale)
