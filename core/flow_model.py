"""``kind: flow`` models: a stack of exact flow layers, or the approximately invertible flow.

``FlowModel`` (exact): ``z = f_L(... f_1(x))`` through the spec's ``flow.layers`` (repeated
``flow.repeat`` times, fresh parameters each time), base distribution N(0, I) over D dims::

    log p(x) = log N(z; 0, I) + sum_l log|det df_l/dx_{l-1}|

``forward(x) -> (z, logdet)``, ``inverse(z) -> (x, logdet)``, ``log_prob(x)``, ``sample(n)``,
``loss(x)`` = mean negative log-likelihood in nats per sample.

``AIFModel`` (``flow.aif``, our definition after free-form flows, Draxler et al. 2024): free
encoder f and decoder g, trained with::

    loss = beta * ||x - g(f(x))||^2 - log N(f(x)) - sum_k v_k^T f'(x) stopgrad(g'(f(x)) v_k) / K

where the last term (the Hutchinson-style surrogate; computed by the ``flow.aif`` op from
``v^T f'(x)`` by reverse mode and ``g'(z) v`` by forward mode) has the gradient of
log|det f'(x)| when g ~ f^-1 (its value is not the log-det). Exact likelihoods are computed
for small D from full Jacobians: ``log_prob(x) = log N(z) - log|det g'(z)|`` with z = f(x) (the
density of the generative model x = g(z), evaluated at the encoder's z), and the encoder's
``log N(f(x)) + log|det f'(x)|`` beside it. Sampling: x = g(z), z ~ N(0, I).

Also here: the spec-level rules for flow specs (``flow_issues``), the builder (``build_flow``)
and the per-trial measurements of a sweep (``run_flow_trial``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from ..registry import get_registry
from .context import BuildContext

LOG2PI = math.log(2 * math.pi)


def normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Standard normal log-density summed over the last dim (in fp32 or wider)."""
    zf = z.to(torch.promote_types(z.dtype, torch.float32))
    return -0.5 * (zf * zf).sum(-1) - 0.5 * z.shape[-1] * LOG2PI


def _ctx(spec, layer: int, n_layers: int, device: str, dtype: torch.dtype, training: bool, backend: str):
    return BuildContext(d_model=spec.flow.dim, n_heads=1, n_kv_heads=1, max_seq=1, layer=layer,
                        n_layers=n_layers, backend=backend, device=torch.device(device).type, dtype=dtype,
                        training=training)


def _make(ref, ctx: BuildContext) -> nn.Module:
    comp = get_registry().component(ref.type)
    local = BuildContext(**{**ctx.__dict__, "backend": ref.backend or ctx.backend})
    module = comp.module(local, comp.params(**ref.params))
    module.component_id = ref.type
    return module


