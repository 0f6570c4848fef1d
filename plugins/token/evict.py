"""token.evict: the learned retention gates and their distillation against the dense model.

Every layer has a small gate per kv head (``EvictGates``): an MLP on each cached token's value and
RoPE-invariant key features that outputs ``beta`` in (0, 1). A token written at position ``j``
scores ``(now - j) * log(beta_j)`` (beta^age in log space, as in TRIM-KV): a token with beta near 1
stays relevant for long, one with a small beta fades fast. The cache keeps the top scores under
the budget (the shared selector; sinks and recent tokens protected), so the threshold is dynamic:
whatever score the budget's last kept token has.

Training (:func:`distill`): the model's weights are frozen; the gates are trained so that the
model with *soft* retention reproduces the dense model. In the soft model, the attention of query
``i`` to an unprotected key ``j`` gets ``(i - j) * log(beta_j)`` added to its logit (the weight
is multiplied by beta^(i-j)); the loss is KL(dense || soft) over next-token distributions plus
``penalty * mean_i relu(r_i - keep(i+1) / (i+1))`` where ``r_i = mean_j beta_j^(i-j)`` is the soft
fraction of the cache query ``i`` still holds (protected tokens count as 1), i.e. the soft
retention above the budget. API: ``distill(model, steps, budget)``; command:
``blockzoo kv distill SPEC --budget 0.25 --steps N --out gates.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...core.context import Context
from .reference import check_shapes, evict_logbeta, gate_feature_dim

GATE_FORMAT = "blockzoo.token.evict.gates/1"


class EvictGates(nn.Module):
    """Retention gates of every layer: per layer and kv head a one-hidden-layer MLP
    (features -> ``hidden`` -> 1). Initialised to keep (bias ``init_bias``: beta ~ 0.95) with
    random first-layer weights, so an untrained gate ranks mostly by recency."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, hidden: int = 16,
                 init_bias: float = 3.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        f = gate_feature_dim(head_dim)
        self.shape = (n_layers, n_kv_heads, head_dim, hidden)
        self.w1 = nn.Parameter(torch.randn(n_layers, n_kv_heads, f, hidden, generator=g) / math.sqrt(f))
        self.b1 = nn.Parameter(torch.zeros(n_layers, n_kv_heads, hidden))
        self.w2 = nn.Parameter(torch.randn(n_layers, n_kv_heads, hidden, generator=g) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.full((n_layers, n_kv_heads), float(init_bias)))

    @classmethod
    def for_model(cls, model, hidden: int = 16, seed: int = 0) -> EvictGates:
        mixer = model.blocks[0].mixer
        return cls(len(model.blocks), mixer.n_kv_heads, mixer.head_dim, hidden, seed=seed)

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """(w1, b1, w2, b2) of layer ``i``: the tensor arguments of the ``token.evict`` op."""
        return self.w1[i], self.b1[i], self.w2[i], self.b2[i]

    def check_model(self, model) -> None:
        mixer = model.blocks[0].mixer
        want = (len(model.blocks), mixer.n_kv_heads, mixer.head_dim)
        if tuple(self.shape[:3]) != want:
            raise ValueError(f"token.evict gates are for (layers, kv heads, head dim) {tuple(self.shape[:3])}, "
                             f"the model has {want}")

    def save(self, path: str | Path, **meta) -> None:
        torch.save({"format": GATE_FORMAT, "shape": list(self.shape), "state": self.state_dict(), "meta": meta},
                   str(path))

    @classmethod
    def load(cls, path: str | Path) -> EvictGates:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"token.evict gate_path {str(path)!r} does not exist "
                                    "(train one with `blockzoo kv distill SPEC --out FILE`)")
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != GATE_FORMAT:
            raise ValueError(f"{path} is not a token.evict gate file (format {GATE_FORMAT!r})")
        n_layers, hk, d, hidden = blob["shape"]
        gates = cls(n_layers, hk, d, hidden)
        gates.load_state_dict(blob["state"])
        gates.meta = blob.get("meta", {})
        return gates


# ---------------------------------------------------------------------------------------------
# soft retention (training)
class SoftRetention:
    """Stands in for the KV cache in ``Context.state["kv_cache"]`` during a parallel forward: each
    attention layer attends with the soft retention bias ``(i - j) * log(beta_j)`` on unprotected
    keys and records the soft retention of every query (for the budget penalty)."""

    def __init__(self, gates: EvictGates, sinks: int, recent: int) -> None:
        self.gates, self.sinks, self.recent = gates, sinks, recent
        self.retention: list[torch.Tensor] = []

    def attend(self, layer: int, q, k, v, positions, op) -> torch.Tensor:
        check_shapes(q, k, v)
        b, t, hq, d = q.shape
        hk = k.shape[2]
        scale = op.kwargs.get("scale") or 1.0 / math.sqrt(d)
        lb = evict_logbeta(k, v, *self.gates.layer(layer))                # [B, Hk, T]
        i = torch.arange(t, device=q.device)
        age = (i[:, None] - i[None, :]).clamp_min(0).float()              # [Tq, Tk]
        prot = (i[None, :] < self.sinks) | (i[None, :] > i[:, None] - self.recent)
        bias = (age[None, None] * lb[:, :, None, :]).masked_fill(prot[None, None], 0.0)  # [B, Hk, T, T]
        causal = i[None, :] <= i[:, None]
        frac = (bias.exp() * causal).sum(-1) / (i + 1).float()              # [B, Hk, T]
        self.retention.append(frac)
        g = hq // hk
        qf = q.float().view(b, t, hk, g, d)
        s = torch.einsum("bqhgd,bkhd->bhgqk", qf, k.float()) * scale + bias[:, :, None]
        s = s.masked_fill(~causal, float("-inf"))
        p = torch.softmax(s, -1)
        o = torch.einsum("bhgqk,bkhd->bqhgd", p, v.float()).reshape(b, t, hq, d)
        return o.to(q.dtype)


