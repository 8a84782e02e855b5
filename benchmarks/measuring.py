"""Timers, memory measurements and device rates of the benchmark harness (``benchmarks/harness.py``).

* :func:`time_fn` — on CUDA ``triton.testing.do_bench`` with the repetition budget scaled to the call
  so it is timed ``reps`` times, never once; calls of 100+ ms are timed ``reps`` times with CUDA events
  instead (do_bench would first spend five calls estimating). On CPU the wall clock, at least ``reps``
  calls and ``min_time_s`` seconds after one warm-up call. Median, quantiles.
* :func:`time_interleaved` — CPU wall clock of several callables, one call of each per round, so the
  load of a shared machine hits them alike.
* :func:`peak_extra_cuda` — CUDA allocator peak above what was allocated before the call;
  :func:`peak_extra_fresh_process` — on CPU the RSS growth of one call in a FRESH process (the inputs
  are built, RSS is read, the call runs under a 1 ms RSS sampler), because a warm process reuses
  memory its allocator already holds.
* :func:`matmul_rate` — the device's measured dense-matmul FLOP/s for a dtype, the denominator of
  "achieved / peak" and of the FLOP floor.

benchmarks/ is not a package: ``harness`` imports this sibling and re-exports its names.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HARNESS = Path(__file__).resolve().parent / "harness.py"
LONG_CALL_MS = 100.0  # CUDA calls at least this long are timed with events, not do_bench


# -- timing ----------------------------------------------------------------------------------------
def _sync(device: Any) -> None:
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: Any, *, reps: int = 5, min_time_s: float = 0.0,
            max_time_s: float = 600.0, warmed: bool = False) -> dict[str, float]:
    """Milliseconds per call: ``median_ms``, ``q20_ms``, ``q80_ms``, ``min_ms``, ``max_ms``, ``reps``.
    ``warmed``: ``fn`` already ran once (e.g. for its memory), so no warm-up call is spent."""
    reps = max(1, reps)
    if getattr(device, "type", device) == "cuda":
        import torch
        from triton.testing import do_bench

        if not warmed:
            fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t0) * 1e3
        if est_ms < LONG_CALL_MS:
            # do_bench runs max(1, rep / estimate) timed calls: give it room for `reps` of them.
            rep = max(100.0, reps * est_ms * 1.1)
            q = do_bench(fn, warmup=25.0, rep=rep, quantiles=[0.5, 0.2, 0.8, 0.0, 1.0])
            return {"median_ms": float(q[0]), "q20_ms": float(q[1]), "q80_ms": float(q[2]), "min_ms": float(q[3]),
                    "max_ms": float(q[4]), "reps": max(1, int(rep / max(est_ms, 1e-3))), "timer": "do_bench"}
        # Long calls: do_bench would spend 5 calls estimating; time `reps` calls with CUDA events
        # (the estimate call is one of them), an L2 flush is immaterial at this length.
        samples = [est_ms]
        while len(samples) < reps:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        return _stats(samples, "cuda events")
    if not warmed:
        fn()  # warm-up: first-call allocations, thread pools, caches
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_time_s and len(samples) >= 2:
            break
    return _stats(samples, "wall clock")


def time_interleaved(fns: dict[str, Callable[[], Any]], *, reps: int = 5,
                     min_time_s: float = 0.0) -> dict[str, dict[str, Any] | BaseException]:
    """CPU wall clock of several callables in rounds — one call of each per round, after one warm-up
    call each — so that load from other processes on a shared machine hits all of them alike. A
    callable that raises is dropped and its exception returned in its place."""
    out: dict[str, dict[str, Any] | BaseException] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in fns.items():
        try:
            fn()
            live[name] = fn
        except Exception as exc:
            out[name] = exc
    samples: dict[str, list[float]] = {name: [] for name in live}
    start, rounds = time.perf_counter(), 0
    while live and (rounds < max(1, reps) or time.perf_counter() - start < min_time_s):
        for name, fn in list(live.items()):
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as exc:
                out[name] = exc
                del live[name]
                continue
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    for name, s in samples.items():
        if name not in out:
            out[name] = _stats(s, "wall clock, interleaved")
    return out


def _stats(samples: list[float], timer: str) -> dict[str, Any]:
    qs = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
    return {"median_ms": statistics.median(samples), "q20_ms": qs[0], "q80_ms": qs[3], "min_ms": min(samples),
            "max_ms": max(samples), "reps": len(samples), "timer": timer}


def time_ms(fn: Callable[[], Any], device: Any, reps: int) -> float:
    """Median milliseconds of ``fn`` (see :func:`time_fn`)."""
    return time_fn(fn, device, reps=reps)["median_ms"]


# -- memory ----------------------------------------------------------------------------------------
def peak_extra_cuda(fn: Callable[[], Any], device: Any) -> int:
    """Peak CUDA bytes of one ``fn()`` above what was allocated before it."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def peak_extra_fresh_process(script: str | Path, case: dict[str, Any], *, timeout: float = 1800.0) -> dict[str, Any]:
    """RSS growth of one call in a new interpreter: ``script`` must define ``build_case(case) -> fn``
    (building the inputs is not counted; the call is). Returns ``{"peak_extra_bytes": …}`` or
    ``{"error": …}``."""
    cmd = [sys.executable, str(HARNESS), "child-memory", str(Path(script).resolve()),
           json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def _child_memory(script: str, case_json: str) -> int:
    import importlib.util

    import torch

    sys.path.insert(0, str(Path(script).parent))
    spec = importlib.util.spec_from_file_location(Path(script).stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[Path(script).stem] = module
    spec.loader.exec_module(module)
    from vlscale.memory.tracker import MemoryTracker

    # Warm the runtime (thread pools, autograd engine) on a tiny problem so that its one-time
    # allocations are not charged to the measured call.
    x = torch.randn(64, 64, requires_grad=True)
    (x @ x).sum().backward()
    fn = module.build_case(json.loads(case_json))
    tracker = MemoryTracker("cpu", backend="rss", interval=0.001)
    with tracker.phase("call"):
        fn()
    rec = tracker.records[-1]
    print(json.dumps({"peak_extra_bytes": rec.delta_bytes, "baseline_rss_bytes": rec.start_bytes,
                      "seconds": rec.seconds}))
    return 0


# -- rates -----------------------------------------------------------------------------------------
_RATES: dict[tuple[str, str, tuple[int, int, int]], float] = {}


def matmul_rate(dtype: Any, device: Any, shape: tuple[int, int, int] | None = None, *, reps: int = 3) -> float:
    """Measured FLOP/s of ``(m×k) @ (k×n)`` in ``dtype`` on ``device`` (cached per process).
    Default shape: 8192³ on CUDA, 2048×512×2048 on CPU (a tile of the contrastive loss)."""
    import torch

    dev = torch.device(device)
    shape = shape or ((8192, 8192, 8192) if dev.type == "cuda" else (2048, 512, 2048))
    key = (str(dev), str(dtype), shape)
    if key not in _RATES:
        m, k, n = shape
        a = torch.randn(m, k, device=dev, dtype=dtype)
        b = torch.randn(k, n, device=dev, dtype=dtype)
        ms = time_fn(lambda: a @ b, dev, reps=reps)["median_ms"]
        _RATES[key] = 2.0 * m * k * n / (ms * 1e-3)
    return _RATES[key]
