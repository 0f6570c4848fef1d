"""KV cache and the decoding driver (prefill + step + generate) over a composed ``DecoderLM``.

The cache holds, per layer, the rotated keys and the values ``[B, Hk, T_kept, D]`` with the
absolute position of every kept token ``[B, Hk, T_kept]`` (after eviction each kv head keeps its
own subset, the same count for every head). The attention mixer finds the cache in
``Context.state["kv_cache"]`` and calls :meth:`KVCache.attend`:

* prefill (empty layer cache): the mixer's own op over the prompt (the parallel forward), then
  the policy scores the prompt and the shared selector compacts it to the budget;
* step (new tokens after a non-empty cache): the new keys are appended; with no policy the
  mixer's own op runs over the full cache (bottom-right causal, so the logits equal the parallel
  forward's); with a policy, dense attention of the new queries over the kept keys (which
  materialises the probabilities H2O accumulates), then eviction if the policy evicts on steps.

A policy is a ``token.*`` component (``plugins/token``); ``None`` is the full cache.

Mixers that are not attention-shaped may decode too: a mixer class with
``decodes_with_cache = True`` finds the cache in ``Context.state["kv_cache"]`` and manages
``cache.layers[context.layer]`` itself (k, v, pos, seen for what it holds, so ``kept_tokens``
counts it; anything else in ``LayerCache.extra``). Eviction policies apply to attention mixers only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .context import Context

#: at most this many tokens leaving per (batch, kv head): kernel backends evict in place
FEW_EVICTIONS = 8


@dataclass
class LayerCache:
    k: torch.Tensor | None = None    # [B, Hk, T, D]
    v: torch.Tensor | None = None    # [B, Hk, T, D]
    pos: torch.Tensor | None = None  # [B, Hk, T] absolute positions (long)
    acc: torch.Tensor | None = None  # [B, Hk, T] running scores (H2O)
    seen: int = 0                    # tokens written to this layer so far
    extra: dict = field(default_factory=dict)  # state a mixer that decodes itself keeps here

    _bufs: dict = field(default_factory=dict, repr=False)  # storage with spare room along T

    @property
    def size(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append t new tokens ([B, Hk, t, D], positions [B, Hk, t]; running scores start at 0)
        in place: the layer's tensors are views of buffers with spare room along T, grown by
        max(t, 64, T/8) when full, so a decoding step writes its token instead of copying the
        cache (torch.cat would move all of it every step). A tensor assigned from outside
        (prefill, compaction, a mixer's own state) starts a new buffer on its next append."""
        parts = {"k": k, "v": v, "pos": pos}
        if self.acc is not None:
            parts["acc"] = self.acc.new_zeros(pos.shape)
        for name, x in parts.items():
            setattr(self, name, _append(self._bufs, name, getattr(self, name), x))

    def trim(self, n: int) -> None:
        """Keep the first n tokens (views; the buffers keep their room)."""
        for name in ("k", "v", "pos", "acc"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x[:, :, :n])


