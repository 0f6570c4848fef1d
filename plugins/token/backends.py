"""Triton and Numba backends of the KV-cache policies ``token.streaming``, ``token.h2o`` and
``token.snapkv`` (registered through the public hooks, like a third-party plugin would).

A backend's functional op is still the policy's scorer (``q [B, Tq, H, D]``, ``k, v [B, Tk, Hk, D]``
-> ``[B, Hk, Tk]``), so the conformance matrix compares it with the reference scorer:

* streaming: the score is the position (no kernel needed; the same torch expression);
* h2o: the attention each token received, from the kernels' attention pass (its lse) and the
  score kernel (``token_scores``), never materialising ``[B, H, Tq, Tk]``;
* snapkv: the same over the observation window, per query head, max-pooled (torch) and summed
  over each kv group.

The op object (:class:`KernelPolicyOps`) also carries the backend's decode-time ops, which
``core/cache.py`` uses when a policy was made with this backend:

* ``decode(q, k, v, scale, scores)`` -> ``(o [B, Tq, Hq, D], s [B, Hk, T] fp32 or None)``: the
  split-K decode kernel over the kept cache ``[B, Hk, T, D]`` and, when the policy accumulates
  attention (h2o), the per-kv-head token scores from the score kernel;
* ``decode_h2o`` (token.h2o): the whole H2O step fused: the split-K decode writes its logits, one
  kernel turns them into probabilities with the final lse, adds them to the running scores and
  evicts the lowest unprotected token in place (``core/cache.py`` takes this path when it exists);
* ``select`` (``select_topk``: the reference's kept set, by top-k instead of a full sort) and
  ``compact`` (Triton row gather on the GPU; torch gather otherwise).

``materialises_attention`` stays True: these backends supply the per-token scores the
attention policies need (the spec rule reads it). :func:`decode_op` gives the decode op of a
backend by name, for full-cache decoding (``make_cache(..., decode_backend=...)``).

Numba kernels are float32/float64 (the registered scorers declare that); ``decode`` upcasts a
bfloat16 / float16 cache to float32 and returns o in the input dtype.
"""

from __future__ import annotations

import torch.nn.functional as F

from ...registry import Backend, Capabilities, hookimpl
from ..attention.plugin import CPU_FLOATS, GPU_DTYPES, _gqa_rule
from .reference import check_shapes, compact, decode_attention, per_kv_head, streaming_scores

COMPONENTS = ("token.streaming", "token.h2o", "token.snapkv")


def _triton():
    from ...kernels.triton import kv_decode
    return kv_decode


def _numba():
    from ...kernels.numba import kv_decode
    return kv_decode