def _keep_fraction(params, t: int, device) -> torch.Tensor:
    """[T] the budget's kept fraction after i + 1 tokens."""
    return torch.tensor([params.keep(n) / n for n in range(1, t + 1)], device=device)


def bytes_lm_sampler(seq: int = 128, batch: int = 8) -> Callable[[torch.Generator], tuple[torch.Tensor, None]]:
    """Windows of the bytes_lm training corpus (the standard library's sources)."""
    from ...core.tasks import BYTES_LM_TRAIN, stdlib_bytes
    data = stdlib_bytes(BYTES_LM_TRAIN)

    def sample(gen):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        return torch.stack([data[s:s + seq] for s in starts]), None
    return sample


def distill(model, steps: int = 200, budget: float = 0.25, *, sample=None, params=None, hidden: int = 16,
            lr: float = 1e-2, penalty: float = 0.1, seed: int = 0, gates: EvictGates | None = None,
            device: str | None = None, log: Callable[[int, dict], None] | None = None) -> EvictGates:
    """Train retention gates for ``model`` (frozen) by distillation against its dense forward.

    sample: ``generator -> (tokens [B, T], anything)`` (default: bytes_lm windows, 8 x 128);
    params: the policy params (``EvictParams``; default ``budget`` with the default sinks/recent),
    whose ``keep`` gives the budget the penalty aims at. Returns the gates (also stored on the
    returned object's ``history``: loss, kl, penalty, retention per step)."""
    from .params import EvictParams
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    params = params or EvictParams(budget=budget)
    device = device or next(model.parameters()).device
    gates = (gates or EvictGates.for_model(model, hidden, seed=seed)).to(device)
    gates.check_model(model)
    sample = sample or bytes_lm_sampler()
    gen = torch.Generator().manual_seed(seed)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    history = []
    try:
        with torch.enable_grad():
            for p, _ in frozen:
                p.requires_grad_(False)
            model.eval()
            for step in range(steps):
                x = sample(gen)[0].to(device)
                with torch.no_grad():
                    teacher = F.log_softmax(model(x).float(), -1)
                soft = SoftRetention(gates, params.sinks, params.recent)
                ctx = Context(positions=torch.arange(x.shape[1], device=device), state={"kv_cache": soft})
                student = F.log_softmax(model(x, ctx).float(), -1)
                kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
                target = _keep_fraction(params, x.shape[1], device)
                ret = torch.stack(soft.retention)                          # [L, B, Hk, T]
                pen = F.relu(ret - target).mean()
                loss = kl + penalty * pen
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rec = {"loss": loss.item(), "kl": kl.item(), "penalty": pen.item(), "retention": ret.mean().item()}
                history.append(rec)
                if log is not None:
                    log(step, rec)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    gates.history = history
    return gates.requires_grad_(False)


def gates_for(model, params, steps: int | None = None) -> EvictGates:
    """The gates a ``token.evict`` policy uses with ``model``: loaded from ``params.gate_path``,
    else distilled here (``params.distill_steps``) on the inputs the model was trained on
    (``model.train_sample``, set by the evaluation tasks) or bytes_lm, once per (model, params)."""
    if params.gate_path:
        gates = EvictGates.load(params.gate_path)
        gates.check_model(model)
        return gates
    store = model.__dict__.setdefault("_evict_gates", {})
    key = params.model_dump_json()
    if key not in store:
        steps = params.distill_steps if steps is None else steps
        if steps == 0:
            raise ValueError("token.evict has no gates: set params.gate_path (a file from `blockzoo kv distill`) "
                             "or distill_steps > 0 to distil them on first use")
        sample = getattr(model, "train_sample", None)
        wrapped = None if sample is None else (lambda g: (sample(g)[0][:params.distill_batch], None))
        store[key] = distill(model, steps, params=params, hidden=params.hidden, lr=params.distill_lr,
                             penalty=params.distill_penalty, seed=params.distill_seed,
                             sample=wrapped or bytes_lm_sampler(batch=params.distill_batch))
    return store[key]


__all__ = ["EvictGates", "SoftRetention", "bytes_lm_sampler", "distill", "gates_for"]
