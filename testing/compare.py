"""``assert_close`` with a report that says where and by how much two tensors differ."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .tolerances import Tolerance

#: how many times the reference's own rounding error (``compare(noise=...)``) a backend may err
NOISE_FACTOR = 4.0
#: the noise rule never raises a bound beyond this many times the table's: a reference whose fp32
#: and fp64 runs differ by more made a different discrete choice (a top-k tie, a quantisation
#: step), which is not rounding
NOISE_CAP = 16.0


@dataclass
class CloseReport:
    name: str
    ok: bool
    max_rel: float
    rms_rel: float
    max_abs: float
    worst_index: tuple[int, ...]
    actual_at_worst: float
    expected_at_worst: float
    nan_actual: int
    nan_expected: int
    shape: tuple[int, ...]
    tol: Tolerance
    noise_bound: float = 0.0  # NOISE_FACTOR x the reference's own max rounding error, when it set the bound

    def __str__(self) -> str:
        status = "ok" if self.ok else "MISMATCH"
        return (f"{self.name}: {status} shape={self.shape} max_rel={self.max_rel:.3e} (tol {self.tol.max_rel:.1e}) "
                f"rms_rel={self.rms_rel:.3e} (tol {self.tol.rms_rel:.1e}) max_abs={self.max_abs:.3e} "
                f"worst at {self.worst_index}: actual={self.actual_at_worst:.6g} expected={self.expected_at_worst:.6g}"
                + (f" (bound: {NOISE_FACTOR:g}x the reference's own fp32 rounding, {self.noise_bound:.3e} abs)"
                   if self.noise_bound else "")
                + (f" NaN: actual {self.nan_actual}, expected {self.nan_expected}"
                   if self.nan_actual or self.nan_expected else ""))


def compare(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, name: str = "tensor",
            noise: torch.Tensor | None = None) -> CloseReport:
    """``noise``: the reference's own rounding error at the backend's precision (the oracle in
    fp32 minus the oracle in fp64, same shape as ``expected``), or None. Where given, the error
    may also reach :data:`NOISE_FACTOR` times that error (its largest element for the max bound,
    its norm for the rms bound): the rule of FlashAttention's tests ("at most k times the error of
    the reference in the same precision"), up to :data:`NOISE_CAP` times the table's bound.
    Rounding is what it measures, so on well-conditioned
    outputs it is far below the table's bound and changes nothing; it only speaks for outputs
    that are sums of cancelling terms, where any summation order loses digits the table cannot
    see from ``expected`` alone."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = int(torch.isnan(a).sum()), int(torch.isnan(e).sum())
    diff = (a - e).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    scale = float(e.abs().max()) if e.numel() else 0.0
    norm = float(e.norm()) if e.numel() else 0.0
    max_abs = float(diff.max()) if diff.numel() else 0.0
    # an all-zero expectation is compared absolutely
    max_rel = max_abs / scale if scale > 0 else max_abs
    rms_rel = float((a - e).nan_to_num(float("inf")).norm()) / norm if norm > 0 else float(diff.norm()) if diff.numel() else 0.0
    if diff.numel():
        flat = int(diff.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        aw, ew = float(a.flatten()[flat]), float(e.flatten()[flat])
    else:
        idx, aw, ew = (), 0.0, 0.0
    # the rms bound is tighter than the max bound because rounding errors average out over many
    # elements; over n elements that averaging buys at most sqrt(n), so tiny tensors (n = 1: rms
    # is the max) are held to max_rel / sqrt(n) at the tightest
    rms_tol = max(tol.rms_rel, tol.max_rel / math.sqrt(max(1, e.numel())))
    tol = Tolerance(tol.max_rel, rms_tol)
    noise_bound = 0.0
    if noise is not None and noise.numel() and diff.numel():
        nz = noise.detach().to("cpu", torch.float64).abs().nan_to_num(0.0, 0.0, 0.0)
        n_max = min(NOISE_FACTOR * float(nz.max()), NOISE_CAP * tol.max_rel * scale)
        n_norm = min(NOISE_FACTOR * float(nz.norm()), NOISE_CAP * tol.rms_rel * norm)
        if scale > 0 and n_max > tol.max_rel * scale:  # the reference's rounding dominates
            max_rel, noise_bound = max_abs / (n_max / tol.max_rel), n_max
        if norm > 0 and n_norm > tol.rms_rel * norm:
            rms_rel = rms_rel * norm / (n_norm / tol.rms_rel)
    ok = nan_a == nan_e == 0 and max_rel <= tol.max_rel and rms_rel <= tol.rms_rel
    if nan_e and nan_a == nan_e and bool((torch.isnan(a) == torch.isnan(e)).all()):
        ok = max_rel <= tol.max_rel  # NaN in both at the same places is not the backend's fault
    return CloseReport(name, ok, max_rel, rms_rel, max_abs, idx, aw, ew, nan_a, nan_e, tuple(a.shape), tol,
                       noise_bound)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, name: str = "tensor") -> CloseReport:
    report = compare(actual, expected, tol, name)
    if not report.ok:
        raise AssertionError(str(report))
    return report
