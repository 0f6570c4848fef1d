"""How many training steps until a model learns mqar key->value recall on this device?

Trains the dense baseline of ``examples/sweeps/temf_gpu.yaml`` (or ``--spec``) on mqar with the
task's optimizer (AdamW, betas 0.9/0.98, grad clip 1, linear warmup then constant lr) and prints
the held-out accuracy every ``--every`` steps with the wall time per step, until ``--steps`` or
``--seconds``. Used to size the GPU quality sweeps (issue 8): a retention number means something
only when the dense row has learned recall (well above the 1/kv_pairs plateau where the model
only picks one of the context's values).

    python3 bench/mqar_probe.py --device cuda --lr 3e-3 --steps 8000 --seconds 150
"""

from __future__ import annotations

import argparse
import json
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=None, help="model spec YAML (default: temf_gpu.yaml's base, dense)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.spec:
        spec = yaml.safe_load(open(a.spec))
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        spec = yaml.safe_load(open(os.path.join(here, "..", "examples", "sweeps", "temf_gpu.yaml")))["base"]
    if a.d_model:
        spec["model"]["d_model"] = a.d_model
    spec = load_spec(spec)
    torch.manual_seed(a.seed)
    model = build(spec).to(a.device)
    vocab = spec.model.vocab
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, min(500, a.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    gen, egen = torch.Generator().manual_seed(a.seed), torch.Generator().manual_seed(10_000)
    evx, evy = mqar_batch(egen, 512, a.seq, a.pairs, vocab)
    evx, evy = evx.to(a.device), evy.to(a.device)
    log, t0 = [], time.time()
    for step in range(1, a.steps + 1):
        x, y = (t.to(a.device) for t in mqar_batch(gen, a.batch, a.seq, a.pairs, vocab))
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = time.time() - t0 > a.seconds
        if step % a.every == 0 or done or step == a.steps:
            model.eval()
            with torch.no_grad():
                pred = model(evx).argmax(-1)
            m = evy != -100
            acc = float((pred[m] == evy[m]).float().mean())
            row = {"step": step, "loss": float(loss), "acc": acc, "s": time.time() - t0,
                   "ms_per_step": 1e3 * (time.time() - t0) / step}
            log.append(row)
            print(json.dumps(row), flush=True)
        if done:
            break
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "log": log}, f, indent=1)


if __name__ == "__main__":
    main()
