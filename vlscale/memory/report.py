"""Memory reports on disk: ``report.json``, ``report.md`` and PNG plots, from a plan or a measurement.

One schema for both (``schema: "vlscale.memory.report/1"``, ``kind: "plan" | "measure" | "run"``):

``inputs``        every number the prediction used (:class:`vlscale.memory.plan.PlanInputs`), bytes;
``strategies``    ``naive`` / ``fused`` / ``fused_gradcache``: peak at the recipe's batch, its phase,
                  whether it fits, ``largest_global_batch``;
``components``    the chosen strategy's per-rank components (bytes) and the phases each is live in;
``phases``        predicted bytes per phase; ``verdict``: one line;
``measured``      (measure / run) per phase: start, peak, peak − start (bytes), with the backend;
``comparison``    (measure / run) per phase: predicted total and predicted growth beside measured;
``plots``         the PNG files written next to the report.

Files are written atomically (temp file + rename). Plots need matplotlib; without it the report
says so instead of failing.
"""

from __future__ import annotations

import io
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlscale.memory.model import GIB, MIB, MemoryEstimate, fmt_bytes

SCHEMA = "vlscale.memory.report/1"
def versions() -> dict[str, str | None]:
    import torch

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "deepspeed", "vlscale"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # optional pieces: absent is a value, not an error
            out[name] = None
    return out


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename
    (:func:`vlscale.data.fs.write_bytes`)."""
    from vlscale.data.fs import write_bytes

    write_bytes(str(path), data.encode() if isinstance(data, str) else data)
    return path


def predicted_growth(est: MemoryEstimate) -> dict[str, float]:
    """Bytes each phase allocates itself (its components minus those carried into it)."""
    carried = est.carried()
    return {p: sum(est.components[c] for c in names if c not in carried[p]) for p, names in est.phases.items()}


def build(kind: str, plan_result: dict[str, Any], *, measured: dict[str, Any] | None = None,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as JSON-able data. ``measured``: ``{"backend", "device", "phases": {name: {"start_bytes",
    "peak_bytes", "delta_bytes", ...}}}`` (a :meth:`MemoryTracker.to_dict`-like summary per phase)."""
    est: MemoryEstimate = plan_result["estimate"]
    report: dict[str, Any] = {
        "schema": SCHEMA, "kind": kind, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "recipe": plan_result["inputs"]["recipe"], "inputs": plan_result["inputs"],
        "verdict": plan_result["verdict"], "chosen": plan_result["chosen"],
        "strategies": plan_result["strategies"],
        "components": [{"name": c, "bytes": b, "phases": [p for p, names in est.phases.items() if c in names]}
                       for c, b in est.components.items()],
        "phases": est.phase_bytes(), "peak_phase": est.peak_phase, "peak_bytes": est.total,
        "sweep": plan_result.get("sweep"), "plots": [], "notes": list(plan_result["inputs"].get("notes", []))}
    if measured is not None:
        growth = predicted_growth(est)
        report["measured"] = measured
        report["comparison"] = {}
        for phase, m in measured["phases"].items():
            pred = report["phases"].get(phase)
            row = {"predicted_bytes": pred, "predicted_growth_bytes": growth.get(phase),
                   "measured_peak_bytes": m["peak_bytes"], "measured_start_bytes": m["start_bytes"],
                   "measured_growth_bytes": m["delta_bytes"]}
            if growth.get(phase):
                row["growth_ratio"] = m["delta_bytes"] / growth[phase]
            if pred and measured.get("absolute"):
                row["peak_ratio"] = m["peak_bytes"] / pred
            report["comparison"][phase] = row
    report.update(extra or {})
    return report


