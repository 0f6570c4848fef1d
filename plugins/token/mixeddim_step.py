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

Every array op has a shape fixed by host ints (rows, slots, ``k``), so the decisions and the moves
make no device -> host copy; one bool is read at the end of a step: whether every run had room
for its entering tokens. If one did not, nothing was written and the caller falls back to
:func:`repack` (with fresh slack), which makes the same decisions from the unchanged cache.
The tail is always moved into the pools (the caller empties it), as :func:`repack` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mixeddim import PackedKV, _rank_order
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


def _energies(buf: torch.Tensor, lv: int, n: int, base: int, g: int, acc_dt) -> torch.Tensor:
    """Group energies [n, lv + 1] of ``n`` level-``lv`` slots from ``base`` (as :func:`repack`)."""
    blk = buf[base:base + n * (lv + 1) * g].view(n, lv + 1, g)
    return (blk.to(acc_dt) ** 2).sum(-1)


def step_state(store: PackedKV) -> StepState:
    """The state :func:`step_rewrite` needs, from a store (one device -> host copy)."""
    R, L, g = store.rows, store.levels, store.step
    dev = store.pos.device
    acc_dt = torch.promote_types(store.kbuf.dtype, torch.float32)
    first, end, bases, _ = store._bounds()
    offs = store.tok_off.tolist()
    ke = torch.zeros(store.slots, L, dtype=acc_dt, device=dev)
    ve = torch.zeros_like(ke)
    for lv in range(L):
        n = end[lv] - first[lv]
        if n:
            ke[first[lv]:end[lv], :lv + 1] = _energies(store.kbuf, lv, n, bases[lv], g, acc_dt)
            ve[first[lv]:end[lv], :lv + 1] = _energies(store.vbuf, lv, n, bases[lv], g, acc_dt)
    held = _slot_held(store)
    ke *= held[:, None]
    ve *= held[:, None]
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
    return StepState(slot.to(dev), level.to(dev), run.to(dev), ke, ve, unit_profile(ke, ve))


def _slot_held(store: PackedKV) -> torch.Tensor:
    lev, row, _, held, _ = store._slot_meta()
    return held


def _pairwise_rank(key: torch.Tensor, group: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """[R, M]: for each member, how many members of its row with the same ``group`` have a smaller
    ``key`` (keys unique within a group)."""
    same = (group[:, :, None] == group[:, None, :]) & member[:, :, None] & member[:, None, :]
    return (same & (key[:, None, :] < key[:, :, None])).sum(-1)


def step_rewrite(store: PackedKV, state: StepState, tail_k, tail_v, tail_pos, tail_acc, seen: int, keep: int,
                 sinks: int, recent: int, drop: int) -> bool:
    """Apply one step's re-allocation to ``store`` and ``state`` in place; the tail's tokens move
    into the pools. ``drop``: the units every row is over its budget (a host int the caller
    tracks: held units + the tail's - ``keep * levels``). Returns False (and writes nothing) when
    a (level, row) run had no room left; the caller then calls :func:`repack`."""
    R, L, g, d = store.rows, store.levels, store.step, store.d
    dev = store.pos.device
    acc_dt = state.ke.dtype
    t = tail_k.shape[2]
    rows = torch.arange(R, device=dev)
    # -- the row view: slots (every level) then the tail ------------------------------------------
    cnt = store.count                                                       # [L, R]
    held = state.run < cnt[state.level, rows[:, None]]                      # [R, S]
    S = state.slot.shape[1]
    tk, tv = _rank_order(tail_k, store.k_order), _rank_order(tail_v, store.v_order)   # [R, t, D]
    ke_t = (tk.to(acc_dt) ** 2).view(R, t, L, g).sum(-1)
    ve_t = (tv.to(acc_dt) ** 2).view(R, t, L, g).sum(-1)
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
    M = min(S + t, 2 * drop + t)
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
    h = torch.zeros(L * R, dtype=torch.long, device=dev).scatter_add_(0, lr_old[leaving], torch.ones_like(
        lr_old[leaving]))
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
    e = torch.zeros(L * R, dtype=torch.long, device=dev).scatter_add_(0, lr_new[entering], torch.ones_like(
        lr_new[entering]))
    final = after + e
    if not bool((final <= cap).all()):
        return False
    dst_slot = store.tok_off[lev_new, rows[:, None]] + dst_run
    # -- writes --------------------------------------------------------------------------------------
    # 1) movers into holes (same level: the whole width)
    mh = hole & (mover >= 0)
    hs, ms = c_slot[mh], mover[mh]
    hl = c_lev_old[mh]
    wl = (hl + 1) * g
    span = ar < wl[:, None]
    dst_el = (store.elem_base[hl] + (hs - store.tok_off[hl, 0]) * wl)[:, None] + ar
    src_el = (store.elem_base[hl] + (ms - store.tok_off[hl, 0]) * wl)[:, None] + ar
    mk, mvv = store.kbuf[src_el[span]], store.vbuf[src_el[span]]
    mpos, macc, mke, mve, mprof = store.pos[ms], store.acc[ms], state.ke[ms], state.ve[ms], state.prof[ms]
    store.kbuf[dst_el[span]] = mk
    store.vbuf[dst_el[span]] = mvv
    store.pos[hs], store.acc[hs], state.ke[hs], state.ve[hs], state.prof[hs] = mpos, macc, mke, mve, mprof
    # 2) clear the slots that fall out of the held prefix of their run (after removals)
    gone_run = after[:, None] + j                                            # [L * R, M]
    gone = (gone_run < cnt_f[:, None])
    gone_slot = (store.tok_off[lvl_of, row_of][:, None] + gone_run)[gone]
    gl = lvl_of[:, None].expand(-1, M)[gone]
    gw = (gl + 1) * g
    gspan = ar < gw[:, None]
    g_el = (store.elem_base[gl] + (gone_slot - store.tok_off[gl, 0]) * gw)[:, None] + ar
    store.kbuf[g_el[gspan]] = 0
    store.vbuf[g_el[gspan]] = 0
    store.pos[gone_slot], store.acc[gone_slot] = -1, 0.0
    state.ke[gone_slot], state.ve[gone_slot], state.prof[gone_slot] = 0.0, 0.0, 0.0
    # 3) entering tokens appended
    es = dst_slot[entering]
    el_ = lev_new[entering]
    ew = (el_ + 1) * g
    espan = ar < ew[:, None]
    e_el = (store.elem_base[el_] + (es - store.tok_off[el_, 0]) * ew)[:, None] + ar
    store.kbuf[e_el[espan]] = srck[entering][espan].to(store.kbuf.dtype)
    store.vbuf[e_el[espan]] = srcv[entering][espan].to(store.vbuf.dtype)
    eke, eve = src_ke[entering], src_ve[entering]
    store.pos[es], store.acc[es] = src_pos[entering], src_acc[entering]
    state.ke[es], state.ve[es], state.prof[es] = eke, eve, unit_profile(eke, eve)
    store.count.copy_(final.view(L, R))
    return True
