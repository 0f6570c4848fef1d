"""Flows (issue 10): exact layers invert and their log-dets are the Jacobians'; the flow model's
likelihood is the change of variables; flow.aif's surrogate, exact likelihood and training;
kind: flow specs (validation quality), the digits_density task from a sweep trial.

Backends: every backend that can run here (reference and numba always; triton on a GPU or
with TRITON_INTERPRET=1), filtered by BLOCKZOO_TEST_BACKENDS like the matrix.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from blockzoo.core.composer import build
from blockzoo.core.context import BuildContext
from blockzoo.core.ops import op
from blockzoo.core.spec import SpecError, load_spec
from blockzoo.registry import get_registry

EXACT = ("flow.coupling", "flow.actnorm", "flow.inv1x1")


def _wanted() -> set[str] | None:
    raw = os.environ.get("BLOCKZOO_TEST_BACKENDS", "").strip()
    return {s.strip() for s in raw.split(",") if s.strip()} or None


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _pairs() -> list[tuple[str, str]]:
    reg = get_registry()
    want = _wanted()
    out = []
    for cid in EXACT:
        for be in reg.backends_for(cid):
            if (want is None or be.name in want) and not be.capabilities.environment_reasons():
                out.append((cid, be.name))
    return out


PAIRS = _pairs()
IDS = [f"{c}-{b}" for c, b in PAIRS]


@pytest.fixture
def one_thread():
    """Small models: one torch thread is fastest (and fair to the other tests on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _op_inputs(cid: str, b: int, d: int, dtype, device, gen) -> tuple[list[torch.Tensor], dict]:
    def r(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    if cid == "flow.coupling":
        return [r(b, d), r(b, d, scale=1.5), r(b, d)], {}
    if cid == "flow.actnorm":
        return [r(b, d), r(d, scale=0.5), r(d, scale=0.5)], {}
    sc = 0.5 / math.sqrt(d)
    sign = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).to(dtype=dtype, device=device)
    return [r(b, d), r(d, d, scale=sc), r(d, d, scale=sc), r(d, scale=0.3), sign], {}


COUPLING_VARIANTS = [{}, {"mask": "half", "parity": 1}, {"parity": 1, "clamp": 0.7}]


@pytest.mark.parametrize("cid,backend", PAIRS, ids=IDS)
@pytest.mark.parametrize("d", [40, 63])
def test_inverse_of_forward_is_identity_fp32(cid, backend, d):
    """inverse(forward(x)) == x within 1e-5 in fp32, and the two log-dets cancel."""
    dev = _device(backend)
    gen = torch.Generator().manual_seed(d)
    variants = COUPLING_VARIANTS if cid == "flow.coupling" else [{}]
    for extra in variants:
        tensors, _ = _op_inputs(cid, 37, d, torch.float32, dev, gen)
        fwd, inv = op(cid, backend), op(cid, backend)
        x, rest = tensors[0], tensors[1:]
        y, ld = fwd(x, *rest, inverse=False, **extra)
        xr, ld_inv = inv(y, *rest, inverse=True, **extra)
        err = float((xr - x).abs().max())
        assert err <= 1e-5, f"{cid}/{backend} {extra}: max |inverse(forward(x)) - x| = {err:.3g}"
        assert float((ld + ld_inv).abs().max()) <= 1e-5 * max(1.0, float(ld.abs().max()))
        assert not torch.equal(y, x), "forward must not be the identity here (test would be vacuous)"


def _layer(cid: str, backend: str, d: int, dtype, device, layer: int = 0, **params):
    comp = get_registry().component(cid)
    ctx = BuildContext(d_model=d, n_heads=1, n_kv_heads=1, max_seq=1, layer=layer, n_layers=1, backend=backend,
                       device=device, dtype=dtype, training=False)
    mod = comp.module(ctx, comp.params(**params)).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():   # away from the identity initialisation
        for p in mod.parameters():
            p.add_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3).to(p))
    return mod


