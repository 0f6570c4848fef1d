"""Reports of a sweep folder: report.md, report.html, pareto.png (quality vs cost) and, for
KV-cache policy sweeps, retention.png (quality vs KV memory held), from results.jsonl alone
(so ``blockzoo report DIR`` can re-render them at any time)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from .store import read_rows, wide

# quality metrics: name -> (label, higher_is_better)
QUALITY = {"bytes_lm_bpb": ("bytes_lm bits/byte", False), "mqar_accuracy": ("mqar accuracy", True),
           "passkey_accuracy": ("passkey accuracy", True)}
COLUMNS = [("label", "trial"), ("status", "status"), ("bytes_lm_bpb", "bpb ↓"), ("mqar_accuracy", "mqar ↑"),
           ("passkey_accuracy", "passkey ↑"), ("rel_attn_flops", "attn FLOPs ×dense"),
           ("rel_kv_bytes", "KV bytes ×dense"), ("fwd_bwd_ms", "fwd+bwd ms"), ("tokens_per_s", "tokens/s"),
           ("params", "params"), ("logits_max_rel_err", "err vs ref"), ("backends", "backends")]


# retention table (KV-cache policy sweeps): quality metric, KV memory metric, header
RETENTION = [("passkey_accuracy", "passkey_kv_rel_bytes", "passkey acc ↑"),
             ("mqar_accuracy", "mqar_kv_rel_bytes", "mqar acc ↑"),
             ("bytes_lm_bpb", "bytes_lm_kv_rel_bytes", "bytes_lm bpb ↓")]


def _policy_budget(t: dict[str, Any]) -> tuple[str | None, float | None]:
    """A trial's KV policy and budget from its axis values (``kv`` or ``kv.type``, ``kv.params.budget``)."""
    axes = t.get("axes") or {}
    kv = axes.get("kv") if isinstance(axes.get("kv"), dict) else {}
    params = kv.get("params") or {}
    budget = axes.get("kv.params.budget", params.get("budget", params.get("budget_tokens")))
    return axes.get("kv.type", kv.get("type")), budget


def retention_table(trials: list[dict[str, Any]]) -> list[list[str]]:
    """Rows (header first) of policy x budget -> each task's quality and KV memory relative to the
    full cache (``<task>_kv_rel_bytes``, the mean over decoding steps); empty when no trial
    evaluated under a KV policy."""
    ok = [t for t in trials if t.get("status") == "ok" and any(t.get(m) is not None for _, m, _ in RETENTION)]
    rows = [(p, b, t) for t in ok for p, b in [_policy_budget(t)] if p is not None and b is not None]
    if not rows:
        return []
    tasks = [r for r in RETENTION if any(t.get(r[0]) is not None for _, _, t in rows)]
    order = {p: i for i, p in enumerate(dict.fromkeys(p for p, _, _ in rows))}
    out = [["policy", "budget"] + [c for q, _, h in tasks for c in (h, "KV ×full")]]
    for p, b, t in sorted(rows, key=lambda r: (r[1] == 1.0, order[r[0]], r[1])):
        name = "full cache" if b == 1.0 else p
        out.append([name, f"{b:g}"] + [_fmt(k, t.get(k)) for q, m, _ in tasks for k in (q, m)])
    return out


