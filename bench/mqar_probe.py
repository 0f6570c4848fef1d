"""How many training steps until a model learns mqar key->value recall on this device?

Trains the dense baseline of ``examples/sweeps/temf_gpu.yaml`` (or ``--spec``) on mqar with the
task's optimizer (AdamW, betas 0.9/0.98, grad clip 1, linear warmup then constant lr) and prints
the held-out accuracy every ``--every`` steps with the wall time per step, until ``--steps`` or
``--seconds``. Used to size the GPU quality sweeps (issues 7 and 8): a retention number means
something only when the dense row has learned recall (well above the 1/kv_pairs plateau where
the model only picks one of the context's values).

``--grid`` runs several settings one after another, e.g.
``--grid "pairs=4,batch=512,lr=3e-3;pairs=8,batch=256,lr=1e-3,d_model=128"`` (keys: pairs,
batch, lr, d_model, layers, seq), and prints a table last: the first step at which the held-out
accuracy reached ``--target`` and the final accuracy. ``--graph`` (CUDA) captures the whole
training step (forward, backward, clipping, AdamW with a tensor learning rate) in one CUDA graph:
the model is tiny, so eager steps are bound by kernel launches.

    python3 bench/mqar_probe.py --device cuda --graph --steps 20000 --seconds 100 \\
        --grid "pairs=4,batch=512,lr=3e-3;pairs=4,batch=512,lr=1e-2"
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from blockzoo.core.composer import build  # noqa: E402
from blockzoo.core.spec import load_spec  # noqa: E402
from blockzoo.core.tasks import mqar_batch  # noqa: E402

KEYS = {"pairs": int, "batch": int, "lr": float, "d_model": int, "layers": int, "seq": int, "seed": int,
        "sched": str}


def parse_grid(text: str, defaults: dict) -> list[dict]:
    runs = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        cfg = dict(defaults)
        for kv in filter(None, (s.strip() for s in item.split(","))):
            key, _, val = kv.partition("=")
            if key not in KEYS:
                raise SystemExit(f"--grid: unknown key {key!r} in {item!r}; keys: {', '.join(KEYS)}")
            cfg[key] = KEYS[key](val)
        runs.append(cfg)
    return runs


def train(base_spec: dict, cfg: dict, a) -> dict:
    spec = copy.deepcopy(base_spec)
    if cfg.get("d_model"):
        spec["model"]["d_model"] = cfg["d_model"]
    if cfg.get("layers"):
        spec["model"]["n_layers"] = cfg["layers"]
    spec = load_spec(spec)
    seed = cfg["seed"]
    torch.manual_seed(seed)
    dev = a.device
    model = build(spec).to(dev)
    vocab, batch, seq, pairs, lr = spec.model.vocab, cfg["batch"], cfg["seq"], cfg["pairs"], cfg["lr"]
    graph = a.graph and dev.startswith("cuda")
    lr_t = torch.tensor(lr, device=dev) if graph else lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr_t, weight_decay=0.0, betas=(0.9, 0.98), capturable=graph)
    if cfg["sched"] not in ("constant", "cosine"):
        raise SystemExit(f"sched must be 'constant' or 'cosine'; got {cfg['sched']!r}")
    # constant: linear warmup (<= 500 steps) then constant; cosine: the sweep's schedule
    # (core/tasks.py: warmup over steps // 10, then cosine to 0 at --steps)
    warm = max(1, min(500, a.steps // 10)) if cfg["sched"] == "constant" else max(1, a.steps // 10)
    gen, egen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(10_000)
    evx, evy = (t.to(dev) for t in mqar_batch(egen, 512, seq, pairs, vocab))
    sx, sy = (t.to(dev) for t in mqar_batch(gen, batch, seq, pairs, vocab))

    def step_fn():
        logits = model(sx)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), sy.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    model.train()
    g = None
    if graph:  # warm up on a side stream (optimizer state exists), then capture one whole step
        for group in opt.param_groups:
            group["lr"].fill_(0.0)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step_fn()
        torch.cuda.current_stream().wait_stream(s)
        opt.zero_grad(set_to_none=True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            loss_t = step_fn()
    log, t0, hit = [], time.time(), None
    for step in range(1, a.steps + 1):
        x, y = mqar_batch(gen, batch, seq, pairs, vocab)
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        cur = lr * min(1.0, step / warm)
        if cfg["sched"] == "cosine":
            cur = lr * min(1.0, step / warm) * 0.5 * (1 + math.cos(math.pi * (step - 1) / a.steps))
        if graph:
            lr_t.fill_(cur)
            g.replay()
        else:
            for group in opt.param_groups:
                group["lr"] = cur
            opt.zero_grad(set_to_none=True)
            loss_t = step_fn()
        done = time.time() - t0 > a.seconds
        if step % a.every == 0 or done or step == a.steps:
            model.eval()
            with torch.no_grad():
                pred = model(evx).argmax(-1)
            model.train()
            m = evy != -100
            acc = float((pred[m] == evy[m]).float().mean())
            row = {"step": step, "loss": float(loss_t.detach()), "acc": acc, "s": round(time.time() - t0, 2),
                   "ms_per_step": round(1e3 * (time.time() - t0) / step, 3)}
            log.append(row)
            print(json.dumps({**cfg, **row}), flush=True)
            if hit is None and acc >= a.target:
                hit = step
        if done:
            break
    return {"cfg": cfg, "log": log, "steps_to_target": hit, "final_acc": log[-1]["acc"],
            "steps": log[-1]["step"], "ms_per_step": log[-1]["ms_per_step"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=None, help="model spec YAML (default: temf_gpu.yaml's base, dense)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--grid", default=None, help="';'-separated settings, each 'key=value,...' (keys: "
                    + ", ".join(KEYS) + ")")
    ap.add_argument("--graph", action="store_true", help="CUDA: one CUDA graph per training step")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--seconds", type=float, default=150.0, help="per setting")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--target", type=float, default=0.9, help="accuracy whose first step is reported")
    ap.add_argument("--seed", type=int, default=0, help="model init and training data")
    ap.add_argument("--sched", default="constant", help="constant or cosine (the sweep's schedule)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.spec:
        base = yaml.safe_load(open(a.spec))
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        base = yaml.safe_load(open(os.path.join(here, "..", "examples", "sweeps", "temf_gpu.yaml")))["base"]
    defaults = {"pairs": a.pairs, "batch": a.batch, "lr": a.lr, "d_model": a.d_model, "layers": a.layers,
                "seq": a.seq, "seed": a.seed, "sched": a.sched}
    runs = parse_grid(a.grid, defaults) if a.grid else [defaults]
    results = [train(base, cfg, a) for cfg in runs]
    print(f"\nmqar probe on {a.device} ({'CUDA graph' if a.graph else 'eager'}), target acc {a.target}:")
    print("| pairs | batch | lr | sched | d_model | layers | seed | steps run | ms/step | steps to target | final acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["cfg"]
        print(f"| {c['pairs']} | {c['batch']} | {c['lr']:g} | {c['sched']} | {c['d_model'] or 'spec'} | "
              f"{c['layers'] or 'spec'} | {c['seed']} | "
              f"{r['steps']} | {r['ms_per_step']:.2f} | {r['steps_to_target'] or '-'} | {r['final_acc']:.3f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
