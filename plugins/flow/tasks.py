"""The ``digits_density`` evaluation task, registered through ``blockzoo_register_tasks``.

Data: scikit-learn's bundled 8x8 digits (1797 images, 64 dims, integer values 0..16; shipped
inside the scikit-learn package, nothing is downloaded). Fixed split: a permutation drawn with
seed 0, the first 1437 images train, the last 360 test. Dequantised: ``x_c = v + u`` with
``u ~ U[0, 1)^64`` (fresh noise each training step; one fixed draw, seed 1, for the test set),
then standardised ``y = (x_c - 8.5) / 4.25`` for the model. Bits per dimension of the
dequantised density in the original units::

    bpd = (-log p(y) / D + log 4.25) / log 2

(the change of variables of the standardisation included); by Jensen's inequality this is an
upper bound on the bits per dimension the model gives the discrete images. A uniform density over
[0, 17)^64 scores log2(17) = 4.09 bpd.

Metrics: ``digits_bpd`` (test; for flow.aif the exact likelihood of the decoder, computed from full
Jacobians), ``digits_bpd_encoder`` (aif: the encoder's change of variables), ``digits_recon_mse``
(test ||x - inverse(forward(x))||^2 per dim, model units), ``digits_fit_s`` (training time,
evaluations excluded), ``digits_time_to_target_s`` (training time until the test bpd first
reaches ``target_bpd``, checked every ``eval_every`` steps; NaN if never or no target),
``digits_sample_ms`` (drawing 1000 samples), ``digits_train_loss``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from ...registry import Task, hookimpl

SCALE = 4.25
CENTER = 8.5
LEVELS = 17
N_TRAIN = 1437
MISSING = ("digits_density needs scikit-learn (its bundled 8x8 digits data set): "
           "pip install blockzoo[flows]")


class DigitsDensityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(400, ge=0, description="optimizer steps")
    batch: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, description="seed of initialisation, batches, dequantisation noise and probes")
    clip: float = Field(10.0, gt=0, description="gradient-norm clip")
    eval_every: int = Field(0, ge=0, description="steps between test evaluations for time-to-target (0: end only)")
    target_bpd: float | None = Field(None, gt=0, description="report the training time to reach this test bpd")
    sample_n: int = Field(1000, ge=1, description="samples drawn for digits_sample_ms")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads during the task (None: as set); "
                                                        "1 is fastest for these small models on a busy CPU")


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor]:
    """(train [1437, 64], test [360, 64]) integer pixel values 0..16 as float64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    data = torch.from_numpy(load_digits().data).to(torch.float64)
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))
    data = data[perm]
    return data[:N_TRAIN], data[N_TRAIN:]


def dequantise(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(v.shape, generator=gen, dtype=torch.float64)
    return ((v + u) - CENTER) / SCALE


def bpd_from_log_prob(log_prob: torch.Tensor, dim: int) -> float:
    return float((-log_prob.double().mean() / dim + math.log(SCALE)) / math.log(2))


def evaluate(model, y_test: torch.Tensor) -> dict[str, float]:
    """Test bpd (exact), the aif encoder's bpd, and reconstruction error."""
    model.eval()
    out = {}
    d = y_test.shape[-1]
    lp = model.log_prob(y_test).detach()
    out["digits_bpd"] = bpd_from_log_prob(lp, d)
    if getattr(model, "kind", "") == "aif":
        out["digits_bpd_encoder"] = bpd_from_log_prob(model.log_prob_encoder(y_test), d)
    with torch.no_grad():
        rec = model.reconstruct(y_test)
    out["digits_recon_mse"] = float(((rec.double() - y_test.double()) ** 2).mean())
    model.train()
    return out


def run_digits_density(make_model: Callable[[], torch.nn.Module], dim: int, config: dict,
                       device: str) -> dict[str, float]:
    cfg = DigitsDensityConfig(**config)
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(make_model, cfg, device)
    finally:
        torch.set_num_threads(before)


def _run(make_model, cfg: DigitsDensityConfig, device: str) -> dict[str, float]:
    train_v, test_v = load_digits_split()
    torch.manual_seed(cfg.seed)
    model = make_model()
    if not hasattr(model, "log_prob") or not hasattr(model, "sample"):
        raise ValueError("digits_density needs a flow model (model.kind: flow), got "
                         f"{type(model).__name__}")
    p0 = next(model.parameters())
    dt = p0.dtype
    d = train_v.shape[1]
    if getattr(model, "dim", d) != d:
        raise ValueError(f"digits_density: the data has {d} dims, the flow spec has flow.dim {model.dim}")
    y_test = dequantise(test_v, torch.Generator().manual_seed(1)).to(device=device, dtype=dt)
    gen = torch.Generator().manual_seed(cfg.seed + 100)
    probe_gen = torch.Generator().manual_seed(cfg.seed + 200)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / max(1, cfg.steps))))
    is_aif = getattr(model, "kind", "") == "aif"
    fit_s = 0.0
    to_target = float("nan")
    last = float("nan")
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, train_v.shape[0], (cfg.batch,), generator=gen)
        y = dequantise(train_v[idx], gen).to(device=device, dtype=dt)
        t0 = time.perf_counter()
        loss = model.loss(y, generator=probe_gen) if is_aif else model.loss(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        fit_s += time.perf_counter() - t0
        last = float(loss.detach())
        if not math.isfinite(last):
            raise FloatingPointError(f"digits_density: training loss became {last} at step {step}")
        if (cfg.target_bpd is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0
                and math.isnan(to_target)):
            if evaluate(model, y_test)["digits_bpd"] <= cfg.target_bpd:
                to_target = fit_s
    out = evaluate(model, y_test)
    if cfg.target_bpd is not None and math.isnan(to_target) and out["digits_bpd"] <= cfg.target_bpd:
        to_target = fit_s
    model.eval()
    model.sample(min(cfg.sample_n, 16))                  # warm-up
    t0 = time.perf_counter()
    samples = model.sample(cfg.sample_n, generator=torch.Generator().manual_seed(cfg.seed + 300))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out["digits_sample_ms"] = (time.perf_counter() - t0) * 1e3
    if not torch.isfinite(samples).all():
        out["digits_sample_nonfinite"] = float((~torch.isfinite(samples)).sum())
    out.update({"digits_fit_s": fit_s, "digits_time_to_target_s": to_target, "digits_train_loss": last})
    if is_aif:
        out.update({f"digits_aif_{k}": v for k, v in model.last_terms.items()})
    return out


@hookimpl
def blockzoo_register_tasks(registry) -> None:
    registry.add_task(Task(name="digits_density", run=run_digits_density, params=DigitsDensityConfig,
                           doc="bits per dimension on scikit-learn's 8x8 digits, dequantised, fixed "
                               "split (lower is better); flow specs only"))
