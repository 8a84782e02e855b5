"""``vlscale memory``: will a recipe fit, and what did it really take?

    vlscale memory plan --recipe zerovl-v100 --world-size 8 --gpu-memory 32GiB --out reports/plan
    vlscale memory plan --recipe zerovl-v100 train.global_batch_size=1048576 --world-size 8 \\
        --gpu-memory 32GiB --act-mib-per-pair 83 --out reports/1m
    vlscale memory measure --recipe tiny-cpu --out reports/measured           # a few real steps
    vlscale memory measure --recipe zerovl-v100 train.global_batch_size=1048576 \\
        --simulate-world-size 8 --memory-cap 32GiB --out reports/1m-on-one-gpu  # one rank of 8, capped
    vlscale memory report runs/demo                                            # a finished run

Each writes ``report.md``, ``report.json`` and PNG plots into ``--out`` (see docs/memory.md) and
prints the verdict. Recipes are names in ``launch/recipes`` or .json/.toml paths, with
``section.key=value`` overrides as for ``vlscale train``. Sizes read like ``32GiB``, ``80GB``,
``40960MiB``. Impossible configurations stop with one error line (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from vlscale.memory import lossmem
from vlscale.memory import plan as planner
from vlscale.memory import report as rep


def _common(p: argparse.ArgumentParser, *, recipe: bool = True) -> None:
    if recipe:
        p.add_argument("--recipe", required=True, help="recipe name in launch/recipes, or a .json/.toml path")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--out", type=Path, help="folder for report.md, report.json and the plots")
    p.add_argument("--gpu-memory", type=planner.parse_bytes, default=None,
                   help="memory of one GPU (plan: required; measure/report: the device's)")
    p.add_argument("--act-mib-per-pair", type=float, default=None,
                   help="measured forward+backward activation MiB per pair (default: counted on the meta device)")
    p.add_argument("--context-reserve", type=planner.parse_bytes, default=planner.DEFAULT_CONTEXT_RESERVE,
                   help="memory outside PyTorch's allocator (CUDA context, workspaces); default 0.75GiB")
    p.add_argument("--allocator-slack", type=float, default=planner.DEFAULT_ALLOCATOR_SLACK,
                   help="allocator fragmentation as a fraction of the peak (default 0.05)")
    p.add_argument("--fused-impl", choices=lossmem.FUSED_IMPLS, default=None,
                   help="the fused loss backend (default: what the recipe's loss.impl runs as on the device)")
    p.add_argument("--gpu", default=None, metavar="KIND",
                   help=f"plan: the target GPU ({', '.join(k for k in lossmem.DEVICE_KINDS if k != 'cpu')}, "
                        "or sm_XY[:SMS]); decides the loss backend loss.impl=auto runs (default: this machine's "
                        f"GPU, else {lossmem.DEFAULT_KIND}). measure / report use the device they ran on")
    # Launchers append --local_rank=N; the rank comes from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vlscale memory", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="predict per-rank memory and the largest batch that fits")
    _common(p)
    p.add_argument("--world-size", type=int, required=True, help="number of GPUs (ranks)")
    m = sub.add_parser("measure", help="run the recipe on this device and compare with the prediction")
    _common(m)
    m.add_argument("--steps", type=int, default=3, help="real training steps (the first warms up); default 3")
    m.add_argument("--simulate-world-size", type=int, default=None, metavar="W",
                   help="run ONE rank of W with the other ranks' embeddings simulated (no launcher needed)")
    m.add_argument("--memory-cap", type=planner.parse_bytes, default=None,
                   help="with --simulate-world-size on CUDA: cap this process (set_per_process_memory_fraction)")
    m.add_argument("--backend", choices=("auto", "rss", "tensors"), default="auto",
                   help="auto = CUDA allocator on GPU, sampled RSS on CPU; tensors = exact live tensor bytes")
    m.add_argument("--no-snapshot", action="store_true", help="CUDA: skip the allocator snapshot (memory_viz)")
    m.add_argument("--keep-checkpoints", action="store_true", help="keep the measured run's checkpoint")
    r = sub.add_parser("report", help="measured vs predicted for a finished training run (its memory.json)")
    r.add_argument("run_dir", type=Path, help="run folder holding config.json and memory.json")
    _common(r, recipe=False)
    return ap


def _plan_result(cfg: Any, args: argparse.Namespace, world_size: int, gpu_memory: float,
                 device: Any = None) -> dict[str, Any]:
    """The plan for ``--gpu`` (plan), or for the device a measurement ran on (``device``)."""
    if device is not None:
        kind: Any = lossmem.current_device_kind(device)
    elif args.gpu is not None:
        kind = lossmem.device_kind(args.gpu)
    else:
        import torch

        kind = lossmem.current_device_kind("cuda") if torch.cuda.is_available() else None
    inputs = planner.plan_inputs(cfg, world_size=world_size, gpu_memory=gpu_memory,
                                 act_mib_per_pair=args.act_mib_per_pair, context_reserve=args.context_reserve,
                                 allocator_slack=args.allocator_slack, fused_impl=args.fused_impl, device_kind=kind)
    return planner.plan(inputs)


def _finish(out: Path, report: dict[str, Any], est: Any) -> int:
    paths = rep.write(out, report, est)
    print(report["verdict"])
    if "comparison" in report:
        for phase, c in report["comparison"].items():
            ratio = f"{c['growth_ratio']:.2f}" if "growth_ratio" in c else "–"
            print(f"  {phase:<10} predicted {rep.fmt_bytes(c['predicted_bytes']):>11}  growth predicted "
                  f"{rep.fmt_bytes(c['predicted_growth_bytes']):>11}  measured {rep.fmt_bytes(c['measured_growth_bytes']):>11}"
                  f"  ({ratio})")
    print(f"report: {paths['md']} (+ report.json, {', '.join(report['plots']) or 'no plots'})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vlscale.config import load_recipe

    if args.gpu_memory is None:
        raise ValueError("plan needs --gpu-memory (e.g. 32GiB)")
    cfg = load_recipe(args.recipe, args.overrides)
    result = _plan_result(cfg, args, args.world_size, args.gpu_memory)
    out = args.out or Path("memory-plan")
    return _finish(out, rep.build("plan", result), result["estimate"])


def cmd_measure(args: argparse.Namespace) -> int:
    import torch

    from vlscale.config import load_recipe
    from vlscale.memory import measure

    cfg = load_recipe(args.recipe, args.overrides)
    out = args.out or Path("memory-measure")
    if args.simulate_world_size is None:
        if args.memory_cap is not None:
            raise ValueError("--memory-cap applies to --simulate-world-size runs (one rank's workload)")
        done = measure.measure_trainer(args.recipe, args.overrides, out, steps=args.steps, backend=args.backend,
                                       keep_checkpoints=args.keep_checkpoints)
        if done is None:  # not rank 0: rank 0 writes the report
            return 0
        return _from_memory_json("measure", done["cfg"], done["memory"], args, out)
    world = args.simulate_world_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.gpu_memory or args.memory_cap or measure.device_memory(device)
    recipe_plan = _plan_result(cfg, args, world, gpu, device)  # validates the config before any model is built
    snap = None if args.no_snapshot or device.type != "cuda" else out / "memory_snapshot.pickle"
    result = measure.measure_simulated(cfg, world_size=world, device=device, memory_cap=args.memory_cap,
                                       backend=args.backend, snapshot=snap)
    sim = planner.plan(measure.simulated_plan_inputs(planner.PlanInputs(**_fields(recipe_plan["inputs"])), result))
    note = " ".join(x for x in (measure.cap_note(result), _snapshot_note(result, snap)) if x)
    measured = dict(result["measured"], note=note)
    extra = {"simulation": {k: v for k, v in result.items() if k not in ("measured",)},
             "recipe_plan": {k: recipe_plan[k] for k in ("verdict", "strategies", "inputs")}}
    report = rep.build("measure", sim, measured=measured, extra=extra)
    report["verdict"] = f"{_measured_verdict(result)} Predicted: {report['verdict']}"
    return _finish(out, report, sim["estimate"])


def _measured_verdict(result: dict[str, Any]) -> str:
    """What the simulated rank really took, first: the measurement is the answer, the model the explanation."""
    if result["oom"]:
        return f"MEASURED: OUT OF MEMORY after phases {result['oom']['after_phases']}."
    peak = rep.fmt_bytes(result["peak_bytes"])
    cap = result.get("memory_cap_bytes")
    if cap is None:
        return f"MEASURED: peak {peak} (rank 0 of {result['world_size']})."
    how = "enforced" if result["cap_enforced"] else "not enforced: CUDA only"
    fits = "fits" if result.get("fits_cap") else "does NOT fit"
    return f"MEASURED: peak {peak} (rank 0 of {result['world_size']}) {fits} the {rep.fmt_bytes(cap)} cap ({how})."


def _snapshot_note(result: dict[str, Any], snap: Path | None) -> str:
    if snap is None:
        return ""
    if result.get("snapshot"):
        return f"Allocator snapshot: `{Path(result['snapshot']).name}` (drag it onto https://pytorch.org/memory_viz)."
    return "Allocator snapshot: not available in this torch build."


def _fields(inputs: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(planner.PlanInputs)}
    return {k: v for k, v in inputs.items() if k in names}


def _from_memory_json(kind: str, cfg: Any, memory: dict[str, Any], args: argparse.Namespace, out: Path) -> int:
    import torch

    from vlscale.memory import measure

    ranks = memory.get("ranks") or []
    if not ranks or "phases" not in ranks[0]:
        raise ValueError("memory.json has no per-phase record: the run needs train.memory_phase_steps >= 1 "
                         "and at least two steps")
    phases = ranks[0]["phases"]
    world = len(ranks)
    device = torch.device("cuda" if phases["backend"] == "cuda" else "cpu")
    gpu = args.gpu_memory or phases.get("device_total_bytes") or measure.device_memory(device, world)
    result = _plan_result(cfg, args, world, float(gpu), device)
    backend = phases["backend"]
    measured = {"backend": backend, "device": phases["device"], "phases": phases["phases"],
                "absolute": backend == "cuda", "what": f"rank 0 of {world}, steps {phases['steps']}",
                "ranks_peak_rss_mib": [r.get("mem/peak_rss_mib") for r in ranks],
                "note": {"rss": "RSS counts pages touched, so buffers allocated but unused (e.g. DeepSpeed's "
                                "reduce bucket) and memory the C allocator reuses do not show as growth.",
                         "tensors": "Exact bytes of tensors created during the recorded steps.",
                         "cuda": "torch.cuda.max_memory_allocated per phase."}.get(backend, "")}
    return _finish(out, rep.build(kind, result, measured=measured), result["estimate"])


def cmd_report(args: argparse.Namespace) -> int:
    from vlscale.config import load_config

    run = args.run_dir
    for name in ("config.json", "memory.json"):
        if not (run / name).is_file():
            raise ValueError(f"{run / name} is missing: point at a finished run folder (vlscale train writes both)")
    cfg = load_config(run / "config.json")
    return _from_memory_json("run", cfg, json.loads((run / "memory.json").read_text()), args,
                             args.out or run / "memory")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"plan": cmd_plan, "measure": cmd_measure, "report": cmd_report}[args.command](args)
    except ValueError as exc:
        print(f"vlscale memory {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
