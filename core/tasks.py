"""Built-in evaluation tasks, registered through ``blockzoo_register_tasks`` like a plugin's.

All offline and seeded. Each task trains a fresh model built from the spec for a fixed budget
and reports metrics (higher-is-better or lower-is-better is in the metric's name/doc):

- ``mqar``: multi-query associative recall (Arora et al. 2023, Zoology). Accuracy of recalling
  the value of each queried key.
- ``bytes_lm``: byte-level language modelling on the Python standard library's own sources
  (fixed file lists below, split by file). Held-out bits per byte.
- ``passkey``: a 5-digit number hidden in filler text; accuracy of reproducing its digits at the
  question (teacher-forced), the probe for inference-time KV policies.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..registry import Task, hookimpl


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(150, ge=0, description="optimizer steps")
    batch: int = Field(16, ge=1)
    seq: int = Field(64, ge=8)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    eval_batches: int = Field(4, ge=1)
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="learning rate after a linear warmup over steps // 10: cosine to 0 at the "
        "last step, or constant")
    cuda_graph: bool = Field(
        False, description="on CUDA, capture one whole training step (forward, backward, clipping, AdamW "
        "with a tensor learning rate) in a CUDA graph and replay it: small models are bound by kernel "
        "launches. The model's training forward must not synchronise with the host. No effect on the CPU")


def _lr_factor(cfg: TrainConfig, s: int) -> float:
    """Learning-rate multiplier of optimizer step ``s`` (0-based)."""
    warm = min(1.0, (s + 1) / max(1, cfg.steps // 10))
    if cfg.schedule == "constant":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * s / max(1, cfg.steps)))


#: trained weights of the last few trainings in this process, keyed by (spec without its ``kv:``
#: policy, task config, device, initial weights): the trials of a sweep over KV-cache policies
#: train the same full-cache model, so a worker trains it once and evaluates each policy on it
_TRAINED: OrderedDict[str, tuple[dict[str, torch.Tensor], float]] = OrderedDict()
_TRAINED_MAX = 4


def _train_key(model: torch.nn.Module, cfg: TrainConfig, device: str) -> str | None:
    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(spec, "kv"):
        return None
    h = hashlib.sha256()
    h.update(spec.model_copy(update={"kv": None}).canonical_json().encode())
    h.update(f"{type(cfg).__name__}{cfg.model_dump_json()}{device}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _train(model: torch.nn.Module, sample: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
           cfg: TrainConfig, device: str) -> float:
    """AdamW on ``loss(logits, targets)`` with targets == -100 ignored. Returns the last loss.
    A model whose spec differs from a recent training only in its ``kv:`` policy (same config,
    same initial weights) gets that training's weights instead of training again."""
    model.train_sample = sample  # learned KV policies (token.evict) distil on the task's own inputs
    key = _train_key(model, cfg, device)
    if key is not None and key in _TRAINED:
        state, last = _TRAINED[key]
        model.load_state_dict(state)
        _TRAINED.move_to_end(key)
        return last
    last = _train_steps(model, sample, cfg, device)
    if key is not None:
        _TRAINED[key] = ({k: t.detach().clone() for k, t in model.state_dict().items()}, last)
        while len(_TRAINED) > _TRAINED_MAX:
            _TRAINED.popitem(last=False)
    return last


def _train_steps(model, sample, cfg: TrainConfig, device: str) -> float:
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.cuda_graph and torch.device(device).type == "cuda" and cfg.steps > 0:
        return _train_steps_graph(model, sample, cfg, device, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.steps):
        x, y = (t.to(device) for t in sample(gen))
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return float(loss.detach())


#: eager steps before the capture (they train: same schedule; they also create AdamW's state)
_GRAPH_EAGER_STEPS = 3


def _train_steps_graph(model, sample, cfg: TrainConfig, device: str, gen: torch.Generator) -> float:
    """:func:`_train_steps` with each step replayed from one CUDA graph: the same batches, learning
    rates, clipping and AdamW update (``capturable``, with the rate in a device tensor)."""
    lr_t = torch.tensor(cfg.lr * _lr_factor(cfg, 0), dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_t, weight_decay=cfg.weight_decay, betas=(0.9, 0.98),
                            capturable=True)
    x0, y0 = sample(gen)
    sx, sy = x0.to(device), y0.to(device)

    def step():
        logits = model(sx)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), sy.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    model.train()
    eager = min(cfg.steps, _GRAPH_EAGER_STEPS)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up steps on a side stream, as capture requires
        for s in range(eager):
            if s:
                x, y = sample(gen)
                sx.copy_(x)
                sy.copy_(y)
            lr_t.fill_(cfg.lr * _lr_factor(cfg, s))
            opt.zero_grad(set_to_none=True)
            last = step().detach()  # no reference to the warm-up's autograd graph outlives it
    torch.cuda.current_stream(device).wait_stream(side)
    if cfg.steps == eager:
        return float(last)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            loss = step()
    except RuntimeError as e:
        raise RuntimeError(f"cuda_graph: this model's training step cannot be captured in a CUDA graph ({e}); "
                           "set cuda_graph: false in the task config") from e
    for s in range(eager, cfg.steps):
        x, y = sample(gen)
        sx.copy_(x, non_blocking=True)
        sy.copy_(y, non_blocking=True)
        lr_t.fill_(cfg.lr * _lr_factor(cfg, s))
        graph.replay()
    return float(loss.detach())


