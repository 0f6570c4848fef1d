"""The conformance check: a backend's forward and every gradient against the fp32 reference.

Used by the project's generated matrix (``tests/test_matrix.py``) and by plugin authors.
For each (component, backend, case, dtype): fresh random inputs rounded to ``dtype``; the oracle
is the component's ``reference`` backend on the same values upcast to fp32 (fp64 for fp64);
a component may supply its own tolerance (``Component.tolerance``: quantised ops whose reference
emulates the rounding, so the oracle is the quantised reference, not fp32 attention), and an
oracle (``Component.oracle``: the reference evaluated with a backend's own discrete decisions);
the backend runs with NaN-poisoned output allocation; outputs and the gradients of every input
(for a random cotangent, also rounded to ``dtype``) are compared with the tolerance table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.ops import op_kwargs
from ..kernels._alloc import poisoned
from ..registry import get_registry
from ..registry.registry import Case
from .compare import CloseReport, compare
from .inputs import fresh_seed, make_inputs
from .tolerances import tolerance

TEST_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)


@dataclass(frozen=True)
class ConformanceCase:
    component: str
    backend: str
    case: Case
    dtype: torch.dtype
    device: str

    @property
    def id(self) -> str:
        return f"{self.component}-{self.backend}-{self.case.id}-{str(self.dtype).removeprefix('torch.')}"


def _selected(env: str) -> list[str] | None:
    # sorted: the matrix must be collected in the same order in every process (pytest-xdist)
    raw = os.environ.get(env, "").strip()
    return sorted({s.strip() for s in raw.split(",") if s.strip()}) or None


def matrix(components=None, backends=None, dtypes=None, device: str | None = None) -> list[ConformanceCase]:
    """Every (component, backend, case, dtype) that the backend declares it can run here.

    Defaults come from ``BLOCKZOO_TEST_COMPONENTS`` / ``BLOCKZOO_TEST_BACKENDS`` /
    ``BLOCKZOO_TEST_DTYPES`` (comma lists) or else everything registered. The reference backend
    is included too: it must match its own fp32 evaluation within the dtype's tolerance.
    """
    reg = get_registry()
    components = components or _selected("BLOCKZOO_TEST_COMPONENTS") or sorted(reg.components)
    backends = backends or _selected("BLOCKZOO_TEST_BACKENDS")
    names = _selected("BLOCKZOO_TEST_DTYPES")
    dtypes = dtypes or ([getattr(torch, n) for n in names] if names else TEST_DTYPES)
    device = device or os.environ.get("BLOCKZOO_TEST_DEVICE") or "cpu"
    out = []
    for cid in components:
        comp = reg.component(cid)
        if comp.cases is None:
            continue
        for be in reg.backends_for(cid):
            if backends and be.name not in backends:
                continue
            if be.capabilities.environment_reasons():
                continue
            for dtype in dtypes:
                for case in comp.cases():
                    from ..registry import Inputs
                    probe = Inputs(device=device, dtype=dtype, requires_grad=be.capabilities.grad,
                                   head_dim=case.head_dim, shapes=tuple((k, v) for k, v in case.shapes.items() if v))
                    if not be.not_supported_reasons(probe):
                        out.append(ConformanceCase(cid, be.name, case, dtype, device))
    return out


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _tolerance(comp, dtype: torch.dtype, kind: str, backend: str, device: str):
    """The component's own tolerance (quantised ops) where it gives one, else the table."""
    if comp.tolerance is not None:
        tol = comp.tolerance(dtype, kind, backend, device)
        if tol is not None:
            return tol
    return tolerance(dtype, kind, backend, device)


def _rerun(run_ref, inputs: dict, kwargs: dict, grad_names: list[str], cots: list[torch.Tensor],
           dtype: torch.dtype | None = None) -> dict:
    """The oracle again on the same input values, in ``dtype`` (None: the inputs' own precision):
    ``{("out", i): output, ("grad", name): grad}`` (the gradients of ``grad_names`` for the
    cotangents ``cots``, cast alike). fp64: the exact values; the case's precision (fp16 / bf16
    cases): what that precision's rounding costs the oracle itself."""
    def cast(t):
        return t.detach().clone() if dtype is None else t.detach().to(dtype)
    own = {k: (None if t is None else cast(t).requires_grad_(t.requires_grad)) for k, t in inputs.items()}
    outs = _as_tuple(run_ref(**own, **kwargs))
    out = {("out", i): o for i, o in enumerate(outs)}
    if grad_names:
        grads = torch.autograd.grad(outs, [own[k] for k in grad_names], [cast(c) for c in cots], allow_unused=True)
        out.update({("grad", k): g for k, g in zip(grad_names, grads, strict=True)})
    return out


