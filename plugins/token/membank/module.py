"""``token.membank`` in a model: :class:`MemBankMixer`.

The attention projections are :class:`~blockzoo.plugins.attention.module.AttentionMixer`'s
(``project``: q, k, v with rotary at the token positions). The compressor is plain torch and
learned with the model, per kv head:

* ``pool_q`` [Hk, M, D]: M learned pooling queries; a complete chunk of W keys/values (rotated
  keys, as cached) is summarised into M slots by ``softmax_j(pool_q . k_j / sqrt(D))``-weighted
  sums (:func:`~.reference.compress_blocks`);
* ``decay_logit`` [Hk, M]: per-slot decay ``g = sigmoid(decay_logit)`` of the gated EMA
  ``S_{c+1} = g S_c + (1 - g) u_c`` (:func:`~.reference.bank_update`);
* ``init_k`` / ``init_v`` [Hk, M, D]: the bank state S_0 seen by the first chunk.

Training (parallel): all chunk summaries at once, the recurrence as a scan over T/W steps, then
ONE call of the op over [bank of each query's chunk | causal sliding window]; the compressor's
gradient arrives through the op's gradients w.r.t. bank_k / bank_v.

Decoding (``decodes_with_cache``): the layer's ``LayerCache`` holds, per kv head, the current bank
(M slots, ``pos = -1``) followed by the window (at most W tokens, ``pos`` = their positions):
``k``/``v`` [B, Hk, M + L, D]. A step appends the token, runs the op over [bank | window] (N = 1
chunk: the window's keys are relative positions 0..L-1 < W), and when the token closes a chunk
(``(p + 1) % W == 0``) the window is exactly that chunk: it is compressed into the bank and the
window trimmed to its last W - 1 tokens. The cache therefore never exceeds M + W tokens per kv
head, whatever T; the logits equal the parallel forward's.
"""

from __future__ import annotations

import torch
from torch import nn

from ....core.context import BuildContext, Context
from ...attention.module import AttentionMixer
from .reference import bank_scan, bank_update, chunk_major, compress_blocks, n_chunks


class MemBankMixer(AttentionMixer):
    decodes_with_cache = True

    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__(ctx, "token.membank", params)
        self.window, self.slots = params.window, params.slots
        hk, m, d = ctx.n_kv_heads, params.slots, ctx.head_dim
        self.pool_q = nn.Parameter(torch.randn(hk, m, d) * d ** -0.25)
        lo, hi = params.gate_init
        logits = torch.linspace(lo, hi, m) if m > 1 else torch.tensor([(lo + hi) / 2])
        self.decay_logit = nn.Parameter(logits.repeat(hk, 1))
        self.init_k = nn.Parameter(torch.randn(hk, m, d) * d ** -0.25)
        self.init_v = nn.Parameter(torch.zeros(hk, m, d))

    # -- the bank ------------------------------------------------------------------------------
    def bank_states(self, k: torch.Tensor, v: torch.Tensor, n_states: int):
        """States S_0 .. S_{n_states-1} [B, n, Hk, M, D] from the keys/values k, v [B, T, Hk, D]
        (needs floor(T/W) >= n_states - 1 complete chunks)."""
        b = k.shape[0]
        u_k, u_v = compress_blocks(k, v, self.pool_q, self.window)
        init_k = self.init_k.to(k.dtype).expand(b, -1, -1, -1)
        init_v = self.init_v.to(v.dtype).expand(b, -1, -1, -1)
        return bank_scan(init_k, init_v, u_k, u_v, torch.sigmoid(self.decay_logit), n_states)

    def forward(self, x: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        q, k, v = self.project(x, context)
        cache = context.state.get("kv_cache") if context is not None else None
        if cache is not None:
            o = self._decode(cache, context, q, k, v)
        else:
            s_k, s_v = self.bank_states(k, v, n_chunks(t, self.window))
            o = self.attn(q, k, v, chunk_major(s_k), chunk_major(s_v))
        return self.out(o.reshape(b, t, h * hd))

    # -- decoding ------------------------------------------------------------------------------
    def _decode(self, cache, context: Context, q, k, v) -> torch.Tensor:
        if cache.policy is not None:
            raise ValueError("token.membank manages its own bounded cache; an eviction policy "
                             f"({type(cache.policy).__name__}) cannot apply to it (use policy=None)")
        lc = cache.layers[context.layer]
        b, t, hk, d = k.shape
        m, w = self.slots, self.window
        if lc.k is None:  # prefill: the parallel forward, then keep the bank and the open window
            if context.positions is not None and t and int(context.positions[0]) != 0:
                raise ValueError("token.membank: prefill must start at position 0")
            f = t // w
            s_k, s_v = self.bank_states(k, v, f + 1)
            n = n_chunks(t, w)
            o = self.attn(q, k, v, chunk_major(s_k[:, :n]), chunk_major(s_v[:, :n]))
            keep = min(t, w - 1)
            self._store(lc, s_k[:, f], s_v[:, f], k[:, t - keep:], v[:, t - keep:], t - keep, t)
            return o
        outs = []
        decay = torch.sigmoid(self.decay_logit)
        for i in range(t):  # one token at a time: chunk boundaries are per position
            b_k, b_v = lc.k[:, :, :m], lc.v[:, :, :m]                                   # [B, Hk, M, D]
            win_k = torch.cat([lc.k[:, :, m:].transpose(1, 2), k[:, i:i + 1]], 1)      # [B, L+1, Hk, D]
            win_v = torch.cat([lc.v[:, :, m:].transpose(1, 2), v[:, i:i + 1]], 1)
            outs.append(self.attn(q[:, i:i + 1], win_k, win_v, b_k.transpose(1, 2).contiguous(),
                                  b_v.transpose(1, 2).contiguous()))
            p = lc.seen
            if (p + 1) % w == 0:  # this token closes chunk p // w: the window is exactly that chunk
                u_k, u_v = compress_blocks(win_k, win_v, self.pool_q, w)
                b_k, b_v = bank_update(b_k, b_v, u_k[:, 0], u_v[:, 0], decay)
            keep = min(win_k.shape[1], w - 1)  # the next query needs the last W - 1 keys
            n = win_k.shape[1]
            self._store(lc, b_k, b_v, win_k[:, n - keep:], win_v[:, n - keep:], p + 1 - keep, p + 1)
        return torch.cat(outs, 1)

    def _store(self, lc, bank_k, bank_v, win_k, win_v, first: int, seen: int) -> None:
        """bank [B, Hk, M, D] + window [B, L, Hk, D] of positions first..seen-1 -> the layer cache."""
        b, hk, m, _ = bank_k.shape
        lc.k = torch.cat([bank_k, win_k.transpose(1, 2)], 2)
        lc.v = torch.cat([bank_v, win_v.transpose(1, 2)], 2)
        pos = torch.cat([torch.full((m,), -1, dtype=torch.long),
                         torch.arange(first, seen, dtype=torch.long)]).to(bank_k.device)
        lc.pos = pos.view(1, 1, -1).expand(b, hk, -1)
        lc.seen = seen
        lc.extra["membank_slots"] = m
