"""``example_lag``: recall the token seen ``lag`` positions earlier (an evaluation task).

Random tokens; at every position t >= lag the target is x[t - lag]. A causal short convolution
with ``kernel_size > lag`` can solve it exactly, attention can too. Offline and seeded; reports
``lag_accuracy`` (higher is better) on fresh held-out batches after ``steps`` AdamW steps.
"""

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class LagConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lag: int = Field(2, ge=1, description="how far back the target token is")
    steps: int = Field(100, ge=0)
    batch: int = Field(16, ge=1)
    seq: int = Field(32, ge=2)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    eval_batches: int = Field(4, ge=1)


def lag_batch(gen: torch.Generator, batch: int, seq: int, lag: int, vocab: int):
    if lag >= seq:
        raise ValueError(f"example_lag: lag {lag} must be smaller than seq {seq}")
    x = torch.randint(0, vocab, (batch, seq), generator=gen)
    y = torch.full_like(x, -100)
    y[:, lag:] = x[:, :-lag]
    return x, y


def run_lag(make_model, vocab: int, config: dict, device: str) -> dict[str, float]:
    cfg = LagConfig(**config)
    torch.manual_seed(cfg.seed)
    model = make_model()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.steps):
        x, y = (t.to(device) for t in lag_batch(gen, cfg.batch, cfg.seq, cfg.lag, vocab))
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    held = torch.Generator().manual_seed(1_000_003 + cfg.seed)
    correct = total = 0
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x, y = lag_batch(held, cfg.batch, cfg.seq, cfg.lag, vocab)
            pred = model(x.to(device)).argmax(-1).cpu()
            mask = y != -100
            correct += int((pred[mask] == y[mask]).sum())
            total += int(mask.sum())
    return {"lag_accuracy": correct / total}
