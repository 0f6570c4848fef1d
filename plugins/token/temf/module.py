"""``token.temf`` in a model: :class:`TemfMixer` (attention projections as ``AttentionMixer``, a
learned chunk compressor, the ``token.temf`` op) and its decoding path.

Compressor (ours; the press text says only "a small learned MLP"): one :class:`ChunkCompressor`
for the keys and one for the values, shared by all kv heads and layers' channels, acting along
the CHUNK axis of every (kv head, channel) column of a closed chunk::

    x [C] (one channel of the chunk's C rotated keys, or values)
    summary [S] = W_lin x + W_2 gelu(W_1 x + b_1)        W_lin [S, C], W_1 [H, C], W_2 [S, H]

``W_lin`` starts as mean pooling over S equal segments of the chunk and ``W_2`` at zero, so a new
model starts from segment-mean summaries and learns to move away from them. The summaries of
the keys are taken from the rotated keys (RoPE at their own positions), the same tensors a
decoder caches, so the decoding path compresses exactly what training compressed.

Decoding (``decodes_with_cache = True``; see ``core/cache.py``): the layer cache holds, per kv
head, the summaries of every closed chunk followed by the keys/values of the open chunk
(``LayerCache.k/v [B, Hk, n, D]``, ``pos`` the chunk's last position for a summary, the token's
own for an open key; ``extra["n_sum"]`` the number of summary rows). Prefill runs the parallel
op over the prompt, then fills the cache; each later token attends (one softmax, all visible) to
everything the cache holds plus itself, and when its chunk fills up the chunk is compressed into S
summaries. After T tokens the cache holds (T // C) * S + T % C entries per kv head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...attention.module import AttentionMixer
from .reference import n_summary_chunks


def _segment_pooling(s: int, c: int) -> torch.Tensor:
    """[S, C]: row s averages the tokens of the s-th of S (nearly) equal segments of the chunk."""
    w = torch.zeros(s, c)
    for i in range(s):
        lo = (i * c) // s
        hi = max(((i + 1) * c) // s, lo + 1)
        lo, hi = min(lo, c - 1), min(hi, c)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


class ChunkCompressor(nn.Module):
    """[..., N, C, Hk, D] closed chunks -> [..., N, S, Hk, D] summaries (see the module doc)."""

    def __init__(self, chunk: int, summaries: int, hidden: int) -> None:
        super().__init__()
        self.lin = nn.Parameter(_segment_pooling(summaries, chunk))
        self.hidden = hidden
        if hidden:
            self.w1 = nn.Parameter(torch.randn(hidden, chunk) * chunk ** -0.5)
            self.b1 = nn.Parameter(torch.zeros(hidden))
            self.w2 = nn.Parameter(torch.zeros(summaries, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # einsum over the chunk axis: on an H100 (T = 32768, C = 256, 16 kv heads, bf16) its
        # forward+backward took 2.8 ms against 4.7 ms for the same maps as broadcast matmuls
        # over a [B*N, C, Hk*D] view (bench/temf_gpu.py, 2026-11-23)
        out = torch.einsum("sc,bnchd->bnshd", self.lin.to(x.dtype), x)
        if self.hidden:
            h = torch.einsum("mc,bnchd->bnmhd", self.w1.to(x.dtype), x) + self.b1.to(x.dtype)[:, None, None]
            out = out + torch.einsum("sm,bnmhd->bnshd", self.w2.to(x.dtype), F.gelu(h))
        return out


class TemfMixer(AttentionMixer):
    decodes_with_cache = True

    def __init__(self, ctx, params) -> None:
        super().__init__(ctx, "token.temf", params)
        self.chunk, self.n_sum = params.chunk, params.summaries
        self.scale = params.scale
        self.comp_k = ChunkCompressor(params.chunk, params.summaries, params.hidden)
        self.comp_v = ChunkCompressor(params.chunk, params.summaries, params.hidden)

    def summarise(self, k: torch.Tensor, v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summaries [B, n, S, Hk, D] of the first n chunks of k, v [B, T, Hk, D]."""
        b, _, hk, d = k.shape
        c = self.chunk
        return (self.comp_k(k[:, : n * c].reshape(b, n, c, hk, d)),
                self.comp_v(v[:, : n * c].reshape(b, n, c, hk, d)))

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, context)
        cache = context.state.get("kv_cache") if context is not None else None
        if cache is not None:
            o = self._decode(cache, context, q, k, v)
        else:
            sk, sv = self.summarise(k, v, n_summary_chunks(t, self.chunk))
            o = self.attn(q, k, v, sk, sv)
        return self.out(o.reshape(b, t, self.n_heads * self.head_dim))

    # -- decoding ---------------------------------------------------------------------------
    def _decode(self, cache, context, q, k, v) -> torch.Tensor:
        if cache.policy is not None:
            raise ValueError("token.temf keeps its own compressed cache; it cannot be combined with a kv "
                             f"eviction policy ({getattr(cache.policy, 'component_id', cache.policy)!r})")
        lc = cache.layers[context.layer]
        b, t, hk, d = k.shape
        c, s = self.chunk, self.n_sum
        pos = context.positions.to(torch.long)
        if lc.k is None:  # prefill: the parallel op, then the cache of the prompt
            sk, sv = self.summarise(k, v, n_summary_chunks(t, c))
            o = self.attn(q, k, v, sk, sv)
            n_closed = t // c
            if n_closed > sk.shape[1]:  # the prompt ends on a chunk boundary: close the last chunk too
                sk, sv = self.summarise(k, v, n_closed)
            kh, vh = k[:, n_closed * c:].transpose(1, 2), v[:, n_closed * c:].transpose(1, 2)
            sum_k = sk.reshape(b, n_closed * s, hk, d).transpose(1, 2)
            sum_v = sv.reshape(b, n_closed * s, hk, d).transpose(1, 2)
            sum_pos = (torch.arange(n_closed, device=k.device) * c + c - 1).repeat_interleave(s)
            lc.k, lc.v = torch.cat([sum_k, kh], 2), torch.cat([sum_v, vh], 2)
            lc.pos = torch.cat([sum_pos, pos[n_closed * c:]]).view(1, 1, -1).expand(b, hk, -1)
            lc.seen = t
            lc.extra["n_sum"] = n_closed * s
            return o
        outs = []
        for i in range(t):  # token by token: a step may cross a chunk boundary
            lc.k = torch.cat([lc.k, k[:, i:i + 1].transpose(1, 2)], 2)
            lc.v = torch.cat([lc.v, v[:, i:i + 1].transpose(1, 2)], 2)
            lc.pos = torch.cat([lc.pos, pos[i].view(1, 1, 1).expand(b, hk, 1)], 2)
            lc.seen += 1
            outs.append(self._attend_cache(q[:, i:i + 1], lc.k, lc.v))
            n_sum = lc.extra["n_sum"]
            if lc.size - n_sum == c:  # the open chunk just closed: compress it
                ck = lc.k[:, :, n_sum:].transpose(1, 2).reshape(b, 1, c, hk, d)
                cv = lc.v[:, :, n_sum:].transpose(1, 2).reshape(b, 1, c, hk, d)
                sk = self.comp_k(ck).reshape(b, s, hk, d).transpose(1, 2)
                sv = self.comp_v(cv).reshape(b, s, hk, d).transpose(1, 2)
                last = lc.pos[:, :, -1:]
                lc.k = torch.cat([lc.k[:, :, :n_sum], sk], 2)
                lc.v = torch.cat([lc.v[:, :, :n_sum], sv], 2)
                lc.pos = torch.cat([lc.pos[:, :, :n_sum], last.expand(b, hk, s)], 2)
                lc.extra["n_sum"] = n_sum + s
        return torch.cat(outs, 1)

    def _attend_cache(self, q, kc, vc) -> torch.Tensor:
        """One query [B, 1, H, D] over every cached entry kc/vc [B, Hk, n, D] (all visible)."""
        from ...attention.reference import attention_reference
        o = attention_reference(q, kc.transpose(1, 2), vc.transpose(1, 2), causal=False, scale=self.scale)
        return o.to(q.dtype)
