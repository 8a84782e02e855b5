"""The machinery every ``benchmarks/bench_*.py`` shares: one command line, one timer, one record schema.

* **Command line** (:func:`add_arguments`): ``--sizes``, ``--providers``, ``--modes`` (forward,
  backward, full), ``--reps``, ``--min-time``, ``--memory``, ``--out``, ``--smoke``.
* **Time** (:func:`time_fn`): on CUDA ``triton.testing.do_bench`` with the repetition budget scaled
  to the call so it is timed ``reps`` times, never once; calls of 100+ ms are timed ``reps`` times
  with CUDA events instead (do_bench would first spend five calls estimating). On CPU the wall
  clock, at least ``reps`` calls and ``--min-time`` seconds after one warm-up call. Median, quantiles.
* **Memory beyond the inputs**: CUDA allocator peak above what was allocated before the call
  (:func:`peak_extra_cuda`); on CPU the RSS growth of one call in a FRESH process
  (:func:`peak_extra_fresh_process`: the inputs are built, RSS is read, the call runs under a 1 ms
  RSS sampler), because a warm process reuses memory its allocator already holds.
* **Rate** (:func:`matmul_rate`): the device's measured dense-matmul FLOP/s for a dtype, the
  denominator of "achieved / peak" and of the FLOP floor.
* **Correctness** (:func:`rel_err`, :meth:`Recorder.check`): errors against float64 with thresholds;
  a provider over its threshold FAILS the run (exit status 1), it is not only recorded.
* **Records** (:class:`Recorder`): every run appends ONE JSON record to ``<out>/<stem>.jsonl`` with a
  fixed schema — ``schema, bench, device, device_name, versions, date, command, config, host,
  cpu_count, load_avg, smoke, rows, summary, failures, notes`` — writes it as ``<stem>.json`` too, and
  renders ``<stem>.md`` plus plots of time and memory vs size per provider (``<stem>_time.png``,
  ``<stem>_memory.png``). The machine's load average is recorded at start and end: numbers from a
  shared, loaded machine say so.

The timers, memory measurements and rates live in ``measuring.py``, the markdown and plots in
``reporting.py``; this module re-exports both, so a script needs only ``import harness``.
benchmarks/ is not a package: scripts put this folder on ``sys.path`` and ``import harness``.
``python benchmarks/harness.py env --out DIR`` writes the device, versions and matmul rates (the GPU
check's first step); ``python benchmarks/harness.py vlscale ARGS`` runs the ``vlscale`` command from a
plain checkout (no ``pip install``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The rendering and measuring halves, re-exported for the bench scripts (harness.md_table, harness.time_fn, ...).
from measuring import (  # noqa: E402, F401
    LONG_CALL_MS,
    _child_memory,
    matmul_rate,
    peak_extra_cuda,
    peak_extra_fresh_process,
    time_fn,
    time_interleaved,
    time_ms,
)
from reporting import default_markdown, md_header, md_table, plot_vs_size  # noqa: E402, F401

SCHEMA = "vlscale.bench/1"
MODES = ("fwd", "bwd", "full")


def ensure_vlscale_importable() -> None:
    """Make ``import vlscale`` (and ``vlscale.kernels``, which pyproject maps from ``kernels/``) work
    from a plain checkout, e.g. on a GPU machine where nothing is installed."""
    try:
        import vlscale.kernels
        return
    except ImportError:
        pass
    import importlib.util

    sys.path.insert(0, str(ROOT))
    import vlscale

    spec = importlib.util.spec_from_file_location(
        "vlscale.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["vlscale.kernels"] = module
    spec.loader.exec_module(module)
    vlscale.kernels = module


# -- command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, *, sizes: str, providers: str, modes: str = "full",
                  reps: int = 5, out: Path = RESULTS) -> argparse.ArgumentParser:
    p.add_argument("--sizes", default=sizes, help=f"comma-separated sizes (default {sizes})")
    p.add_argument("--providers", default=providers, help=f"comma-separated providers (default {providers})")
    p.add_argument("--modes", default=modes, help=f"comma-separated modes among {','.join(MODES)} (default {modes})")
    p.add_argument("--reps", type=int, default=reps, help="timed calls at least (do_bench on CUDA scales to them)")
    p.add_argument("--min-time", type=float, default=0.0, help="CPU: keep timing until this many seconds passed")
    p.add_argument("--memory", choices=("auto", "fresh", "off"), default="auto",
                   help="peak memory beyond the inputs: auto = CUDA allocator, or RSS in a fresh process on CPU")
    p.add_argument("--out", type=Path, default=out, help="results folder (or a .jsonl file to append to)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration: checks the script, not speed")
    return p


def parse_list(text: str | Iterable[Any], kind: type = str) -> list[Any]:
    items = text.split(",") if isinstance(text, str) else list(text)
    return [kind(x) for x in (str(i).strip() for i in items) if x]


def parse_modes(text: str) -> list[str]:
    modes = parse_list(text)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}: choose among {', '.join(MODES)}")
    return modes


# -- correctness -----------------------------------------------------------------------------------
def rel_err(got: Any, want: Any) -> float:
    """max |got − want| / max |want| (both cast to float64)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# -- records ---------------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    from importlib import metadata

    for name, dist in (("torch", "torch"), ("triton", "triton"), ("numpy", "numpy"), ("deepspeed", "deepspeed"),
                       ("inf_cl", "inf-cl"), ("vlscale", "vlscale")):
        try:
            out[name] = str(getattr(__import__(name), "__version__", None) or metadata.version(dist))
        except Exception:  # optional pieces: absent is recorded, not an error
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: Any) -> dict[str, Any]:
    import torch

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    env = {"device": dev.type, "device_name": name, "versions": versions(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join([Path(sys.executable).name, *sys.argv]), "host": platform.node(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if dev.type == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        env["device_memory_bytes"] = torch.cuda.get_device_properties(dev).total_memory
    return env


def output_paths(out: Path, stem: str) -> tuple[Path, str]:
    """``--out`` is a folder, or a ``.jsonl`` file whose folder and stem are used."""
    out = Path(out)
    return (out.parent, out.stem) if out.suffix == ".jsonl" else (out, stem)


class Recorder:
    """Rows of one benchmark run, its threshold failures, and the files they end in."""

    def __init__(self, bench: str, args: argparse.Namespace, device: Any, *, stem: str | None = None,
                 partial: bool = False) -> None:
        self.bench, self.args, self.device = bench, args, device
        self.rows: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.summary: dict[str, Any] = {}
        self.env = environment(device)
        self.env["load_avg_start"] = _load()
        self.out_dir, self.stem = output_paths(getattr(args, "out", RESULTS), stem or bench)
        self.partial = partial

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        """Keep a row; ``<stem>.json`` is rewritten at once (``"complete": false``), so a run that is
        killed (a time limit) still leaves every row it measured."""
        from vlscale.memory.report import atomic_write

        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        if self.partial:
            atomic_write(self.out_dir / f"{self.stem}.json",
                         json.dumps(self.record() | {"complete": False}, indent=1, default=str) + "\n")
        return row

    def check(self, what: str, errors: dict[str, float], limits: dict[str, float]) -> bool:
        """Record a failure for every error over its limit (a non-finite error always fails)."""
        ok = True
        for key, err in errors.items():
            limit = limits.get(key)
            if limit is not None and not (math.isfinite(err) and err <= limit):
                self.failures.append(f"{what}: {key} error {err:.3e} > threshold {limit:.3e}")
                ok = False
        return ok

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def record(self) -> dict[str, Any]:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()}
        return {"schema": SCHEMA, "bench": self.bench, **self.env, "load_avg_end": _load(), "config": config,
                "smoke": bool(getattr(self.args, "smoke", False)), "rows": self.rows, "summary": self.summary,
                "failures": self.failures, "notes": self.notes}

    def append(self, plots: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
        """Draw the plots and append the record to ``<stem>.jsonl`` (the run history); returns it."""
        rec = self.record()
        rec["plots"] = []
        for spec in plots:
            path = plot_vs_size(self.rows, out=self.out_dir / f"{self.stem}_{spec['name']}.png", **{
                k: v for k, v in spec.items() if k != "name"})
            if path is not None:
                rec["plots"].append(path.name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"{self.stem}.jsonl").open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        return rec

    def write(self, markdown: Callable[[dict[str, Any]], str] | None = None,
              plots: Iterable[dict[str, Any]] = ()) -> Path:
        """Append the record to ``<stem>.jsonl``; write ``<stem>.json``, ``<stem>.md`` and the plots."""
        from vlscale.memory.report import atomic_write

        rec = self.append(plots)
        path = atomic_write(self.out_dir / f"{self.stem}.json",
                            json.dumps(rec | {"complete": True}, indent=1, default=str) + "\n")
        atomic_write(self.out_dir / f"{self.stem}.md", (markdown or default_markdown)(rec))
        for failure in self.failures:
            print(f"FAILED {failure}", file=sys.stderr)
        print(f"wrote {self.out_dir / self.stem}.{{jsonl,json,md}}", flush=True)
        return path


# -- command line of this file -----------------------------------------------------------------------
def _env_command(argv: list[str]) -> int:
    """Device, versions and measured matmul rates (bf16 / fp16 / fp32 on CUDA; fp32 on CPU)."""
    p = argparse.ArgumentParser(prog="harness.py env")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32} if device.type == "cuda" \
        else {"fp32": torch.float32}
    env["matmul_tflops"] = {}
    for name, dt in dtypes.items():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 rate is true fp32
        try:
            env["matmul_tflops"][name] = matmul_rate(dt, device) / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    env["load_avg"] = _load()
    from vlscale.memory.report import atomic_write

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "env.json", json.dumps(env, indent=1) + "\n")
    print(json.dumps(env))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    ensure_vlscale_importable()
    if command == "child-memory":
        return _child_memory(*rest)
    if command == "env":
        return _env_command(rest)
    if command == "vlscale":
        from vlscale.cli import main as vlscale_main

        return vlscale_main(rest)
    print(f"harness.py: unknown command {command!r} (env, vlscale, child-memory)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
