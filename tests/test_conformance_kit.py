"""The conformance kit as a plugin author uses it: a two-line test file, run by pytest in a
fresh process, against a plugin installed through a ``blockzoo`` entry point (a dist-info on
PYTHONPATH). The kit passes what is right and fails what is wrong."""

import os
import re
import subprocess
import sys
import textwrap

PLUGIN = '''
import torch
from pydantic import BaseModel, ConfigDict, Field
from blockzoo.kernels import empty_like
from blockzoo.registry import Backend, Capabilities, Case, Component, Inputs, hookimpl

class P(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(2.0, description="gain")

def describe(x, params=None):
    return Inputs.from_tensors({"x": x})

def cases():
    return [Case("n5", {"x": (3, 5)}), Case("a3", {"x": (2, 7)}, {"alpha": 3.0})]

def unwritten(x, alpha=2.0):
    out = empty_like(x)
    out[:, :-1] = (x * alpha)[:, :-1]   # forgets the last column
    return out

@hookimpl
def blockzoo_register_components(registry):
    registry.add_component(Component(id="kit.scale", slot="mlp", params=P, describe=describe, cases=cases))

@hookimpl
def blockzoo_register_backends(registry):
    registry.add_backend(Backend("kit.scale", "reference", lambda x, alpha=2.0: x * alpha))
    registry.add_backend(Backend("kit.scale", "good", lambda x, alpha=2.0: (x.double() * alpha).to(x.dtype),
                                 Capabilities(devices=("cpu",), dtypes=(torch.float32, torch.float64)), priority=3))
    registry.add_backend(Backend("kit.scale", "wrong", lambda x, alpha=2.0: x * alpha * 1.01,
                                 Capabilities(devices=("cpu",), dtypes=(torch.float32,)), priority=5))
    registry.add_backend(Backend("kit.scale", "unwritten", unwritten,
                                 Capabilities(devices=("cpu",), dtypes=(torch.float32,), grad=False), priority=1))
    registry.add_backend(Backend("kit.scale", "never", lambda x, alpha=2.0: x * alpha,
                                 Capabilities(devices=("cpu",), dtypes=(torch.int8,)), priority=2))
'''

TWO_LINES = '''from blockzoo.testing import conformance_tests
TestConformance = conformance_tests("kit.scale")
'''