def check(cc: ConformanceCase, seed: int | None = None) -> list[CloseReport]:
    """Run one conformance case; raises AssertionError with every report on a mismatch."""
    seed = fresh_seed() if seed is None else seed
    reg = get_registry()
    comp = reg.component(cc.component)
    backend = reg.backend(cc.component, cc.backend)
    reference = reg.backend(cc.component, "reference")
    params = comp.params(**cc.case.params)
    kwargs = op_kwargs(comp, params)
    grad_ok = backend.capabilities.grad

    inputs = make_inputs(cc.case, cc.dtype, cc.device, seed, requires_grad=grad_ok)
    acc = torch.promote_types(cc.dtype, torch.float32)
    oracle_inputs = {k: (None if t is None else t.detach().to(acc).requires_grad_(t.requires_grad))
                     for k, t in inputs.items()}
    oracle = comp.oracle(cc.backend, cc.device) if comp.oracle is not None else None
    if oracle is None:
        expected = _as_tuple(reference.fn(**oracle_inputs, **kwargs))
        with poisoned():
            actual = _as_tuple(backend.fn(**inputs, **kwargs))
    else:  # the reference evaluated with the backend's own discrete decisions (Component.oracle)
        with poisoned(), oracle.capture():
            actual = _as_tuple(backend.fn(**inputs, **kwargs))
        expected = _as_tuple(oracle.reference(**oracle_inputs, **kwargs))

    where = f"[{cc.id} seed={seed}; replay with BLOCKZOO_TEST_SEED={seed}]"
    # every comparison as (name, actual, expected, tolerance kind, key of its fp64 counterpart)
    pairs = []
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.dtype != cc.dtype:
            raise AssertionError(f"output {i} has dtype {a.dtype}, expected {cc.dtype} {where}")
        pairs.append((f"out[{i}]", a, e, "fwd", ("out", i) if e.is_floating_point() else None))

    grad_names = [k for k, t in inputs.items() if t is not None and t.requires_grad]
    cots = []
    if grad_ok and grad_names:
        gen = torch.Generator().manual_seed(seed + 1)
        cots = [torch.randn(e.shape, generator=gen, dtype=torch.float64).to(cc.dtype).to(cc.device) for e in expected]
        got = torch.autograd.grad(actual, [inputs[k] for k in grad_names], cots, allow_unused=True)
        want = torch.autograd.grad(expected, [oracle_inputs[k] for k in grad_names],
                                   [c.to(acc) for c in cots], allow_unused=True)
        for name, g, w in zip(grad_names, got, want, strict=True):
            if w is None and g is None:
                continue
            if g is None or w is None:
                raise AssertionError(f"grad of {name}: backend gives {'None' if g is None else 'a tensor'}, "
                                     f"reference {'None' if w is None else 'a tensor'} {where}")
            if g.dtype != inputs[name].dtype:
                raise AssertionError(f"grad of {name} has dtype {g.dtype}, expected {inputs[name].dtype} {where}")
            pairs.append((f"grad[{name}]", g, w, "grad", ("grad", name)))

    tols = {kind: _tolerance(comp, cc.dtype, kind, cc.backend, cc.device) for kind in {p[3] for p in pairs}}
    reports = [compare(a, e, tols[kind], name) for name, a, e, kind, _ in pairs]

    # A backend may err as much as NOISE_FACTOR times the oracle's own rounding at the case's
    # precision (testing/compare.py), measured against the oracle in fp64, forward and backward;
    # matters only for cancelling sums. fp32 cases: the oracle's run above is that precision.
    # fp16 / bf16 cases: the oracle runs again on the case's own inputs, at their precision (a
    # gradient summed over 3 rows of one feature cancelled to 1% of its terms in fp16, 8% off,
    # in CI). The rule only ever widens a bound (capped at NOISE_CAP times the table), so a
    # comparison that passes the table passes with it too: the extra runs are made (once per
    # case) only when one fails, and then every comparison is redone with them, as the failure
    # report shows them.
    if any(not r.ok for r in reports) and cc.dtype in (torch.float32, torch.float16, torch.bfloat16):
        run_ref = oracle.reference if oracle is not None else reference.fn
        names = grad_names if grad_ok else []
        exact = _rerun(run_ref, inputs, kwargs, names, cots, torch.float64)
        same = None if cc.dtype == torch.float32 else _rerun(run_ref, inputs, kwargs, names, cots)

        def noise(e, key):
            x = None if key is None else exact.get(key)
            if x is None or not x.is_floating_point():
                return None
            if same is not None:
                e = same.get(key)
                if e is None:
                    return None
            return (e.detach().double() - x.detach()).abs()

        reports = [compare(a, e, tols[kind], name, noise(e, key)) for name, a, e, kind, key in pairs]

    bad = [r for r in reports if not r.ok]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(reports)} comparisons failed {where}\n"
                             + "\n".join(str(r) for r in reports))
    return reports
