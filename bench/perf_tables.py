"""Render Markdown tables for docs/performance.md from `blockzoo bench --json` files.

    python bench/perf_tables.py bench_attention.json bench_norm.json bench_mlp.json
"""

import json
import sys
from collections import defaultdict


def load(paths):
    rows, env = [], None
    for p in paths:
        d = json.load(open(p))
        env = env or d["environment"]
        rows += d["rows"]
    return env, rows


def table_attention(rows):
    by = defaultdict(dict)
    for r in rows:
        if r["component"] == "attention.dense" and r["ms"]:
            by[(r["case"], r["mode"])][r["impl"]] = r
    out = ["| shape (bf16) | mode | ours TFLOP/s | SDPA flash (FA2) | cuDNN | efficient | ours / FA2 | ours / cuDNN |",
           "|---|---|---|---|---|---|---|---|"]
    for (case, mode), d in by.items():
        o, f, c, e = (d.get(k) for k in ("triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"))
        if not o:
            continue
        out.append(f"| {case} | {mode} | {o['rate']:.0f} | {f['rate']:.0f} | {c['rate']:.0f} | {e['rate']:.0f} | "
                   f"**{o['speedup']['sdpa-flash']:.2f}** | {o['speedup']['sdpa-cudnn']:.2f} |")
    return "\n".join(out)


def table_norm(rows):
    out = ["| component | rows x width | dtype | mode | ours GB/s | % of copy | vs torch eager |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["component"].startswith("normres.") and r["impl"] == "triton" and r["ms"]:
            pct = f"{r['pct_of_copy']:.0f}%" if r.get("pct_of_copy") else "—"
            out.append(f"| {r['component']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['rate']:.0f} | {pct} | "
                       f"{r['speedup']['torch-eager']:.2f}x |")
    return "\n".join(out)


def table_mlp(rows):
    out = ["| component | shape | mode | triton TFLOP/s | vs torch eager | vs reference |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["component"].startswith("mlp.") and r["impl"] == "triton" and r["ms"]:
            out.append(f"| {r['component']} | {r['case']} | {r['mode']} | {r['rate']:.0f} | "
                       f"{r['speedup']['torch-eager']:.2f}x | {r['speedup']['reference']:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    env, rows = load(sys.argv[1:])
    print(f"Device: {env['device']}; {env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}\n")
    print(table_attention(rows), "\n")
    print(table_norm(rows), "\n")
    print(table_mlp(rows))