def test_two_line_file_passes_the_right_and_fails_the_wrong(tmp_path):
    info = tmp_path / "kit_plugin-0.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kit-plugin\nVersion: 0.2.0\n")
    (info / "entry_points.txt").write_text("[blockzoo]\nkit = kit_plugin\n")
    (tmp_path / "kit_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "test_kit.py").write_text(TWO_LINES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "BLOCKZOO_TEST_DTYPES": "float32,float64", "BLOCKZOO_PLUGINS_STRICT": "1"}
    env.pop("BLOCKZOO_TEST_BACKENDS", None)
    env.pop("BLOCKZOO_TEST_COMPONENTS", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "test_kit.py", "-q", "-rfp", "-p", "no:cacheprovider",
                          "-p", "no:randomly", "--blockzoo-seed=7"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    failed = set(re.findall(r"FAILED test_kit.py::TestConformance::(\S+)", text))
    assert out.returncode == 1, text
    assert failed == {
        "test_backend_matches_reference[kit.scale-wrong-n5-float32]",
        "test_backend_matches_reference[kit.scale-wrong-a3-float32]",
        "test_backend_matches_reference[kit.scale-unwritten-n5-float32]",
        "test_backend_matches_reference[kit.scale-unwritten-a3-float32]",
        "test_every_backend_is_checked",
    }, text
    passed = set(re.findall(r"PASSED test_kit.py::TestConformance::(\S+)", text))
    assert passed == {
        "test_registered",
        "test_backend_matches_reference[kit.scale-reference-n5-float32]",
        "test_backend_matches_reference[kit.scale-reference-a3-float32]",
        "test_backend_matches_reference[kit.scale-good-n5-float32]",
        "test_backend_matches_reference[kit.scale-good-a3-float32]",
        "test_backend_matches_reference[kit.scale-good-n5-float64]",
        "test_backend_matches_reference[kit.scale-good-a3-float64]",
        "test_spec_round_trip[kit.scale-defaults]",
        "test_spec_round_trip[kit.scale-a3]",
    }, text
    assert "kit.scale:never: no case and dtype it can run here" in text
    assert "seed=7" in text  # --blockzoo-seed pins the seed printed for replay


def test_reference_noise_rule_admits_rounding_of_cancelling_sums_only():
    """compare(noise=...): a backend may err NOISE_FACTOR x the reference's own fp32 rounding, capped
    at NOISE_CAP x the table; well-conditioned outputs keep the table's bound."""
    import torch

    from blockzoo.testing.compare import NOISE_CAP, NOISE_FACTOR, compare
    from blockzoo.testing.tolerances import Tolerance
    tol = Tolerance(5e-5, 1e-5)
    e = torch.tensor([1.0], dtype=torch.float64)
    ref_err = torch.tensor([1e-4], dtype=torch.float64)  # a cancelling sum: the fp32 reference is 1e-4 off
    assert not compare(e + 3e-4, e, tol).ok
    assert compare(e + 3e-4, e, tol, noise=ref_err).ok  # 3e-4 <= 4 x 1e-4
    assert compare(e + 3e-4, e, tol, noise=ref_err).noise_bound == NOISE_FACTOR * 1e-4
    assert not compare(e + 5e-4, e, tol, noise=ref_err).ok  # > 4 x the reference's error
    # a discrete flip between the fp32 and fp64 references is not rounding: the cap holds
    big = torch.tensor([1.0], dtype=torch.float64)
    assert compare(e + 0.9 * NOISE_CAP * 5e-5, e, tol, noise=big).ok
    assert not compare(e + 1.1 * NOISE_CAP * 5e-5, e, tol, noise=big).ok
    # well-conditioned: a reference rounding far below the table changes nothing
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, generator=g, dtype=torch.float64)
    tiny = torch.full_like(w, 1e-7)
    assert not compare(w * (1 + 1e-4), w, tol, noise=tiny).ok
    assert compare(w * (1 + 5e-6), w, tol, noise=tiny).ok


def _lazy_registry(calls):
    """A private registry: ``lazy.scale`` (x * alpha) and ``lazy.cancel`` ((x + 1000) - 1000, whose
    fp32 reference rounds every element), references counting their fp64 evaluations."""
    import torch
    from pydantic import BaseModel, ConfigDict

    from blockzoo.registry import Backend, Capabilities, Case, Component, Inputs
    from blockzoo.registry.registry import Registry

    class P(BaseModel):
        model_config = ConfigDict(extra="forbid")
        alpha: float = 2.0

    def counted(fn, key):
        def run(x, **kw):
            calls[key] += x.dtype == torch.float64
            return fn(x, **kw)
        return run

    def wrong_grad(x, alpha=2.0):  # the right forward, a gradient 1% too large
        y = x * (0.01 * alpha)
        return x * alpha + (y - y.detach())

    def describe(x, params=None):
        return Inputs.from_tensors({"x": x})

    caps = Capabilities(devices=("cpu",), dtypes=(torch.float32,))
    reg = Registry()
    for cid, ref in (("lazy.scale", lambda x, alpha=2.0: x * alpha),
                     ("lazy.cancel", lambda x, alpha=2.0: (x + 1000.0) - 1000.0),
                     ("lazy.cancel16", lambda x, alpha=2.0: (x + 32.0) - 32.0)):
        reg.add_component(Component(id=cid, slot="mlp", params=P, describe=describe,
                                    cases=lambda: [Case("n", {"x": (4, 64)})]))
        reg.add_backend(Backend(cid, "reference", counted(ref, cid)))
    reg.add_backend(Backend("lazy.scale", "good", lambda x, alpha=2.0: (x.double() * alpha).to(x.dtype), caps))
    reg.add_backend(Backend("lazy.scale", "wrong", lambda x, alpha=2.0: x * alpha * 1.01, caps))
    reg.add_backend(Backend("lazy.scale", "wrong_grad", wrong_grad, caps))
    # exact, unlike the fp32 reference
    reg.add_backend(Backend("lazy.cancel", "exact", lambda x, alpha=2.0: x * 1.0, caps))
    # fp16: the reference's own rounding at fp16 (``same``), and 5% more than that (``worse``)
    caps16 = Capabilities(devices=("cpu",), dtypes=(torch.float16,))
    reg.add_backend(Backend("lazy.cancel16", "same", lambda x, alpha=2.0: (x + 32.0) - 32.0, caps16))
    reg.add_backend(Backend("lazy.cancel16", "worse", lambda x, alpha=2.0: ((x + 32.0) - 32.0) * 1.05, caps16))
    return reg


def test_fp64_oracle_runs_only_when_the_table_fails(monkeypatch):
    """check() evaluates the reference in fp64 (for the noise rule) only when a comparison fails
    the table, and then once, forward and backward together; the verdicts are the rule's."""
    import collections

    import pytest
    import torch

    from blockzoo.registry import Case
    from blockzoo.testing import compare, conformance, tolerance
    from blockzoo.testing.conformance import ConformanceCase, check

    calls = collections.Counter()
    monkeypatch.setattr(conformance, "get_registry", lambda: _lazy_registry(calls))
    case = Case("n", {"x": (4, 64)})

    def run(cid, backend, fp64_runs):
        calls.clear()
        try:
            return check(ConformanceCase(cid, backend, case, torch.float32, "cpu"), seed=3)
        finally:
            assert calls[cid] == fp64_runs, (cid, backend, calls)

    # passes the table: no fp64 run
    reports = run("lazy.scale", "good", 0)
    assert [r.name for r in reports] == ["out[0]", "grad[x]"]
    assert all(r.ok and not r.noise_bound for r in reports)

    # fails the table (forward and gradient, or only the gradient): one fp64 run
    with pytest.raises(AssertionError, match=r"2 of 2 comparisons failed"):
        run("lazy.scale", "wrong", 1)
    only_grad = r"1 of 2 comparisons failed.*\n.*out\[0\]: ok.*\n.*grad\[x\]: MISMATCH"
    with pytest.raises(AssertionError, match=only_grad):
        run("lazy.scale", "wrong_grad", 1)

    # the fp32 reference's own rounding fails the table; the fp64 run (once) admits it
    reports = run("lazy.cancel", "exact", 1)
    fwd, grad = reports
    assert fwd.ok and fwd.noise_bound > 0 and grad.ok
    x = conformance.make_inputs(case, torch.float32, "cpu", 3)["x"].detach()
    assert not compare(x, (x + 1000.0) - 1000.0, tolerance(torch.float32, "fwd")).ok


def test_half_precision_cases_admit_the_references_own_rounding(monkeypatch):
    """fp16 / bf16 cases: when the table fails, the oracle runs again at the case's precision
    and in fp64, and a backend may err NOISE_FACTOR x that run's error (a cancelling sum in fp16
    failed the table in CI with the reference itself as the backend); 5% more fails."""
    import collections

    import pytest
    import torch

    from blockzoo.registry import Case
    from blockzoo.testing import compare, conformance, tolerance
    from blockzoo.testing.conformance import ConformanceCase, check

    calls = collections.Counter()
    monkeypatch.setattr(conformance, "get_registry", lambda: _lazy_registry(calls))
    case = Case("n", {"x": (4, 64)})
    x = conformance.make_inputs(case, torch.float16, "cpu", 3)["x"].detach()
    assert not compare((x + 32.0) - 32.0, x.float(), tolerance(torch.float16, "fwd")).ok  # the table alone
    fwd, grad = check(ConformanceCase("lazy.cancel16", "same", case, torch.float16, "cpu"), seed=3)
    assert fwd.ok and fwd.noise_bound > 0 and grad.ok
    assert calls["lazy.cancel16"] == 1
    with pytest.raises(AssertionError, match=r"out\[0\]: MISMATCH"):
        check(ConformanceCase("lazy.cancel16", "worse", case, torch.float16, "cpu"), seed=3)