def _md_inputs(inp: dict[str, Any]) -> list[str]:
    rows = [("recipe", inp["recipe"]), ("parameters Ψ", f"{inp['params']:,}"),
            ("ranks × GPU memory", f"{inp['world_size']} × {fmt_bytes(inp['gpu_memory'])} "
             f"({fmt_bytes(inp['usable'])} usable after {fmt_bytes(inp['context_reserve'])} for the CUDA context)"),
            ("engine", f"{inp['engine']}, model states as ZeRO-{inp['zero_stage']} ({inp['states_precision']} spec"
             + (f", {inp['offload']} offloaded to the host" if inp.get("offload") else "")
             + f"), towers in {inp['precision']}"),
            ("global batch / per rank", f"{inp['global_batch']:,} / {inp['global_batch'] // inp['world_size']:,}"),
            ("gradient cache", f"{'on' if inp['gradient_cache'] else 'off'}, chunk {inp['chunk']}"),
            ("embedding width D", inp["embed_dim"]),
            ("activations per pair / per chunk row", f"{fmt_bytes(inp['act_bytes_per_pair'])} / "
             f"{fmt_bytes(inp['chunk_act_bytes_per_row'])} ({inp['act_source']})"),
            ("inputs per pair", fmt_bytes(inp["input_bytes_per_pair"])),
            ("engine buffers", fmt_bytes(inp["engine_buffer_bytes"])),
            ("fused loss", f"{inp['fused_impl']} on {inp.get('device_kind', '?')}"
             + (f" ({inp['fused_impl_why']})" if inp.get("fused_impl_why") else "")),
            ("techniques", _md_techniques(inp.get("techniques") or {})),
            ("allocator slack", f"{inp['allocator_slack']:.0%} of the peak")]
    return ["| input | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _md_techniques(t: dict[str, Any]) -> str:
    parts = [] if t.get("contrastive", True) else ["no symmetric term"]
    if t.get("momentum_params"):
        parts.append(f"momentum contrast ({t['candidates']}, K = {t['queue_size']:,}, fp32 copy of "
                     f"{t['momentum_params']:,} parameters)")
    if t.get("hier_levels"):
        parts.append(f"{t['hier_levels']} hierarchical levels")
    if t.get("mim_act_bytes_per_row"):
        parts.append(f"masked image modeling ({fmt_bytes(t['mim_act_bytes_per_row'])} per image)")
    return "; ".join(parts) or "none (the symmetric loss)"


def to_markdown(report: dict[str, Any]) -> str:
    inp = report["inputs"]
    title = {"plan": "Memory plan", "measure": "Memory measured vs predicted",
             "run": "Memory of a training run: measured vs predicted"}[report["kind"]]
    lines = [f"# {title}: `{report['recipe']}`", "", f"**{report['verdict']}**", ""]
    if report["kind"] != "plan":
        m = report["measured"]
        lines += [f"Measured on `{m['device']}` with the `{m['backend']}` backend "
                  f"({m.get('what', 'one step')}). Growth = peak − start of the phase: what the phase itself "
                  "allocated. " + m.get("note", ""), "",
                  "| phase | predicted | predicted growth | measured peak | measured start | measured growth | "
                  "growth measured / predicted |", "|---|---:|---:|---:|---:|---:|---:|"]
        for phase, c in report["comparison"].items():
            ratio = f"{c['growth_ratio']:.2f}" if "growth_ratio" in c else "–"
            lines.append(f"| {phase} | {fmt_bytes(c['predicted_bytes'])} | {fmt_bytes(c['predicted_growth_bytes'])} | "
                         f"{fmt_bytes(c['measured_peak_bytes'])} | {fmt_bytes(c['measured_start_bytes'])} | "
                         f"{fmt_bytes(c['measured_growth_bytes'])} | {ratio} |")
        lines.append("")
    lines += ["## Strategies", "", "| strategy | loss | gradient cache | peak at this batch | phase | fits | "
              "largest global batch |", "|---|---|---|---:|---|---|---:|"]
    for name, s in report["strategies"].items():
        lines.append(f"| {name} | {s['loss_impl']} | {'chunk ' + str(s['chunk']) if s['gradient_cache'] else 'off'} "
                     f"| {fmt_bytes(s['peak_bytes'])} | {s['peak_phase']} | {'yes' if s['fits'] else 'no'} | "
                     f"{s['largest_global_batch']:,} |")
    if "recipe_plan" in report:
        rp = report["recipe_plan"]
        lines += ["", "The table above is the simulated rank (what ran). The recipe under its own engine "
                  f"(`{rp['inputs']['engine']}`, ZeRO-{rp['inputs']['zero_stage']}):", "", f"**{rp['verdict']}**", "",
                  "| strategy | peak at this batch | fits | largest global batch |", "|---|---:|---|---:|"]
        lines += [f"| {n} | {fmt_bytes(s['peak_bytes'])} | {'yes' if s['fits'] else 'no'} | "
                  f"{s['largest_global_batch']:,} |" for n, s in rp["strategies"].items()]
    phases = list(report["phases"])
    lines += ["", f"## Per-rank components: `{report['chosen']['strategy']}` at global batch "
              f"{report['chosen']['global_batch']:,}", "",
              "| component | size | " + " | ".join(phases) + " |", "|---|---:|" + "---|" * len(phases)]
    for c in report["components"]:
        marks = " | ".join("x" if p in c["phases"] else "" for p in phases)
        lines.append(f"| {c['name']} | {fmt_bytes(c['bytes'])} | {marks} |")
    lines.append("| **phase total** | | " + " | ".join(fmt_bytes(report["phases"][p]) for p in phases) + " |")
    lines += ["", f"Peak: **{fmt_bytes(report['peak_bytes'])}** in phase `{report['peak_phase']}`.", ""]
    host = inp.get("host") or {}
    if host:
        lines += ["## Host memory per rank (data path)", "",
                  f"**{host['bytes_per_rank'] / 1e9:.1f} GB**: {host['formula']}; one local batch is "
                  f"{host['batch_bytes'] / 1e9:.2f} GB (`data.pixel_dtype`, `data.num_workers`, `data.prefetch_factor`; "
                  "times the ranks on one machine).", ""]
    lines += ["## Inputs", "", *_md_inputs(inp), ""]
    for plot in report["plots"]:
        lines += [f"![{plot}]({plot})", ""]
    notes = report["notes"] + ([report["plots_note"]] if report.get("plots_note") else [])
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    lines += [f"Written {report['created']}; versions: `{json.dumps(report['versions'])}`.", ""]
    return "\n".join(lines)


def _savefig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def _plots(report: dict[str, Any], est: MemoryEstimate, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    inp, sweep = report["inputs"], report.get("sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, peaks in sweep["peak_bytes"].items():
            ax.plot(sweep["global_batch"], [p / GIB for p in peaks], marker=".", label=name)
        ax.axhline(inp["gpu_memory"] / GIB, color="k", lw=1.2, label=f"GPU {inp['gpu_memory'] / GIB:.0f} GiB")
        ax.axhline(inp["usable"] / GIB, color="k", lw=0.8, ls="--", label="usable")
        ax.axvline(report["chosen"]["global_batch"], color="grey", lw=0.8, ls=":", label="recipe batch")
        ax.set(xscale="log", yscale="log", xlabel=f"global batch ({inp['world_size']} ranks)",
               ylabel="predicted peak per rank (GiB)", title=f"{report['recipe']}: peak memory vs global batch")
        ax.legend(fontsize=8)
        _savefig(fig, out / "peak_vs_batch.png")
        plt.close(fig)
        written.append("peak_vs_batch.png")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    phases = list(est.phases)
    bottom = [0.0] * len(phases)
    colors = iter([*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors])  # 40: techniques add components
    unit, label = (GIB, "GiB") if est.total >= GIB else (MIB, "MiB")
    for comp, nbytes in est.components.items():
        heights = [nbytes / unit if comp in est.phases[p] else 0.0 for p in phases]
        if any(heights):
            ax.bar(phases, heights, bottom=bottom, label=comp, color=next(colors))
            bottom = [b + h for b, h in zip(bottom, heights)]
    if report["kind"] != "plan":
        meas = report["measured"]["phases"]
        key = "peak_bytes" if report["measured"].get("absolute") else "delta_bytes"
        xs = [p for p in phases if p in meas]
        ax.scatter(xs, [meas[p][key] / unit for p in xs], color="k", marker="D", zorder=3,
                   label="measured peak" if key == "peak_bytes" else "measured growth")
    ax.set(ylabel=f"per rank ({label})", title=f"{report['chosen']['strategy']} at global batch "
           f"{report['chosen']['global_batch']:,}: components per phase")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _savefig(fig, out / "breakdown.png")
    plt.close(fig)
    written.append("breakdown.png")
    return written


def write(out: str | Path, report: dict[str, Any], est: MemoryEstimate) -> dict[str, Path]:
    """Write the plots, ``report.json`` and ``report.md`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report["plots"] = _plots(report, est, out)
    except ImportError as exc:
        report["plots_note"] = f"plots skipped: matplotlib is not installed ({exc})"
    paths = {"json": atomic_write(out / "report.json", json.dumps(report, indent=1, default=_jsonable) + "\n"),
             "md": atomic_write(out / "report.md", to_markdown(report))}
    paths.update({p: out / p for p in report["plots"]})
    return paths


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, MemoryEstimate):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