@pytest.mark.parametrize("cid,backend", PAIRS, ids=IDS)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_logdet_matches_autograd_jacobian(cid, backend, inverse):
    """Each layer module (conditioner included) at several points: its log-det is
    log|det| of torch.autograd.functional.jacobian of the map it computes."""
    dev = _device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    d = 6
    variants = COUPLING_VARIANTS if cid == "flow.coupling" else [{}]
    for extra in variants:
        mod = _layer(cid, backend, d, dtype, dev, **({"hidden": 16, **extra} if cid == "flow.coupling" else extra))
        fn = mod.inverse if inverse else mod.forward
        x = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dtype=dtype, device=dev)
        _, ld = fn(x)
        ld = ld.detach()
        for i in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda r, fn=fn: fn(r[None])[0][0], x[i])
            want = torch.linalg.slogdet(jac.double())[1]
            assert abs(float(ld[i]) - float(want)) <= tol * max(1.0, abs(float(want))), \
                f"{cid}/{backend} {extra} row {i}: logdet {float(ld[i])} vs jacobian {float(want)}"


STACK = {"name": "t", "model": {"kind": "flow", "dtype": "float64"},
         "flow": {"dim": 6, "repeat": 2, "layers": [
             {"type": "flow.actnorm"}, {"type": "flow.inv1x1"},
             {"type": "flow.coupling", "params": {"hidden": 16}},
             {"type": "flow.coupling", "params": {"hidden": 16, "mask": "half"}}]}}


def _backend_stack(backend: str) -> dict:
    import copy
    spec = copy.deepcopy(STACK)
    for ref in spec["flow"]["layers"]:
        if ref["type"] != "flow.inv1x1":
            ref["backend"] = backend
    return spec


@pytest.mark.parametrize("backend", sorted({b for _, b in PAIRS} - {"triton"}))
def test_flow_model_log_prob_is_change_of_variables(backend, one_thread):
    torch.manual_seed(0)
    model = build(_backend_stack(backend))
    data = torch.randn(64, 6, dtype=torch.float64) * 2 + 1
    model.train()
    model(data)                                 # actnorm data-dependent init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(4, 6, dtype=torch.float64)
    lp = model.log_prob(x)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda r: model(r[None])[0][0], x[i])
        z = model(x[i:i + 1])[0][0]
        want = -0.5 * float(z @ z) - 3 * math.log(2 * math.pi) + float(torch.linalg.slogdet(jac)[1])
        assert abs(float(lp[i]) - want) < 1e-8
    xr = model.inverse(model(x)[0])[0]
    assert float((xr - x).abs().max()) < 1e-10
    s = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 6) and torch.isfinite(s).all()
    # the loss trains: a few steps lower the NLL of the data
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = float(model.loss(data))
    for _ in range(30):
        opt.zero_grad()
        model.loss(data).backward()
        opt.step()
    assert float(model.loss(data)) < before - 0.5


@pytest.mark.parametrize("backend", sorted({b for _, b in PAIRS} - {"reference", "triton"}))
def test_flow_model_backend_matches_reference(backend, one_thread):
    torch.manual_seed(0)
    ref = build(_backend_stack("reference"))
    other = build(_backend_stack(backend))
    other.load_state_dict(ref.state_dict())
    x = torch.randn(16, 6, dtype=torch.float64)
    la, lb = ref.loss(x), other.loss(x)
    la.backward()
    lb.backward()
    assert abs(float(la - lb)) < 1e-10
    for (n, p), (_, q) in zip(ref.named_parameters(), other.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-11), n


# ---------------------------------------------------------------------------------------------
# flow.aif
def test_aif_surrogate_gradient_is_logdet_gradient():
    """With f(x) = A x and g = A^-1 exactly, the surrogate's gradient in A averaged over probes
    is d log|det A| / dA = A^-T (the estimator the aif loss relies on)."""
    d, k = 5, 4000
    gen = torch.Generator().manual_seed(0)
    A = (torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64))
    A.requires_grad_(True)
    x = torch.randn(k, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(k, d, generator=gen, dtype=torch.float64)
    v = v * math.sqrt(d) / v.norm(dim=-1, keepdim=True)
    z = x @ A.T
    vjf, = torch.autograd.grad(z, x, v, create_graph=True)      # v^T A
    jgv = v @ torch.linalg.inv(A).T.detach()                    # A^-1 v
    sur = op("flow.aif")(vjf, jgv).mean()
    g, = torch.autograd.grad(sur, A)
    want = torch.linalg.inv(A).T.detach()
    assert float((g - want).norm() / want.norm()) < 0.06


AIF = {"name": "aif", "model": {"kind": "flow", "dtype": "float64"},
       "flow": {"dim": 4, "layers": [{"type": "flow.aif", "params": {"hidden": 32, "blocks": 1, "beta": 20.0}}]}}


def test_aif_exact_log_prob_matches_jacobian():
    torch.manual_seed(0)
    model = build(AIF)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, 4, dtype=torch.float64)
    lp, lpe = model.log_prob(x), model.log_prob_encoder(x)
    for i in range(3):
        z = model.net.encode(x[i:i + 1])[0]
        jg = torch.autograd.functional.jacobian(lambda r: model.net.decode(r[None])[0], z)
        jf = torch.autograd.functional.jacobian(lambda r: model.net.encode(r[None])[0], x[i])
        base = -0.5 * float(z @ z) - 2 * math.log(2 * math.pi)
        assert abs(float(lp[i]) - (base - float(torch.linalg.slogdet(jg)[1]))) < 1e-9
        assert abs(float(lpe[i]) - (base + float(torch.linalg.slogdet(jf)[1]))) < 1e-9


