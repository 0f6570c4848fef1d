"""token.mixeddim's incremental rewrite step in Triton (``plugins/token/mixeddim_step.py``).

Four launches (three kernels, the last one twice), no device -> host copy, the same decisions and
the same moves as the torch step (``step_rewrite``; compared bit for bit in the tests):

1. ``_scan_kernel``, grid ``(P, R)``: program ``(p, r)`` takes ``BLOCK`` tokens of row ``r``'s view
   (its held tokens level by level, then the tail's, whose unit profiles it computes from their
   group energies), builds the int64 key of every held unit of every unprotected token (the
   gain's order-preserving bits, then ``2**32 - 1 - (pos * L + rank)``: gain ascending, later
   token and higher rank first, as the whole-cache sort breaks ties) and writes its ``KA``
   smallest keys (with the token's id: its slot, or ``-1 - j`` for tail token
   ``j``), its ``2 * KA`` smallest keys of units of rank >= 1, the largest clamped score, the
   protected tokens, the unprotected tokens and their units.
2. ``_stage1_kernel``, grid ``(R,)``: merges a row's partial lists: the row's ``drop`` smallest
   units are stage 1's drops; a dropped unit of rank 0 empties its token; writes the row's live
   tokens, the drops, the largest dropped key and the row's largest score.
3. ``_apply_kernel``, grid ``(R,)``, twice (first the room check of every row, then the moves,
   all or nothing): the largest live count over all rows gives each row the
   tokens it revives (its best emptied ones by ``score / row max``, ties the earlier) and as many
   stage-2 drops (its smallest remaining units of rank >= 1, from the scan's second lists); then
   every changed token (at most ``2 * KA + T`` a row) moves: out of its run by swap-remove (the
   run's last held tokens fill the holes), into its new run by append (its first ``w`` channels),
   the vacated slots cleared; the per-slot energies move along and the unit profile of a token
   whose width changed is recomputed (the same operations in the same order as
   ``reference.unit_profile``, divisions correctly rounded). Every store of a row is made by its
   own program, after all its loads.

When a run of any row lacks room nothing is written (``FLAG``; the returned ``[fits, free]``), as
in the torch step; the policy checks room one step ahead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

I64_MAX = tl.constexpr(2**63 - 1)
I64_NEG = tl.constexpr(-(2**63 - 1))


@triton.jit
def _order_key(gain, pos, u, L: tl.constexpr):
    """int64 key of a unit: gain's order-preserving bits (gain >= 0; -0.0 as +0.0), then later
    (position, rank) first."""
    bits = gain.to(tl.int32, bitcast=True)
    bits = tl.where(gain == 0.0, 0, bits)
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (bits.to(tl.int64) << 32) | (4294967295 - (pos * L + u))


@triton.jit
def _store_smallest(keys, head, lo, ids, OUT_KEY, OUT_ID, K: tl.constexpr):
    """The K smallest keys of the units ``lo <= u <= head`` of every token of the block, ascending,
    with their token's ``ids``, stored at OUT_KEY[0..K) and OUT_ID[0..K) (a missing one: I64_MAX,
    id 0). ``keys`` [BLOCK, LP]: a token's keys fall with its rank (its gain is ``s * profile`` and
    the profile is a running minimum along the ranks; ties go to the higher rank), so its smallest
    not-yet-taken unit is always its highest one: each extraction is a minimum over the tokens'
    current heads ([BLOCK]) rather than over every unit ([BLOCK, LP]). (A minimum with its index,
    the id computed from the index, was slower on the H100: 108 against 73 us a scan.)"""
    u = tl.arange(0, keys.shape[1])[None, :]
    cur = tl.where(head >= lo, tl.sum(tl.where(u == head[:, None], keys, 0), 1), I64_MAX)
    for i in range(K):  # a loop, not unrolled: compile time grows with K otherwise
        mn = tl.min(cur, 0)
        hit = cur == mn
        tl.store(OUT_KEY + i, mn)
        tl.store(OUT_ID + i, tl.sum(tl.where(hit & (mn != I64_MAX), ids, 0), 0))
        head = tl.where(hit, head - 1, head)
        nxt = tl.where(head >= lo, tl.sum(tl.where(u == head[:, None], keys, 0), 1), I64_MAX)
        cur = tl.where(hit, nxt, cur)


@triton.jit(do_not_specialize=["seen"])  # one compiled kernel for every step, not one per seen % 16
def _scan_kernel(TOK, CNT, POS, ACC, PROF, TPOS, TACC, TKE, TVE,
                 OA_KEY, OA_ID, OB_KEY, OB_ID, OSTAT, OMAX,
                 R, P, T, seen, sinks, recent,
                 L: tl.constexpr, LP: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    r = tl.program_id(1)
    j = p * BLOCK + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.int64)
    H = tl.zeros([], tl.int64)
    lvl = zero
    slot = zero
    inpool = j < 0
    for lv in tl.static_range(L):
        c = tl.load(CNT + lv * R + r)
        t0 = tl.load(TOK + lv * (R + 1) + r)
        m = (j >= H) & (j < H + c)
        lvl = tl.where(m, lv, lvl)
        slot = tl.where(m, t0 + (j - H), slot)
        inpool = inpool | m
        H += c
    jt = j - H
    intail = (jt >= 0) & (jt < T)
    jt = tl.where(intail, jt, 0)
    pos = tl.where(inpool, tl.load(POS + slot, mask=inpool, other=-1),
                   tl.load(TPOS + r * T + jt, mask=intail, other=-1))
    acc = tl.where(inpool, tl.load(ACC + slot, mask=inpool, other=0.0),
                   tl.load(TACC + r * T + jt, mask=intail, other=0.0))
    units = tl.where(inpool, lvl + 1, tl.where(intail, L, 0))
    valid = inpool | intail
    prot = valid & ((pos < sinks) | (pos >= seen - recent))
    free = valid & ~prot
    s = tl.maximum(acc, 0.0)
    u = tl.arange(0, LP)
    um = u < L
    prof = tl.load(PROF + slot[:, None] * L + u[None, :], mask=inpool[:, None] & um[None, :], other=0.0)
    if p * BLOCK + BLOCK > H:  # the chunk holds tail tokens: their unit profiles from their energies
        tm = intail[:, None] & um[None, :]
        t_off = (r * T + jt)[:, None] * L + u[None, :]
        tprof = _unit_profile(tl.load(TKE + t_off, mask=tm, other=0.0), tl.load(TVE + t_off, mask=tm, other=0.0),
                              tm, LP, L)
        prof = tl.where(inpool[:, None], prof, tprof)
    key = _order_key(s[:, None] * prof, pos[:, None], u[None, :].to(tl.int64), L)
    head = tl.where(free, units - 1, -1)  # a token's highest held unit (none: -1)
    ida = tl.where(inpool, slot, -1 - jt)
    out = (r * P + p).to(tl.int64)
    _store_smallest(key, head, 0, ida, OA_KEY + out * KA, OA_ID + out * KA, KA)
    _store_smallest(key, head, 1, ida, OB_KEY + out * KB, OB_ID + out * KB, KB)
    tl.store(OMAX + out, tl.max(tl.where(valid, s, 0.0), 0))
    tl.store(OSTAT + out * 3 + 0, tl.sum(prot.to(tl.int64), 0))
    tl.store(OSTAT + out * 3 + 1, tl.sum(free.to(tl.int64), 0))
    tl.store(OSTAT + out * 3 + 2, tl.sum(tl.where(free, units, 0), 0))


@triton.jit(do_not_specialize=["keep_units", "drop_host"])
def _stage1_kernel(OA_KEY, OA_ID, OSTAT, OMAX, D1_KEY, D1_ID, LIVE, ROWMAX, TAU, FLAG,
                   R, P, keep_units, drop_host, L: tl.constexpr, KA: tl.constexpr, PKP: tl.constexpr,
                   PP: tl.constexpr):
    r = tl.program_id(0)
    q = tl.arange(0, PKP)
    qm = q < P * KA
    keys = tl.load(OA_KEY + r * P * KA + q, mask=qm, other=I64_MAX)
    ids = tl.load(OA_ID + r * P * KA + q, mask=qm, other=0)
    pp = tl.arange(0, PP)
    pm = pp < P
    nprot = tl.sum(tl.load(OSTAT + (r * P + pp) * 3 + 0, mask=pm, other=0), 0)
    nfree = tl.sum(tl.load(OSTAT + (r * P + pp) * 3 + 1, mask=pm, other=0), 0)
    ufree = tl.sum(tl.load(OSTAT + (r * P + pp) * 3 + 2, mask=pm, other=0), 0)
    rowmax = tl.max(tl.load(OMAX + r * P + pp, mask=pm, other=0.0), 0)
    drop = ufree - (keep_units - nprot * L)
    emptied = tl.zeros([], tl.int64)
    tau = tl.full([], -1, tl.int64)
    for i in range(KA):
        mn = tl.min(keys, 0)
        hit = keys == mn
        act = (i < drop) & (mn != I64_MAX)
        idm = tl.sum(tl.where(hit & act, ids, 0), 0)
        flat = 4294967295 - (mn & 4294967295)
        emptied += (act & (flat % L == 0)).to(tl.int64)
        tl.store(D1_KEY + r * KA + i, tl.where(act, mn, I64_MAX))
        tl.store(D1_ID + r * KA + i, idm)
        tau = tl.where(act, mn, tau)
        keys = tl.where(hit, I64_MAX, keys)
    tl.store(LIVE + r, nfree - emptied)
    tl.store(ROWMAX + r, rowmax)
    tl.store(TAU + r, tau)
    # the caller's drop must be the row's (else the step would select too few units: refused)
    tl.store(FLAG + r * 2 + 0, ((drop == drop_host) & (drop <= KA)).to(tl.int64))


@triton.jit
def _unit_profile(ke, ve, gm, LP: tl.constexpr, L: tl.constexpr):
    """reference.unit_profile of rows [M, LP] (groups beyond L zero): sums left to right, divisions
    correctly rounded, then the running minimum along the ranks."""
    u = tl.arange(0, LP)[None, :]
    sk = tl.sum(tl.where(u == 0, ke, 0.0), 1)
    sv = tl.sum(tl.where(u == 0, ve, 0.0), 1)
    for i in tl.static_range(1, L):
        sk = sk + tl.sum(tl.where(u == i, ke, 0.0), 1)
        sv = sv + tl.sum(tl.where(u == i, ve, 0.0), 1)
    sk = tl.maximum(sk, 1e-30)
    sv = tl.maximum(sv, 1e-30)
    share = 0.5 * (tl.math.div_rn(ke, sk[:, None]) + tl.math.div_rn(ve, sv[:, None]))
    run = tl.sum(tl.where(u == 0, share, 0.0), 1)
    out = tl.where(u == 0, run[:, None], 0.0)
    for i in tl.static_range(1, L):
        run = tl.minimum(run, tl.sum(tl.where(u == i, share, 0.0), 1))
        out = tl.where(u == i, run[:, None], out)
    return tl.where(gm, out, 0.0)


@triton.jit
def _apply_kernel(D1_KEY, D1_ID, OB_KEY, OB_ID, LIVE, ROWMAX, TAU, FLAG, OUT,
                  TOK, CNT, EB, POS, ACC, KE, VE, PROF, KB_, VB_,
                  TPOS, TACC, TKE, TVE, TK, TV,
                  R, P, T,
                  L: tl.constexpr, LP: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  KA: tl.constexpr, KB: tl.constexpr, PBP: tl.constexpr, ME: tl.constexpr,
                  RB: tl.constexpr, APPLY: tl.constexpr):
    """Launched twice with the same decisions: APPLY=False writes each row's room check (FLAG);
    APPLY=True moves the tokens if every row had room (all or nothing, as the torch step), and its
    program 0 writes OUT = [fits, free] over every row (what ``step_apply`` returns)."""
    r = tl.program_id(0)
    # -- the largest live count over every row -----------------------------------------------------
    n_live = tl.zeros([], tl.int64)
    for r0 in range(0, R, RB):
        rr = r0 + tl.arange(0, RB)
        n_live = tl.maximum(n_live, tl.max(tl.load(LIVE + rr, mask=rr < R, other=0), 0))
    need = n_live - tl.load(LIVE + r)
    rowmax = tl.maximum(tl.load(ROWMAX + r), 1e-30)
    tau = tl.load(TAU + r)
    # -- entries: stage-1 drops [0, KA), stage-2 drops [KA, 2 KA), tail tokens [2 KA, 2 KA + T) --------
    e = tl.arange(0, ME)
    in1 = e < KA
    intl = (e >= 2 * KA) & (e < 2 * KA + T)
    k1 = tl.load(D1_KEY + r * KA + e, mask=in1, other=I64_MAX)
    i1 = tl.load(D1_ID + r * KA + e, mask=in1, other=0)
    # stage-2 drops: the `need` smallest scan-B keys above stage 1's largest drop
    qb = tl.arange(0, PBP)
    qbm = qb < P * KB
    kb = tl.load(OB_KEY + r * P * KB + qb, mask=qbm, other=I64_MAX)
    ib = tl.load(OB_ID + r * P * KB + qb, mask=qbm, other=0)
    kb = tl.where(kb > tau, kb, I64_MAX)
    k2 = tl.full([ME], I64_MAX, tl.int64)
    i2 = tl.zeros([ME], tl.int64)
    for i in range(KA):
        mn = tl.min(kb, 0)
        hit = kb == mn
        act = (i < need) & (mn != I64_MAX)
        idm = tl.sum(tl.where(hit & act, ib, 0), 0)
        k2 = tl.where(e == KA + i, tl.where(act, mn, I64_MAX), k2)
        i2 = tl.where(e == KA + i, idm, i2)
        kb = tl.where(hit, I64_MAX, kb)
    key = tl.where(in1, k1, k2)
    dropped = key != I64_MAX
    flat = 4294967295 - (key & 4294967295)
    rank = tl.where(dropped, flat % L, L)
    ident = tl.where(in1, i1, i2)
    ident = tl.where(intl, -1 - (e - 2 * KA), ident)
    ok = dropped | intl
    # -- revive: emptied tokens (a rank-0 stage-1 drop), the `need` best by score / row max ------------
    emp = in1 & dropped & (rank == 0)
    is_t = ident < 0
    jt = tl.where(is_t, -1 - ident, 0)
    sl = tl.where(is_t, 0, ident)
    e_acc = tl.where(is_t, tl.load(TACC + r * T + jt, mask=ok & is_t, other=0.0),
                     tl.load(ACC + sl, mask=ok & ~is_t, other=0.0))
    e_pos = tl.where(is_t, tl.load(TPOS + r * T + jt, mask=ok & is_t, other=0),
                     tl.load(POS + sl, mask=ok & ~is_t, other=0))
    pri = tl.math.div_rn(tl.maximum(e_acc, 0.0), rowmax)
    pbits = pri.to(tl.int32, bitcast=True)
    pbits = tl.where(pri == 0.0, 0, pbits)
    pkey = (pbits.to(tl.int64) << 32) | (4294967295 - e_pos)
    pkey = tl.where(emp, pkey, I64_NEG)
    revive = e < 0
    for i in range(KA):
        mx = tl.max(pkey, 0)
        hit = pkey == mx
        act = (i < need) & (mx != I64_NEG)
        revive = revive | (hit & act)
        pkey = tl.where(hit, I64_NEG, pkey)
    # -- per token: old level, old and new units; one representative entry per token -------------------
    same = (ident[:, None] == ident[None, :]) & ok[:, None] & ok[None, :]
    first = tl.sum((same & (e[None, :] < e[:, None])).to(tl.int32), 1) == 0
    rep = ok & first
    newu = tl.min(tl.where(same, rank[None, :], L), 1)
    rev_tok = tl.max(tl.where(same, revive[None, :].to(tl.int32), 0), 1) > 0
    newu = tl.where(rev_tok, 1, newu)
    old_l = tl.zeros([ME], tl.int64) - 1
    run_i = tl.zeros([ME], tl.int64)
    for lv in tl.static_range(L):
        t0 = tl.load(TOK + lv * (R + 1) + r)
        t1 = tl.load(TOK + lv * (R + 1) + r + 1)
        m = ~is_t & (sl >= t0) & (sl < t1)
        old_l = tl.where(m, lv, old_l)
        run_i = tl.where(m, sl - t0, run_i)
    oldu = tl.where(is_t, L, old_l + 1)
    changed = rep & ((newu != oldu) | is_t)
    leaving = changed & ~is_t
    entering = changed & (newu > 0)
    new_l = newu - 1
    # -- runs: swap-remove holes, movers, append slots, room ----------------------------------------------
    q = tl.arange(0, ME)
    hole = e < 0
    mover_of = tl.zeros([ME], tl.int64)
    dst_of = tl.zeros([ME], tl.int64)
    fits = tl.load(FLAG + r * 2 + 0) != 0
    free_min = tl.full([], I64_MAX, tl.int64)
    for lv in tl.static_range(L):
        t0 = tl.load(TOK + lv * (R + 1) + r)
        cap = tl.load(TOK + lv * (R + 1) + r + 1) - t0
        cnt = tl.load(CNT + lv * R + r)
        lv_leave = leaving & (old_l == lv)
        h = tl.sum(lv_leave.to(tl.int64), 0)
        after = cnt - h
        lv_hole = lv_leave & (run_i < after)
        hole = hole | lv_hole
        hole_rank = tl.sum((lv_hole[None, :] & (run_i[None, :] < run_i[:, None])).to(tl.int64), 1)
        cand = t0 + after + q
        cand_leaves = tl.sum(((ident[None, :] == cand[:, None]) & lv_leave[None, :]).to(tl.int32), 1) > 0
        cand_ok = (q < h) & ~cand_leaves
        cand_rank = tl.sum((cand_ok[None, :] & (q[None, :] < q[:, None])).to(tl.int64), 1)
        pick = (cand_rank[None, :] == hole_rank[:, None]) & cand_ok[None, :] & lv_hole[:, None]
        mover_of = tl.where(lv_hole, tl.sum(tl.where(pick, cand[None, :], 0), 1), mover_of)
        lv_ent = entering & (new_l == lv)
        ent_rank = tl.sum((lv_ent[None, :] & (e[None, :] < e[:, None])).to(tl.int64), 1)
        n_ent = tl.sum(lv_ent.to(tl.int64), 0)
        dst_of = tl.where(lv_ent, t0 + after + ent_rank, dst_of)
        fits = fits & (after + n_ent <= cap)
        free_min = tl.minimum(free_min, cap - after - n_ent)
    if not APPLY:
        tl.store(FLAG + r * 2 + 0, fits.to(tl.int64))
        tl.store(FLAG + r * 2 + 1, free_min)
        return
    free_all = tl.full([], I64_MAX, tl.int64)
    for r0 in range(0, R, RB):  # all or nothing: every row's room
        rr = r0 + tl.arange(0, RB)
        fits = fits & (tl.min(tl.load(FLAG + rr * 2, mask=rr < R, other=1), 0) != 0)
        free_all = tl.minimum(free_all, tl.min(tl.load(FLAG + rr * 2 + 1, mask=rr < R, other=I64_MAX), 0))
    if r == 0:  # the step's [fits, free] over every row
        tl.store(OUT + 0, fits.to(tl.int64))
        tl.store(OUT + 1, free_all)
    # -- loads: every source before any store ---------------------------------------------------------------
    c = tl.arange(0, BLOCK_D)
    u = tl.arange(0, LP)[None, :]
    gm = u < L
    # entering tokens: their first w_new channels, from their old slot or the tail
    w_old = tl.where(is_t, D, (old_l + 1) * G)
    w_new = new_l * G + G
    eb_old = tl.load(EB + tl.maximum(old_l, 0), mask=entering & ~is_t, other=0)
    tb_old = tl.load(TOK + tl.maximum(old_l, 0) * (R + 1), mask=entering & ~is_t, other=0)
    el_old = eb_old + (sl - tb_old) * w_old
    inw = (c[None, :] < w_new[:, None]) & entering[:, None]
    src_k = tl.where(is_t[:, None], tl.load(TK + (r * T + jt)[:, None] * D + c[None, :], mask=inw & is_t[:, None],
                                             other=0.0),
                     tl.load(KB_ + el_old[:, None] + c[None, :], mask=inw & ~is_t[:, None], other=0.0))
    src_v = tl.where(is_t[:, None], tl.load(TV + (r * T + jt)[:, None] * D + c[None, :], mask=inw & is_t[:, None],
                                             other=0.0),
                     tl.load(VB_ + el_old[:, None] + c[None, :], mask=inw & ~is_t[:, None], other=0.0))
    src_pos = tl.where(is_t, tl.load(TPOS + r * T + jt, mask=entering & is_t, other=0),
                       tl.load(POS + sl, mask=entering & ~is_t, other=0))
    src_acc = tl.where(is_t, tl.load(TACC + r * T + jt, mask=entering & is_t, other=0.0),
                       tl.load(ACC + sl, mask=entering & ~is_t, other=0.0))
    keepg = gm & (u < newu[:, None]) & entering[:, None]
    src_ke = tl.where(is_t[:, None], tl.load(TKE + (r * T + jt)[:, None] * L + u, mask=keepg & is_t[:, None], other=0.0),
                      tl.load(KE + sl[:, None] * L + u, mask=keepg & ~is_t[:, None], other=0.0))
    src_ve = tl.where(is_t[:, None], tl.load(TVE + (r * T + jt)[:, None] * L + u, mask=keepg & is_t[:, None], other=0.0),
                      tl.load(VE + sl[:, None] * L + u, mask=keepg & ~is_t[:, None], other=0.0))
    src_prof = _unit_profile(src_ke, src_ve, keepg, LP, L)
    # movers: the whole row of their (the hole's) level
    hole = hole & fits
    w_h = (old_l + 1) * G
    eb_h = tl.load(EB + tl.maximum(old_l, 0), mask=hole, other=0)
    tb_h = tl.load(TOK + tl.maximum(old_l, 0) * (R + 1), mask=hole, other=0)
    inh = (c[None, :] < w_h[:, None]) & hole[:, None]
    m_el = eb_h + (mover_of - tb_h) * w_h
    h_el = eb_h + (sl - tb_h) * w_h
    mv_k = tl.load(KB_ + m_el[:, None] + c[None, :], mask=inh, other=0.0)
    mv_v = tl.load(VB_ + m_el[:, None] + c[None, :], mask=inh, other=0.0)
    mv_pos = tl.load(POS + mover_of, mask=hole, other=0)
    mv_acc = tl.load(ACC + mover_of, mask=hole, other=0.0)
    hg = hole[:, None] & gm
    mv_ke = tl.load(KE + mover_of[:, None] * L + u, mask=hg, other=0.0)
    mv_ve = tl.load(VE + mover_of[:, None] * L + u, mask=hg, other=0.0)
    mv_pf = tl.load(PROF + mover_of[:, None] * L + u, mask=hg, other=0.0)
    # every load above happens before any store below, in every warp: a mover's or an entering
    # token's source slot can be another token's destination (program order alone does not order
    # global memory across the warps of a program)
    tl.debug_barrier()
    # -- stores ---------------------------------------------------------------------------------------------
    tl.store(KB_ + h_el[:, None] + c[None, :], mv_k, mask=inh)
    tl.store(VB_ + h_el[:, None] + c[None, :], mv_v, mask=inh)
    tl.store(POS + sl, mv_pos, mask=hole)
    tl.store(ACC + sl, mv_acc, mask=hole)
    tl.store(KE + sl[:, None] * L + u, mv_ke, mask=hg)
    tl.store(VE + sl[:, None] * L + u, mv_ve, mask=hg)
    tl.store(PROF + sl[:, None] * L + u, mv_pf, mask=hg)
    ent = entering & fits
    eb_n = tl.load(EB + tl.maximum(new_l, 0), mask=ent, other=0)
    tb_n = tl.load(TOK + tl.maximum(new_l, 0) * (R + 1), mask=ent, other=0)
    d_el = eb_n + (dst_of - tb_n) * w_new
    inn = (c[None, :] < w_new[:, None]) & ent[:, None]
    tl.store(KB_ + d_el[:, None] + c[None, :], src_k.to(KB_.dtype.element_ty), mask=inn)
    tl.store(VB_ + d_el[:, None] + c[None, :], src_v.to(VB_.dtype.element_ty), mask=inn)
    tl.store(POS + dst_of, src_pos, mask=ent)
    tl.store(ACC + dst_of, src_acc, mask=ent)
    eg = ent[:, None] & gm
    tl.store(KE + dst_of[:, None] * L + u, src_ke, mask=eg)
    tl.store(VE + dst_of[:, None] * L + u, src_ve, mask=eg)
    tl.store(PROF + dst_of[:, None] * L + u, src_prof, mask=eg)
    # vacated slots of every run, and the counts
    for lv in tl.static_range(L):
        t0 = tl.load(TOK + lv * (R + 1) + r)
        cnt = tl.load(CNT + lv * R + r)
        h = tl.sum((leaving & (old_l == lv)).to(tl.int64), 0)
        n_ent = tl.sum((entering & (new_l == lv)).to(tl.int64), 0)
        fin = cnt - h + n_ent
        vs = t0 + fin + q
        vm = (fin + q < cnt) & fits
        eb = tl.load(EB + lv)
        tb = tl.load(TOK + lv * (R + 1))
        vel = eb + (vs - tb) * ((lv + 1) * G)
        vmk = vm[:, None] & (c[None, :] < (lv + 1) * G)
        tl.store(KB_ + vel[:, None] + c[None, :], tl.zeros([ME, BLOCK_D], KB_.dtype.element_ty), mask=vmk)
        tl.store(VB_ + vel[:, None] + c[None, :], tl.zeros([ME, BLOCK_D], VB_.dtype.element_ty), mask=vmk)
        tl.store(POS + vs, tl.full([ME], -1, tl.int64), mask=vm)
        tl.store(ACC + vs, tl.zeros([ME], tl.float32), mask=vm)
        vg = vm[:, None] & gm
        tl.store(KE + vs[:, None] * L + u, tl.zeros([ME, LP], tl.float32), mask=vg)
        tl.store(VE + vs[:, None] * L + u, tl.zeros([ME, LP], tl.float32), mask=vg)
        tl.store(PROF + vs[:, None] * L + u, tl.zeros([ME, LP], tl.float32), mask=vg)
        tl.store(CNT + lv * R + r, tl.where(fits, fin, cnt))


def _p2(n: int) -> int:
    return max(1, triton.next_power_of_2(int(n)))


def _consts(L: int, g: int, drop: int, t: int, R: int, P: int, block: int = 512) -> dict:
    """The constexprs of the four launches (scan, stage 1, apply): one place, so that
    :func:`compile_check` compiles exactly what :func:`step_apply` launches."""
    KA, LP = _p2(max(drop, 1)), _p2(L)  # candidates a row keeps per scan chunk
    return {"scan": dict(L=L, LP=LP, KA=KA, KB=2 * KA, BLOCK=block),
            "stage1": dict(L=L, KA=KA, PKP=_p2(P * KA), PP=_p2(P)),
            "apply": dict(L=L, LP=LP, G=g, D=L * g, BLOCK_D=_p2(L * g), KA=KA, KB=2 * KA, PBP=_p2(P * 2 * KA),
                          ME=_p2(2 * KA + t), RB=min(1024, _p2(R)))}


def _scan_cfg() -> tuple[int, int]:
    """(BLOCK, num_warps) of the scan: ``BLOCKZOO_MIXEDDIM_SCAN="block,warps"`` (for A/B runs), else
    (512, 4)."""
    env = os.environ.get("BLOCKZOO_MIXEDDIM_SCAN")
    if not env:
        return 512, 4
    block, warps = (int(x) for x in env.split(","))
    return block, warps


def step_apply(store, state, tk, tv, tpos, tacc, tke, tve, seen: int, keep: int, sinks: int, recent: int,
               drop: int, max_row_tokens: int) -> torch.Tensor:
    """One incremental step on the device (the four launches above). ``tk``, ``tv`` [R, t, D] the
    tail in rank order; ``tke``, ``tve`` [R, t, L] its group energies (as the torch step computes
    them; the kernels compute its unit profiles); ``max_row_tokens`` a host bound on any row's held
    tokens (its slots). Returns ``[fits, free]`` (device, over all rows)."""
    R, L, g = store.rows, store.levels, store.step
    dev = store.pos.device
    t = tk.shape[1]
    block, warps = _scan_cfg()
    P = max(1, triton.cdiv(max_row_tokens + t, block))
    c = _consts(L, g, drop, t, R, P, block)
    KA, KB = c["scan"]["KA"], c["scan"]["KB"]
    i64 = dict(dtype=torch.int64, device=dev)
    oa_key, oa_id = torch.empty(R, P, KA, **i64), torch.empty(R, P, KA, **i64)
    ob_key, ob_id = torch.empty(R, P, KB, **i64), torch.empty(R, P, KB, **i64)
    ostat = torch.empty(R, P, 3, **i64)
    omax = torch.empty(R, P, dtype=torch.float32, device=dev)
    tpos_c, tacc_c = tpos.reshape(R, t).contiguous(), tacc.reshape(R, t).float().contiguous()
    tke, tve, tk, tv = tke.contiguous(), tve.contiguous(), tk.contiguous(), tv.contiguous()
    _scan_kernel[(P, R)](store.tok_off, store.count, store.pos, store.acc, state.prof, tpos_c, tacc_c, tke, tve,
                         oa_key, oa_id, ob_key, ob_id, ostat, omax, R, P, t, seen, sinks,
                         recent, **c["scan"], num_warps=warps)
    d1_key, d1_id = torch.empty(R, KA, **i64), torch.empty(R, KA, **i64)
    live, tau = torch.empty(R, **i64), torch.empty(R, **i64)
    rowmax = torch.empty(R, dtype=torch.float32, device=dev)
    flag = torch.empty(R, 2, **i64)
    _stage1_kernel[(R,)](oa_key, oa_id, ostat, omax, d1_key, d1_id, live, rowmax, tau, flag, R, P, keep * L, drop,
                         **c["stage1"])
    res = torch.empty(2, **i64)
    for apply in (False, True):
        _apply_kernel[(R,)](d1_key, d1_id, ob_key, ob_id, live, rowmax, tau, flag, res,
                            store.tok_off, store.count, store.elem_base, store.pos, store.acc, state.ke, state.ve,
                            state.prof, store.kbuf, store.vbuf, tpos_c, tacc_c, tke, tve, tk, tv, R, P, t,
                            **c["apply"], APPLY=apply)
    return res


def compile_check(target=("cuda", 90, 32), levels: int = 4, step: int = 32, drop: int = 4, t: int = 1,
                  dtype: str = "bf16", rows: int = 128, chunks: int = 18, kernels=("scan", "stage1", "apply")
                  ) -> list[str]:
    """Compile the kernels for ``target`` without a GPU (front end to PTX/cubin through the installed
    backend), with the constexprs a launch on ``rows`` rows of ``chunks`` scan chunks would use:
    catches what the interpreter does not check (constexpr globals, types, the compiler's own
    failures). Returns the compiled kernels' names; raises on an error."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = {n: "i32" for n in ("R", "P", "T", "seen", "sinks", "recent", "keep_units", "drop_host")}
    f32 = {n: "*fp32" for n in ("ACC", "PROF", "TACC", "OMAX", "ROWMAX", "KE", "VE", "TKE", "TVE")}
    half = {n: f"*{dtype}" for n in ("KB_", "VB_", "TK", "TV")}
    types = {**ints, **f32, **half}
    c = _consts(levels, step, drop, t, rows, chunks)
    fns = {"scan": [(_scan_kernel, c["scan"])], "stage1": [(_stage1_kernel, c["stage1"])],
           "apply": [(_apply_kernel, {**c["apply"], "APPLY": a}) for a in (False, True)]}
    done = []
    for fn, consts in (job for name in kernels for job in fns[name]):
        sig = {n: ("constexpr" if n in consts else types.get(n, "*i64")) for n in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget(*target))
        done.append(fn.__name__)
    return done
