"""Benchmark of the symmetric CLIP loss: every registered vlscale backend against naive torch and Inf-CL.

Providers:

* every backend registered in :mod:`vlscale.loss.backends` (enumerated, not hard-coded: ``chunked``,
  ``triton``, ``reference`` and whatever variants are registered there), through
  ``contrastive_loss(impl=name)``; one that cannot run on this device is skipped with the reason;
* ``naive`` — open_clip's ``ClipLoss`` on one device: dense logits, two cross-entropies;
* ``infcl`` — Inf-CL's ``cal_flash_loss`` once per direction. It returns a per-row loss VECTOR, so
  each direction is averaged (its real return convention) before the two are averaged; skipped with
  a note when ``inf_cl`` is not importable or D is not a multiple of 256.

Per (B, D, mode ∈ fwd / bwd / full, provider): median time and quantiles, achieved TFLOP/s counting the
floor (2·B²·D forward, 6·B²·D backward, 8·B²·D both), the ratio to that floor at the device's MEASURED
matmul rate for the dtype, the peak memory beyond the inputs (CUDA allocator; RSS growth in a fresh
process on CPU), and for B ≤ ``--check-max`` the error of the loss and of every gradient (both
embeddings, the logit scale) against a float64 reference. Thresholds follow flash-attention's rule:
at most 2× PyTorch's own error in that dtype (the naive loss) plus a floor per dtype — a provider
over them FAILS the run (exit status 1).

    python benchmarks/bench_contrastive_loss.py                                  # GPU sweep, bf16, D=512
    python benchmarks/bench_contrastive_loss.py --sizes 32768 --providers triton,infcl --modes fwd,bwd,full
    python benchmarks/bench_contrastive_loss.py --device cpu --dtype fp32 --sizes 2048,4096 --reps 3
    TRITON_INTERPRET=1 python benchmarks/bench_contrastive_loss.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # sibling script (benchmarks/ is no package)

# The providers, inputs and float64 checks; build_case is what the fresh-process memory call builds.
from loss_providers import (  # noqa: F401
    DTYPES,
    ERROR_KEYS,
    REL_FLOOR,
    all_providers,
    build_case,
    error_limits,
    errors_vs_float64,
    infcl_loss,
    make_inputs,
    naive_loss,
    provider_fn,
    registered_backends,
    step_fn,
    warm_compiled,
)

SIZES = "4096,8192,16384,32768,65536,131072,262144"
FLOOR_FACTOR = {"fwd": 2, "bwd": 6, "full": 8}  # × B²·D: one S forward; S again + two products backward


def _checked(row: dict, fn: Callable, inputs: tuple, limits: dict[str, float], rec: harness.Recorder) -> dict:
    """Add the float64 errors and their verdict to ``row`` (a failure is recorded in ``rec``)."""
    row["max_rel_err_vs_fp64"] = errors_vs_float64(fn, *inputs)
    row["error_limits"] = limits
    what = f"{row['provider']} B={row['B']} D={row['D']} {row['dtype']}"
    row["check"] = "pass" if rec.check(what, row["max_rel_err_vs_fp64"], limits) else "FAIL"
    return row


def measure(name: str, b: int, d: int, mode: str, args: argparse.Namespace, device: torch.device, rate: float,
            limits: dict[str, float] | None, rec: harness.Recorder) -> dict:
    return measure_group([name], b, d, mode, args, device, rate, limits, rec)[0]


def measure_group(names: list[str], b: int, d: int, mode: str, args: argparse.Namespace, device: torch.device,
                  rate: float, limits: dict[str, float] | None, rec: harness.Recorder) -> list[dict]:
    """One (B, D, mode) for several providers on shared inputs. On CUDA each provider is timed with
    do_bench in turn; on a (shared) CPU the calls are interleaved round by round together with a
    matmul of the loss's tile shape, so other processes' load hits every provider and the rate alike."""
    rows: dict[str, dict] = {}
    fns: dict[str, Callable] = {}
    for name in names:
        row = rows[name] = {"provider": name, "B": b, "D": d, "dtype": args.dtype, "mode": mode}
        overrides = json.loads(args.triton_settings) if name == "triton" and args.triton_settings else {}
        if overrides:
            row["triton_settings"] = overrides
        cap = args.max_size.get(name)
        fn = f"B > {cap} (--provider-max-size)" if cap is not None and b > cap else provider_fn(name, d, device,
                                                                                               overrides)
        if isinstance(fn, str):
            row.update(status="skipped", note=fn)
        else:
            fns[name] = fn
    inputs = make_inputs(b, d, DTYPES[args.dtype], device, seed=b + d)

    def crashed(name: str, exc: BaseException) -> None:
        fns.pop(name, None)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            rows[name]["status"] = "oom"
            return
        if not args.tune:  # a provider that crashes fails the run; the sweep goes on
            rec.failures.append(f"{name} B={b} D={d} {mode}: {type(exc).__name__}: {str(exc)[:200]}")
        rows[name].update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")

    timings: dict[str, dict] = {}
    if not args.check_only:
        runs = {}
        for name, fn in list(fns.items()):
            try:
                runs[name] = step_fn(fn, *inputs, mode)
            except Exception as exc:
                crashed(name, exc)
        if device.type == "cuda":
            for name, run in runs.items():
                try:  # the memory call is also the warm-up (compilation) of the timing
                    if args.memory != "off":
                        rows[name]["peak_extra_mib"] = harness.peak_extra_cuda(run, device) / 2**20
                    timings[name] = harness.time_fn(run, device, reps=args.reps, warmed=args.memory != "off")
                except Exception as exc:
                    crashed(name, exc)
                finally:
                    torch.cuda.empty_cache()
        elif runs:
            m, k, n = (1024, 512, 4096) if not args.smoke else (256, 32, 256)
            a_, b_ = torch.randn(m, k, dtype=DTYPES[args.dtype]), torch.randn(k, n, dtype=DTYPES[args.dtype])
            got = harness.time_interleaved({**runs, "__matmul__": lambda: a_ @ b_}, reps=args.reps,
                                           min_time_s=args.min_time)
            rate = 2.0 * m * k * n / (got.pop("__matmul__")["median_ms"] * 1e-3)
            for name, res in got.items():
                if isinstance(res, BaseException):
                    crashed(name, res)
                else:
                    timings[name] = res
        del runs
    for name, timing in timings.items():
        flops, ms = FLOOR_FACTOR[mode] * b * b * d, timing["median_ms"]
        row = rows[name]
        row.update(status="ok", ms=ms, **{k: v for k, v in timing.items() if k != "median_ms"}, flops=flops,
                   tflops=flops / (ms * 1e-3) / 1e12, matmul_tflops=rate / 1e12, floor_ms=flops / rate * 1e3)
        row.update(ratio_to_floor=ms / row["floor_ms"], fraction_of_matmul=row["tflops"] * 1e12 / rate)
    if limits is not None and (mode == "full" or args.check_only):
        for name, fn in list(fns.items()):
            try:
                _checked(rows[name], fn, inputs, limits, rec)
                rows[name].setdefault("status", "ok")
            except Exception as exc:
                crashed(name, exc)
    del inputs
    if args.memory != "off" and device.type == "cpu" and not args.check_only:
        for name in timings:
            case = {"provider": name, "B": b, "D": d, "dtype": args.dtype, "mode": mode, "device": "cpu",
                    "triton_settings": rows[name].get("triton_settings")}
            got = harness.peak_extra_fresh_process(__file__, case)
            if "peak_extra_bytes" in got:
                rows[name].update(peak_extra_mib=got["peak_extra_bytes"] / 2**20,
                                  memory_method="RSS growth, fresh process")
            else:
                rows[name]["memory_note"] = got.get("error")
    return [rows[name] for name in names]


def to_markdown(rec: dict) -> str:
    cfg = rec["config"]
    lines = harness.md_header(rec, "Symmetric CLIP loss: " + ", ".join(harness.parse_list(cfg["modes"])))
    rate = rec["summary"].get("matmul_tflops")
    where = ("timed on its own at the start" if rec["device"] == "cuda" else
             "timed at the start; each row's floor uses the rate timed in the same interleaved rounds as the "
             "providers (column `matmul TFLOP/s`), so the machine's load hits both alike")
    lines += [f"Measured {cfg['dtype']} matmul {rec['summary'].get('matmul_shape')}: {rate:.3g} TFLOP/s, {where} — "
              "the floor's denominator (floor = 2·B²·D forward, 6·B²·D backward, 8·B²·D both). Memory: peak "
              "beyond the inputs (" + ("CUDA allocator" if rec["device"] == "cuda" else
                                       "RSS growth of one call in a fresh process") + "). Errors: max relative "
              "error against float64 (loss / dI / dT / d logit_scale); thresholds = 2× the naive loss's own error "
              f"+ {REL_FLOOR[cfg['dtype']]:g}.", ""]

    def err(r: dict) -> str | None:
        e = r.get("max_rel_err_vs_fp64")
        return " / ".join(f"{v:.1e}" for v in e.values()) + f" ({r['check']})" if e else None

    lines += harness.md_table(rec["rows"], [
        ("provider", lambda r: r["provider"]), ("mode", lambda r: r["mode"]), ("B", lambda r: f"{r['B']:,}"),
        ("D", lambda r: r["D"]), ("status", lambda r: r["status"] if r["status"] == "ok" else
                                  f"{r['status']}: {r.get('note', '')}"),
        ("median ms", lambda r: f"{r['ms']:.1f}"), ("q20–q80 ms", lambda r: f"{r['q20_ms']:.1f}–{r['q80_ms']:.1f}"),
        ("reps", lambda r: r["reps"]), ("TFLOP/s", lambda r: f"{r['tflops']:.3g}"),
        ("matmul TFLOP/s", lambda r: f"{r['matmul_tflops']:.3g}"),
        ("× floor", lambda r: f"{r['ratio_to_floor']:.2f}"), ("peak extra MiB", lambda r: f"{r['peak_extra_mib']:,.0f}"),
        ("max rel err vs fp64", err)])
    lines += ["", *_vs_naive(rec["rows"]), "", *[f"![{p}]({p})" for p in rec.get("plots", [])], "", *rec["notes"],
              "", "Config: `" + json.dumps(cfg) + "`", ""]
    return "\n".join(lines)


def _vs_naive(rows: list[dict]) -> list[str]:
    """Each provider's time and extra memory relative to the naive loss at the same (B, D, mode)."""
    naive = {(r["B"], r["D"], r["mode"]): r for r in rows if r["provider"] == "naive" and "ms" in r}
    out = []
    for r in rows:
        n = naive.get((r["B"], r["D"], r["mode"]))
        if r["provider"] == "naive" or "ms" not in r or n is None:  # check-only rows are not timed
            continue
        mem = (f"{r['peak_extra_mib']:,.0f} MiB vs {n['peak_extra_mib']:,.0f} MiB extra"
               if r.get("peak_extra_mib") is not None and n.get("peak_extra_mib") is not None else "memory not measured")
        out.append(f"- {r['provider']} {r['mode']} B={r['B']:,}: {r['ms'] / n['ms']:.2f}× the naive loss's time; {mem}")
    return ["Against the naive loss (same B, D, mode):", "", *out] if out else []


