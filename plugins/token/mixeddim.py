"""token.mixeddim's packed cache: tokens stored at the width they keep, so the memory really shrinks.

Layout (:class:`PackedKV`, one per layer, in ``LayerCache.extra["packed"]``). A token keeps
``0, g, 2g, ..., D`` channels (``g = D / levels``); "keeps ``w``" means the first ``w`` channels of
its (batch, kv head)'s channel order, fixed at prefill (keys and values have their own order,
``channel_ranks``). Level ``l`` (``0 <= l < levels``) holds the tokens that keep ``w_l = (l+1) g``
channels, stored **in rank order** and only those ``w_l`` channels.

Storage is in *slots*: a slot is room for one token of its level, numbered globally (level-major,
then row-major inside a level; row = ``b * Hk + hk``).

* ``tok_off`` [levels, R + 1] int64: slot boundaries. Row ``r`` of level ``l`` OWNS the slots
  ``tok_off[l, r] <= i < tok_off[l, r + 1]`` (its capacity in that level);
* ``count`` [levels, R] int64: the tokens it HOLDS there, in the first ``count[l, r]`` of its
  slots, in no particular order (time order inside a (level, row) is not guaranteed: the tokens
  may be moved in place, e.g. by swap-remove and append; order by ``pos`` where it matters, as
  :meth:`PackedKV.table` does). The other slots (the row's slack) are unused: ``pos = -1``,
  ``acc = 0``, K and V elements zero;
* ``kbuf``, ``vbuf`` [E]: one flat buffer each; the ``w_l`` elements (rank order) of slot ``i`` of
  level ``l`` are ``elem_base[l] + (i - tok_off[l, 0]) * w_l + [0, w_l)``; so the buffers hold the
  kept elements plus the slack's: ``E = sum_l slots_l * w_l`` (:meth:`PackedKV.kv_elements`),
  against ``sum_l held_l * w_l`` kept (:meth:`PackedKV.kept_elements`);
* ``pos`` [slots] (absolute positions), ``acc`` [slots] fp32 (accumulated attention), per slot;
* ``k_order``, ``v_order`` [R, D]: channel at each rank (``argsort`` of the ranks);
* ``host``: (slots per level over all rows, element base per level) as host ints: capacities,
  which is what a decode kernel sizes its grid with (no device -> host copy per step).

:func:`repack` builds a store with ``slack`` spare slots per (level, row) (default 0: every slot
held, the rows' tokens in time order, the buffers exactly the kept elements).

The tokens written since the last rewrite (the new decode tokens) stay in the layer cache's
ordinary full-width tail (``lc.k``, ``lc.v`` ``[B, Hk, t, D]``, natural channel order, with
``lc.pos``, ``lc.acc``); a rewrite moves them into the pools.

Decode attention is ONE softmax over all pools and the tail: the scores of a level-``l`` token
are ``q_perm[:w_l] . k[:w_l]`` (``q_perm`` = q in its kv head's key rank order, which is what the
zeroed full-width layout computes, since the dropped channels are zero there), its value adds to
the first ``w_l`` channels of the output in value rank order, mapped back to natural order at the
end. Only held slots are read; the per-token scores are per slot (unused slots get 0). Backends:
``reference`` (zero-padded unpack + ``reference.decode_attention``; obviously right, not
memory-lean), ``triton`` (``kernels/triton/kv_mixeddim.py``) and ``numba``
(``kernels/numba/kv_mixeddim.py``), which read the pools directly.

Rewrite (:func:`repack`): the held tokens of the pools and the tail are viewed as one table per
row in time order (every row holds the same number of tokens), the group energies of each token
(``g`` channels per group, computed from the stored values) go to ``reference.allocate_units``
(the allocator the zeroed layout uses through ``allocate_dims(step=g)``: the same inputs, so the
same decisions), and each new level is gathered from wherever its tokens are (a token never
regains channels). Transient memory of a rewrite: the old and the new pools (both packed), never
a full-width copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import allocate_units, decode_attention, group_energy, per_kv_head, protected_mask


@dataclass
class PackedKV:
    b: int
    hk: int
    d: int
    levels: int
    k_order: torch.Tensor    # [R, D] long: channel at each key rank
    v_order: torch.Tensor    # [R, D] long: channel at each value rank
    kbuf: torch.Tensor       # [E]: kept elements + the slack's (zeros)
    vbuf: torch.Tensor       # [E]
    pos: torch.Tensor        # [slots] long (-1: unused slot)
    acc: torch.Tensor        # [slots] fp32 (0: unused slot)
    tok_off: torch.Tensor    # [levels, R + 1] int64: slot boundaries (row r of level l owns [l, r] .. [l, r + 1])
    elem_base: torch.Tensor  # [levels] int64
    #: (slots per level over all rows, element base per level) as host ints, kept from the
    #: rewrite so that a decode step sizes its kernel grid without a device -> host copy
    host: tuple | None = None
    #: [levels, R] int64: tokens held in (level l, row r), in its first count[l, r] slots
    #: (keyword-only: a positional call written for the layout without it fails loudly)
    count: torch.Tensor = field(kw_only=True)

    @property
    def step(self) -> int:
        return self.d // self.levels

    @property
    def rows(self) -> int:
        return self.b * self.hk

    @property
    def slots(self) -> int:
        """Slots over all levels and rows (the capacity; the length of ``pos`` and ``acc``)."""
        return self.pos.shape[0]

    @property
    def held(self) -> int:
        """Tokens held over all levels and rows (``count.sum()``: one device -> host copy)."""
        return int(self.count.sum())

    def width(self, level: int) -> int:
        return (level + 1) * self.step

    @classmethod
    def empty(cls, b: int, hk: int, d: int, levels: int, k_rank: torch.Tensor, v_rank: torch.Tensor,
              dtype: torch.dtype, device) -> PackedKV:
        if levels < 1 or d % levels:
            raise ValueError(f"token.mixeddim: levels={levels} must divide the head dim ({d}) "
                             f"(allowed: the divisors of {d})")
        r = b * hk
        return cls(b, hk, d, levels, torch.argsort(k_rank.reshape(r, d), -1), torch.argsort(v_rank.reshape(r, d), -1),
                   torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device),
                   torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.float32, device=device),
                   torch.zeros(levels, r + 1, dtype=torch.long, device=device),
                   torch.zeros(levels, dtype=torch.long, device=device), ((0,) * levels, (0,) * levels),
                   count=torch.zeros(levels, r, dtype=torch.long, device=device))

    # -- memory --------------------------------------------------------------------------------
    def kv_elements(self) -> int:
        """K and V elements of the real buffers: the kept elements plus the slack's (unused
        slots); equal to :meth:`kept_elements` for a store without slack."""
        return self.kbuf.numel() + self.vbuf.numel()

    def kv_nbytes(self) -> int:
        """Bytes of the K and V buffers' storage (what the allocator really holds: kept elements
        plus slack)."""
        return self.kbuf.untyped_storage().nbytes() + self.vbuf.untyped_storage().nbytes()

    def kept_elements(self) -> int:
        """K and V elements of the tokens held (``sum_l count[l].sum() * w_l``, twice: K and V),
        without the slack (one device -> host copy)."""
        w = (torch.arange(self.levels, device=self.count.device) + 1) * self.step
        return 2 * int((self.count.sum(1) * w).sum())

    # -- views ---------------------------------------------------------------------------------
    def _bounds(self) -> tuple[list[int], list[int], list[int], int]:
        """Host ints, one device -> host copy: first slot per level, end slot per level, element
        base per level, tokens held over all levels and rows."""
        L = self.levels
        h = torch.cat([self.tok_off[:, 0], self.tok_off[:, -1], self.elem_base, self.count.sum().view(1)]).tolist()
        return h[:L], h[L:2 * L], h[2 * L:3 * L], int(h[-1])

    def _slot_meta(self, bounds=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Per slot (unused ones included): level, row, element base [slots] (long), whether it
        holds a token [slots] (bool); and the tokens held (host int). ``bounds``:
        :meth:`_bounds` if the caller has it (else one device -> host copy)."""
        dev = self.pos.device
        first, end, bases, n_held = self._bounds() if bounds is None else bounds
        lev, row, base, held = [], [], [], []
        r = torch.arange(self.rows, device=dev)
        for lv in range(self.levels):
            n = end[lv] - first[lv]
            i = torch.arange(n, device=dev)
            rw = torch.repeat_interleave(r, self.tok_off[lv, 1:] - self.tok_off[lv, :-1], output_size=n)
            lev.append(torch.full((n,), lv, dtype=torch.long, device=dev))
            row.append(rw)
            base.append(bases[lv] + i * self.width(lv))
            held.append(first[lv] + i - self.tok_off[lv, rw] < self.count[lv, rw])
        return torch.cat(lev), torch.cat(row), torch.cat(base), torch.cat(held), n_held

    def slot_energies(self, bounds=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Group energies of K and V per slot [slots, levels] (fp32; zero beyond a token's width,
        and for unused slots, whose channels are zero), from the stored channels (:func:`energies`).
        ``bounds``: :meth:`_bounds` if the caller has it (else one device -> host copy)."""
        first, end, bases, _ = self._bounds() if bounds is None else bounds
        acc_dt = torch.promote_types(self.kbuf.dtype, torch.float32)
        out = []
        for buf in (self.kbuf, self.vbuf):
            e = torch.zeros(self.slots, self.levels, dtype=acc_dt, device=self.pos.device)
            for lv in range(self.levels):
                n, w = end[lv] - first[lv], self.width(lv)
                if n:
                    e[first[lv]:end[lv], :lv + 1] = energies(buf[bases[lv]:bases[lv] + n * w].view(n, w), self.step)
            out.append(e)
        return out[0], out[1]

    def _held_slots(self, held: torch.Tensor, n_held: int) -> torch.Tensor:
        """The held slots' indices (every slot when every slot is held: no nonzero)."""
        return torch.arange(self.slots, device=self.pos.device) if n_held == self.slots else \
            torch.nonzero(held).squeeze(1)

    def meta(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per held token (unused slots skipped), in slot order: its global slot index, level,
        row and element base [held] (all long)."""
        lev, row, base, held, n_held = self._slot_meta()
        slot = self._held_slots(held, n_held)
        return slot, lev[slot], row[slot], base[slot]

    def _time_table(self, slot: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """[R, n] of the held ``slot`` (rows ``row``), each row sorted by position."""
        if slot.numel() == 0:
            return torch.empty(self.rows, 0, dtype=torch.long, device=self.pos.device)
        pos = self.pos[slot]
        key = row * (int(pos.max()) + 1) + pos
        return slot[torch.argsort(key)].view(self.rows, -1)

    def table(self) -> torch.Tensor:
        """[R, n] global slot indices of the tokens every row holds, in time order (sorted by
        ``pos``; every row holds n tokens). Unused slots are not in it."""
        slot, _, row, _ = self.meta()
        return self._time_table(slot, row)

    def unpack(self):
        """Full-width copies of the held tokens in natural channel order, zeros where dropped,
        rows in time order: k, v [B, Hk, n, D], pos, acc, dims [B, Hk, n] and the global slot
        index of each [R, n]. For the reference decode and the tests (it is the zeroed layout's
        content)."""
        lev, row, base, held, n_held = self._slot_meta()
        slot = self._held_slots(held, n_held)
        idx = self._time_table(slot, row[slot])
        n = idx.shape[1]
        dims = ((lev + 1) * self.step)[idx]                                  # [R, n]
        rng = torch.arange(self.d, device=self.pos.device)
        keep = rng[None, None, :] < dims[..., None]                         # [R, n, D] rank order
        el = (base[idx][..., None] + rng).masked_fill(~keep, 0)
        out = []
        for buf, order in ((self.kbuf, self.k_order), (self.vbuf, self.v_order)):
            ranked = buf[el] * keep.to(buf.dtype) if buf.numel() else torch.zeros(
                *keep.shape, dtype=buf.dtype, device=buf.device)
            nat = torch.zeros_like(ranked).scatter_(-1, order[:, None, :].expand(-1, n, -1), ranked)
            out.append(nat.view(self.b, self.hk, n, self.d))
        shp = (self.b, self.hk, n)
        return out[0], out[1], self.pos[idx].view(shp), self.acc[idx].view(shp), dims.view(shp), idx


def energies(x: torch.Tensor, g: int) -> torch.Tensor:
    """[..., w] rank-ordered channels -> [..., w / g] group energies in fp32 (fp64 for fp64): what
    the allocator sees of a token, computed the same way wherever it is (pools, tail, the
    incremental step), so the decisions are the same bits."""
    return group_energy(x.to(torch.promote_types(x.dtype, torch.float32)) ** 2, g)


def _rank_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[B, Hk, t, D] natural order -> [R, t, D] rank order."""
    b, hk, t, d = x.shape
    return torch.gather(x.reshape(b * hk, t, d), -1, order[:, None, :].expand(-1, t, -1))


def repack(store: PackedKV, tail_k, tail_v, tail_pos, tail_acc, seen: int, keep: int, sinks: int,
           recent: int, slack: int = 0) -> PackedKV | None:
    """The store after re-allocating the dims of every token it holds (pools + the full-width
    tail) to exactly ``keep * D`` elements per row; None when the row holds no more than that.
    The new store gives every (level, row) ``slack`` spare slots after its tokens (unused: pos -1,
    acc 0, K and V zero); with ``slack=0`` every slot is held, each row's tokens of a level in time
    order, and the buffers hold exactly the kept elements."""
    if not isinstance(slack, int) or isinstance(slack, bool) or slack < 0:
        raise ValueError(f"token.mixeddim repack: slack must be an int >= 0, got {slack!r}")
    R, L, g, d = store.rows, store.levels, store.step, store.d
    dev = store.pos.device
    t = 0 if tail_k is None else tail_k.shape[2]
    bounds = store._bounds()
    offs0, offs1, bases, n_held = bounds
    ns = store.slots
    n_all = n_held + R * t
    if n_all % R:
        raise RuntimeError(f"token.mixeddim: rows hold different token counts ({n_all} tokens over {R} rows)")
    T = n_all // R
    budget = keep * L
    # per slot (unused ones included, never selected below), then the tail
    lev, row, base, held, _ = store._slot_meta(bounds)
    caps_all = torch.cat([lev + 1, torch.full((R * t,), L, dtype=torch.long, device=dev)])
    if T == 0 or T * L <= budget:
        return None
    # group energies [slots + tail, L] from the stored values (the same numbers the zeroed layout sees)
    ke, ve = store.slot_energies(bounds)
    tk = tv = None
    if t:
        tk, tv = _rank_order(tail_k, store.k_order), _rank_order(tail_v, store.v_order)
        ke = torch.cat([ke, energies(tk, g).view(R * t, L)])
        ve = torch.cat([ve, energies(tv, g).view(R * t, L)])
    rows_all = torch.cat([row, torch.arange(R, device=dev).repeat_interleave(t)])
    pos_all = torch.cat([store.pos, tail_pos.reshape(-1)]) if t else store.pos
    acc_all = torch.cat([store.acc, tail_acc.reshape(-1).float()]) if t else store.acc
    ebase_all = torch.cat([base, store.kbuf.numel() + torch.arange(R * t, device=dev) * d])
    span = int(pos_all.max()) + 1
    key = rows_all * span + pos_all
    if n_held == ns:  # every slot held
        order = torch.argsort(key).view(R, T)
    else:  # unused slots sort after every held token and are cut off
        unused = torch.cat([~held, torch.zeros(R * t, dtype=torch.bool, device=dev)])
        order = torch.argsort(key.masked_fill(unused, R * span))[:R * T].view(R, T)
    shp = (store.b, store.hk, T)
    caps = caps_all[order].view(shp)
    if int(caps.sum(-1).max()) <= budget:
        return None
    pos_t = pos_all[order].view(shp)
    prot = protected_mask(pos_t, seen, sinks, recent)
    units = allocate_units(acc_all[order].view(shp), ke[order].view(*shp, L), ve[order].view(*shp, L), caps, prot,
                           budget, unit=g).view(R, T)
    allk = torch.cat([store.kbuf, tk.reshape(-1)]) if t else store.kbuf
    allv = torch.cat([store.vbuf, tv.reshape(-1)]) if t else store.vbuf
    ks, vs, ps, accs, tok_off, counts, elem_base, lev_tok = [], [], [], [], [], [], [], []
    n_tok = n_el = 0
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    for lv in range(L):
        w = store.width(lv)
        m = units == lv + 1
        sel = order[m]                                      # row-major: rows contiguous, time order
        c = m.sum(-1)                                       # [R] tokens per row
        nsel = int(sel.shape[0])
        el = ebase_all[sel][:, None] + torch.arange(w, device=dev)
        if slack:  # row r's j-th token goes to slot (level start) + j + slack * r
            n_sl = nsel + R * slack
            dst = torch.arange(nsel, device=dev) + slack * torch.repeat_interleave(
                torch.arange(R, device=dev), c, output_size=nsel)
            kn = allk.new_zeros(n_sl, w)
            vn = allv.new_zeros(n_sl, w)
            kn[dst] = allk[el]
            vn[dst] = allv[el]
            ks.append(kn.view(-1))
            vs.append(vn.view(-1))
            ps.append(pos_all.new_full((n_sl,), -1).index_copy_(0, dst, pos_all[sel]))
            accs.append(acc_all.new_zeros(n_sl).index_copy_(0, dst, acc_all[sel]))
        else:
            n_sl = nsel
            ks.append(allk[el].reshape(-1))
            vs.append(allv[el].reshape(-1))
            ps.append(pos_all[sel])
            accs.append(acc_all[sel])
        tok_off.append(n_tok + torch.cat([zero, (c + slack).cumsum(0)]))
        counts.append(c)
        elem_base.append(n_el)
        lev_tok.append(n_sl)
        n_tok += n_sl
        n_el += n_sl * w
    return PackedKV(store.b, store.hk, d, L, store.k_order, store.v_order, torch.cat(ks), torch.cat(vs),
                    torch.cat(ps), torch.cat(accs), torch.stack(tok_off),
                    torch.tensor(elem_base, dtype=torch.long, device=dev), (tuple(lev_tok), tuple(elem_base)),
                    count=torch.stack(counts))


# ---------------------------------------------------------------------------------------------
# decode over the pooled cache
def permute_queries(q: torch.Tensor, order: torch.Tensor, hk: int) -> torch.Tensor:
    """q [B, Tq, Hq, D] -> each query head's channels in its kv head's rank order."""
    b, tq, hq, d = q.shape
    idx = order.view(b, 1, hk, 1, d).expand(b, tq, hk, hq // hk, d).reshape(b, tq, hq, d)
    return torch.gather(q, -1, idx)


def unpermute_output(o_r: torch.Tensor, order: torch.Tensor, hk: int) -> torch.Tensor:
    """o_r [B, Tq, Hq, D] in value rank order -> natural channel order."""
    b, tq, hq, d = o_r.shape
    idx = order.view(b, 1, hk, 1, d).expand(b, tq, hk, hq // hk, d).reshape(b, tq, hq, d)
    return torch.zeros_like(o_r).scatter_(-1, idx, o_r)


def decode_reference(q, store: PackedKV, tail_k, tail_v, scale=None, scores: bool = True):
    """Reference: (o [B, Tq, Hq, D], pool scores [slots] fp32 (0 for an unused slot), tail scores
    [B, Hk, t] fp32) by unpacking the held tokens to full width (zeros) and running dense decode
    attention (fp32)."""
    k, v, _, _, _, idx = store.unpack()
    n = k.shape[2]
    kc = torch.cat([k.to(tail_k.dtype), tail_k], 2)
    vc = torch.cat([v.to(tail_v.dtype), tail_v], 2)
    o, p = decode_attention(q, kc, vc, scale=scale)
    if not scores:
        return o, None, None
    s = per_kv_head(p, store.hk).float()
    s_pool = torch.zeros(store.slots, dtype=torch.float32, device=q.device)
    s_pool[idx.reshape(-1)] = s[..., :n].reshape(-1)
    return o, s_pool, s[..., n:]


#: most query rows (GQA group x new queries) one Triton program holds
MAX_ROWS = 64


def decode_kernel(kind: str, q, store: PackedKV, tail_k, tail_v, scale=None, scores: bool = True):
    """The same contract as :func:`decode_reference` on the Triton or Numba kernel. A Triton
    step with more than :data:`MAX_ROWS` query rows per kv head (a long multi-token step) goes to
    the reference (one program holds all rows of its group)."""
    if kind == "triton":
        from ...kernels.triton import kv_mixeddim as mod
    elif kind == "numba":
        from ...kernels.numba import kv_mixeddim as mod
    else:
        raise ValueError(f"token.mixeddim decode kernel: kind must be 'triton' or 'numba', got {kind!r}")
    from ...kernels.numba.kv_mixeddim import check_pooled
    check_pooled(q, q, store.kbuf, store.vbuf, store.tok_off, store.count, store.elem_base, store.step, tail_k,
                 tail_v)
    if kind == "triton" and q.shape[2] // tail_k.shape[1] * q.shape[1] > MAX_ROWS:
        return decode_reference(q, store, tail_k, tail_v, scale, scores)
    qp = permute_queries(q, store.k_order, store.hk)
    kw = {"layout": store.host} if kind == "triton" else {}
    o_n, o_r, s_pool, s_tail = mod.pooled_decode(q, qp, store.kbuf, store.vbuf, store.tok_off, store.count,
                                                 store.elem_base, store.step, tail_k, tail_v, scale, scores, **kw)
    o = o_n + unpermute_output(o_r, store.v_order, store.hk)
    return o.to(q.dtype), s_pool, s_tail


class MixedDimKernelOps:
    """Registered op of token.mixeddim's Triton / Numba backend: the scorer (the attention each
    key receives, from the h2o kernels) plus ``decode_packed`` over the pooled cache."""

    def __init__(self, kind: str) -> None:
        from .backends import KernelPolicyOps
        self.kind = kind
        self._h2o = KernelPolicyOps("token.h2o", kind)
        self.__name__ = f"mixeddim_scores_{kind}"

    def __repr__(self) -> str:
        return f"MixedDimKernelOps({self.kind!r})"

    def __call__(self, q, k, v, **_policy):
        return self._h2o(q, k, v)

    def decode(self, q, k, v, scale=None, scores: bool = False):
        """Full-width decode (the zeroed layout): the h2o kernels'."""
        return self._h2o.decode(q, k, v, scale, scores)

    def decode_packed(self, q, store, tail_k, tail_v, scale=None, scores: bool = True):
        return decode_kernel(self.kind, q, store, tail_k, tail_v, scale, scores)


def register_backends(registry) -> None:
    """token.mixeddim's triton and numba backends (called from backends.py's hook)."""
    from ...registry import Backend, Capabilities
    from ..attention.plugin import CPU_FLOATS, GPU_DTYPES, _gqa_rule
    caps = {
        "triton": Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, head_dims=range(1, 257), grad=False,
                               requires=("triton>=3.6",), min_compute_capability=(8, 0), interpreted_on_cpu=True,
                               rules=(_gqa_rule,)),
        "numba": Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, grad=False, requires=("numba>=0.60",),
                              rules=(_gqa_rule,)),
    }
    docs = {"triton": "one-softmax split-K Triton decode over the packed per-width pools (splits of every level "
                      "per (batch, kv head), a combine, scores in a split pass with the final lse); scorer = the "
                      "h2o kernels",
            "numba": "Numba decode over the packed per-width pools, one task per (batch, kv head); scorer = the "
                     "h2o kernels"}
    for kind, prio in (("triton", 30), ("numba", 20)):
        b = Backend("token.mixeddim", kind, MixedDimKernelOps(kind), caps[kind], priority=prio, doc=docs[kind])
        b.materialises_attention = True
        registry.add_backend(b)
