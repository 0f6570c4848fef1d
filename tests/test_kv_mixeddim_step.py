"""token.mixeddim's incremental allocation step (``reference.allocate_step``) against the
whole-cache allocator (``reference.allocate_units``) on the same tokens: the same kept units for
every token, bit for bit, on random caches with tied scores, tied profiles, zero scores, slots in
shuffled order and empty slots.

    .venv/bin/python -m pytest tests/test_kv_mixeddim_step.py -q
"""
from __future__ import annotations

import os

import pytest
import torch

from blockzoo.plugins.token.reference import allocate_step, allocate_units, unit_profile


def _case(seed: int, rows: int, t: int, levels: int, ties: bool):
    """A cache of ``t`` tokens per row holding 1..levels units (caps), every row with the same
    protected positions and the same held total (a cache after a rewrite plus new tokens)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.sort(torch.randperm(3 * t, generator=g)[:t]).values.expand(rows, t).contiguous()
    prot = torch.zeros(rows, t, dtype=torch.bool)
    n_sink = int(torch.randint(0, 3, (1,), generator=g))
    n_recent = int(torch.randint(0, 4, (1,), generator=g))
    prot[:, :n_sink] = True
    if n_recent:
        prot[:, -n_recent:] = True
    caps = torch.randint(1, levels + 1, (rows, t), generator=g)
    caps[prot] = levels
    ke = torch.rand(rows, t, levels, generator=g)
    ve = torch.rand(rows, t, levels, generator=g)
    sc = torch.rand(rows, t, generator=g)
    if ties:  # few distinct values: ties in scores, energies and so in gains and in score / max
        ke = (ke * 3).floor() + 1
        ve = (ve * 2).floor() + 1
        sc = (sc * 4).floor() / 4
        if seed % 3 == 0:
            ve = ke.clone()
    ranks = torch.arange(levels)
    within = ranks < caps[..., None]
    ke, ve = ke * within, ve * within
    free_units = (caps * ~prot).sum(-1)
    # the units every row keeps: up to 2 * levels below the smallest row's (rows differ in caps)
    held = int(free_units.min())
    drop = int(torch.randint(0, min(2 * levels, held) + 1, (1,), generator=g)) if held else 0
    rest = torch.full_like(free_units, held - drop)
    return sc, ke, ve, caps, prot, pos, rest, drop


def _whole(sc, ke, ve, caps, prot, rest, levels):
    n_prot = prot.sum(-1)
    budget = int((rest + n_prot * levels)[0])
    assert torch.equal(rest + n_prot * levels, torch.full_like(rest, budget))
    return allocate_units(sc[None], ke[None], ve[None], caps[None], prot[None], budget)[0]


def _place(x, fill, perm, s):
    """token j of row r -> slot perm[r, j] of ``s`` slots; the other slots hold ``fill``."""
    rows, t = x.shape[:2]
    out = torch.full((rows, s, *x.shape[2:]), fill, dtype=x.dtype)
    idx = perm[:, :t].reshape(rows, t, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter_(1, idx, x)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_step_equals_whole_cache_allocator(ties):
    base = int.from_bytes(os.urandom(4), "little") % (2**31 - 1)
    checked = 0
    for i in range(120):
        seed = base + i
        levels = (1, 2, 3, 4, 8)[i % 5]
        rows, t = 1 + i % 4, 1 + (i * 7) % 23
        sc, ke, ve, caps, prot, pos, rest, drop = _case(seed, rows, t, levels, ties)
        if int(((caps * ~prot).sum(-1) - rest).min()) < 0 or not bool((rest >= 0).all()):
            continue
        want = _whole(sc, ke, ve, caps, prot, rest, levels)
        k_max = int(((caps * ~prot).sum(-1) - rest).max())  # the units to drop (rows differ here)
        prof = unit_profile(ke, ve)
        # slots in a shuffled order with empty slots between them
        g = torch.Generator().manual_seed(seed + 1)
        extra = int(torch.randint(0, 4, (1,), generator=g))
        s = t + extra
        perm = torch.stack([torch.randperm(s, generator=g) for _ in range(rows)])      # slot of each token
        got_s = allocate_step(_place(sc, 7.0, perm, s), _place(prof, 0.5, perm, s), _place(caps, 0, perm, s),
                              _place(pos, -1, perm, s), _place(prot, False, perm, s), rest, k_max=k_max)
        got = torch.gather(got_s, 1, perm[:, :t])
        assert torch.equal(got, want), (seed, levels, rows, t, drop, got, want)
        assert bool((got_s.scatter(1, perm[:, :t], 0) == 0).all()), "an empty slot got units"
        checked += 1
    assert checked >= 60, checked
