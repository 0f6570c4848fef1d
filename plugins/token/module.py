"""Policy objects the KV cache (``core/cache.py``) calls: when to score, where scores come from.

Eviction schedule: ``token.streaming`` and ``token.h2o`` evict after prefill and after every
decoding step whenever the cache holds more than its budget (so it never exceeds it);
``token.snapkv`` compresses the prompt once, after prefill, and then appends decoded tokens
without eviction (as in the SnapKV paper). ``token.evict`` rescores every cached token at every
eviction (its score depends on the token's age); ``token.mixeddim`` keeps part of a token's
dimensions and rewrites the cache itself (``rewrite``) instead of the shared keep-or-drop.

The cache calls ``prefill_scores(q, k, v, positions, layer=i, cache=lc)`` after prefill and
``step_scores(lc, probs, layer=i)`` after a decoding step; ``bind(model)`` once, when a cache is
made for a model (token.evict loads or distils its gates there).
"""

from __future__ import annotations

from typing import Any

import torch

from .reference import allocate_dims, channel_ranks, compact, dims_mask, per_kv_head, protected_mask


class KVPolicy:
    """Base: a scorer op (the registered backend's function) plus the budget params.

    needs_attention: the scores need attention probabilities (the decode attention must
    materialise them). evicts_on_step: evict during decoding too, not only after prefill.
    accumulates: the layer cache keeps a running score (H2O) instead of rescoring."""

    needs_attention = False
    evicts_on_step = True
    accumulates = False

    def __init__(self, component_id: str, params: Any, scorer) -> None:
        self.component_id = component_id
        self.params = params
        self.scorer = scorer
        self.op_kwargs = params.model_dump()

    def keep(self, seen: int) -> int:
        return self.params.keep(seen)

    def bind(self, model) -> None:
        """Called once by ``make_cache`` with the model the cache is for."""

    def held_tokens(self, lc) -> float:
        """KV memory a layer cache holds, in full tokens per (batch, kv head)."""
        return float(lc.size)

    def prefill_scores(self, q, k, v, positions, layer: int = 0, cache=None) -> torch.Tensor:
        """[B, Hk, T] scores of the prompt's tokens (q, k, v as the mixer has them, [B, T, H, D])."""
        return self.scorer(q, k, v, **self.op_kwargs)

    def step_scores(self, lc, probs: torch.Tensor | None, layer: int = 0) -> torch.Tensor:
        """[B, Hk, T] scores of the cached tokens after a decoding step (``lc`` a LayerCache;
        ``probs`` [B, Hq, Tq, T] the step's attention over the cache)."""
        raise NotImplementedError


class StreamingPolicy(KVPolicy):
    def prefill_scores(self, q, k, v, positions, layer=0, cache=None):
        return self.scorer(q, k, v, positions=positions, **self.op_kwargs)

    def step_scores(self, lc, probs, layer=0):
        return lc.pos.to(torch.float32)


class H2OPolicy(KVPolicy):
    needs_attention = True
    accumulates = True

    def step_scores(self, lc, probs, layer=0):
        lc.acc += per_kv_head(probs, lc.k.shape[1]).to(lc.acc.dtype)  # in place: acc stays a cache buffer view
        return lc.acc


class SnapKVPolicy(KVPolicy):
    needs_attention = True
    evicts_on_step = False

    def step_scores(self, lc, probs, layer=0):  # never called: no eviction while decoding
        raise RuntimeError("token.snapkv compresses at prefill only")


class EvictPolicy(KVPolicy):
    """Learned retention gate (``plugins/token/evict.py``): score = (now - position) * log(beta)."""

    def __init__(self, component_id, params, scorer) -> None:
        super().__init__(component_id, params, scorer)
        self.op_kwargs = {}
        self.gates = None

    def bind(self, model) -> None:
        """Gates for ``model`` unless set already (``policy.gates = EvictGates``)."""
        if self.gates is None:
            from .evict import gates_for
            self.gates = gates_for(model, self.params)
        else:
            self.gates.check_model(model)

    def _gates(self, layer: int | None):
        if layer is None:
            raise ValueError("token.evict needs the layer index (its gates are per layer): the cache must call "
                             "prefill_scores/step_scores with layer=... (core/cache.py does)")
        if self.gates is None:
            raise RuntimeError("token.evict policy has no gates: make the cache with make_cache(model, ...) "
                               "(it binds the policy to the model) or set policy.gates")
        return [t.to(torch.float32) for t in self.gates.layer(layer)]

    def prefill_scores(self, q, k, v, positions, layer=None, cache=None):
        return self.scorer(q, k, v, *self._gates(layer), positions=positions)

    def step_scores(self, lc, probs, layer=None):
        layer = getattr(lc, "layer_idx", None) if layer is None else layer
        k, v = lc.k.transpose(1, 2), lc.v.transpose(1, 2)
        return self.scorer(k[:, -1:], k, v, *self._gates(layer), positions=lc.pos, now=lc.seen - 1)


