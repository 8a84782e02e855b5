"""The summary of ``benchmarks/gpu_check.sh``: ``gpu_check.json`` and ``gpu_check.md`` from its steps' files.

Reads ``steps.jsonl`` (status and time of every step), ``env/env.json``, ``compile/compile.json``, ``kernels/*.json``,
``loss/contrastive_loss_*.json``, ``gradcache/bench_gradcache.json`` and ``memory/report.json``
when they exist; a step that failed, timed out or was skipped is reported as such with its note —
never as a number. Exit status 1 when any step failed or timed out (a skipped optional piece is not
a failure).

    python benchmarks/gpu_check_report.py OUT_DIR [--dry-run] [--budget S] [--elapsed S] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _kernel_summary(out: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for path in sorted((out / "kernels").glob("kernels_*.json")):
        rec = _load(path)
        if not rec:
            continue
        checked = [r for r in rec["rows"] if r.get("check")]
        worst: dict[str, float] = {}
        for r in checked:
            for k, v in r["max_rel_err_vs_fp64"].items():
                worst[k] = max(worst.get(k, 0.0), v)
        res[path.stem.removeprefix("kernels_")] = {
            "cases": len(checked), "failed": [f for f in rec["failures"]],
            "skipped": sorted({f"{r['provider']}: {r.get('note', '')}" for r in rec["rows"] if r["status"] == "skipped"}),
            "providers": sorted({r["provider"] for r in checked}), "worst_rel_err": worst,
            "complete": rec.get("complete", False)}
    return res


def _loss_summary(out: Path) -> dict[str, Any] | None:
    paths = sorted((out / "loss").glob("contrastive_loss_*.json"))
    rec = _load(paths[0]) if paths else None
    if not rec:
        return None
    rows = [{k: r.get(k) for k in ("provider", "B", "D", "dtype", "mode", "status", "ms", "reps", "ratio_to_floor",
                                   "tflops", "peak_extra_mib", "check", "note")} for r in rec["rows"]]
    return {"matmul_tflops": rec["summary"].get("matmul_tflops"), "rows": rows, "failures": rec["failures"],
            "complete": rec.get("complete", False)}


def _gradcache_summary(out: Path) -> dict[str, Any] | None:
    rec = _load(out / "gradcache" / "bench_gradcache.json")
    if not rec:
        return None
    return {"summary": rec["summary"], "rows": rec["rows"]}


def _memory_summary(out: Path) -> dict[str, Any] | None:
    rep = _load(out / "memory" / "report.json")
    if not rep:
        return None
    sim = rep.get("simulation", {})
    return {"verdict": rep["verdict"], "peak_bytes": sim.get("peak_bytes"), "cap_bytes": sim.get("memory_cap_bytes"),
            "cap_enforced": sim.get("cap_enforced"), "fits_cap": sim.get("fits_cap"), "oom": sim.get("oom"),
            "step_seconds": sim.get("step_seconds"), "snapshot": sim.get("snapshot"),
            "comparison": rep.get("comparison"), "recipe_verdict": rep.get("recipe_plan", {}).get("verdict")}


def build(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "steps.jsonl").exists() else []
    return {"dry_run": args.dry_run, "budget_s": args.budget, "elapsed_s": args.elapsed, "notes": args.note,
            "steps": steps, "env": _load(out / "env" / "env.json"),
            "compile": (_load(out / "compile" / "compile.json") or {}).get("dtypes"), "kernels": _kernel_summary(out),
            "loss": _loss_summary(out), "gradcache": _gradcache_summary(out), "memory": _memory_summary(out),
            "ok": all(s["status"] in ("ok", "skipped") for s in steps)}


def _f(v: Any, fmt: str = ".3g") -> str:
    return "–" if v is None else format(v, fmt)


def to_markdown(s: dict[str, Any]) -> str:
    env = s["env"] or {}
    title = "GPU check (DRY RUN on the CPU: toy sizes, no GPU numbers)" if s["dry_run"] else "GPU check"
    lines = [f"# {title}", "", f"Device: **{env.get('device_name', '?')}** ({env.get('device', '?')}); "
             f"versions `{json.dumps(env.get('versions', {}))}`; {env.get('date', '?')}; "
             f"{s['elapsed_s']} s of a {s['budget_s']} s budget. " + " ".join(s["notes"]), "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {x['step']} | {x['status']} | {x['seconds']} | {x['note'] if x['status'] != 'ok' else ''} |"
              for x in s["steps"]]
    rates = env.get("matmul_tflops") or {}
    lines += ["", "## Matmul rates (measured)", "", *(f"- {k}: {_f(v)} TFLOP/s" for k, v in rates.items())]
    if s.get("compile"):
        lines += ["", "## torch.compile of the compiled loss backend", "", "| dtype | status | compile s | then s per call |",
                  "|---|---|---:|---:|"]
        lines += [f"| {dt} | {c['status']}{': ' + c['note'] if c.get('note') else ''} | {_f(c.get('compile_s'), '.1f')} | "
                  f"{_f(c.get('second_s'), '.3f')} |" for dt, c in s["compile"].items()]
    lines += ["", "## Kernels against float64", "", "| dtype | cases | providers | worst rel. error (loss / dI / dT / ds) "
              "| failures |", "|---|---:|---|---|---|"]
    for dt, k in s["kernels"].items():
        worst = " / ".join(f"{v:.1e}" for v in k["worst_rel_err"].values())
        lines.append(f"| {dt} | {k['cases']} | {', '.join(k['providers'])} | {worst} | "
                     f"{'; '.join(k['failed']) or 'none'} |")
    if s["loss"]:
        lines += ["", f"## Loss sweep (matmul {_f(s['loss']['matmul_tflops'])} TFLOP/s)", "",
                  "| provider | B | status | median ms | reps | × floor | TFLOP/s | peak extra MiB | float64 |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in s["loss"]["rows"]:
            lines.append(f"| {r['provider']} | {r['B']:,} | {r['status']}{': ' + r['note'] if r.get('note') else ''} | "
                         f"{_f(r['ms'], '.2f')} | {_f(r['reps'], 'd')} | {_f(r['ratio_to_floor'], '.2f')} | "
                         f"{_f(r['tflops'])} | {_f(r['peak_extra_mib'], ',.0f')} | {r['check'] or '–'} |")
    if s["gradcache"]:
        g = s["gradcache"]["summary"]
        lines += ["", "## Gradient cache", "", f"cached / plain step at batch {g.get('largest_plain_batch')}: "
                  f"**{_f(g.get('cached_over_plain'), '.2f')}×** (target ≤ {g.get('target')}); plain "
                  f"{_f(g.get('plain_ms'), '.1f')} ms, cached {_f(g.get('cached_ms'), '.1f')} ms"]
    if s["memory"]:
        m = s["memory"]
        lines += ["", "## One rank's exact workload under a memory cap (other ranks simulated)", "", f"**{m['verdict']}**", "",
                  f"measured peak {_f((m['peak_bytes'] or 0) / GIB, '.2f')} GiB; cap "
                  f"{_f((m['cap_bytes'] or 0) / GIB, '.0f')} GiB (enforced: {m['cap_enforced']}); fits: "
                  f"{m['fits_cap']}; out of memory: {m['oom']}; step {_f(m['step_seconds'], '.1f')} s; "
                  f"snapshot: {m['snapshot']}", "", f"The recipe under its own engine: {m['recipe_verdict']}"]
    lines += ["", f"Overall: **{'ok' if s['ok'] else 'FAILED'}** (see logs/ for each step).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)
    summary = build(args.out, args)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(to_markdown(summary))
    print(to_markdown(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
