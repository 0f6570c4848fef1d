"""Reference (explicit fp32 math, the oracle) of the ``token.membank`` op and the compressor.

Op layout: q [B, Tq, Hq, D], k/v [B, Tk, Hk, D] (Tq <= Tk; query row t is at absolute position
``p_t = t + Tk - Tq``, the keys at 0..Tk-1, bottom-right aligned as ``attention.dense``),
bank_k/bank_v [B, N*M, Hk, D] **chunk-major**: N = ceil(Tk / W) chunks, rows ``n*M .. n*M+M-1``
are the M bank slots that the queries of chunk n (positions nW .. nW+W-1) see. GQA: query head
h reads kv head h // (Hq // Hk) for the window and the bank alike. Query row t attends, under ONE
softmax, to

* the window: keys j with ``p_t - W < j <= p_t``;
* the M bank slots of chunk ``p_t // W``.

The bank states themselves are made by the module's compressor (:func:`compress_blocks`,
:func:`bank_scan`): S_0 is learned; after chunk c is complete,
``S_{c+1} = g * S_c + (1 - g) * pool(chunk c)``. Queries of chunk n read S_n, which depends on
tokens < nW only (causal).
"""

from __future__ import annotations

import math

import torch

from ...attention.reference import check_shapes, expand_kv


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def n_chunks(tk: int, window: int) -> int:
    return -(-tk // window) if tk > 0 else 0


def bank_slots(q, k, bank_k, bank_v, window: int) -> int:
    """Validate the bank tensors and return M (slots per chunk and kv head)."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    b, tq, _, d = q.shape
    tk = k.shape[1]
    if tq > tk:
        raise ValueError(f"token.membank needs Tq <= Tk (queries are the last Tq key positions); got Tq={tq}, "
                         f"Tk={tk}")
    if bank_k.dim() != 4 or tuple(bank_k.shape) != tuple(bank_v.shape):
        raise ValueError(f"bank_k / bank_v must be one shape [B, N*M, Hk, D]; got {tuple(bank_k.shape)}, "
                         f"{tuple(bank_v.shape)}")
    if bank_k.shape[0] != b or bank_k.shape[2] != k.shape[2] or bank_k.shape[3] != d:
        raise ValueError(f"bank_k {tuple(bank_k.shape)} must be [B={b}, N*M, Hk={k.shape[2]}, D={d}]")
    n = n_chunks(tk, window)
    rows = bank_k.shape[1]
    if n == 0:
        if rows:
            raise ValueError(f"bank_k has {rows} rows but there are no keys")
        return 0
    if rows % n:
        raise ValueError(f"bank_k has {rows} rows, not a multiple of N = ceil(Tk/window) = {n} "
                         f"(Tk={tk}, window={window}; chunk-major [B, N*M, Hk, D])")
    return rows // n


def membank_reference(q, k, v, bank_k, bank_v, window: int = 64, scale: float | None = None) -> torch.Tensor:
    """One softmax over [bank slots of the query's chunk | sliding window] (fp32)."""
    check_shapes(q, k, v)
    m_slots = bank_slots(q, k, bank_k, bank_v, window)
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    n = n_chunks(tk, window)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = _acc(q.dtype)
    qf = q.to(acc)
    kf, vf = expand_kv(k, hq).to(acc), expand_kv(v, hq).to(acc)
    s_win = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale                      # [B, H, Tq, Tk]
    p_abs = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=q.device)[None, :]
    s_win = s_win.masked_fill(~((j <= p_abs) & (j > p_abs - window)), float("-inf"))
    bk = expand_kv(bank_k, hq).to(acc).reshape(b, n, m_slots, hq, d)
    bv = expand_kv(bank_v, hq).to(acc).reshape(b, n, m_slots, hq, d)
    chunk = (torch.arange(tq, device=q.device) + (tk - tq)) // window            # [Tq]
    bk_q, bv_q = bk[:, chunk], bv[:, chunk]                                      # [B, Tq, M, H, D]
    s_bank = torch.einsum("bqhd,bqmhd->bhqm", qf, bk_q) * scale                 # [B, H, Tq, M]
    p = torch.softmax(torch.cat([s_bank, s_win], dim=-1), dim=-1).nan_to_num(0.0)
    p_bank, p_win = p[..., :m_slots], p[..., m_slots:]
    o = torch.einsum("bhqm,bqmhd->bqhd", p_bank, bv_q) + torch.einsum("bhqk,bkhd->bqhd", p_win, vf)
    return o.to(q.dtype)


def window_pairs(tq: int, tk: int, window: int) -> int:
    """Visible (query, window key) pairs."""
    p = torch.arange(tq) + (tk - tq)
    return int(torch.clamp(torch.minimum(p + 1, torch.full_like(p, window)), min=0).sum())


def membank_flops(b: int, tq: int, tk: int, hq: int, d: int, window: int, slots: int) -> float:
    """Forward matmul FLOPs of the op: 4*d per (query, visible key) pair, window plus M bank slots
    per query row (the compressor, O(T * M * D) per kv head, is not counted)."""
    return 4.0 * b * hq * d * (window_pairs(tq, tk, window) + tq * slots)


# ---------------------------------------------------------------------------------------------
# the compressor (module side, plain torch: its gradient reaches the op through d bank_k/v)
# ---------------------------------------------------------------------------------------------

def compress_blocks(k: torch.Tensor, v: torch.Tensor, pool_q: torch.Tensor, window: int):
    """Attention-pool each complete chunk of W tokens into M summaries per kv head.

    k, v [B, F*W, Hk, D] (F complete chunks), pool_q [Hk, M, D] learned queries.
    -> (u_k, u_v) [B, F, Hk, M, D]: ``a = softmax_j(pool_q . k_j / sqrt(D))`` over the chunk's W
    tokens, ``u = a @ chunk``."""
    b, t, hk, d = k.shape
    f = t // window
    kc = k[:, :f * window].reshape(b, f, window, hk, d)
    vc = v[:, :f * window].reshape(b, f, window, hk, d)
    s = torch.einsum("bfwhd,hmd->bfhmw", kc, pool_q.to(k.dtype)) / math.sqrt(d)
    a = torch.softmax(s.float(), dim=-1).to(k.dtype)
    return torch.einsum("bfhmw,bfwhd->bfhmd", a, kc), torch.einsum("bfhmw,bfwhd->bfhmd", a, vc)


def bank_update(s_k, s_v, u_k, u_v, decay: torch.Tensor):
    """One step of the bank recurrence: S' = g S + (1 - g) u, g = decay [Hk, M] (in (0, 1))."""
    g = decay[..., None].to(s_k.dtype)
    return g * s_k + (1 - g) * u_k, g * s_v + (1 - g) * u_v


def bank_scan(init_k, init_v, u_k, u_v, decay, n_states: int, max_elems: int = 1 << 24):
    """States S_0 .. S_{n_states-1} [B, n_states, Hk, M, D] from S_0 = init [B, Hk, M, D] and the
    chunk summaries u [B, F, Hk, M, D] (F >= n_states - 1).

    The recurrence ``S_{c+1} = g S_c + (1 - g) u_c`` has a constant per-slot gate, so it is a
    linear filter with the closed form ``S_n = g^n S_0 + sum_{c<n} (1 - g) g^(n-1-c) u_c``: one
    batched matmul (fp32) with an [n, n-1] lower-triangular kernel per (kv head, slot) instead of
    n sequential small ops (launch-bound on a GPU). Above ``max_elems`` kernel entries it falls back
    to the sequential scan (:func:`bank_scan_loop`)."""
    n = n_states
    hk, m = decay.shape
    if n <= 1 or hk * m * n * (n - 1) > max_elems:
        return bank_scan_loop(init_k, init_v, u_k, u_v, decay, n)
    dev = u_k.device
    g = decay.float()
    logg = torch.log(g)                                                        # [Hk, M]
    e = torch.arange(n, device=dev)[:, None] - 1 - torch.arange(n - 1, device=dev)[None, :]
    kern = torch.exp(e.clamp(min=0).float() * logg[..., None, None]) * (1 - g)[..., None, None]
    kern = torch.where(e >= 0, kern, torch.zeros((), device=dev))              # [Hk, M, n, n-1]
    pw = torch.exp(torch.arange(n, device=dev).float() * logg[..., None])      # [Hk, M, n]

    def run(init, u):
        s = torch.einsum("hmnc,bchmd->bnhmd", kern, u[:, :n - 1].float())
        return (s + torch.einsum("hmn,bhmd->bnhmd", pw, init.float())).to(u.dtype)
    return run(init_k, u_k), run(init_v, u_v)


def bank_scan_loop(init_k, init_v, u_k, u_v, decay, n_states: int):
    """The same states by the sequential recurrence (one :func:`bank_update` per chunk)."""
    states = [(init_k, init_v)]
    for c in range(n_states - 1):
        states.append(bank_update(*states[-1], u_k[:, c], u_v[:, c], decay))
    return torch.stack([s[0] for s in states], 1), torch.stack([s[1] for s in states], 1)


def chunk_major(states: torch.Tensor) -> torch.Tensor:
    """[B, N, Hk, M, D] -> the op's chunk-major [B, N*M, Hk, D]."""
    b, n, hk, m, d = states.shape
    return states.permute(0, 1, 3, 2, 4).reshape(b, n * m, hk, d)