def test_aif_training_learns_density_with_bounded_reconstruction(one_thread):
    """Trained on a correlated, shifted 4-D Gaussian: the exact NLL drops near the data's
    entropy, and the reconstruction error ||x - g(f(x))||^2 stays bounded (reported)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    L = torch.tensor([[2.0, 0, 0, 0], [1.0, 0.5, 0, 0], [0.3, -0.4, 1.0, 0], [0, 0.5, 0.2, 0.3]], dtype=torch.float64)
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)

    def data(n):
        return torch.randn(n, 4, generator=gen, dtype=torch.float64) @ L.T + mu
    model = build(AIF)
    held = data(512)
    nll0 = float(-model.log_prob(held).mean())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    probe = torch.Generator().manual_seed(2)
    for _ in range(400):
        loss = model.loss(data(128), generator=probe)
        opt.zero_grad()
        loss.backward()
        opt.step()
    nll = float(-model.log_prob(held).mean())
    entropy = 0.5 * 4 * (1 + math.log(2 * math.pi)) + float(torch.log(torch.diagonal(L).abs()).sum())
    with torch.no_grad():
        rec = float(((model.reconstruct(held) - held) ** 2).sum(-1).mean())
    print(f"aif: nll {nll0:.3f} -> {nll:.3f} (entropy {entropy:.3f}); recon {rec:.2e}")
    # most of the way from the identity initialisation to the best possible NLL (the entropy)
    assert nll0 - nll >= 0.8 * (nll0 - entropy), (nll0, nll, entropy)
    assert rec < 0.05, f"reconstruction error {rec} after training"


# ---------------------------------------------------------------------------------------------
# specs
FLOW_YAML = """\
name: f
model: {kind: flow}
flow:
  dim: 8
  layers:
    - {type: flow.actnorm}
    - {type: flow.couplng}
"""


@pytest.mark.parametrize("text,line,path,needle", [
    (FLOW_YAML, 7, "flow.layers.1.type", "did you mean 'flow.coupling'?"),
    (FLOW_YAML.replace("flow.couplng", "mlp.swiglu"), 7, "flow.layers.1.type", "flow components: flow.actnorm"),
    (FLOW_YAML.replace("{type: flow.couplng}", "{type: flow.coupling, params: {mask: checker}}"), 7,
     "flow.layers.1.params.mask", "'alternate' or 'half'"),
    (FLOW_YAML.replace("{type: flow.couplng}", "{type: flow.coupling, params: {hiden: 3}}"), 7,
     "flow.layers.1.params.hiden", "did you mean 'hidden'?"),
    (FLOW_YAML.replace("  dim: 8", "  dims: 8"), 4, "flow.dims", "did you mean 'dim'?"),
    (FLOW_YAML.replace("{type: flow.couplng}", "{type: flow.aif}"), 7, "flow.layers.1",
     "must be the only layer"),
    (FLOW_YAML.replace("{kind: flow}", "{kind: decoder}").replace("flow.couplng", "flow.coupling"), 3, "flow",
     "needs model.kind: flow"),
    ("name: f\nmodel: {kind: flow}\n", 2, "model.kind", "needs a 'flow' section"),
    (FLOW_YAML.replace("{kind: flow}", "{kind: flwo}"), 2, "model.kind", "'decoder' or 'flow'"),
    (FLOW_YAML.replace("{type: flow.couplng}", "{type: flow.inv1x1, backend: numba}"), 7,
     "flow.layers.1.backend", "flow.inv1x1 has no backend 'numba'"),
])
def test_bad_flow_specs_name_file_line_path(tmp_path, text, line, path, needle):
    f = tmp_path / "spec.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(f)
    issue = err.value.issues[0]
    assert issue.where is not None and issue.where.file.endswith("spec.yaml") and issue.where.line == line, str(issue)
    assert issue.path == path, str(issue)
    assert needle in issue.message, str(issue)


def test_decoder_spec_canonical_form_has_no_flow_key():
    """Adding kind: flow must not change existing decoder specs' hashes (sweep resume)."""
    spec = load_spec({"name": "d"})
    assert "flow" not in spec.expanded()
    flow = load_spec(STACK)
    assert flow.expanded()["flow"]["layers"][2]["params"]["clamp"] == 2.0


