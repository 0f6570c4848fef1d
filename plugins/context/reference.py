"""Mixture of Contexts (MoC, arXiv 2508.21058): routing and the reference attention.

Layout q [B, Tq, Hq, D], k/v [B, Tk, Hk, D], Hq % Hk == 0 (GQA: query head h reads kv head
h // (Hq // Hk)). Query row i sits at key position ``pos_i = i + (Tk - Tq)`` (bottom-right
alignment, as in ``attention.dense``).

Routing (shared by EVERY backend, so that they select exactly the same keys):

* chunks: fixed ``chunk_size`` or given start offsets ``boundaries`` (0 implied, offsets >= Tk
  dropped); chunk c covers keys [s_c, s_{c+1}) with s_C = Tk.
* descriptor of chunk c, per kv head: the mean of its keys (fp32, fp64 for fp64 inputs).
* score of chunk c for query row i, head h: ``q_i . desc_c`` (fp32; no scale: it does not change
  the order).
* candidates: causal -> chunks entirely before the query's own chunk; non-causal -> every chunk
  but the own one. Future chunks are removed BEFORE the top-k.
* top-k over candidates. Tie-breaking (ours): higher score first, lower chunk index on equal
  scores (a stable descending sort).
* training options (seeded, CPU generator, so every backend draws the same numbers): drop-off
  removes each selected past chunk with probability ``drop_off``; drop-in adds each unselected
  candidate with probability ``drop_in``.
* the own chunk (the one holding ``pos_i``) is always selected (causal mask inside it), and the
  first ``prefix`` keys are always visible (causal too). One softmax over the union.

Routing is discrete and computed without gradients; gradients flow through the attention over
the selected keys only. A row that sees no key (``pos_i < 0``) returns 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention.reference import check_shapes, expand_kv


def chunk_bounds(tk: int, chunk_size: int = 64, boundaries=None) -> list[int]:
    """Chunk boundaries ``[s_0=0, s_1, ..., s_C=Tk]`` (C >= 1 when Tk >= 1)."""
    if tk <= 0:
        return [0]
    if boundaries is None:
        starts = list(range(0, tk, int(chunk_size)))
    else:
        starts = sorted({0, *(int(b) for b in boundaries if 0 <= int(b) < tk)})
    return starts + [tk]


@dataclass
class MoCRouting:
    """What the router chose.

    bounds: LongTensor [C + 1] chunk boundaries. own: LongTensor [Tq], the own chunk of each
    query row (-1: the row sees no key). sel: bool [B, Hq, Tq, C], selected chunks INCLUDING the
    own chunk. lim: LongTensor [Tq], exclusive key limit of each row (``pos_i + 1`` causal,
    ``Tk`` otherwise, clamped to [0, Tk]). prefix: the always-visible leading keys.
    """

    bounds: torch.Tensor
    own: torch.Tensor
    sel: torch.Tensor
    lim: torch.Tensor
    prefix: int
    causal: bool

    @property
    def n_chunks(self) -> int:
        return self.bounds.numel() - 1

    def visible_per_row(self) -> torch.Tensor:
        """[B, Hq, Tq] number of keys each (row, head) attends to (the union, counted once)."""
        s, e = self.bounds[:-1], self.bounds[1:]
        lo = torch.clamp(s, min=self.prefix)                      # prefix keys counted separately
        hi = torch.minimum(e[None, :], self.lim[:, None])          # [Tq, C]
        lenv = torch.clamp(hi - lo[None, :], min=0)
        n = (self.sel.long() * lenv).sum(-1)
        return n + torch.clamp(self.lim, max=self.prefix)

    def pairs(self) -> int:
        """Visible (query, key) pairs summed over batch and query heads."""
        return int(self.visible_per_row().sum())

    def dense_pairs(self) -> int:
        b, h = self.sel.shape[:2]
        return int(self.lim.sum()) * b * h

    def density(self) -> float:
        """Visible pairs / pairs dense attention (same causality) would see."""
        d = self.dense_pairs()
        return self.pairs() / d if d else 0.0

    def key_mask(self) -> torch.Tensor:
        """bool [B, Hq, Tq, Tk], True where attention is allowed (O(T^2): for tests/reference)."""
        tk = int(self.bounds[-1])
        dev = self.sel.device
        j = torch.arange(tk, device=dev)
        chunk_of = torch.bucketize(j, self.bounds[1:].to(dev), right=True)  # [Tk]
        m = self.sel[..., chunk_of]                                         # [B, Hq, Tq, Tk]
        m = m | (j < self.prefix)[None, None, None, :]
        return m & (j[None, :] < self.lim.to(dev)[:, None])[None, None]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def chunk_descriptors(k: torch.Tensor, bounds: torch.Tensor, lens: list[int] | None = None) -> torch.Tensor:
    """Mean key of each chunk: [B, C, Hk, D] in fp32 (fp64 for fp64 inputs).

    Deterministic on every device (no atomics: the routing is a discrete function of these
    means, so a run-to-run wobble in the last bit would flip near-tied choices): equal chunks
    are one reshape + sum, other boundaries one ``segment_reduce``. ``lens``: the chunk lengths
    as a host list when the caller has them (the GPU router): then the equal-chunk test and the
    divisors need nothing from the device, so no host sync (same values: lengths are exact in
    the float types)."""
    acc = _acc_dtype(k.dtype)
    k = k.detach()
    b = k.shape[0]
    if lens is None:
        lens = (bounds[1:] - bounds[:-1]).tolist()
    c = len(lens)
    size = lens[0] if c else 0
    if c and all(n == size for n in lens[:-1]) and lens[-1] <= size:
        full = c - 1 if lens[-1] < size else c
        # sums accumulated in ``acc`` straight from k (no upcast copy of k)
        parts = [k[:, :full * size].reshape(b, full, size, *k.shape[2:]).sum(2, dtype=acc)]
        if full < c:
            parts.append(k[:, full * size:].sum(1, keepdim=True, dtype=acc))
        sums = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        # the divisors as a device tensor made by fills (no host-to-device copy)
        lens_t = torch.full((c,), size, dtype=acc, device=k.device)
        if full < c:
            lens_t[-1] = lens[-1]
    else:
        lens_t = (bounds[1:] - bounds[:-1]).to(k.device)
        sums = torch.segment_reduce(k.to(acc), "sum", lengths=lens_t.expand(b, c).contiguous(), axis=1)
    return sums / lens_t.to(acc)[None, :, None, None]


@torch.no_grad()
def routing_geometry(tq: int, tk: int, causal: bool, chunk_size: int, boundaries, device):
    """Chunk bounds and per-row facts that do not depend on the data: ``bounds`` [C + 1],
    ``lim`` [Tq] (exclusive key limit) and ``own`` [Tq] (own chunk, -1 for a row without keys)."""
    if boundaries is not None and hasattr(boundaries, "tolist"):
        boundaries = boundaries.tolist()
    bounds = torch.tensor(chunk_bounds(tk, chunk_size, boundaries), dtype=torch.long, device=device)
    pos = torch.arange(tq, device=device) + (tk - tq)
    if causal:
        lim = torch.clamp(pos + 1, 0, tk)
    else:
        lim = torch.full((tq,), tk, dtype=torch.long, device=device)
    inside = (pos >= 0) & (pos < tk)
    own = torch.where(inside, torch.bucketize(pos.clamp(0, max(tk - 1, 0)), bounds[1:], right=True),
                      torch.full_like(pos, -1))
    if causal:
        own = torch.where(lim > 0, own, torch.full_like(own, -1))
    return bounds, lim, own


@torch.no_grad()
def chunk_scores(q: torch.Tensor, k: torch.Tensor, bounds: torch.Tensor, lens: list[int] | None = None) -> torch.Tensor:
    """Router scores ``q_i . desc_c`` per head: fp32 (fp64 for fp64 inputs) [B, Hq, Tq, C]
    (``lens``: as :func:`chunk_descriptors`)."""
    desc = chunk_descriptors(k, bounds, lens)                             # [B, C, Hk, D]
    b, tq, hq, d = q.shape
    c, hk = desc.shape[1], desc.shape[2]
    g = hq // hk
    # one copy of q, upcast and laid out [B, Hk, G, Tq, D] (query head h = hk * G + g shares kv
    # head hk), then one matmul per (batch, kv head) straight into [B, Hq, Tq, C]
    qh = torch.empty((b, hk, g, tq, d), dtype=desc.dtype, device=q.device)
    qh.copy_(q.detach().unflatten(2, (hk, g)).permute(0, 2, 3, 1, 4))
    return torch.matmul(qh.view(b, hk, g * tq, d), desc.permute(0, 2, 3, 1)).view(b, hq, tq, c)


@torch.no_grad()
def moc_routing(q: torch.Tensor, k: torch.Tensor, causal: bool = True, chunk_size: int = 64,
                top_k: int = 4, prefix: int = 0, boundaries=None, drop_off: float = 0.0,
                drop_in: float = 0.0, seed: int = 0, **_ignored) -> MoCRouting:
    """Route every (query row, head) to its chunks. Deterministic; see the module docstring."""
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    dev = q.device
    bounds, lim, own = routing_geometry(tq, tk, causal, chunk_size, boundaries, dev)
    c = bounds.numel() - 1
    if c == 0 or tq == 0:
        sel = torch.zeros((b, hq, tq, max(c, 0)), dtype=torch.bool, device=dev)
        return MoCRouting(bounds, own, sel, lim, int(prefix), bool(causal))
    ci = torch.arange(c, device=dev)
    if causal:
        # chunks entirely before the own chunk; a row before every key (pos < 0) has none
        cand = (ci[None, :] < own[:, None]) & (lim[:, None] > 0)
    else:
        cand = ci[None, :] != own[:, None]
    scores = chunk_scores(q, k, bounds)                                  # [B, Hq, Tq, C]
    scores.masked_fill_(~cand, float("-inf"))
    kk = min(int(top_k), c)
    if kk > 0:
        # tie-breaking: higher score first, lower chunk index on ties. The k-th largest score tau
        # (torch.topk; its own order among ties does not matter) splits the row: every score
        # > tau is kept, and the lowest-index scores == tau fill the remaining places. Same
        # result as a stable descending sort, at the cost of a top-k.
        tau = torch.topk(scores, kk, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        gt = scores > tau
        eq = scores == tau
        room = kk - gt.sum(-1, keepdim=True)
        sel = gt | (eq & (torch.cumsum(eq, -1) <= room))
        sel &= cand                       # fewer than top_k candidates: -inf entries were taken
    else:
        sel = torch.zeros(scores.shape, dtype=torch.bool, device=dev)
    if drop_off > 0 or drop_in > 0:
        gen = torch.Generator().manual_seed(int(seed))
        u_off = torch.rand(sel.shape, generator=gen).to(dev)
        u_in = torch.rand(sel.shape, generator=gen).to(dev)
        if drop_off > 0:
            sel &= u_off >= drop_off
        if drop_in > 0:
            sel |= cand & (u_in < drop_in)
    own_1h = (ci[None, :] == own[:, None]) & (own >= 0)[:, None]        # [Tq, C]
    sel |= own_1h
    return MoCRouting(bounds, own, sel, lim, int(prefix), bool(causal))


def moc_reference(q, k, v, causal: bool = True, chunk_size: int = 64, top_k: int = 4, prefix: int = 0,
                  boundaries=None, drop_off: float = 0.0, drop_in: float = 0.0, seed: int = 0,
                  scale: float | None = None, routing: MoCRouting | None = None) -> torch.Tensor:
    """Dense fp32 scores with the routing mask (the oracle); differentiable in q, k, v."""
    check_shapes(q, k, v)
    if routing is None:
        routing = moc_routing(q, k, causal, chunk_size, top_k, prefix, boundaries, drop_off, drop_in, seed)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), expand_kv(k, q.shape[2]).to(acc), expand_kv(v, q.shape[2]).to(acc)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    allowed = routing.key_mask()
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    o = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    return o.to(q.dtype)


def expected_pairs(tq: int, tk: int, causal: bool, chunk_size: int, top_k: int, prefix: int,
                   boundaries=None, drop_off: float = 0.0, drop_in: float = 0.0) -> float:
    """Expected visible (query, key) pairs per (batch, head) WITHOUT the tensors: every query is
    assumed to pick ``min(top_k, #candidates)`` of its candidate chunks uniformly (so a chunk's
    expected share is the average candidate length), then drop-off / drop-in in expectation.
    Exact counts come from :meth:`MoCRouting.pairs` on real inputs."""
    bounds = torch.tensor(chunk_bounds(tk, chunk_size, boundaries), dtype=torch.float64)
    if tq == 0 or tk == 0:
        return 0.0
    s, e = bounds[:-1], bounds[1:]
    pos = torch.arange(tq, dtype=torch.float64) + (tk - tq)
    lim = torch.clamp(pos + 1, 0, tk) if causal else torch.full((tq,), float(tk), dtype=torch.float64)
    own = torch.bucketize(pos.clamp(0, tk - 1), e, right=True)
    has = (pos >= 0) & (pos < tk) & (lim > 0)
    lo = torch.clamp(s, min=prefix)
    lenc = torch.clamp(e - lo, min=0)                                  # [C] lengths outside prefix
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(lenc, 0)])
    own_i = own.long()
    if causal:
        ncand = own.to(torch.float64)
        cand_len = csum[own_i]
    else:
        ncand = torch.full_like(pos, float(lenc.numel() - 1))
        cand_len = csum[-1] - lenc[own_i]
    ncand = torch.where(has, ncand, torch.zeros_like(ncand))
    cand_len = torch.where(has, cand_len, torch.zeros_like(cand_len))
    kk = torch.clamp(ncand, max=float(top_k))
    frac = torch.where(ncand > 0, kk / ncand.clamp(min=1), torch.zeros_like(ncand))
    frac = frac * (1 - drop_off) + (1 - frac) * drop_in
    past = frac * cand_len
    own_len = torch.clamp(torch.minimum(e[own_i], lim) - lo[own_i], min=0)
    own_len = torch.where(has, own_len, torch.zeros_like(own_len))
    return float((past + own_len + torch.clamp(lim, max=float(prefix))).sum())


def moc_flops(b: int, tq: int, tk: int, hq: int, hk: int, d: int, causal: bool, chunk_size: int, top_k: int,
              prefix: int = 0, boundaries=None, drop_off: float = 0.0, drop_in: float = 0.0) -> float:
    """Forward FLOPs: 4*d per visible (query, key) pair (QK^T and PV, expected count), plus the
    router: chunk means (Tk*Hk*D adds) and scores (2*Tq*Hq*C*D)."""
    pairs = expected_pairs(tq, tk, causal, chunk_size, top_k, prefix, boundaries, drop_off, drop_in)
    n_chunks = len(chunk_bounds(tk, chunk_size, boundaries)) - 1
    route = b * (tk * hk * d + 2.0 * tq * hq * n_chunks * d)
    return 4.0 * b * hq * d * pairs + route
