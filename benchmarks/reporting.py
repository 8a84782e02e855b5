"""Markdown and plots of benchmark records (the rendering half of ``benchmarks/harness.py``).

``md_header`` (device, versions, date, load average, command, failures), ``md_table`` (rows ×
columns), ``default_markdown`` (every key of every row) and ``plot_vs_size`` (one line per
provider of a value vs the size, log-log) — written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def md_header(rec: dict[str, Any], title: str) -> list[str]:
    v = rec["versions"]
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [f"# {title}", "", f"Device: **{rec['device_name']}** ({rec['device']}, {rec['cpu_count']} CPUs, "
             f"{rec['torch_threads']} torch threads); {vers}; {rec['date']}.",
             f"Load average (1/5/15 min) at start {rec['load_avg_start']}, at end {rec['load_avg_end']}"
             + (" — a shared machine: other work ran beside these timings." if rec["device"] == "cpu" else "."),
             "", f"Command: `{rec['command']}`", ""]
    if rec["failures"]:
        lines += ["**FAILED thresholds:**", "", *(f"- {f}" for f in rec["failures"]), ""]
    return lines


def md_table(rows: list[dict[str, Any]], columns: list[tuple[str, Callable[[dict[str, Any]], Any]]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, get in columns:
            try:
                value = get(r)
            except (KeyError, TypeError):
                value = None
            cells.append("–" if value is None else str(value))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _getter(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: r.get(key)


def default_markdown(rec: dict[str, Any]) -> str:
    keys = sorted({k for r in rec["rows"] for k in r})
    lines = md_header(rec, rec["bench"]) + md_table(rec["rows"], [(k, _getter(k)) for k in keys])
    lines += ["", *[f"![{p}]({p})" for p in rec.get("plots", [])], "", *rec["notes"]]
    return "\n".join(lines) + "\n"


def plot_vs_size(rows: list[dict[str, Any]], *, out: Path, x: str, y: str, series: Iterable[str] = ("provider",),
                 title: str = "", ylabel: str = "", scale: float = 1.0, where: dict[str, Any] | None = None) -> Path | None:
    """One line per series (e.g. provider × mode) of ``y`` vs ``x`` over the rows that have ``y``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = tuple(series)
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get(y) is None or r.get(x) is None or any(r.get(k) != v for k, v in (where or {}).items()):
            continue
        label = " ".join(str(r.get(k)) for k in series)
        lines.setdefault(label, []).append((float(r[x]), float(r[y]) * scale))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel=x, ylabel=ylabel or y, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out