def _eval_logits(model: torch.nn.Module, x: torch.Tensor, prefill_len: int, rels: list[float]) -> torch.Tensor:
    """Evaluation logits: the parallel forward, or, when the model's spec has a ``kv:`` policy,
    teacher-forced decoding under that policy's cache (prefill ``x[:, :prefill_len]`` with the full
    attention, then one step per token; the model was trained with the full cache). Appends the
    KV tokens held relative to the full cache (mean over steps) to ``rels``."""
    if getattr(getattr(model, "spec", None), "kv", None) is None:
        return model(x)
    from .cache import decode_logits
    logits, rel = decode_logits(model, x, max(1, prefill_len))
    rels.append(rel)
    return logits


def _first_target(y: torch.Tensor) -> int:
    """First position with a target in any row: the prompt before it is prefilled."""
    return int((y != -100).any(0).nonzero()[0])


def _kv_metric(name: str, rels: list[float]) -> dict[str, float]:
    return {f"{name}_kv_rel_bytes": sum(rels) / len(rels)} if rels else {}


# ---------------------------------------------------------------------------------------------
# mqar
class MQARConfig(TrainConfig):
    steps: int = 200
    seq: int = 64
    kv_pairs: int = Field(8, ge=1)
    # 1e-3: with 3e-3 or 1e-2 a 2-layer d64 model stayed on the 1/kv_pairs plateau for 10k-26k
    # steps, with 1e-3 (batch 512) it reached 0.96 at step 3000 (bench/mqar_probe.py, H100)
    lr: float = 1e-3


def mqar_batch(gen: torch.Generator, batch: int, seq: int, kv_pairs: int, vocab: int):
    """Keys from [1, vocab/2), values from [vocab/2, vocab); layout
    ``k1 v1 k2 v2 ... kN vN | filler ... q(k_i) ...``: each key queried once, at a random
    position after the pairs; the target at a query is its value (everything else ignored)."""
    half = vocab // 2
    if 2 * kv_pairs * 2 > seq or kv_pairs >= half - 1:
        raise ValueError(f"mqar: seq {seq} too short for {kv_pairs} pairs (needs >= {4 * kv_pairs})")
    # all rows at once: k distinct draws without replacement per row = the first k of a random
    # permutation (argsort of uniform noise)
    keys = torch.rand(batch, half - 1, generator=gen).argsort(1)[:, :kv_pairs] + 1
    vals = torch.randint(half, vocab, (batch, kv_pairs), generator=gen)
    x = torch.zeros(batch, seq + 1, dtype=torch.long)
    x[:, 0:2 * kv_pairs:2], x[:, 1:2 * kv_pairs:2] = keys, vals
    y = torch.full((batch, seq + 1), -100, dtype=torch.long)
    free = seq + 1 - 2 * kv_pairs
    pos = 2 * kv_pairs + torch.rand(batch, free - 1, generator=gen).argsort(1)[:, :kv_pairs]
    order = torch.rand(batch, kv_pairs, generator=gen).argsort(1)
    x.scatter_(1, pos, keys.gather(1, order))
    y.scatter_(1, pos, vals.gather(1, order))  # predict the value at the query's own position
    return x[:, :-1], y[:, :-1]


def run_mqar(make_model: Callable[[], torch.nn.Module], vocab: int, config: dict, device: str) -> dict[str, float]:
    cfg = MQARConfig(**config)
    model = make_model()
    last = _train(model, lambda g: mqar_batch(g, cfg.batch, cfg.seq, cfg.kv_pairs, vocab), cfg, device)
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    correct = total = 0
    rels: list[float] = []
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x, y = mqar_batch(gen, cfg.batch, cfg.seq, cfg.kv_pairs, vocab)
            pred = _eval_logits(model, x.to(device), _first_target(y), rels).argmax(-1).cpu()
            mask = y != -100
            correct += int((pred[mask] == y[mask]).sum())
            total += int(mask.sum())
    return {"mqar_accuracy": correct / total, "mqar_train_loss": last, **_kv_metric("mqar", rels)}


# ---------------------------------------------------------------------------------------------
# bytes_lm
BYTES_LM_TRAIN = ("argparse.py", "textwrap.py", "functools.py", "heapq.py", "string.py", "json/decoder.py",
                  "json/encoder.py", "csv.py", "fractions.py", "calendar.py", "shlex.py", "dataclasses.py",
                  "enum.py")
