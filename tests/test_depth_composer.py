"""depth.moda / depth.mod in models: the depth KV stream (who writes, what each layer reads),
pre- vs post-norm, spec options and their errors, causality of whole models, tiny models that
train, and `blockzoo run` / a sweep with a MoDA mixer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockzoo
from blockzoo.core.context import Context, DepthStream
from blockzoo.core.spec import SpecError, load_spec
from blockzoo.testing.training import train_on_pattern

ROOT = Path(__file__).parent.parent

MODA_SPEC = """
name: moda-tiny
model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 3, max_seq: 64}
block:
  mixer: {type: depth.moda}
  normres: {type: normres.rmsnorm}
  mlp: {type: mlp.swiglu}
workload: {batch: 2, seq: 32, steps: 1}
"""

MOD_SPEC = """
name: mod-tiny
model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 2, max_seq: 64}
block:
  mixer: {type: depth.mod, params: {capacity: 0.5}}
layers:
  - {at: 0, mixer: {type: attention.dense}}
workload: {batch: 2, seq: 32, steps: 1}
"""


def _spec(text, **extra):
    import yaml
    data = yaml.safe_load(text)
    for key, val in extra.items():
        if isinstance(val, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **val}
        else:
            data[key] = val
    return data


def _slots_read(model, tokens, monkeypatch):
    seen = []
    orig = DepthStream.read

    def spy(self, like):
        seen.append(self.slots)
        return orig(self, like)
    monkeypatch.setattr(DepthStream, "read", spy)
    model(tokens)
    return seen


@pytest.mark.parametrize("depth,expect", [(None, [0, 1, 2]), ({"mlp_writers": True}, [0, 2, 4]),
                                          ({"attention_writers": False, "mlp_writers": True}, [0, 1, 2])])
def test_depth_stream_slots_per_layer(depth, expect, monkeypatch):
    data = _spec(MODA_SPEC) if depth is None else _spec(MODA_SPEC, depth=depth)
    model = blockzoo.build(data, backend="reference")
    assert _slots_read(model, torch.randint(0, 256, (2, 16)), monkeypatch) == expect
    assert load_spec(data).depth_slots(2) == expect[2]


def test_dense_layers_write_to_the_stream(monkeypatch):
    data = _spec(MODA_SPEC, layers=[{"at": [0, 1], "mixer": {"type": "attention.dense"}}])
    model = blockzoo.build(data, backend="reference")
    assert _slots_read(model, torch.randint(0, 256, (1, 9)), monkeypatch) == [2]


def test_depth_stream_reaches_moda_and_changes_output():
    """Layer 2 reads the K,V that layers 0 and 1 wrote: with the stream emptied its output differs."""
    torch.manual_seed(0)
    model = blockzoo.build(MODA_SPEC, backend="reference")
    tokens = torch.randint(0, 256, (1, 12))
    ctx = Context()
    base = model(tokens, ctx)
    stream = ctx.state["depth_kv"]
    assert stream.slots == 3 and stream.keys[0].shape == (1, 12, 2, 8)
    mixer = model.blocks[2].mixer
    orig = DepthStream.read
    try:
        DepthStream.read = lambda self, like: (like.new_empty((1, 0, 2, 8)),) * 2
        other = model(tokens)
    finally:
        DepthStream.read = orig
    assert mixer.reads_depth and not torch.allclose(base, other)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_moda_model_is_causal(backend, norm_position):
    torch.manual_seed(0)
    data = _spec(MODA_SPEC, model={"norm_position": norm_position}, depth={"mlp_writers": True})
    model = blockzoo.build(data, backend=backend).eval()
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_post_norm_changes_the_block():
    torch.manual_seed(0)
    pre = blockzoo.build(MODA_SPEC, backend="reference")
    post = blockzoo.build(_spec(MODA_SPEC, model={"norm_position": "post"}), backend="reference")
    post.load_state_dict(pre.state_dict())
    tokens = torch.randint(0, 256, (1, 10))
    assert not torch.allclose(pre(tokens), post(tokens))
    assert all(b.post_norm for b in post.blocks) and not any(b.post_norm for b in pre.blocks)


@pytest.mark.parametrize("data,needle", [
    (_spec(MODA_SPEC, depth={"mlp_writer": True}), "did you mean 'mlp_writers'"),
    (_spec(MODA_SPEC, depth={"attention_writers": False}), "both false"),
    (_spec(MODA_SPEC, model={"norm_position": "middle"}), "norm_position"),
    (_spec(MODA_SPEC, block={"mixer": {"type": "depth.moda", "params": {"causl": True}}}), "causal"),
    (_spec(MOD_SPEC, block={"mixer": {"type": "depth.mod", "params": {"capacity": 1.5}}}), "capacity"),
])
def test_spec_errors(data, needle):
    with pytest.raises(SpecError, match=needle):
        load_spec(data)


def test_existing_spec_hashes_unchanged_by_depth_options():
    data = {"model": {"d_model": 32, "n_heads": 4}}
    expanded = load_spec(data).expanded()
    assert "depth" not in expanded and "norm_position" not in expanded["model"]
    post = load_spec({**data, "model": {**data["model"], "norm_position": "post"}})
    assert post.spec_hash() != load_spec(data).spec_hash()


def _train(model, steps=40):
    return train_on_pattern(model, steps=steps, length=40)


@pytest.mark.parametrize("backend,variant", [("reference", "pre"), ("numba", "post+mlp_writers")])
def test_model_with_moda_trains(backend, variant):
    torch.manual_seed(1)
    data = _spec(MODA_SPEC) if variant == "pre" else _spec(MODA_SPEC, model={"norm_position": "post"},
                                                           depth={"mlp_writers": True})
    model = blockzoo.build(data, backend=backend)
    first, last = _train(model)
    assert last < 0.25 * first, (first, last)
    assert {r["backend"] for r in model.backends() if r["component"] == "depth.moda"} == {backend}


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_model_with_mod_trains_and_decodes_causally(backend):
    torch.manual_seed(1)
    model = blockzoo.build(MOD_SPEC, backend=backend)
    ctx = Context()
    model.loss(torch.randint(0, 256, (2, 16)), ctx)
    assert list(ctx.aux_losses) == ["depth.mod.predictor.1"]
    first, last = _train(model, steps=60)
    assert last < 0.25 * first, (first, last)
    assert {r["backend"] for r in model.backends() if r["component"] == "depth.mod"} == {backend}
    # eval with the causal predictor: earlier logits never depend on later tokens
    model.eval()
    tokens = torch.randint(0, 256, (2, 24))
    changed = tokens.clone()
    changed[:, 15:] = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=1e-5, atol=1e-5)


def test_mod_predictor_learns_the_topk_choice():
    """The BCE auxiliary loss teaches the predictor the router's top-k choice."""
    torch.manual_seed(0)
    model = blockzoo.build(MOD_SPEC, backend="reference")
    mixer = model.blocks[1].mixer
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 256, (4, 32))
    for _ in range(80):
        ctx = Context()
        loss = model.loss(tokens, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = model.embed(tokens[:, :-1])
    n, _ = model.blocks[1].norm1(model.blocks[0](x, None, Context())[0], None)
    with torch.no_grad():
        chosen = mixer.predictor(n).squeeze(-1) > 0
        r = mixer.router(n).squeeze(-1)
        from blockzoo.plugins.depth.reference import mod_select
        target = torch.zeros_like(r, dtype=torch.bool).scatter_(1, mod_select(r, 0.5), True)
    assert (chosen == target).float().mean() > 0.8


def _cli(*args):
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "blockzoo.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT.parent)


def test_blockzoo_run_with_moda(tmp_path):
    spec = tmp_path / "moda.yaml"
    spec.write_text(MODA_SPEC)
    out = _cli("run", str(spec), "--backend", "numba", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["loss"] > 0
    assert {r["backend"] for r in result["backends"] if r["component"] == "depth.moda"} == {"numba"}


def test_sweep_with_moda_and_mod(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("""name: depth
base:
  model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 2, max_seq: 64, backend: reference}
  workload: {batch: 2, seq: 32}
axes:
  block.mixer: [{type: attention.dense}, {type: depth.moda}, {type: depth.mod}]
tasks: {mqar: {steps: 2, batch: 2, seq: 32, kv_pairs: 2, eval_batches: 1}}
measure: {correctness: true, latency: false}
""")
    out = _cli("sweep", str(sweep), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for f in (tmp_path / "out").rglob("*.jsonl") for line in f.read_text().splitlines()]
    flops = {r["label"]: r["value"] for r in rows if r.get("metric") == "rel_attn_flops"}
    assert len(flops) == 3, flops
    moda = next(v for k, v in flops.items() if "moda" in k)
    mod = next(v for k, v in flops.items() if "mod" in k and "moda" not in k)
    assert 1.0 < moda < 1.2 and mod < 0.5, flops
