"""The append-only, long-format results table of a sweep: ``DIR/results.jsonl``.

One JSON object per line, one line per (trial, metric). A trial's lines are written with one
``write`` + ``fsync`` and end with its ``status`` line, so a trial counts as done only if its
status line is complete; a kill mid-write leaves at most one partial trailing line, which
readers ignore and the next writer truncates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    rows = []
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # partial trailing line from a kill
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    done = {r["trial"] for r in rows if r.get("metric") == "status"}
    return [r for r in rows if r["trial"] in done]


def done_trials(out_dir: Path) -> dict[str, dict[str, Any]]:
    """trial key -> its status row, for every complete trial."""
    return {r["trial"]: r for r in read_rows(out_dir) if r["metric"] == "status"}


def _repair(path: Path) -> None:
    """Drop a partial trailing line (and any lines of a trial without its status line)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(cut)


def append_trial(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    assert rows and rows[-1]["metric"] == "status"
    path = Path(out_dir) / RESULTS
    _repair(path)
    payload = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def wide(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long rows -> one dict per trial: label, status, reason, backends and every metric."""
    trials: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = trials.setdefault(r["trial"], {"trial": r["trial"], "label": r.get("label", ""),
                                           "sweep": r.get("sweep", ""), "device": r.get("device", ""),
                                           "backends": r.get("backends", ""), "axes": r.get("axes", {})})
        if r["metric"] == "status":
            t["status"], t["reason"], t["wall_s"] = r["status"], r.get("reason", ""), r.get("value")
        else:
            t[r["metric"]] = r["value"]
    return list(trials.values())