class FlowModel(nn.Module):
    """Exact flow: a stack of invertible layers with log-determinants."""

    kind = "exact"

    def __init__(self, spec, device: str, dtype: torch.dtype, training: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.dim = spec.flow.dim
        refs = [ref for _ in range(spec.flow.repeat) for ref in spec.flow.layers]
        seen: dict[str, int] = {}
        layers = []
        for ref in refs:
            idx = seen.get(ref.type, 0)
            seen[ref.type] = idx + 1
            layers.append(_make(ref, _ctx(spec, idx, len(refs), device, dtype, training, spec.model.backend)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor):
        """x [..., D] -> (z, sum of log-dets [...])."""
        total = torch.zeros(x.shape[:-1], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            total = total + ld
        return x, total

    def inverse(self, z: torch.Tensor):
        total = torch.zeros(z.shape[:-1], dtype=torch.promote_types(z.dtype, torch.float32), device=z.device)
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z)
            total = total + ld
        return z, total

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, ld = self(x)
        return normal_log_prob(z) + ld

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        return self.inverse(z)[0]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.inverse(self(x)[0])[0]

    def backends(self) -> list[dict[str, str]]:
        return [{"layer": str(i), "slot": "flow", "component": getattr(m, "component_id", "?"),
                 "backend": getattr(m, "backend_name", "?")} for i, m in enumerate(self.layers)]


def _jacobians(fn, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians [B, D, D] of a row-wise map by forward mode over the D basis vectors."""
    d = x.shape[-1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    def col(v):
        return torch.func.jvp(fn, (x,), (v.expand_as(x),))[1]
    return torch.func.vmap(col)(eye).permute(1, 2, 0)   # [B, D_out, D_in]


class AIFModel(nn.Module):
    """Approximately invertible (free-form) flow: encoder f, decoder g, surrogate training."""

    kind = "aif"

    def __init__(self, spec, device: str, dtype: torch.dtype, training: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.dim = spec.flow.dim
        ref = spec.flow.layers[0]
        self.net = _make(ref, _ctx(spec, 0, 1, device, dtype, training, spec.model.backend))
        self.params_ = self.net.params
        self.last_terms: dict[str, float] = {}

    def forward(self, x: torch.Tensor):
        """x -> (z = f(x), NaN log-det: the free-form encoder has no cheap exact log-det)."""
        z = self.net.encode(x)
        return z, torch.full(x.shape[:-1], float("nan"), device=x.device)

    def inverse(self, z: torch.Tensor):
        return self.net.decode(z), torch.full(z.shape[:-1], float("nan"), device=z.device)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.decode(self.net.encode(x))

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """beta * ||x - g(f(x))||^2 - log N(f(x)) - surrogate, averaged over the batch."""
        p = self.params_
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = self.net.encode(x)
            sur = torch.zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
            x1 = None
            for _ in range(p.hutchinson_samples):
                v = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z)
                v = v * math.sqrt(z.shape[-1]) / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                x1, jgv = torch.func.jvp(self.net.decode, (z.detach(),), (v,))        # g'(z) v
                vjf, = torch.autograd.grad(z, x, v, create_graph=True)                 # v^T f'(x)
                sur = sur + self.net.surrogate_op(vjf, jgv.detach()) / p.hutchinson_samples
            x1 = self.net.decode(z)          # reconstruction with gradients into both networks
            rec = ((x - x1) ** 2).sum(-1)
            nll = -normal_log_prob(z)
            loss = (p.beta * rec + nll - sur).mean()
        self.last_terms = {"recon": float(rec.detach().mean()), "nll_z": float(nll.detach().mean()),
                           "surrogate": float(sur.detach().mean())}
        return loss

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(f(x)) - log|det g'(f(x))| (full decoder Jacobian; D <= exact_max_dim)."""
        self._check_dim()
        with torch.no_grad():
            z = self.net.encode(x)
        jac = _jacobians(self.net.decode, z.detach())
        return (normal_log_prob(z) - torch.linalg.slogdet(jac.double())[1].to(z.dtype)).detach()

    def log_prob_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """log N(f(x)) + log|det f'(x)| (full encoder Jacobian)."""
        self._check_dim()
        with torch.no_grad():
            z = self.net.encode(x)
        jac = _jacobians(self.net.encode, x.detach())
        return (normal_log_prob(z) + torch.linalg.slogdet(jac.double())[1].to(z.dtype)).detach()

    def _check_dim(self) -> None:
        if self.dim > self.params_.exact_max_dim:
            raise ValueError(f"flow.aif: exact log-likelihood needs full Jacobians; dim {self.dim} > "
                             f"exact_max_dim {self.params_.exact_max_dim}")

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        return self.net.decode(z)

    def backends(self) -> list[dict[str, str]]:
        return [{"layer": "0", "slot": "flow", "component": "flow.aif",
                 "backend": getattr(self.net, "backend_name", "?")}]


def build_flow(spec, device: str, dtype: torch.dtype, training: bool = True) -> nn.Module:
    if any(ref.type == "flow.aif" for ref in spec.flow.layers):
        return AIFModel(spec, device, dtype, training)
    return FlowModel(spec, device, dtype, training)


# ---------------------------------------------------------------------------------------------
# spec rules (called by core.spec's cross-component stage)
def flow_issues(spec, src) -> list:
    from .spec import SpecIssue
    issues = []

    def add(path, msg, key=False):
        issues.append(SpecIssue(src.where(path, key=key) if src else None, ".".join(map(str, path)), msg))
    kind = spec.model.kind
    if kind != "flow":
        if spec.flow is not None:
            add(("flow",), f"a 'flow' section needs model.kind: flow (model.kind is {kind!r})", key=True)
        return issues
    if spec.flow is None:
        add(("model", "kind"), "model.kind: flow needs a 'flow' section (dim, layers)")
        return issues
    if spec.layers:
        add(("layers",), "per-layer overrides are for decoder specs; list flow layers under flow.layers")
    types = [ref.type for ref in spec.flow.layers]
    if "flow.aif" in types:
        i = types.index("flow.aif")
        if len(types) > 1:
            add(("flow", "layers", i), "flow.aif is a whole model (encoder + decoder) and must be the only layer")
        elif spec.flow.repeat != 1:
            add(("flow", "repeat"), f"flow.aif cannot be repeated (repeat is {spec.flow.repeat})")
    return issues


# ---------------------------------------------------------------------------------------------
# sweep trial
def correctness(spec, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The model with its chosen backends vs the same weights on the reference backend."""
    from .composer import build
    ref = build(spec, backend="reference")
    ref.load_state_dict(model.state_dict())
    model.eval()
    ref.eval()
    out: dict[str, float] = {}
    losses = []
    gen = torch.Generator().manual_seed(1)
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        g = gen if isinstance(m, AIFModel) else None
        if g is not None:
            g.manual_seed(1)
            loss = m.loss(x, generator=g)
        else:
            loss = m.loss(x)
        loss.backward()
        losses.append(loss.detach())
    with torch.no_grad():
        a, b = model(x)[0].float(), ref(x)[0].float()
    out["z_max_rel_err"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    worst = 0.0
    for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if p.grad is not None and q.grad is not None:
            worst = max(worst, float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)))
    out["grad_max_rel_err"] = worst
    out["loss_abs_err"] = float((losses[0] - losses[1]).abs())
    return out


def run_flow_trial(spec, model: nn.Module, job: dict[str, Any], t0: float) -> dict[str, Any]:
    """Per-trial measurements of a flow spec (same result layout as core.trial.run_trial)."""
    from .composer import build
    from .tasks import run_task
    from .timing import median_ms
    backends = sorted({f"{r['component']}:{r['backend']}" for r in model.backends()})
    dev = spec.model.device
    wl = spec.workload
    metrics: dict[str, float] = {"params": float(sum(p.numel() for p in model.parameters()))}
    gen = torch.Generator().manual_seed(wl.seed)
    x = torch.randn(wl.batch, spec.flow.dim, generator=gen).to(device=dev, dtype=spec.torch_dtype())
    measure = job.get("measure", {})
    if measure.get("correctness", True):
        metrics.update(correctness(spec, model, x))
    if measure.get("latency", True):
        reps = measure.get("latency_reps", 5)
        model.train()

        def fwd():
            with torch.no_grad():
                return model(x)

        def step():
            model.zero_grad(set_to_none=True)
            model.loss(x).backward()

        def sample():
            return model.sample(wl.batch)
        metrics["forward_ms"] = median_ms(fwd, dev, rep_ms=0, min_reps=reps, max_reps=reps)
        metrics["fwd_bwd_ms"] = median_ms(step, dev, rep_ms=0, min_reps=reps, max_reps=reps)
        metrics["sample_ms"] = median_ms(sample, dev, rep_ms=0, min_reps=reps, max_reps=reps)
        metrics["samples_per_s"] = wl.batch / (metrics["fwd_bwd_ms"] / 1e3)
    for name, cfg in job.get("tasks", {}).items():
        t_task = time.perf_counter()
        metrics.update(run_task(name, lambda: build(spec), spec.flow.dim, cfg, dev))
        metrics[f"{name}_train_s"] = time.perf_counter() - t_task
    return {"status": "ok", "reason": "", "metrics": metrics, "backends": " ".join(backends),
            "compute_s": time.perf_counter() - t0}