BYTES_LM_HELDOUT = ("difflib.py", "pprint.py", "bisect.py")


def stdlib_bytes(files: tuple[str, ...]) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(f"bytes_lm: standard-library files missing under {root}: {missing}")
    data = b"".join((root / f).read_bytes() + b"\n" for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class BytesLMConfig(TrainConfig):
    steps: int = 200
    seq: int = 128
    eval_windows: int = Field(32, ge=1)


def run_bytes_lm(make_model, vocab: int, config: dict, device: str) -> dict[str, float]:
    cfg = BytesLMConfig(**config)
    if vocab < 256:
        raise ValueError(f"bytes_lm needs vocab >= 256, the spec has {vocab}")
    train, held = stdlib_bytes(BYTES_LM_TRAIN), stdlib_bytes(BYTES_LM_HELDOUT)

    def sample(gen):
        starts = torch.randint(0, len(train) - cfg.seq - 1, (cfg.batch,), generator=gen)
        w = torch.stack([train[s:s + cfg.seq + 1] for s in starts])
        return w[:, :-1], w[:, 1:]
    model = make_model()
    last = _train(model, sample, cfg, device)
    # fixed, evenly spaced held-out windows
    starts = torch.linspace(0, len(held) - cfg.seq - 2, cfg.eval_windows).long()
    nll = count = 0.0
    rels: list[float] = []
    model.eval()
    with torch.no_grad():
        for chunk in starts.split(cfg.batch):
            w = torch.stack([held[s:s + cfg.seq + 1] for s in chunk]).to(device)
            # under a kv policy: the first eighth prefilled, the rest decoded token by token
            logits = _eval_logits(model, w[:, :-1], cfg.seq // 8, rels).float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
            count += w[:, 1:].numel()
    return {"bytes_lm_bpb": nll / count / math.log(2), "bytes_lm_train_loss": last, **_kv_metric("bytes_lm", rels)}


# ---------------------------------------------------------------------------------------------
# passkey
FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class PasskeyConfig(TrainConfig):
    steps: int = 200
    seq: int = 128


def passkey_batch(gen: torch.Generator, batch: int, seq: int):
    """filler with 'pass key is NNNNN.' at a random depth, then 'key? NNNNN' at the end; targets
    are the 5 answer digits."""
    xs, ys = [], []
    for _ in range(batch):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (5,), generator=gen))
        needle = f" pass key is {key}. ".encode()
        tail = b" key? " + key.encode()
        room = seq + 1 - len(needle) - len(tail)
        if room < 0:
            raise ValueError(f"passkey: seq {seq} too short")
        filler = (FILLER * (room // len(FILLER) + 2))[int(torch.randint(0, len(FILLER), (1,), generator=gen)):][:room]
        at = int(torch.randint(0, room + 1, (1,), generator=gen))
        seqb = filler[:at] + needle + filler[at:] + tail
        t = torch.tensor(list(seqb), dtype=torch.long)
        y = torch.full_like(t, -100)
        y[-5:] = t[-5:]
        xs.append(t[:-1])
        ys.append(y[1:])
    return torch.stack(xs), torch.stack(ys)


def run_passkey(make_model, vocab: int, config: dict, device: str) -> dict[str, float]:
    cfg = PasskeyConfig(**config)
    model = make_model()
    last = _train(model, lambda g: passkey_batch(g, cfg.batch, cfg.seq), cfg, device)
    gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    correct = total = 0
    rels: list[float] = []
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x, y = passkey_batch(gen, cfg.batch, cfg.seq)
            pred = _eval_logits(model, x.to(device), _first_target(y), rels).argmax(-1).cpu()
            mask = y != -100
            correct += int((pred[mask] == y[mask]).sum())
            total += int(mask.sum())
    return {"passkey_accuracy": correct / total, "passkey_train_loss": last, **_kv_metric("passkey", rels)}


TASKS: dict[str, tuple[Callable[..., dict[str, float]], type[BaseModel], str]] = {
    "mqar": (run_mqar, MQARConfig, "multi-query associative recall accuracy (higher is better)"),
    "bytes_lm": (run_bytes_lm, BytesLMConfig, "held-out bits per byte on stdlib sources (lower is better)"),
    "passkey": (run_passkey, PasskeyConfig, "passkey digit accuracy (higher is better)"),
}


@hookimpl
def blockzoo_register_tasks(registry) -> None:
    for name, (fn, cfg, doc) in TASKS.items():
        registry.add_task(Task(name=name, run=fn, params=cfg, doc=doc))


def task_names() -> list[str]:
    from ..registry import get_registry
    return sorted(get_registry().tasks)


def run_task(name: str, make_model, vocab: int, config: dict[str, Any], device: str) -> dict[str, float]:
    from ..registry import get_registry
    return get_registry().tasks[name].run(make_model, vocab, config, device)