class _Kernels:
    """The decode / score kernels of one backend behind one interface."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def attend(self, q, k, v, scale=None):
        """o, lse of q [B, Tq, Hq, D] over the cache k, v [B, Hk, T, D]."""
        if self.kind == "triton":
            return _triton().decode_attention(q, k, v, scale)
        if q.dtype not in CPU_FLOATS:  # numba kernels are fp32/fp64
            o, lse = _numba().decode_attention(q.float(), k.float(), v.float(), scale)
            return o.to(q.dtype), lse
        if q.shape[2] // k.shape[1] * q.shape[1] > 64:  # a prefill: the blocked dense kernel
            from ...kernels.numba.attention import attention_fwd
            return attention_fwd(q, k.transpose(1, 2), v.transpose(1, 2), True, scale)
        return _numba().decode_attention(q, k, v, scale)

    def scores(self, q, k, lse, scale=None, per_query_head=False):
        if self.kind == "triton":
            return _triton().token_scores(q, k, lse, scale, per_query_head)
        if q.dtype not in CPU_FLOATS:
            q, k = q.float(), k.float()
        return _numba().token_scores(q, k, lse, scale, per_query_head)  # fp32 (fp64 for fp64)


class KernelPolicyOps:
    """Registered op of a kernel backend of a ``token.*`` policy: callable as the scorer, with
    the decode-time ops (``decode``, ``select``, ``compact``) as methods."""

    def __init__(self, component: str, kind: str) -> None:
        if component not in COMPONENTS:
            raise ValueError(f"no kernel backend for {component!r} (have {COMPONENTS})")
        self.component, self.kind = component, kind
        self.kernels = _Kernels(kind)
        self.__name__ = f"{component.split('.')[1]}_scores_{kind}"

    def __repr__(self) -> str:
        return f"KernelPolicyOps({self.component!r}, {self.kind!r})"

    # -- the functional op: the policy's scorer ------------------------------------------------
    def __call__(self, q, k, v, positions=None, window: int = 8, pool: int = 5, **_policy):
        check_shapes(q, k, v)
        if self.component == "token.streaming":
            return streaming_scores(q, k, v, positions=positions)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # the cache layout [B, Hk, Tk, D] (views)
        if self.component == "token.h2o":
            _, lse = self.kernels.attend(q, kt, vt)
            return self.kernels.scores(q, kt, lse).to(q.dtype)
        w = min(window, q.shape[1])
        qw = q[:, -w:]
        _, lse = self.kernels.attend(qw, kt, vt)
        s = self.kernels.scores(qw, kt, lse, per_query_head=True)  # [B, Hq, Tk]
        if pool > 1:
            s = F.max_pool1d(s, kernel_size=pool, stride=1, padding=pool // 2)
        b, hq, tk = s.shape
        hk = k.shape[2]
        return s.view(b, hk, hq // hk, tk).sum(2).to(q.dtype)

    # -- decode-time ops (core/cache.py) -------------------------------------------------------
    def decode(self, q, k, v, scale=None, scores: bool = False):
        """o [B, Tq, Hq, D] of the new queries over the cache k, v [B, Hk, T, D], and (scores=True)
        the attention each cached token received, per kv head, [B, Hk, T] fp32."""
        o, lse = self.kernels.attend(q, k, v, scale)
        return o, (self.kernels.scores(q, k, lse, scale) if scores else None)

    def select(self, scores, positions, seen, keep, sinks, recent):
        from ...kernels.select import select_topk
        return select_topk(scores, positions, seen, keep, sinks, recent)

    @property
    def decode_h2o(self):
        """token.h2o only (else None): the fused decoding step ``(q, k, v, pos, acc, seen, keep,
        sinks, recent, scale) -> (o, evicted)`` of ``kv_decode.decode_h2o``: the decode pass writes
        its logits, one kernel adds the probabilities to ``acc`` and (one token over the budget)
        evicts in place, so the scores never take a second pass over K."""
        if self.component != "token.h2o":
            return None
        return (_triton() if self.kind == "triton" else _numba()).decode_h2o

    @property
    def evict_one(self):
        """Triton only: the one-token in-place eviction kernel (``kv_decode.evict_one``)."""
        return _triton().evict_one if self.kind == "triton" else None

    def compact(self, idx, *tensors):
        if self.kind == "triton":
            return _triton().compact(idx, *tensors)
        return compact(idx, *tensors)


def _reference_decode(q, k, v, scale=None, scores: bool = False):
    o, p = decode_attention(q, k, v, scale=scale)
    return o, (per_kv_head(p, k.shape[1]) if scores else None)


def decode_op(backend: str):
    """``(q, k, v, scale, scores) -> (o, per-kv-head scores or None)`` of a backend by name."""
    if backend == "reference":
        return _reference_decode
    if backend in ("triton", "numba"):
        return KernelPolicyOps("token.h2o", backend).decode
    raise ValueError(f"decode backend must be 'reference', 'triton' or 'numba', got {backend!r}")


def _add(registry, cid: str, name: str, caps: Capabilities, priority: int, doc: str) -> None:
    b = Backend(cid, name, KernelPolicyOps(cid, name), caps, priority=priority, doc=doc)
    b.materialises_attention = True  # supplies the per-token attention scores the policies need
    registry.add_backend(b)


@hookimpl
def blockzoo_register_backends(registry) -> None:
    for cid in COMPONENTS:
        _add(registry, cid, "triton",
             Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, head_dims=range(1, 257), grad=False,
                          requires=("triton>=3.6",), min_compute_capability=(8, 0), interpreted_on_cpu=True,
                          rules=(_gqa_rule,)),
             30, "split-K Triton decode attention over the kept cache + score kernel from its lse; "
                 "top-k selection and Triton gather compaction")
        _add(registry, cid, "numba",
             Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, grad=False, requires=("numba>=0.60",),
                          rules=(_gqa_rule,)),
             20, "Numba decode attention per (batch, kv head) + score kernel from its lse")
    from .mixeddim import register_backends as register_mixeddim  # decode over token.mixeddim's pools
    register_mixeddim(registry)


__all__ = ["KernelPolicyOps", "decode_op", "COMPONENTS"]
