"""KV-cache policies: the scorers (one per policy) and the shared selector and compaction.

Scorer ops (the registered functional ops, checked by the conformance matrix) take
``q [B, Tq, H, D]`` (the queries that look at the cache) and ``k, v [B, Tk, Hk, D]`` and return a
score per cached token and kv head, ``[B, Hk, Tk]`` (higher = keep). Causality is bottom-right
aligned as in ``attention.dense`` (query i sees key j iff j <= i + Tk - Tq).

The selector (:func:`select`) is shared: it keeps the top-scoring tokens per (batch, kv head)
under the budget, always keeping the protected tokens (the first ``sinks`` positions and the
``recent`` most recent ones), and returns the kept indices in time order; :func:`compact`
gathers any per-token tensors along the token axis with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention.reference import causal_mask, check_shapes


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = True,
                      scale: float | None = None) -> torch.Tensor:
    """Softmax attention probabilities [B, Hq, Tq, Tk] in fp32 (fp64 for fp64) from q [B, Tq, Hq, D]
    and k [B, Tk, Hk, D] (GQA: query head h reads kv head h // (Hq // Hk))."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[2] // k.shape[2]
    kf = k.to(acc) if group == 1 else k.to(acc).repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), kf) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def per_kv_head(p: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[B, Hq, Tq, Tk] attention -> [B, Hk, Tk]: summed over the queries and the query heads of
    each kv group."""
    b, hq, _, tk = p.shape
    return p.sum(2).view(b, n_kv_heads, hq // n_kv_heads, tk).sum(2)


# ---------------------------------------------------------------------------------------------
# scorers (functional ops)
def streaming_scores(q, k, v, positions: torch.Tensor | None = None, **_policy) -> torch.Tensor:
    """StreamingLLM: newer is better (score = absolute position); the sinks are protected by the
    selector. ``positions`` [B, Hk, Tk] (default 0..Tk-1)."""
    check_shapes(q, k, v)
    b, tk, hk, _ = k.shape
    if positions is None:
        positions = torch.arange(tk, device=k.device).expand(b, hk, tk)
    return positions.to(q.dtype)


def h2o_scores(q, k, v, **_policy) -> torch.Tensor:
    """H2O: attention each cached token received from the queries (summed over queries and the
    query heads of its kv group). The cache accumulates these over decoding steps."""
    check_shapes(q, k, v)
    return per_kv_head(attention_weights(q, k), k.shape[2]).to(q.dtype)


def snapkv_scores(q, k, v, window: int = 8, pool: int = 5, **_policy) -> torch.Tensor:
    """SnapKV: attention from the last ``window`` queries (the observation window), summed over
    them, max-pooled along the keys per query head (kernel ``pool``) so that neighbours of a
    strong token are kept with it, then summed over the query heads of each kv group."""
    check_shapes(q, k, v)
    w = min(window, q.shape[1])
    s = attention_weights(q[:, -w:], k).sum(2)  # [B, Hq, Tk]
    if pool > 1:  # per query head (as in SnapKV), then summed over the kv group
        s = F.max_pool1d(s, kernel_size=pool, stride=1, padding=pool // 2)
    b, hq, tk = s.shape
    hk = k.shape[2]
    return s.view(b, hk, hq // hk, tk).sum(2).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# shared selector and compaction
def protected_mask(positions: torch.Tensor, seen: int, sinks: int, recent: int) -> torch.Tensor:
    """bool like ``positions``: the first ``sinks`` positions and the last ``recent`` of ``seen``."""
    return (positions < sinks) | (positions >= seen - recent)


def checked_protected(positions: torch.Tensor, seen: int, keep: int, sinks: int, recent: int) -> torch.Tensor:
    """The protected mask, after checking that ``keep`` fits in the cache and holds every
    protected token (raises with the numbers otherwise). Shared by every selector."""
    t = positions.shape[-1]
    if keep > t:
        raise ValueError(f"keep={keep} exceeds the {t} cached tokens")
    prot = protected_mask(positions, seen, sinks, recent)
    n_prot = int(prot.sum(-1).max()) if t else 0
    if keep < n_prot:
        raise ValueError(f"keep={keep} is smaller than the {n_prot} protected tokens (sinks={sinks}, "
                         f"recent={recent})")
    return prot


def select(scores: torch.Tensor, positions: torch.Tensor, seen: int, keep: int, sinks: int,
           recent: int) -> torch.Tensor:
    """Indices [B, Hk, keep] (ascending, i.e. time order) of the tokens to keep.

    scores, positions: [B, Hk, T] (T = tokens now cached). Protected tokens are kept first
    (``keep`` must be at least their count), the rest of the budget goes to the highest scores
    (ties: the older token, by position). Raises if the budget cannot hold the protected tokens."""
    prot = checked_protected(positions, seen, keep, sinks, recent)
    s = scores.float().masked_fill(prot, float("inf"))
    # ties: the older token (lower position) first. Visit the tokens in position order, then a
    # stable sort by score (a cache kept in time order makes by_pos the identity; the kernel
    # backends' in-place eviction does not keep time order, core/cache.py)
    by_pos = torch.sort(positions, dim=-1, stable=True).indices
    order = torch.sort(s.gather(-1, by_pos), dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(by_pos.gather(-1, order), dim=-1).values


def compact(idx: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather each [B, Hk, T, ...] tensor along T with ``idx`` [B, Hk, keep]."""
    out = []
    for x in tensors:
        ix = idx.view(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
        out.append(torch.gather(x, 2, ix))
    return tuple(out)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of new queries q [B, Tq, Hq, D] over the kept cache k, v [B, Hk, T, D]
    (the new tokens are its last Tq entries; bottom-right causal). Returns the output
    [B, Tq, Hq, D] and the probabilities [B, Hq, Tq, T] (fp32), which H2O accumulates."""
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    p = attention_weights(q, kt, causal=True, scale=scale)
    group = q.shape[2] // k.shape[1]
    vf = vt.to(p.dtype) if group == 1 else vt.to(p.dtype).repeat_interleave(group, dim=2)
    o = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    return o.to(q.dtype), p


# ---------------------------------------------------------------------------------------------
# token.evict: a learned retention gate (beta in (0, 1) per token), score = age * log(beta)
def key_pair_norms(k: torch.Tensor) -> torch.Tensor:
    """[..., D] rotated keys -> [..., D - D // 2]: the norm of every RoPE pair
    (k[..., i], k[..., i + D // 2]) and |k| of an odd tail channel. RoPE rotates each pair, so
    these features do not depend on the position the key was written at."""
    half = k.shape[-1] // 2
    pairs = torch.sqrt(k[..., :half] ** 2 + k[..., half:2 * half] ** 2 + 1e-12)
    return torch.cat([pairs, k[..., 2 * half:].abs()], dim=-1)


def gate_features(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Gate input per token and kv head: [value, key pair norms], [..., D + D - D // 2]."""
    return torch.cat([v, key_pair_norms(k)], dim=-1)


def gate_feature_dim(head_dim: int) -> int:
    return head_dim + head_dim - head_dim // 2


def evict_logbeta(k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor) -> torch.Tensor:
    """log(beta) [B, Hk, Tk] of the retention gate of one layer: a per-kv-head MLP
    ``beta = sigmoid(w2 . gelu(W1 f + b1) + b2)`` on the features ``f`` of k, v [B, Tk, Hk, D].
    w1 [Hk, F, E], b1 [Hk, E], w2 [Hk, E], b2 [Hk]; computed in fp32 (fp64 for fp64)."""
    acc = torch.promote_types(k.dtype, torch.float32)
    f = gate_features(k.to(acc), v.to(acc))
    if w1.shape[:2] != (k.shape[2], f.shape[-1]):
        raise ValueError(f"gate w1 {tuple(w1.shape)} does not fit {k.shape[2]} kv heads x {f.shape[-1]} "
                         f"features (head dim {k.shape[-1]})")
    h = F.gelu(torch.einsum("bthf,hfe->bthe", f, w1.to(acc)) + b1.to(acc))
    logit = torch.einsum("bthe,he->bth", h, w2.to(acc)) + b2.to(acc)
    return F.logsigmoid(logit).transpose(1, 2)


def evict_scores(q, k, v, w1, b1, w2, b2, positions: torch.Tensor | None = None, now: int | None = None,
                 **_policy) -> torch.Tensor:
    """token.evict: ``score = age * log(beta)`` (the log of beta^age, TRIM-KV's decayed retention),
    age = ``now - position`` (default: positions 0..Tk-1 and now = the newest position). Higher =
    keep. Differentiable in k, v and the gate weights (q only fixes the layout)."""
    check_shapes(q, k, v)
    b, tk, hk, _ = k.shape
    if positions is None:
        positions = torch.arange(tk, device=k.device).expand(b, hk, tk)
    now = int(positions.max()) if now is None and positions.numel() else (now or 0)
    lb = evict_logbeta(k, v, w1, b1, w2, b2)
    return ((now - positions).to(lb.dtype) * lb).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# token.mixeddim: each kept token keeps a number of K/V dimensions (0 = evicted)
def mixeddim_scores(q, k, v, **_policy) -> torch.Tensor:
    """token.mixeddim's token importance: the attention each cached token receives (as H2O; the
    cache accumulates it over decoding steps). The dims allocation is :func:`allocate_dims`."""
    return h2o_scores(q, k, v)


def channel_ranks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, kv head) rank of every key and value channel, [B, Hk, D] each (0 = kept
    first). Keys: ThinK-style importance ``||q_c|| * ||k_c||`` over the prompt (query heads of the
    group summed), averaged over each RoPE pair so the two channels of a pair stay adjacent in
    the order; values: ``||v_c||``. q [B, Tq, H, D], k, v [B, Tk, Hk, D]."""
    acc = torch.promote_types(k.dtype, torch.float32)
    b, _, hq, d = q.shape
    hk = k.shape[2]
    qn = (q.to(acc) ** 2).sum(1).view(b, hk, hq // hk, d).sum(2).sqrt()      # [B, Hk, D]
    kn = (k.to(acc) ** 2).sum(1).sqrt()
    imp = qn * kn
    half = d // 2
    if half:
        pair = 0.5 * (imp[..., :half] + imp[..., half:2 * half])
        imp = torch.cat([pair, pair, imp[..., 2 * half:]], -1)
    # base order [0, half, 1, half + 1, ..., tail]: partners adjacent, kept so by the stable sort
    base = torch.tensor([c for i in range(half) for c in (i, i + half)] + list(range(2 * half, d)),
                        device=k.device)
    order = base[torch.sort(imp[..., base], dim=-1, descending=True, stable=True).indices]
    vorder = torch.sort((v.to(acc) ** 2).sum(1), dim=-1, descending=True, stable=True).indices

    def ranks(o):
        r = torch.empty_like(o)
        r.scatter_(-1, o, torch.arange(d, device=o.device).expand_as(o))
        return r
    return ranks(order), ranks(vorder)


def dims_mask(dims: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """bool [B, Hk, T, D]: channel c of token j is kept iff rank[c] < dims[j]."""
    return rank[:, :, None, :] < dims[..., None]


def _greedy(gain: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """gain [R, T, D] (non-increasing along D, -inf where not allowed); n [R] elements to give.
    Takes the n largest gains per row (ties: the lower token, then the lower rank) and returns
    how many each token got [R, T] (a prefix of its ranks, as the gains do not increase)."""
    r, t, d = gain.shape
    order = torch.sort(gain.reshape(r, t * d), dim=-1, descending=True, stable=True).indices
    take = torch.arange(t * d, device=gain.device)[None, :] < n[:, None]
    chosen = torch.zeros(r, t * d, dtype=torch.bool, device=gain.device)
    chosen.scatter_(1, order, take)
    return chosen.view(r, t, d).sum(-1)


def allocate_dims(scores: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caps: torch.Tensor,
                  protected: torch.Tensor, k_rank: torch.Tensor, v_rank: torch.Tensor,
                  budget: int, step: int = 1) -> torch.Tensor:
    """Kept dims per token [B, Hk, T] (long) with exactly ``budget`` K/V elements per (batch, kv
    head) row, every row keeping the same number of tokens (the cache stays rectangular).

    scores [B, Hk, T] token importance (>= 0); k, v [B, Hk, T, D] the cached (already reduced)
    entries; caps [B, Hk, T] dims each token holds now (a token never regains dropped dims);
    protected [B, Hk, T] bool (kept whole; their caps must be D). The loss of keeping d of a
    token's dims is ``score * (dropped share of ||k||^2 + dropped share of ||v||^2) / 2``
    (channels in rank order); the allocation minimises the summed loss greedily (largest
    marginal gain first). Stage 1 lets it drop tokens entirely; stage 2 gives every row the
    largest stage-1 token count n, keeping each row's n best tokens with at least one dim.
    ``step``: dims move in groups of ``step`` channels (``D / step`` levels; ``D``, ``budget`` and
    ``caps`` multiples of it); 1 = per channel. Requires ``budget < caps.sum(-1)``."""
    b, hk, t, d = k.shape
    if step < 1 or d % step or budget % step:
        raise ValueError(f"step={step} must divide the head dim ({d}) and the budget ({budget})")
    acc = torch.promote_types(k.dtype, torch.float32)
    kk = torch.gather(k.to(acc) ** 2, -1, torch.argsort(k_rank, -1)[:, :, None, :].expand(b, hk, t, d))
    vv = torch.gather(v.to(acc) ** 2, -1, torch.argsort(v_rank, -1)[:, :, None, :].expand(b, hk, t, d))
    ke, ve = group_energy(kk, step), group_energy(vv, step)
    return allocate_units(scores, ke, ve, caps // step, protected, budget // step, unit=step) * step


def running_min(x: torch.Tensor) -> torch.Tensor:
    """``torch.cummin(x, -1).values`` by log2(n) elementwise minima over shifted copies (a
    Hillis-Steele scan: min is exact, so the values are the same bit for bit). On CUDA, torch's
    scan kernel for a short last dim is slow: 11 ms for [1M, 4] on an H100, most of a
    token.mixeddim rewrite (docs/performance.md)."""
    n = x.shape[-1]
    s = 1
    while s < n:
        x = torch.cat([x[..., :s], torch.minimum(x[..., s:], x[..., :-s])], -1)
        s *= 2
    return x


def group_energy(sq: torch.Tensor, step: int) -> torch.Tensor:
    """[..., D] squared channels in rank order -> [..., D / step]: the energy of each group of
    ``step`` consecutive ranks (the packed layout computes the same from its pools)."""
    return sq.view(*sq.shape[:-1], sq.shape[-1] // step, step).sum(-1)


def _last_sum(e: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, left to right (a fixed order: every caller gets the same bits)."""
    out = e[..., 0]
    for j in range(1, e.shape[-1]):
        out = out + e[..., j]
    return out


def unit_profile(ke: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
    """[..., L] group energies of each token (zero beyond its width) -> its unit profile [..., L]:
    the running minimum along the ranks of ``(ke / sum ke + ve / sum ve) / 2``, the share of the
    token's K and V energy each unit holds. A unit's gain is ``score * profile`` (``score >= 0``;
    rounding is monotone, so this equals the running minimum of ``score * share`` bit for bit), so
    a token's gains never increase along its ranks. Element-wise in the token: the whole-cache
    allocator and the incremental step compute the same bits for the same token."""
    share = 0.5 * (ke / _last_sum(ke).clamp_min(1e-30)[..., None] + ve / _last_sum(ve).clamp_min(1e-30)[..., None])
    return running_min(share)


def allocate_units(scores: torch.Tensor, ke: torch.Tensor, ve: torch.Tensor, caps: torch.Tensor,
                   protected: torch.Tensor, budget: int, unit: int = 1) -> torch.Tensor:
    """:func:`allocate_dims` on group energies: ke, ve [B, Hk, T, L] (energy of each group of
    ``unit`` channels, in rank order), caps [B, Hk, T] and ``budget`` in groups; returns the kept
    groups per token [B, Hk, T]. ``unit`` only scales the numbers in error messages."""
    b, hk, t, d = ke.shape
    acc = ke.dtype
    gain = scores.to(acc).clamp_min(0)[..., None] * unit_profile(ke, ve)  # non-increasing along the ranks
    ranks = torch.arange(d, device=ke.device)
    allowed = (ranks < caps[..., None]) & ~protected[..., None]
    gain = gain.masked_fill(~allowed, float("-inf")).view(b * hk, t, d)
    n_prot = protected.sum(-1).view(-1)
    rest = budget - n_prot * d
    if bool((rest < 0).any()):
        raise ValueError(f"budget of {budget * unit} elements is smaller than the protected tokens' "
                         f"{int(n_prot.max()) * d * unit}")
    if bool((caps.masked_fill(protected, 0).sum(-1).view(-1) < rest).any()):
        raise ValueError("allocate_dims: the cache holds fewer elements than the budget")
    got = _greedy(gain, rest)                                          # stage 1 [R, T]
    live = got > 0
    n_live = int(live.sum(-1).max())
    # stage 2: each row keeps its n_live best tokens (live ones first, then by score) with >= 1 dim
    pri = torch.where(live, 1.0, 0.0) * 4 + scores.view(b * hk, t).to(acc).clamp_min(0) / \
        scores.view(b * hk, t).to(acc).clamp_min(0).amax(-1, keepdim=True).clamp_min(1e-30)
    pri = pri.masked_fill(protected.view(b * hk, t), float("-inf"))
    pick = torch.zeros_like(live)
    pick.scatter_(1, torch.sort(pri, dim=-1, descending=True, stable=True).indices[:, :n_live], True)
    g2 = gain.clone()
    g2[..., 0] = torch.where(pick, torch.full_like(g2[..., 0], float("inf")), g2[..., 0])
    g2 = g2.masked_fill(~pick[..., None], float("-inf"))
    got = _greedy(g2, rest)
    dims = torch.where(protected.view(b * hk, t), torch.full_like(got, d), got)
    return dims.view(b, hk, t)


_I64_MAX = torch.iinfo(torch.int64).max


def _order_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 values >= 0 (or NaN-free, any sign) -> int64 whose order is the values' order (-0.0 and
    +0.0 tie, as they do in a sort)."""
    bits = (x.float() + 0.0).view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)


def _k_smallest(key: torch.Tensor, n: torch.Tensor, k_max: int) -> torch.Tensor:
    """bool like key [R, M]: the n[r] smallest keys of each row (keys unique where chosen;
    _I64_MAX = never), through a top-k of the host bound ``k_max >= n``."""
    out = torch.zeros_like(key, dtype=torch.bool)
    k_max = min(k_max, key.shape[-1])
    if k_max <= 0:
        return out
    idx = torch.topk(key, k_max, dim=-1, largest=False, sorted=True).indices
    take = torch.arange(k_max, device=key.device)[None, :] < n[:, None]
    take &= torch.gather(key, -1, idx) != _I64_MAX
    return out.scatter_(-1, idx, take)


def allocate_step(scores: torch.Tensor, profile: torch.Tensor, units: torch.Tensor, positions: torch.Tensor,
                  protected: torch.Tensor, rest: torch.Tensor, k_max: int) -> torch.Tensor:
    """:func:`allocate_units` on a cache whose tokens already hold their widths (``caps`` = the
    units they hold), by selection instead of sorting the whole cache: the kept units per slot
    [R, S], equal to :func:`allocate_units`' for the same tokens, bit for bit.

    Slots, in any order: scores [R, S] (>= 0 after the clamp), profile [R, S, L]
    (:func:`unit_profile` of each token's energies at its current width), units [R, S] (0 = an
    empty slot), positions [R, S] (unique per row among the held slots; the ties of the
    whole-cache sort go by time order, which is position order; ``positions * L < 2**32``),
    protected [R, S] (held whole). rest [R]: the units the unprotected tokens may keep;
    ``k_max`` (a host int) >= every row's ``held - rest`` (the units to drop): the work is top-k
    selections of ``k_max``, so no device -> host copy.

    Why it is the same: with caps = widths, stage 1 of :func:`allocate_units` keeps the ``rest``
    largest held units, i.e. drops the ``held - rest`` smallest in the order (gain ascending, then
    flat index (time, rank) descending), and each dropped unit is its token's last (gains do not
    increase along ranks; ties keep the lower rank). Stage 2 gives every row ``n`` = the largest
    stage-1 count of live tokens: a row with ``n - live`` fewer revives that many of its tokens
    emptied in stage 1 (the best ``score / row max``, ties the earlier one) at one unit and, to
    pay for them, drops the same number of its lowest remaining units of rank >= 1 (the greedy
    over the forced unit 0s keeps the top ``rest - n`` other units, a prefix of stage 1's)."""
    r, s_, L = profile.shape
    dev = units.device
    acc = profile.dtype
    valid = units > 0
    free = valid & ~protected
    sc = scores.to(acc).clamp_min(0)
    ranks = torch.arange(L, device=dev)
    held = free[..., None] & (ranks < units[..., None])                        # [R, S, L]
    flat = positions[..., None] * L + ranks                                    # time, rank
    tie = (2**32 - 1) - flat                                                   # later first
    key = (_order_bits(sc[..., None] * profile) << 32) | tie
    key = key.masked_fill(~held, _I64_MAX).view(r, s_ * L)
    drop = held.view(r, -1).sum(-1) - rest                                     # [R]
    d1 = _k_smallest(key, drop, k_max).view(r, s_, L)
    after = units - d1.sum(-1) * free                                          # stage 1's widths
    live = free & (after > 0)
    n_live = live.sum(-1)
    need = n_live.max() - n_live                                               # [R] tokens to revive
    # revive: the emptied tokens with the best score / row max (ties: the earlier), as the sort did
    rowmax = sc.masked_fill(~valid, 0).amax(-1, keepdim=True).clamp_min(1e-30)
    emptied = free & (after == 0)
    # (the largest keys, as the smallest of their bitwise complements: ~x = -1 - x, keys >= 0)
    rkey = ~((_order_bits(sc / rowmax) << 32) | (2**32 - 1 - positions))
    revive = _k_smallest(rkey.masked_fill(~emptied, _I64_MAX), need, k_max)
    # and pay for them: the lowest remaining units of rank >= 1
    key2 = key.view(r, s_, L).masked_fill(d1 | (ranks == 0), _I64_MAX).view(r, -1)
    d2 = _k_smallest(key2, need, k_max).view(r, s_, L)
    out = after - d2.sum(-1) * free
    out = torch.where(revive, torch.ones_like(out), out)
    return torch.where(protected & valid, units, out)
