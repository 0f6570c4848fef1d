"""token.mixeddim's incremental rewrite: one decode step's re-allocation applied in place.

After a decode step the new token sits in the full-width tail and the cache is ``k`` units over
its budget (``k = levels`` per new token once full). :func:`repack` re-decides every token and
gathers every pool anew; :func:`step_rewrite` makes the same decisions
(``reference.allocate_step``: top-k selections, equal to ``allocate_units`` bit for bit) and moves
only the tokens whose width changes, inside a store that has spare slots per (level, row)
(``repack(..., slack=s)``):

* a token leaving a (level, row) run leaves a hole, filled by the run's last held token
  (swap-remove: the run stays a prefix of its slots, in no particular order);
* a token entering a run (a narrower width, a revived token at one unit, the tail's tokens) is
  appended after the run's held tokens, its first ``w`` rank-ordered channels copied;
* per slot the state keeps the token's group energies and unit profile
  (``reference.unit_profile``), so a step never recomputes the energies of the whole cache.

Every array op has a shape fixed by host ints (rows, slots, ``k``) and the writes are masked
accumulations instead of boolean indexing, so a step makes no device -> host copy. Room: a run
gains at most :func:`step_bound` tokens a step; the step returns (on the device) the fewest spare
slots left in any run, which the caller reads one step later (long computed by then) and falls
back to :func:`repack` (with fresh slack) when it is below the bound, before the step that could
overflow. The tail is always moved into the pools (the caller empties it), as :func:`repack`
does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...registry.capabilities import package_reason
from .mixeddim import PackedKV, _rank_order, energies
from .reference import allocate_step, protected_mask, unit_profile


@dataclass
class StepState:
    """Per-row view of a store's slots and the per-slot energies; built once per :func:`repack`
    (:func:`step_state`), kept up to date by :func:`step_rewrite`."""
    slot: torch.Tensor    # [R, S] long: every slot of row r, over all levels (padding: 0)
    level: torch.Tensor   # [R, S] long: its level (padding: 0)
    run: torch.Tensor     # [R, S] long: its index inside its (level, row) run (padding: a huge value)
    ke: torch.Tensor      # [slots, L] fp32 group energies of K (zero beyond the width, unused slots 0)
    ve: torch.Tensor      # [slots, L] fp32 group energies of V
    prof: torch.Tensor    # [slots, L] fp32 unit_profile(ke, ve)


def step_state(store: PackedKV) -> StepState:
    """The state :func:`step_rewrite` needs, from a store (one device -> host copy)."""
    R, L = store.rows, store.levels
    offs = store.tok_off.tolist()
    ke, ve = store.slot_energies()
    caps = [[offs[lv][r + 1] - offs[lv][r] for lv in range(L)] for r in range(R)]
    S = max(1, max(sum(c) for c in caps))
    slot = torch.zeros(R, S, dtype=torch.long)
    level = torch.zeros(R, S, dtype=torch.long)
    run = torch.full((R, S), 2**40, dtype=torch.long)
    for r in range(R):
        j = 0
        for lv in range(L):
            c = caps[r][lv]
            slot[r, j:j + c] = torch.arange(offs[lv][r], offs[lv][r] + c)
            level[r, j:j + c] = lv
            run[r, j:j + c] = torch.arange(c)
            j += c
    dev = store.pos.device
    return StepState(slot.to(dev), level.to(dev), run.to(dev), ke, ve, unit_profile(ke, ve))


def _pairwise_rank(key: torch.Tensor, group: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """[R, M]: for each member, how many members of its row with the same ``group`` have a smaller
    ``key`` (keys unique within a group)."""
    same = (group[:, :, None] == group[:, None, :]) & member[:, :, None] & member[:, None, :]
    return (same & (key[:, None, :] < key[:, :, None])).sum(-1)


def step_bound(drop: int, t: int) -> int:
    """Most tokens of a row one step moves (so most that enter one run): ``drop`` units from
    stage 1, as many from stage 2 (revived tokens are among stage 1's), and the tail's ``t``."""
    return 2 * drop + t


STEP_IMPL_ENV = "BLOCKZOO_MIXEDDIM_STEP"


def _use_triton(store: PackedKV, impl: str) -> bool:
    """``impl="auto"``: the environment's ``BLOCKZOO_MIXEDDIM_STEP`` when set (auto, torch or
    triton), else the Triton step on a CUDA store and the torch step elsewhere."""
    if impl == "auto":
        impl = os.environ.get(STEP_IMPL_ENV, "auto") or "auto"
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"token.mixeddim step_rewrite: impl must be 'auto', 'torch' or 'triton', got {impl!r}"
                         f" (from {STEP_IMPL_ENV} when the call said 'auto')")
    if impl == "auto":
        return store.pos.is_cuda and package_reason("triton>=3.6") is None
    return impl == "triton"


def step_rewrite(store: PackedKV, state: StepState, tail_k, tail_v, tail_pos, tail_acc, seen: int, keep: int,
                 sinks: int, recent: int, drop: int, impl: str = "auto") -> torch.Tensor:
    """Apply one step's re-allocation to ``store`` and ``state`` in place; the tail's tokens move
    into the pools. ``drop``: the units every row is over its budget (a host int the caller
    tracks: held units + the tail's - ``keep * levels``). No device -> host copy: returns a device
    tensor ``[fits, free]``: whether the step was applied (every run had room; when not, nothing
    was written) and the fewest spare slots any run has left. The caller makes sure of room
    beforehand: a run gains at most :func:`step_bound` tokens a step, so a step whose previous
    ``free`` (read one step late, when it is long computed) is at least that bound fits.
    ``impl``: "triton" (``kernels/triton/kv_mixeddim_step.py``, four launches; what "auto" picks
    on CUDA) or "torch" (the code below; "auto" elsewhere); the same caches (tested: both against
    :func:`repack` after every step)."""
    R, L, g, d = store.rows, store.levels, store.step, store.d
    dev = store.pos.device
    t = tail_k.shape[2]
    rows = torch.arange(R, device=dev)
    # -- the row view: slots (every level) then the tail ------------------------------------------
    S = state.slot.shape[1]
    tk, tv = _rank_order(tail_k, store.k_order), _rank_order(tail_v, store.v_order)   # [R, t, D]
    ke_t, ve_t = energies(tk, g), energies(tv, g)                          # [R, t, L]
    if _use_triton(store, impl):
        from ...kernels.triton.kv_mixeddim_step import step_apply
        return step_apply(store, state, tk, tv, tail_pos, tail_acc, ke_t, ve_t, seen, keep,
                          sinks, recent, drop, S)
    cnt = store.count                                                       # [L, R]
    held = state.run < cnt[state.level, rows[:, None]]                      # [R, S]
    units = torch.cat([torch.where(held, state.level + 1, 0), torch.full((R, t), L, device=dev)], 1)
    pos = torch.cat([torch.where(held, store.pos[state.slot], -1), tail_pos.reshape(R, t)], 1)
    sc = torch.cat([torch.where(held, store.acc[state.slot], 0.0), tail_acc.reshape(R, t).float()], 1)
    prof = torch.cat([state.prof[state.slot], unit_profile(ke_t, ve_t)], 1)
    prot = protected_mask(pos, seen, sinks, recent) & (units > 0)
    rest = keep * L - prot.sum(-1) * L
    new = allocate_step(sc, prof, units, pos, prot, rest, drop)
    # -- the tokens that move: width changed, or in the tail ---------------------------------------
    is_tail = torch.zeros_like(units, dtype=torch.bool)
    is_tail[:, S:] = True
    changed = (new != units) | is_tail
    M = min(S + t, step_bound(drop, t))
    cidx = torch.topk(changed.to(torch.int32), M, dim=-1, sorted=False).indices  # [R, M]
    ok_c = changed.gather(1, cidx)
    c_tail = cidx >= S
    c_new = new.gather(1, cidx)
    c_slotcol = cidx.clamp_max(S - 1)
    c_slot = state.slot.gather(1, c_slotcol)
    c_lev_old = state.level.gather(1, c_slotcol)
    c_run_old = state.run.gather(1, c_slotcol)
    leaving = ok_c & ~c_tail                                                # pool tokens leaving their run
    entering = ok_c & (c_new > 0)
    # source data of every moving token, read before anything is written: K, V [R, M, D] (rank
    # order, zeros beyond its new width), pos, acc, energies (zeros beyond its new width)
    ar = torch.arange(d, device=dev)
    w_old = torch.where(c_tail, d, (c_lev_old + 1) * g)
    w_new = c_new * g
    base_old = store.elem_base[c_lev_old] + (c_slot - store.tok_off[c_lev_old, 0]) * w_old
    inside = ar < w_new[..., None]
    el = (base_old[..., None] + ar).masked_fill(~inside | c_tail[..., None], 0)
    tj = (cidx - S).clamp(0, t - 1)
    tail_rows = rows[:, None].expand(R, M)
    srck = torch.where(c_tail[..., None], tk[tail_rows, tj], store.kbuf[el]) * inside
    srcv = torch.where(c_tail[..., None], tv[tail_rows, tj], store.vbuf[el]) * inside
    src_pos = pos.gather(1, cidx)
    src_acc = sc.gather(1, cidx)
    keep_g = torch.arange(L, device=dev) < c_new[..., None]
    src_ke = torch.where(c_tail[..., None], ke_t[tail_rows, tj], state.ke[c_slot]) * keep_g
    src_ve = torch.where(c_tail[..., None], ve_t[tail_rows, tj], state.ve[c_slot]) * keep_g
    # -- removals: swap-remove per (level, row) run ------------------------------------------------
    lr_old = c_lev_old * R + rows[:, None]                                   # run id
    h = _count(lr_old, leaving, L * R)
    cnt_f = cnt.reshape(-1)
    after = cnt_f - h                                                        # [L * R]
    hole = leaving & (c_run_old < after[lr_old])
    hole_rank = _pairwise_rank(c_run_old, lr_old, hole)
    # movers: the held tokens of the run's last h slots that do not leave, in run order
    j = torch.arange(M, device=dev)
    mv_run = cnt_f[:, None] - 1 - j                                          # [L * R, M], descending
    lvl_of = torch.arange(L, device=dev).repeat_interleave(R)
    row_of = rows.repeat(L)
    mv_slot = store.tok_off[lvl_of, row_of][:, None] + mv_run.clamp_min(0)
    slot_leaves = torch.zeros(store.slots + 1, dtype=torch.bool, device=dev)
    slot_leaves[torch.where(leaving, c_slot, store.slots)] = True
    mv_ok = (j[None, :] < h[:, None]) & (mv_run >= 0) & ~slot_leaves[mv_slot.clamp_max(store.slots - 1)]
    # rank among the run's movers by run index (ascending) = how many valid movers come after in j
    mv_rank = torch.flip(torch.cumsum(torch.flip(mv_ok.long(), [1]), 1), [1]) - mv_ok.long()
    by_rank = torch.full((L * R, M + 1), -1, dtype=torch.long, device=dev)
    by_rank.scatter_(1, torch.where(mv_ok, mv_rank, M), torch.where(mv_ok, mv_slot, -1))
    mover = by_rank[lr_old, hole_rank.clamp_max(M)]                          # [R, M] slot moving into each hole
    mover = torch.where(hole, mover, -1)
    # -- appends: entering tokens after the run's remaining held ones --------------------------------
    lev_new = (c_new - 1).clamp_min(0)
    lr_new = lev_new * R + rows[:, None]
    ent_rank = _pairwise_rank(cidx, lr_new, entering)
    dst_run = after[lr_new] + ent_rank
    cap = (store.tok_off[:, 1:] - store.tok_off[:, :-1]).reshape(-1)
    e = _count(lr_new, entering, L * R)
    final = after + e
    free = (cap - final).min() if cap.numel() else torch.zeros((), dtype=torch.long, device=dev)
    # device bool: every run had room, every row was exactly the caller's ``drop`` units over
    # (allocate_step selects at most that many: a caller tracking the pools wrongly would go
    # over budget silently) and no row changed more tokens than the bound M (2 * drop + t by
    # allocate_step's stages; checked, as a wrong bound would lose tokens)
    over = (units * (~prot & (units > 0))).sum(-1) - rest
    fits = (free >= 0) & (changed.sum(-1).max() <= M) & (over == drop).all()
    dst_slot = store.tok_off[lev_new, rows[:, None]] + dst_run
    # -- writes: no boolean indexing (no device -> host copy): masked entries add zeros --------------
    # Every destination is first cleared (x + (-x) = 0 exactly), then the value added (0 + v = v), by
    # index_add_ (atomic adds, no sort), where a masked entry adds 0 at its own clamped address (_spread).
    # Unused slots hold pos -1, acc 0, zeros; writes to them add onto that. Nothing is written when
    # a run lacked room (``fits`` false).
    hole_w = (hole & (mover >= 0)) & fits                                   # [R, M]
    gone = (j[None, :] < (cnt_f - after)[:, None]) & fits                    # [L * R, M]: run idx after + j
    gone_slot = store.tok_off[lvl_of, row_of][:, None] + after[:, None] + j
    ent_w = entering & fits
    # 1) read: the movers' rows (the holes' new content)
    ms = mover.clamp_min(0)
    m_pos, m_acc = store.pos[ms], store.acc[ms]
    m_ke, m_ve, m_prof = state.ke[ms], state.ve[ms], state.prof[ms]
    hl = c_lev_old
    hw = (hl + 1) * g
    h_span = (ar < hw[..., None]) & hole_w[..., None]                        # [R, M, D]
    h_el = (store.elem_base[hl] + (c_slot - store.tok_off[hl, 0]) * hw)[..., None] + ar
    m_el = (store.elem_base[hl] + (ms - store.tok_off[hl, 0]) * hw)[..., None] + ar
    m_k = store.kbuf[torch.where(h_span, m_el, 0)]
    m_v = store.vbuf[torch.where(h_span, m_el, 0)]
    # the gone slots' elements
    gw = ((lvl_of + 1) * g)[:, None].expand(-1, M)
    g_span = (ar < gw[..., None]) & gone[..., None]
    g_el = (store.elem_base[lvl_of][:, None] + (gone_slot - store.tok_off[lvl_of, 0][:, None]) * gw)[..., None] + ar
    # the entering tokens' destinations
    ew = w_new
    e_span = (ar < ew[..., None]) & ent_w[..., None]
    e_el = (store.elem_base[lev_new] + (dst_slot - store.tok_off[lev_new, 0]) * ew)[..., None] + ar
    # 2) clear the holes and the gone slots
    for mask, slot, span, el in ((hole_w, c_slot, h_span, h_el), (gone, gone_slot, g_span, g_el)):
        _clear(store, state, mask, slot, span, el)
    # 3) write the movers into the holes, the entering tokens after the runs' held ones
    _add(store, state, hole_w, c_slot, h_span, h_el, m_k, m_v, m_pos, m_acc, m_ke, m_ve, m_prof)
    _add(store, state, ent_w, dst_slot, e_span, e_el, srck, srcv, src_pos, src_acc, src_ke, src_ve,
         unit_profile(src_ke, src_ve))
    store.count.copy_(torch.where(fits, final, cnt_f).view(L, R))
    return torch.stack([fits.long(), free])


def _count(bins: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """How many masked entries fall in each of ``n`` bins (no boolean indexing)."""
    out = torch.zeros(n + 1, dtype=torch.long, device=bins.device)
    return out.scatter_add_(0, torch.where(mask, bins, n).reshape(-1), mask.reshape(-1).long())[:n]


def _spread(store, slot, el):
    """Where masked entries add their zeros: their own (clamped) addresses, which are spread out;
    all at one address, the atomic adds of a [rows, M, D] write serialise (170 ms a step on an
    H100). Adding 0 is exact, so it does not matter where, even onto a real write's address."""
    return slot.clamp(0, max(store.slots - 1, 0)), el.clamp(0, max(store.kbuf.numel() - 1, 0))


def _clear(store, state, mask, slot, span, el) -> None:
    """Slots ``slot[mask]``: K / V elements ``el[span]`` to 0, pos to -1, acc and the state to 0."""
    sl, e0 = _spread(store, slot, el)
    for buf in (store.kbuf, store.vbuf):
        buf.index_add_(0, e0.reshape(-1), -(buf[e0] * span).reshape(-1))
    store.pos.index_add_(0, sl.reshape(-1), (-1 - store.pos[sl]).masked_fill(~mask, 0).reshape(-1))
    store.acc.index_add_(0, sl.reshape(-1), -(store.acc[sl] * mask).reshape(-1))
    for t in (state.ke, state.ve, state.prof):
        t.index_add_(0, sl.reshape(-1), -(t[sl] * mask[..., None]).reshape(-1, t.shape[1]))


def _add(store, state, mask, slot, span, el, k, v, pos, acc, ke, ve, prof) -> None:
    """Onto cleared slots ``slot[mask]``: K / V ``k[span]``, pos, acc and the state."""
    sl, e0 = _spread(store, slot, el)
    sl, e0 = sl.reshape(-1), e0.reshape(-1)
    store.kbuf.index_add_(0, e0, (k * span).to(store.kbuf.dtype).reshape(-1))
    store.vbuf.index_add_(0, e0, (v * span).to(store.vbuf.dtype).reshape(-1))
    store.pos.index_add_(0, sl, ((pos + 1) * mask).reshape(-1))
    store.acc.index_add_(0, sl, (acc * mask).reshape(-1))
    for t, x in ((state.ke, ke), (state.ve, ve), (state.prof, prof)):
        t.index_add_(0, sl, (x * mask[..., None]).reshape(-1, t.shape[1]))