def retention_series(trials: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """task quality metric -> policy (``full cache`` for budget 1.0) -> points (KV held relative to
    the full cache, quality), sorted by KV held: what :func:`_retention_plot` draws."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for t in trials:
        if t.get("status") != "ok":
            continue
        policy, budget = _policy_budget(t)
        if policy is None or budget is None:
            continue
        name = "full cache" if budget == 1.0 else policy
        for quality, mem, _ in RETENTION:
            q, m = t.get(quality), t.get(mem)
            if isinstance(q, (int, float)) and isinstance(m, (int, float)) and math.isfinite(q) and math.isfinite(m):
                out.setdefault(quality, {}).setdefault(name, []).append((float(m), float(q)))
    for per in out.values():
        for pts in per.values():
            pts.sort()
    return out


def _retention_plot(trials: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per task: quality against the KV memory actually held (relative to the full
    cache), one line per policy over its budgets, the full cache as a star."""
    series = retention_series(trials)
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4.0), squeeze=False)
    for ax, (quality, per) in zip(axes[0], series.items(), strict=True):
        label, higher = QUALITY[quality]
        for policy, pts in per.items():
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if policy == "full cache":
                ax.scatter(xs, ys, marker="*", s=160, c="black", zorder=4, label=policy)
            else:
                ax.plot(xs, ys, "o-", ms=4, lw=1.2, label=policy)
        ax.set_xlabel("KV memory held, relative to the full cache")
        ax.set_ylabel(label + (" (higher is better)" if higher else " (lower is better)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("KV-cache policies: quality vs memory held")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(key: str, v: Any) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        if key == "params":
            return f"{v:,.0f}"
        if key in ("tokens_per_s",):
            return f"{v:,.0f}"
        if key.endswith("err"):
            return f"{v:.1e}"
        return f"{v:.3f}"
    return str(v)


def pareto_front(points: list[tuple[float, float]], higher_better: bool) -> list[int]:
    """Indices of points not dominated (lower cost, better quality)."""
    front = []
    for i, (c, q) in enumerate(points):
        dominated = False
        for j, (c2, q2) in enumerate(points):
            if j == i:
                continue
            better_q = q2 >= q if higher_better else q2 <= q
            strictly = c2 < c or (q2 > q if higher_better else q2 < q)
            if c2 <= c and better_q and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.get("status", "?")] = counts.get(t.get("status", "?"), 0) + 1
    ok = [t for t in trials if t.get("status") == "ok" and t.get("wall_s")]
    overhead = None
    if ok:
        wall = sum(t["wall_s"] for t in ok)
        compute = sum(t.get("compute_s") or 0 for t in ok)
        overhead = (wall - compute) / wall if wall else None
    return {"counts": counts, "runner_overhead": overhead}


def render(out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    trials = wide(rows)
    status_rows = {r["trial"]: r for r in rows if r["metric"] == "status"}
    for t in trials:
        t["compute_s"] = status_rows.get(t["trial"], {}).get("compute_s")
    info = summary(trials)
    inv = out_dir / "invocations.jsonl"
    if inv.exists():  # runner overhead of the latest invocation that ran trials: wall vs trial compute
        import json
        last = [json.loads(line) for line in inv.read_text().splitlines() if line.strip()]
        # files written before invocations recorded their worker slots compared wall time with the
        # summed trial time of parallel workers (negative with > 1 worker): per-trial accounting then
        if last and last[-1].get("slots") and last[-1].get("overhead") is not None:
            n = last[-1]["slots"]
            info["runner_overhead"] = last[-1]["overhead"]
            info["overhead_note"] = (f"latest invocation: {last[-1]['trials_run']} trials on {n} worker"
                                     f"{'s' if n > 1 else ''} in {last[-1]['wall_s']:.1f} s wall, "
                                     f"{last[-1]['compute_s']:.1f} s inside trials")
    name = trials[0]["sweep"] if trials else out_dir.name
    versions = rows[-1].get("versions", {}) if rows else {}
    cols = [(k, h) for k, h in COLUMNS if any(t.get(k) not in (None, "") for t in trials)]
    written = {}

    # markdown
    lines = [f"# sweep `{name}`", "",
             f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(info['counts'].items())) + ".",
             f"Device: {trials[0]['device'] if trials else '?'}; versions: "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".", ""]
    if info["runner_overhead"] is not None:
        lines += [f"Runner overhead (worker start, imports, bookkeeping): {100 * info['runner_overhead']:.1f}% of "
                  f"the sweep's wall time ({info.get('overhead_note', 'per-trial accounting')}).", ""]
    lines += ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for t in trials:
        lines.append("| " + " | ".join(_fmt(k, t.get(k)).replace("|", "\\|") for k, _ in cols) + " |")
    retention = retention_table(trials)
    if retention:
        lines += ["", "## Retention table", "",
                  "Quality under each KV-cache policy and budget (kept fraction of the full cache) and the KV "
                  "memory actually held relative to the full cache (mean over the decoding steps of each task; "
                  "budget 1.0 is the full cache).", "",
                  "| " + " | ".join(retention[0]) + " |", "|" + "---|" * len(retention[0])]
        lines += ["| " + " | ".join(r) + " |" for r in retention[1:]]
        rplot = _retention_plot(trials, out_dir / "retention.png")
        if rplot:
            lines += ["", "![quality vs KV memory held](retention.png)"]
            written["retention.png"] = rplot
    failed = [t for t in trials if t.get("status") in ("failed", "skipped") and t.get("reason")]
    if failed:
        lines += ["", "## Skipped and failed trials", ""]
        for t in failed:
            first = t["reason"].strip().splitlines()[0] if t["reason"].strip() else ""
            lines.append(f"- **{t['label']}** ({t['status']}): {first}")
    plot = _plot(trials, out_dir / "pareto.png")
    if plot:
        lines += ["", "![quality vs cost](pareto.png)"]
        written["pareto.png"] = plot
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    written["report.md"] = out_dir / "report.md"

    # html
    h = ["<!doctype html><meta charset='utf-8'><title>blockzoo sweep</title>",
         "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
         ".failed{background:#fdd}.skipped{background:#eee}</style>",
         f"<h1>sweep <code>{html.escape(name)}</code></h1>",
         f"<p>{html.escape(lines[2])}<br>{html.escape(lines[3])}</p><table><tr>"
         + "".join(f"<th>{html.escape(hd)}</th>" for _, hd in cols) + "</tr>"]
    for t in trials:
        cls = t.get("status", "")
        h.append(f"<tr class='{cls}'>" + "".join(
            f"<td title='{html.escape(t.get('reason', '') if k == 'status' else '')}'>{html.escape(_fmt(k, t.get(k)))}</td>"
            for k, _ in cols) + "</tr>")
    h.append("</table>")
    if retention:
        h.append("<h2>Retention table</h2><table>" + "".join(
            "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row) + "</tr>"
            for row, tag in zip(retention, ["th"] + ["td"] * (len(retention) - 1), strict=True)) + "</table>")
        if "retention.png" in written:
            h.append("<p><img src='retention.png' alt='quality vs KV memory held' style='max-width:100%'></p>")
    if plot:
        h.append("<p><img src='pareto.png' alt='quality vs cost' style='max-width:100%'></p>")
    (out_dir / "report.html").write_text("\n".join(h))
    written["report.html"] = out_dir / "report.html"
    return written


def _plot(trials: list[dict[str, Any]], path: Path) -> Path | None:
    ok = [t for t in trials if t.get("status") == "ok"]
    metrics = [m for m in QUALITY if any(t.get(m) is not None for t in ok)]
    # a cost axis on which every trial is equal (e.g. all-dense attention FLOPs) says nothing
    costs = [c for c in ("rel_attn_flops", "fwd_bwd_ms")
             if len({round(t[c], 9) for t in ok if t.get(c) is not None}) > 1]
    if not ok or not metrics or not costs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(metrics), len(costs), figsize=(6 * len(costs), 4.2 * len(metrics)), squeeze=False)
    for r, metric in enumerate(metrics):
        label, higher = QUALITY[metric]
        for c, cost in enumerate(costs):
            ax = axes[r][c]
            pts = [(t[cost], t[metric], t["label"]) for t in ok if t.get(cost) is not None and t.get(metric) is not None
                   and math.isfinite(t[metric])]
            if not pts:
                ax.set_visible(False)
                continue
            front = set(pareto_front([(p[0], p[1]) for p in pts], higher))
            for i, (x, y, lab) in enumerate(pts):
                ax.scatter([x], [y], c="tab:red" if i in front else "tab:blue", s=40 if i in front else 20, zorder=3)
                ax.annotate(lab, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
            fr = sorted((pts[i][0], pts[i][1]) for i in front)
            ax.plot([p[0] for p in fr], [p[1] for p in fr], "--", c="tab:red", lw=1, label="Pareto front")
            ax.set_xlabel({"rel_attn_flops": "attention FLOPs relative to dense",
                           "fwd_bwd_ms": "forward+backward time (ms)"}[cost])
            ax.set_ylabel(label + (" (higher is better)" if higher else " (lower is better)"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("quality vs cost (red: Pareto front)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