class MixedDimPolicy(KVPolicy):
    """MixedDimKV-style: every cached token keeps a number of its K/V channels (0 = evicted) so
    that the cache holds exactly ``keep(seen) * D`` elements per (layer, batch, kv head).

    Token importance: accumulated attention (as H2O). Channel order per (layer, batch, kv head),
    fixed at prefill (``channel_ranks``); a token keeps a multiple of ``D / levels`` channels.
    ``layout="packed"`` (default): tokens live in per-width pools (``plugins/token/mixeddim.py``,
    ``lc.extra["packed"]``) that hold exactly the kept elements; the policy runs the decode step
    itself (``attend``, over the pools and the full-width tail of new tokens) and memory is the
    real buffers' size. ``layout="zeroed"``: the full-width cache with dropped channels zeroed,
    ``lc.extra["dims"]`` the kept count per token, memory accounted in elements (the same
    allocation decisions; kept as the readable reference of the packed layout)."""

    needs_attention = True
    accumulates = True

    @property
    def attends(self) -> bool:
        """core/cache.py hands the decoding step to :meth:`attend` (the packed layout)."""
        return self.params.layout == "packed"

    def held_tokens(self, lc) -> float:
        d = lc.k.shape[-1]
        store = lc.extra.get("packed")
        if store is not None:  # the real buffers: pools + the full-width tail
            held = store.kv_elements() + lc.k.numel() + lc.v.numel()
            return held / (2.0 * store.rows * d)
        dims = lc.extra.get("dims")
        if dims is None:
            return float(lc.size)
        return float(dims.sum()) / (dims.shape[0] * dims.shape[1] * d)

    def prefill_scores(self, q, k, v, positions, layer=0, cache=None):
        if cache is None or not hasattr(cache, "extra"):
            raise ValueError("token.mixeddim rewrites the layer cache (per-token dims): it needs "
                             "prefill_scores(..., cache=LayerCache) and a cache that calls policy.rewrite "
                             "(core/cache.py); this cache does not")
        d = k.shape[-1]
        if d % self.params.levels:
            raise ValueError(f"token.mixeddim: levels={self.params.levels} must divide the head dim ({d})")
        k_rank, v_rank = channel_ranks(q, k, v)
        if self.attends:
            from .mixeddim import PackedKV
            cache.extra["packed"] = PackedKV.empty(k.shape[0], k.shape[2], d, self.params.levels, k_rank, v_rank,
                                                   k.dtype, k.device)
        else:
            cache.extra["k_rank"], cache.extra["v_rank"] = k_rank, v_rank
            cache.extra["dims"] = torch.full(positions.shape, d, dtype=torch.long, device=k.device)
        return self.scorer(q, k, v, **self.op_kwargs)

    def step_scores(self, lc, probs, layer=0):
        dims = lc.extra["dims"]
        new = lc.size - dims.shape[2]
        if new:
            lc.extra["dims"] = torch.cat([dims, dims.new_full((*dims.shape[:2], new), lc.k.shape[-1])], 2)
        lc.acc += per_kv_head(probs, lc.k.shape[1]).to(lc.acc.dtype)  # in place: acc stays a cache buffer view
        return lc.acc

    def attend(self, lc, q, kh, vh, pos, scale=None):
        """The packed layout's decoding step (core/cache.py calls it instead of its own): append
        the new tokens [B, Hk, t, D] to the full-width tail, ONE softmax over the pools and the
        tail (the backend's ``decode_packed``, else the reference), accumulate the attention
        each token received, then rewrite if over the budget. Returns o [B, Tq, Hq, D]."""
        if lc.size == 0:  # the tail was moved into the pools: a fresh, exactly sized tail
            lc.k, lc.v, lc.pos = kh.contiguous(), vh.contiguous(), pos.contiguous()
            lc.acc = torch.zeros(pos.shape, dtype=torch.float32, device=pos.device)
            lc._bufs.clear()
        else:
            lc.append(kh, vh, pos)
        lc.seen += kh.shape[2]
        store = lc.extra["packed"]
        dec = getattr(self.scorer, "decode_packed", None)
        if dec is None:
            from .mixeddim import decode_reference as dec
        o, s_pool, s_tail = dec(q, store, lc.k, lc.v, scale, True)
        store.acc += s_pool
        lc.acc += s_tail.to(lc.acc.dtype)
        self.rewrite(lc, lc.acc)
        return o

    def rewrite(self, lc, scores: torch.Tensor) -> None:
        """Re-allocate the dims of the cached tokens to exactly the budget (when over it): the
        packed layout moves every token into the pool of its new width (the tail included) and
        empties the tail; the zeroed layout drops the tokens left with none and zeroes the
        dropped channels. ``scores``: the running importance of the tail (lc.acc)."""
        d = lc.k.shape[-1]
        p = self.params
        store = lc.extra.get("packed")
        if store is not None:
            if not self._rewrite_packed(lc, store, scores):
                return
            b, hk = lc.k.shape[:2]
            lc.k, lc.v = lc.k.new_empty(b, hk, 0, d), lc.v.new_empty(b, hk, 0, d)
            lc.pos, lc.acc = lc.pos.new_empty(b, hk, 0), lc.acc.new_empty(b, hk, 0)
            lc._bufs.clear()
            return
        dims = lc.extra["dims"]
        budget = self.keep(lc.seen) * d
        if int(dims.sum(-1).max()) <= budget:
            return
        prot = protected_mask(lc.pos, lc.seen, p.sinks, p.recent)
        new = allocate_dims(scores, lc.k, lc.v, dims, prot, lc.extra["k_rank"], lc.extra["v_rank"], budget,
                            step=d // p.levels)
        n = int((new > 0).sum(-1).max())
        idx = torch.sort(torch.sort((new > 0).float(), dim=-1, descending=True, stable=True).indices[..., :n], dim=-1).values
        k, v, pos, acc, dims = compact(idx, lc.k, lc.v, lc.pos, lc.acc, new)
        lc.k = k * dims_mask(dims, lc.extra["k_rank"]).to(k.dtype)
        lc.v = v * dims_mask(dims, lc.extra["v_rank"]).to(v.dtype)
        lc.pos, lc.acc, lc.extra["dims"] = pos, acc, dims

    #: most units over budget a step may drop incrementally (more: the whole-cache rewrite)
    STEP_MAX_DROP_LEVELS = 4

    def _rewrite_packed(self, lc, store, scores) -> bool:
        """The packed layout's rewrite; True when the tail moved into the pools. Incremental
        (``mixeddim_step.step_rewrite``) when the store has spare slots from the last whole-cache
        rewrite, the step is a few units over budget and every run had room for a step's worth of
        entering tokens after the previous step; else :func:`mixeddim.repack` with ``slack`` spare
        slots. ``lc.extra["packed_step"]``: the step state, the units the pools hold per row (a host
        int: a step needs no device -> host copy to know how far over budget it is) and the
        previous step's ``[fits, free]`` (read one step late, when it is long computed)."""
        from .mixeddim import repack
        from .mixeddim_step import step_bound, step_rewrite, step_state
        p = self.params
        L = store.levels
        t = lc.k.shape[2]
        keep = self.keep(lc.seen)
        inc = lc.extra.get("packed_step")
        if inc is not None and t:
            drop = inc["pool_units"] + t * L - keep * L
            if drop <= 0:
                return False  # under budget: the tail stays, as repack would leave it
            free = inc["free"]
            if inc["flag"] is not None:
                fits, free = inc["flag"].tolist()
                if not fits:  # cannot happen when the room was checked: a bug, never silent
                    raise RuntimeError("token.mixeddim: an incremental rewrite step found a run without room "
                                       "or moved more tokens than its bound, and left the cache unchanged")
            if drop <= self.STEP_MAX_DROP_LEVELS * L and free >= step_bound(drop, t):
                flag = step_rewrite(store, inc["state"], lc.k, lc.v, lc.pos, scores, lc.seen, keep, p.sinks,
                                    p.recent, drop)
                inc.update(pool_units=keep * L, flag=flag)
                return True
        slack = self.default_slack(keep) if p.slack is None else p.slack
        new = repack(store, lc.k, lc.v, lc.pos, scores, lc.seen, keep, p.sinks, p.recent, slack=slack)
        if new is None:
            return False
        lc.extra["packed"] = new
        lc.extra["packed_step"] = {"state": step_state(new), "pool_units": keep * L, "flag": None,
                                   "free": slack} if slack else None
        return True

    @staticmethod
    def default_slack(keep: int) -> int:
        """Spare slots per run when ``slack`` is not set: 64 from a budget of 2048 tokens per row (the
        incremental step pays off; 2% of the pools at 8192), else 0 (a small cache rewrites whole
        cheaply, and 64 spare slots per run would be most of its memory)."""
        return 64 if keep >= 2048 else 0


POLICY_CLASSES = {"token.streaming": StreamingPolicy, "token.h2o": H2OPolicy, "token.snapkv": SnapKVPolicy,
                  "token.evict": EvictPolicy, "token.mixeddim": MixedDimPolicy}


def make_policy(ref, backend: str | None = None) -> KVPolicy:
    """A spec's ``kv:`` ComponentRef (or a component id) -> the policy object."""
    from ...registry import get_registry
    reg = get_registry()
    cid = ref if isinstance(ref, str) else ref.type
    params = {} if isinstance(ref, str) else ref.params
    name = backend or (None if isinstance(ref, str) else ref.backend) or "reference"
    comp = reg.component(cid)
    if name == "auto":  # the highest-priority backend that can run here (triton needs CUDA)
        name = next(b.name for b in reg.backends_for(cid) if not b.capabilities.environment_reasons())
    if comp.slot != "kv" or comp.module is None:
        raise ValueError(f"{cid!r} is not a KV-cache policy (slot {comp.slot!r})")
    return comp.module(comp.params(**params), reg.backend(cid, name).fn, cid)