TUNE_AXES = {  # coordinate descent over the Triton tile settings: one axis at a time, keep the fastest
    "backward": ["banded", "fused"], "block_n": [64, 128], "block_m": [64, 128], "block_d": [32, 64, 128],
    "num_warps": [4, 8], "num_stages": [2, 3, 4], "grad_block_m": [32, 64, 128], "grad_block_n": [32, 64, 128],
    "band_elems": [1 << 26, 1 << 27, 1 << 28],
}


def tune(args: argparse.Namespace, device: torch.device, rate: float, rec: harness.Recorder) -> None:
    """Time the triton provider for each candidate setting at the first (B, D); every try is recorded."""
    b, d = harness.parse_list(args.sizes, int)[0], harness.parse_list(args.dims, int)[0]
    best: dict = json.loads(args.triton_settings) if args.triton_settings else {}
    for axis, values in TUNE_AXES.items():
        timed = {}
        for v in values:
            args.triton_settings = json.dumps({**best, axis: v})
            row = rec.add(measure("triton", b, d, "full", args, device, rate, None, rec))
            if row["status"] == "ok":
                timed[v] = row["ms"]
        if timed:
            best[axis] = min(timed, key=timed.get)
    args.triton_settings = json.dumps(best)
    rec.notes.append(f"best triton settings at B={b}, D={d}: {args.triton_settings}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_arguments(p, sizes=SIZES, providers="all", modes="full")
    p.add_argument("--dims", default="512", help="comma-separated embedding dims D")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--check-max", type=int, default=None, help="largest B checked against float64 "
                   "(default 8192 on CUDA, 4096 on CPU)")
    p.add_argument("--triton-settings", default="", help='JSON KernelSettings overrides, e.g. {"block_n": 128}')
    p.add_argument("--provider-max-size", default="", metavar="NAME=B,...",
                   help="largest B per provider, e.g. triton=512 for the CPU interpreter (larger: skipped)")
    p.add_argument("--check-only", action="store_true",
                   help="only the float64 checks (every size, mode full), no timing: the GPU check's kernel step")
    p.add_argument("--tune", action="store_true", help="first tune the triton tiles at the first size (recorded)")
    p.add_argument("--stem", default=None, help="results file stem (default contrastive_loss_<device>)")
    p.add_argument("--exclude", default="", metavar="NAME,...", help="providers to leave out of --providers all")
    p.add_argument("--warm-compile", default="", metavar="DTYPE,...",
                   help="only compile the torch.compile'd provider for these dtypes and time it: <out>/compile.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.dims, args.dtype, args.reps, args.check_max, args.device = "40", "32", "fp32", 1, 10**9, "cpu"
        args.memory = "off" if args.memory == "auto" else args.memory
    if args.check_only:
        args.modes, args.check_max, args.memory = "full", 10**12, "off"
    args.max_size = {k: int(v) for k, v in (x.split("=") for x in harness.parse_list(args.provider_max_size))}
    return args


def warm_compile(args: argparse.Namespace, device: torch.device) -> Path:
    """``--warm-compile``: compile and time the compiled provider per dtype into ``<out>/compile.json``
    (rewritten after each dtype); SystemExit(1) when one failed to compile."""
    from vlscale.memory.report import atomic_write

    path = harness.output_paths(args.out, "compile")[0] / "compile.json"
    env = {k: v for k, v in harness.environment(device).items() if k in ("device", "device_name", "versions", "date")}

    def write(result: dict) -> None:
        atomic_write(path, json.dumps({**env, "dtypes": result}, indent=1) + "\n")

    result = warm_compiled(device, harness.parse_list(args.warm_compile), done=write)
    for name, row in result.items():
        print(f"compiled {name}: {row['status']}" + (f", compile {row['compile_s']:.1f} s (probe {row['probe_s']:.1f} s, "
                                                     f"first call {row['first_s']:.1f} s, then {row['second_s']:.2f} s)"
                                                     if row["status"] == "ok" else f": {row['note']}"), flush=True)
    if any(row["status"] != "ok" for row in result.values()):
        raise SystemExit(1)
    return path


def main(argv: list[str] | None = None) -> Path:
    """Run the sweep; returns the JSON record's path. Raises SystemExit(1) after writing it if any
    provider crossed its float64 threshold or crashed."""
    args = parse_args(argv)
    harness.ensure_vlscale_importable()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.warm_compile:
        return warm_compile(args, device)
    providers = all_providers() if args.providers == "all" else harness.parse_list(args.providers)
    providers = [p for p in providers if p not in harness.parse_list(args.exclude)]
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("smoke: TRITON_INTERPRET is not 1, the triton provider will be skipped", file=sys.stderr)
    check_max = args.check_max if args.check_max is not None else (8192 if device.type == "cuda" else 4096)
    stem = args.stem or ("contrastive_loss_smoke" if args.smoke else f"contrastive_loss_{device.type}")
    rec = harness.Recorder("contrastive_loss", args, device, stem=stem, partial=True)
    shape = (8192, 8192, 8192) if device.type == "cuda" else ((256, 32, 256) if args.smoke else (1024, 512, 4096))
    rate = harness.matmul_rate(DTYPES[args.dtype], device, shape)
    rec.summary.update(matmul_tflops=rate / 1e12, matmul_shape="×".join(map(str, shape)), providers=providers)
    if args.tune:
        tune(args, device, rate, rec)
    modes = harness.parse_modes(args.modes)
    for d in harness.parse_list(args.dims, int):
        for b in harness.parse_list(args.sizes, int):
            limits = None
            if b <= check_max and "full" in modes:
                img, txt, t = make_inputs(b, d, DTYPES[args.dtype], device, seed=b + d)
                limits = error_limits(errors_vs_float64(naive_loss, img, txt, t), args.dtype)
                del img, txt, t
            for mode in modes:
                for row in measure_group(providers, b, d, mode, args, device, rate, limits, rec):
                    rec.add(row)
    plots = [dict(name="time", x="B", y="ms", series=("provider", "mode"), ylabel="ms per call",
                  title=f"time vs B ({args.dtype}, D={args.dims})"),
             dict(name="memory", x="B", y="peak_extra_mib", series=("provider", "mode"), ylabel="MiB beyond inputs",
                  title=f"peak memory beyond the inputs vs B ({args.dtype})")]
    path = rec.write(to_markdown, plots)
    if rec.failures:
        raise SystemExit(1)
    return path


if __name__ == "__main__":
    main()
