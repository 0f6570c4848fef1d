#!/usr/bin/env python3
"""Plot the context.moc density sweep of bench/moc_keymajor.py: speed-up over SDPA flash (FA2)
against row density, forward and forward+backward, per path and input kind, with the issue's
target line 0.5 / density.

    python3 bench/moc_plot.py moc_keymajor.json [docs/img/moc_density.png]
"""
from __future__ import annotations

import json
import pathlib
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    src = pathlib.Path(sys.argv[1])
    dst = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "docs/img/moc_density.png")
    data = json.loads(src.read_text())
    sweep_t = data["args"]["sweep_T"]
    rows = [r for r in data["rows"] if r["T"] == sweep_t]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = {("query", "random"): ("tab:blue", "o", "--"), ("query", "coherent"): ("tab:blue", "s", "-"),
              ("key", "random"): ("tab:red", "o", "--"), ("key", "coherent"): ("tab:red", "s", "-")}
    dens = sorted({r["row_density"] for r in rows})
    lo, hi = min(dens) * 0.9, max(dens) * 1.1
    xs = [lo + (hi - lo) * i / 100 for i in range(101)]
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fb", "forward + backward")):
        for (path, kind), (color, marker, ls) in styles.items():
            pts = sorted((r["row_density"], r[f"{path}_{mode}_x"], r["top_k"]) for r in rows if r["inputs"] == kind)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, ls=ls,
                    label=f"{path}-major, {kind}")
            for x, y, k in pts:
                ax.annotate(f"k{k}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
        ax.plot(xs, [0.5 / x for x in xs], color="k", lw=1, ls=":", label="target 0.5 / density")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_yticks([0.5, 0.75, 1, 1.5, 2, 3, 4, 6])
        ax.set_xticks([0.05, 0.1, 0.2, 0.3, 0.5, 0.8])
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("row density (visible keys / causal dense keys)")
        ax.set_title(f"{title}, T={sweep_t}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over SDPA flash (FA2)")
    axes[1].legend(fontsize=8)
    env = data["env"]
    fig.suptitle(f"context.moc Triton, chunk 512, 16 heads, D 128, bf16 -- {env['device']}, {env['date']}",
                 fontsize=10)
    fig.tight_layout()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)
    print("wrote", dst)


if __name__ == "__main__":
    main()