# ---------------------------------------------------------------------------------------------
# digits_density
def _small(spec: dict) -> dict:
    return load_spec(spec).expanded()


def test_digits_density_runs_from_a_sweep_trial(one_thread):
    from blockzoo.core.trial import run_trial
    pytest.importorskip("sklearn")
    exact = {"name": "e", "model": {"kind": "flow"}, "flow": {"dim": 64, "layers": [
        {"type": "flow.actnorm"}, {"type": "flow.coupling", "params": {"hidden": 32, "depth": 1}},
        {"type": "flow.coupling", "params": {"hidden": 32, "depth": 1}}]}, "workload": {"batch": 8}}
    aif = {"name": "a", "model": {"kind": "flow"}, "flow": {"dim": 64, "layers": [
        {"type": "flow.aif", "params": {"hidden": 32, "blocks": 1}}]}, "workload": {"batch": 8}}
    task = {"digits_density": {"steps": 30, "batch": 64, "lr": 3e-3, "eval_every": 10, "target_bpd": 4.0,
                               "sample_n": 50, "threads": 1}}
    for spec in (exact, aif):
        res = run_trial({"spec": _small(spec), "tasks": task,
                         "measure": {"correctness": True, "latency": True, "latency_reps": 1}})
        assert res["status"] == "ok", res["reason"]
        m = res["metrics"]
        for key in ("digits_bpd", "digits_recon_mse", "digits_fit_s", "digits_sample_ms", "sample_ms",
                    "fwd_bwd_ms", "grad_max_rel_err"):
            assert math.isfinite(m[key]), (key, m)
        assert 0.5 < m["digits_bpd"] < 8.0, m      # plumbing only: 30 steps do not train a flow
        assert m["grad_max_rel_err"] < 1e-4
        if spec is aif:
            assert math.isfinite(m["digits_bpd_encoder"]) and m["digits_recon_mse"] < 0.5
        else:
            assert m["digits_recon_mse"] < 1e-9


def test_digits_density_without_sklearn_names_the_extra(monkeypatch):
    from blockzoo.plugins.flow import tasks
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install blockzoo\[flows\]"):
        tasks.load_digits_split()


def test_digits_density_rejects_decoder_models():
    pytest.importorskip("sklearn")
    from blockzoo.plugins.flow.tasks import run_digits_density
    with pytest.raises(ValueError, match="needs a flow model"):
        run_digits_density(lambda: build({"name": "d", "model": {"d_model": 16, "n_heads": 2, "n_layers": 1}}),
                           64, {"steps": 1}, "cpu")


def test_digits_split_is_fixed():
    pytest.importorskip("sklearn")
    from blockzoo.plugins.flow.tasks import load_digits_split
    tr, te = load_digits_split()
    tr2, te2 = load_digits_split()
    assert tr.shape == (1437, 64) and te.shape == (360, 64)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert float(tr.min()) == 0 and float(tr.max()) == 16


def test_flow_sweep_file_expands():
    from pathlib import Path

    from blockzoo.core.sweep import load_sweep
    sw = load_sweep(Path(__file__).parent.parent / "examples" / "sweeps" / "flows.yaml")
    assert len(sw.trials) >= 2 and all(t.spec is not None for t in sw.trials), [t.reason for t in sw.trials]
    kinds = {t.spec["flow"]["layers"][0]["type"] for t in sw.trials}
    assert "flow.aif" in kinds and "flow.actnorm" in kinds


def test_blockzoo_run_on_a_flow_spec():
    """`blockzoo run` times a flow spec on [batch, dim] data (its loss is the NLL)."""
    import pathlib

    from blockzoo.core.run import run_spec
    spec = pathlib.Path(__file__).resolve().parents[1] / "examples" / "specs" / "flow_digits.yaml"
    out = run_spec(spec, backend="reference", steps=1)
    assert out["seq"] is None and out["params"] > 0 and out["fwd_bwd_ms"] > 0
    assert all(row["backend"] == "reference" for row in out["backends"])
