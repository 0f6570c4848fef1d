"""Exact fast selection for the KV-cache policies (torch ops only; used by the triton and numba
backends of ``plugins/token``): the same kept set as ``plugins.token.reference.select`` without
a full stable sort.

The fp32 score (protected tokens set to +inf, -0.0 normalised to +0.0) is mapped to its
order-preserving int32 bit pattern in the high word of an int64 and ``2^31 - 1 - position`` in
the low word, so the keys are unique and "largest key first" is "highest score first, ties to
the older token" (by position, so it holds for a cache not kept in time order): ``torch.topk`` over them returns exactly the stable sort's prefix. When at most
:data:`FEW_EVICTIONS` tokens leave (a decoding step evicts one), it takes the bottom ``T - keep``
keys and builds the kept index range around them (no boolean indexing, no host sync).
"""

from __future__ import annotations

import torch

__all__ = ["select_topk", "drop_few", "FEW_EVICTIONS"]

#: up to this many evicted tokens per (batch, kv head), select_topk skips them in a kept range
FEW_EVICTIONS = 8


def _sortable_keys(scores: torch.Tensor, prot: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ordering like (score descending, position ascending) when sorted
    descending (positions are unique per row and < 2^31)."""
    s = scores.float().masked_fill(prot, float("inf")) + 0.0  # -0.0 -> +0.0 (equal in the sort)
    bits = s.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float value
    low = 0x7FFFFFFF - positions.to(torch.int64)
    return ordered * (1 << 32) + low


def _checked_keys(scores, positions, seen, keep, sinks, recent) -> torch.Tensor:
    from ..plugins.token.reference import checked_protected
    prot = checked_protected(positions, seen, keep, sinks, recent)
    if scores.isnan().any():
        raise ValueError("select_topk: NaN scores")
    return _sortable_keys(scores, prot, positions)


def drop_few(scores: torch.Tensor, positions: torch.Tensor, seen: int, keep: int, sinks: int,
             recent: int) -> torch.Tensor:
    """The complement of ``select_topk``: indices [B, Hk, T - keep] (ascending) of the tokens
    that leave, by a top-k of the lowest keys (the decoding step's path: one token leaves)."""
    keys = _checked_keys(scores, positions, seen, keep, sinks, recent)
    drop = torch.topk(keys, scores.shape[-1] - keep, dim=-1, largest=False, sorted=False).indices
    return torch.sort(drop, dim=-1).values


def select_topk(scores: torch.Tensor, positions: torch.Tensor, seen: int, keep: int, sinks: int,
                recent: int) -> torch.Tensor:
    """Same contract and same result as ``plugins.token.reference.select`` (kept indices
    [B, Hk, keep], ascending), by ``torch.topk`` over unique keys instead of a stable sort."""
    t = scores.shape[-1]
    keys = _checked_keys(scores, positions, seen, keep, sinks, recent)
    n_drop = t - keep
    if n_drop == 0:
        return torch.arange(t, device=scores.device).expand(*scores.shape[:-1], t).contiguous()
    if n_drop <= FEW_EVICTIONS:  # the usual decoding step: one or a few tokens leave
        drop = torch.topk(keys, n_drop, dim=-1, largest=False, sorted=False).indices
        drop = torch.sort(drop, dim=-1).values
        idx = torch.arange(keep, device=scores.device).expand(*scores.shape[:-1], keep)
        for i in range(n_drop):  # skip each dropped index, in ascending order (no host sync)
            idx = idx + (idx >= drop[..., i:i + 1]).to(idx.dtype)
        return idx
    idx = torch.topk(keys, keep, dim=-1, largest=True, sorted=False).indices
    return torch.sort(idx, dim=-1).values
