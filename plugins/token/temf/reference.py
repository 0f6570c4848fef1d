"""Reference (explicit fp32 math, the oracle) for ``token.temf``.

Layout: q [B, T, Hq, D], k/v [B, T, Hk, D], summaries sk/sv [B, N, S, Hk, D] with
N = (T - 1) // C (every chunk that has a later query; all of them are full), Hq % Hk == 0 (GQA:
query head h reads kv head h // (Hq // Hk), for the sequence keys and the summaries alike).

Query row i (chunk c = i // C) attends, under ONE softmax, to

* the keys of its own chunk up to itself: key j iff ``c*C <= j <= i``;
* every summary (n, s) of the chunks before it: ``n < c``.

The summary of chunk c - 1 is visible from the first query of chunk c on (the chunk closed with
its last token). Every row sees at least itself, so no row is empty.
"""

from __future__ import annotations

import math

import torch

from ...attention.reference import check_shapes, expand_kv


def n_summary_chunks(t: int, chunk: int) -> int:
    """Chunks whose summaries some query reads: (T - 1) // C (0 for T = 0)."""
    return max(0, (t - 1) // chunk)


def check_summaries(q, k, sk, sv, chunk: int) -> int:
    """Validate sk/sv against q/k and the chunk length; return S."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    b, t, _, d = q.shape
    if sk.dim() != 5 or sv.dim() != 5:
        raise ValueError(f"sk and sv must be [B, N, S, Hk, D]; got {tuple(sk.shape)}, {tuple(sv.shape)}")
    if sk.shape != sv.shape:
        raise ValueError(f"sk {tuple(sk.shape)} and sv {tuple(sv.shape)} differ")
    n = n_summary_chunks(t, chunk)
    want = (b, n, sk.shape[2], k.shape[2], d)
    if tuple(sk.shape) != want:
        raise ValueError(f"sk {tuple(sk.shape)} must be [B={b}, N=(T-1)//chunk={n}, S, Hk={k.shape[2]}, D={d}] "
                         f"for T={t}, chunk={chunk}")
    return sk.shape[2]


def temf_mask(t: int, n: int, s: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (True = visible): summaries [T, N*S] and sequence [T, T]."""
    i = torch.arange(t, device=device)[:, None]
    ci = i // chunk
    r = torch.arange(n * s, device=device)[None, :]
    m_sum = (r // max(s, 1)) < ci
    j = torch.arange(t, device=device)[None, :]
    m_seq = (j <= i) & (j // chunk == ci)
    return m_sum, m_seq


def temf_reference(q, k, v, sk, sv, chunk: int = 256, scale: float | None = None) -> torch.Tensor:
    """One softmax over [summaries of earlier chunks | own chunk, causal] (fp32)."""
    check_shapes(q, k, v)
    s_slots = check_summaries(q, k, sk, sv, chunk)
    b, t, hq, d = q.shape
    n = sk.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc)
    kf, vf = expand_kv(k, hq).to(acc), expand_kv(v, hq).to(acc)
    skf = expand_kv(sk.reshape(b, n * s_slots, sk.shape[3], d), hq).to(acc)
    svf = expand_kv(sv.reshape(b, n * s_slots, sv.shape[3], d), hq).to(acc)
    m_sum, m_seq = temf_mask(t, n, s_slots, chunk, q.device)
    sc_sum = torch.einsum("bqhd,bkhd->bhqk", qf, skf) * scale
    sc_seq = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    sc = torch.cat([sc_sum.masked_fill(~m_sum, float("-inf")), sc_seq.masked_fill(~m_seq, float("-inf"))], -1)
    p = torch.softmax(sc, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhqk,bkhd->bqhd", p[..., : n * s_slots], svf) + \
        torch.einsum("bhqk,bkhd->bqhd", p[..., n * s_slots:], vf)
    return o.to(q.dtype)


def temf_pairs(t: int, chunk: int, s: int) -> int:
    """Visible (query, key) pairs of one head: own-chunk causal pairs + earlier summaries."""
    full, rem = divmod(t, chunk)
    local = full * chunk * (chunk + 1) // 2 + rem * (rem + 1) // 2
    summ = s * (chunk * full * (full - 1) // 2 + rem * full)  # row i sees (i // C) * S summaries
    return local + summ


def temf_flops(b: int, t: int, hq: int, d: int, chunk: int, s: int) -> float:
    """Forward matmul FLOPs of the op: 4*d per visible (query, key) pair (the compressor is
    counted separately by :func:`compressor_flops`)."""
    return 4.0 * b * hq * d * temf_pairs(t, chunk, s)


def compressor_flops(b: int, t: int, hk: int, d: int, chunk: int, s: int, hidden: int) -> float:
    """Forward FLOPs of the chunk compressor (keys and values): per closed chunk and channel a
    C->S linear map plus a C->hidden->S MLP."""
    n = n_summary_chunks(t, chunk)
    per = 2.0 * chunk * s + 2.0 * chunk * hidden + 2.0 * hidden * s
    return 2.0 * b * n * hk * d * per


def decode_cache_tokens(t: int, chunk: int, s: int) -> int:
    """Entries per kv head a decoder holds after t tokens: (t // C) * S summaries + t % C open."""
    return (t // chunk) * s + t % chunk