def _append(bufs: dict, name: str, cur: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n, t = cur.shape[2], x.shape[2]
    buf = bufs.get(name)
    fits = (buf is not None and buf.shape[2] >= n + t and cur.data_ptr() == buf.data_ptr()
            and cur.stride() == buf.stride() and buf.dtype == x.dtype)
    if not fits:
        cap = n + max(t, 64, n // 8)
        buf = cur.new_empty(*cur.shape[:2], cap, *cur.shape[3:])
        buf[:, :, :n] = cur
        bufs[name] = buf
    buf[:, :, n:n + t] = x
    return buf[:, :, :n + t]


def fill_holes(lc: LayerCache, drop: torch.Tensor) -> None:
    """Evict the tokens at ``drop`` [B, Hk, e] (distinct slot indices, e per row, any order) in place:
    the tokens in the last e slots that stay move into the dropped slots before them, and the
    cache shrinks by e. O(e) writes instead of a gather of the whole cache; the cache stops being
    in time order (attention over it does not need the order: the new tokens of a step are
    always its last entries, and the selector breaks ties by position, not slot)."""
    n, e = lc.size, drop.shape[-1]
    base = n - e
    big = n  # sorts after every slot
    in_tail = drop >= base
    # which tail slots leave; drops before the tail go to a spare column e (scatter_ with repeated
    # indices keeps an unspecified one of the values on CUDA, so no two drops may share an index)
    dropped_tail = torch.zeros(*drop.shape[:2], e + 1, dtype=torch.bool, device=drop.device)
    dropped_tail.scatter_(-1, torch.where(in_tail, drop - base, e), in_tail)
    dropped_tail = dropped_tail[..., :e]
    tail = torch.arange(base, n, device=drop.device).expand_as(drop)
    movers = torch.sort(torch.where(dropped_tail, big, tail), dim=-1).values
    holes = torch.sort(torch.where(in_tail, big, drop), dim=-1).values
    valid = holes < big  # as many holes as movers in every row
    src = torch.where(valid, movers, n - 1)
    dst = torch.where(valid, holes, n - 1)  # unused pairs copy slot n-1 onto itself (then trimmed)
    for name in ("k", "v", "pos", "acc"):
        x = getattr(lc, name)
        if x is None:
            continue
        shape = (*src.shape, *x.shape[3:])
        view = (*src.shape, *([1] * (x.dim() - 3)))
        x.scatter_(2, dst.view(view).expand(shape), torch.gather(x, 2, src.view(view).expand(shape)))
    lc.trim(base)


@dataclass
class KVCache:
    """Per-layer caches plus an optional eviction policy (a ``plugins.token.module.KVPolicy``)."""

    n_layers: int
    policy: Any = None
    layers: list[LayerCache] = field(default_factory=list)
    #: full-cache steps: None runs the mixer's own op over the whole cache; "triton" / "numba" /
    #: "reference" runs that backend's decode kernel (plugins/token/backends.py:decode_op)
    decode_backend: str | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [LayerCache() for _ in range(self.n_layers)]

    @property
    def seen(self) -> int:
        return self.layers[0].seen

    def kept_tokens(self) -> int:
        """Tokens held, summed over layers (per kv head: every head keeps the same count)."""
        return sum(lc.size for lc in self.layers)

    def full_tokens(self) -> int:
        return sum(lc.seen for lc in self.layers)

    def kept_fraction(self) -> float:
        """KV memory held relative to the full cache (token.mixeddim counts kept K/V elements)."""
        held = getattr(self.policy, "held_tokens", None)
        return sum(held(lc) if held else lc.size for lc in self.layers) / self.full_tokens()

    # -- called by the attention mixer ---------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, op) -> torch.Tensor:
        """q [B, t, H, D], k/v [B, t, Hk, D] (RoPE already applied at ``positions`` [t]);
        ``op`` the mixer's bound attention op. Returns the attention output [B, t, H, D]."""
        if op.kwargs.get("causal", True) is False:
            raise ValueError("decoding needs a causal mixer; this layer's op has causal=False")
        lc = self.layers[layer]
        b, t, hk, _ = k.shape
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)
        pos = positions.to(torch.long).view(1, 1, t).expand(b, hk, t)
        pol = self.policy
        if lc.k is None:  # prefill
            o = op(q, k, v)
            # own copies: views of the projection would keep q alive and be written by eviction
            lc.k, lc.v, lc.pos, lc.seen = kh.contiguous(), vh.contiguous(), pos.contiguous(), t
            if pol is not None:
                scores = pol.prefill_scores(q, k, v, pos, layer=layer, cache=lc).float()
                if pol.accumulates:
                    lc.acc = scores
                self._evict(lc, scores)
            return o
        if getattr(pol, "attends", False):  # a policy with its own storage (token.mixeddim packed) decodes itself
            return pol.attend(lc, q, kh, vh, pos, op.kwargs.get("scale"))
        lc.append(kh, vh, pos)
        lc.seen += t
        if pol is None and self.decode_backend is None:
            return op(q, lc.k.transpose(1, 2), lc.v.transpose(1, 2))
        fused = getattr(pol.scorer, "decode_h2o", None) if pol is not None and pol.evicts_on_step else None
        if fused is not None and lc.acc is not None and not hasattr(pol, "rewrite"):
            # a kernel backend's H2O step: the decode pass writes its logits, one kernel adds the
            # probabilities to acc and evicts the one token over the budget in place
            p = pol.params
            o, evicted = fused(q, lc.k, lc.v, lc.pos, lc.acc, lc.seen, pol.keep(lc.seen), p.sinks, p.recent,
                               op.kwargs.get("scale"))
            if evicted:
                lc.trim(lc.size - 1)
            else:  # at most the budget (nothing to do) or several tokens over: the general path
                self._evict(lc, lc.acc)
            return o
        o, probs = self._decode(q, lc, op.kwargs.get("scale"))
        if pol is None:
            return o
        if pol.evicts_on_step:
            self._evict(lc, pol.step_scores(lc, probs, layer=layer).float())
        return o

    def _decode(self, q: torch.Tensor, lc: LayerCache, scale):
        """Attention of the new queries over the layer's cache and what the policy scores need:
        the reference's probabilities [B, Hq, Tq, T], or (a kernel backend's ``decode`` op,
        carried by the policy's scorer) the per-kv-head sums as [B, Hk, 1, T], which
        ``per_kv_head`` maps to themselves; None when the policy needs no attention."""
        pol = self.policy
        if pol is None:
            from ..plugins.token.backends import decode_op
            return decode_op(self.decode_backend)(q, lc.k, lc.v, scale, False)
        dec = getattr(pol.scorer, "decode", None)
        if dec is None:
            from ..plugins.token.reference import decode_attention
            return decode_attention(q, lc.k, lc.v, scale=scale)
        o, s = dec(q, lc.k, lc.v, scale, pol.needs_attention and pol.evicts_on_step)
        return o, (None if s is None else s.unsqueeze(2))

    def _evict(self, lc: LayerCache, scores: torch.Tensor) -> None:
        from ..plugins.token.reference import compact, select
        if hasattr(self.policy, "rewrite"):  # policies beyond keep-or-drop (token.mixeddim) rewrite the cache
            self.policy.rewrite(lc, scores)
            return
        keep = self.policy.keep(lc.seen)
        if lc.size <= keep:
            return
        p = self.policy.params
        one = getattr(self.policy.scorer, "evict_one", None)
        if one is not None and lc.size - keep == 1 and lc.k.device.type == scores.device.type:
            # a Triton backend's decoding step: one token leaves, one kernel moves the newest into its slot
            one(scores if scores.stride(-1) == 1 else scores.contiguous(), lc.k, lc.v, lc.pos, lc.acc,
                lc.seen, p.sinks, p.recent)
            lc.trim(keep)
            return
        if getattr(self.policy.scorer, "select", None) is not None and lc.size - keep <= FEW_EVICTIONS:
            # a kernel backend's decoding step: find the few leaving tokens, fill their slots
            from ..kernels.select import drop_few
            fill_holes(lc, drop_few(scores, lc.pos, lc.seen, keep, p.sinks, p.recent))
            return
        select = getattr(self.policy.scorer, "select", select)  # a kernel backend's exact fast path
        compact = getattr(self.policy.scorer, "compact", compact)
        idx = select(scores, lc.pos, lc.seen, keep, p.sinks, p.recent)
        if lc.acc is not None:
            lc.k, lc.v, lc.pos, lc.acc = compact(idx, lc.k, lc.v, lc.pos, lc.acc)
        else:
            lc.k, lc.v, lc.pos = compact(idx, lc.k, lc.v, lc.pos)


# ---------------------------------------------------------------------------------------------
# driver
DECODE_BACKENDS = (None, "reference", "triton", "numba")

def check_decodable(model) -> None:
    """Raise with the reason when a model cannot decode with a KV cache."""
    from ..plugins.attention.module import AttentionMixer
    if getattr(model, "depth", None) is not None:
        raise ValueError("decoding with a KV cache does not support the depth KV stream (depth.moda) yet")
    for i, block in enumerate(model.blocks):
        if getattr(block.mixer, "decodes_with_cache", False):
            continue
        if not isinstance(block.mixer, AttentionMixer):
            raise ValueError(f"layer {i}: mixer {getattr(block.mixer, 'component_id', '?')!r} has no KV-cache "
                             "decoding path (only attention-shaped mixers built on AttentionMixer decode)")


def make_cache(model, policy: Any = "spec", decode_backend: str | None = None) -> KVCache:
    """An empty cache for ``model``. policy: "spec" (the spec's ``kv:`` section, or the full
    cache when it has none), None (full cache), a component id, a ComponentRef or a KVPolicy.
    decode_backend: for full-cache steps, None (the mixer's own op) or "reference" / "triton" /
    "numba" (that backend's decode kernel; a policy uses its own backend's)."""
    if decode_backend not in DECODE_BACKENDS:
        raise ValueError(f"decode_backend must be one of {DECODE_BACKENDS}, got {decode_backend!r}")
    check_decodable(model)
    if isinstance(policy, str) and policy == "spec":
        policy = model.spec.kv
    if policy is not None and not hasattr(policy, "prefill_scores"):
        from ..plugins.token.module import make_policy
        policy = make_policy(policy)
    if policy is not None and hasattr(policy, "bind"):
        policy.bind(model)  # learned policies (token.evict) load or distil their parts for this model
    return KVCache(len(model.blocks), policy, decode_backend=decode_backend)


def _run(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    t0 = cache.seen
    ctx = Context(positions=torch.arange(t0, t0 + tokens.shape[1], device=tokens.device),
                  state={"kv_cache": cache})
    return model(tokens, ctx)


def prefill(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt [B, T] through the model, filling ``cache``; logits [B, T, V]."""
    if cache.seen:
        raise ValueError(f"prefill needs an empty cache; this one has seen {cache.seen} tokens (use step)")
    return _run(model, tokens, cache)


def step(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed new tokens [B, t] (usually t = 1) after the cached ones; logits [B, t, V]."""
    if not cache.seen:
        raise ValueError("step needs a prefilled cache (call prefill first)")
    if tokens.dim() == 1:
        tokens = tokens[:, None]
    return _run(model, tokens, cache)


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int, policy: Any = "spec",
             temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt [B, T] -> [B, T + max_new_tokens]: greedy (temperature 0) or sampled."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cache = make_cache(model, policy)
    logits = prefill(model, tokens, cache)[:, -1]
    out = [tokens]
    for i in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits = step(model, nxt, cache)[:, -1]
    return torch.cat(out, 1)


@torch.no_grad()
def decode_logits(model, tokens: torch.Tensor, prefill_len: int, policy: Any = "spec"
                  ) -> tuple[torch.Tensor, float]:
    """Teacher-forced decoding: prefill ``tokens[:, :prefill_len]``, then one step per remaining
    token. Returns the logits [B, T, V] (comparable to ``model(tokens)``) and the KV tokens held
    relative to the full cache, averaged over the decoding steps (1.0 for the full cache)."""
    t = tokens.shape[1]
    if not 1 <= prefill_len <= t:
        raise ValueError(f"prefill_len must be in [1, {t}], got {prefill_len}")
    cache = make_cache(model, policy)
    outs = [prefill(model, tokens[:, :prefill_len], cache)]
    rel = [cache.kept_fraction()]
    for i in range(prefill_len, t):
        outs.append(step(model, tokens[:, i:i + 1], cache))
        rel.append(cache.kept_fraction())
    return torch.cat(outs, 1), sum(rel) / len(rel)
