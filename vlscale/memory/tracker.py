"""Measuring peak memory per phase of a training step: ``MemoryTracker`` and ``LiveTensorBytes``.

``MemoryTracker(backend=...)`` records, for each ``with tracker.phase(name):`` block, the memory
live when the phase started and its peak inside the phase (both in bytes). Backends:

``"cuda"``     the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``:
               exact tensor bytes (what :mod:`vlscale.memory.model` predicts).
``"rss"``      process resident set size on CPU, sampled by a light background thread (every
               ``interval`` seconds, plus at the start and end of the phase). ``ru_maxrss`` is not
               used because it never goes down, so it cannot give a per-phase peak. RSS includes
               the interpreter, libraries and memory the C allocator has not returned to the OS, so
               read the *delta* (peak − start), and expect it to miss allocations that live
               shorter than the sampling interval.
``"tensors"``  exact live tensor bytes on any device via :class:`LiveTensorBytes`, a
               ``TorchDispatchMode`` that sees every tensor created inside the phase (and in the
               backward it triggers). Slower (a Python hook per op): for validation on small models.

``"auto"`` is ``"cuda"`` for a CUDA device, else ``"rss"``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = float(2**20)
BACKENDS = ("auto", "cuda", "rss", "tensors")


def current_rss() -> int:
    """Resident set size of this process in bytes (psutil, else /proc, else ru_maxrss)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        # Last resort: the high-water mark (kilobytes on Linux); per-phase deltas degrade to 0.
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active and still alive; keeps the peak.

    Each new storage is counted once (by data pointer) and released through a weak-reference
    finaliser when it dies, so views, in-place ops and tensors saved for backward are handled.
    Storages created before entering are not counted (``current`` starts at 0).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        with self._lock:
            if self._live.pop(key, None) is not None:
                self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or getattr(t, "is_sparse", False):
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        key = (str(t.device), ptr)
        if ptr == 0 or key in self._live:
            return
        nbytes = storage.nbytes()
        with self._lock:
            self._live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key, nbytes)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: not a new allocation (and the input
        # may predate the tracker, e.g. a parameter).
        inputs = {_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _ptr(t) not in inputs:
                self._track(t)
        return out


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return -1


@dataclass
class PhaseRecord:
    """One phase: bytes live at its start, its peak, and wall time."""

    name: str
    start_bytes: int
    peak_bytes: int
    seconds: float

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


class _RssSampler:
    """Background thread sampling RSS; ``peak`` is the highest value seen since ``start``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        return self.peak


class MemoryTracker:
    """Peak memory per named phase; ``report()`` renders a table, ``to_dict()`` the records."""

    def __init__(self, device: torch.device | str = "cpu", *, backend: str = "auto",
                 interval: float = 0.001) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.device = torch.device(device)
        if backend == "auto":
            backend = "cuda" if self.device.type == "cuda" else "rss"
        if backend == "cuda" and self.device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs a CUDA device, got {self.device}")
        self.backend = backend
        self.interval = interval
        self.records: list[PhaseRecord] = []
        self._tensors: LiveTensorBytes | None = None
        self._active: str | None = None
        self._sampler: _RssSampler | None = None
        self._start = 0
        self._start_t = 0.0
        self.run_peak = 0
        """CUDA backend: the allocator's peak over the whole run (phases reset its counter)."""

    # -- backends ------------------------------------------------------------------------------
    def _now(self) -> int:
        if self.backend == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        if self.backend == "tensors":
            return self._tensors.current if self._tensors is not None else 0
        return current_rss()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[MemoryTracker]:
        """For the "tensors" backend: count every tensor created inside this block (phases too).

        Re-entering keeps counting the storages created in earlier blocks that are still alive.
        """
        if self.backend != "tensors":
            yield self
            return
        if self._tensors is None:
            self._tensors = LiveTensorBytes()
        with self._tensors:
            yield self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak memory of the enclosed block as phase ``name`` (phases do not nest)."""
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    @property
    def active(self) -> str | None:
        """The phase being recorded (None between phases)."""
        return self._active

    def begin(self, name: str) -> None:
        """Start recording phase ``name`` (for phases that do not fit one ``with`` block, e.g. a
        training step observed through hooks); :meth:`end` or :meth:`switch` closes it."""
        if self._active is not None:
            # Resetting the peak for an inner phase would lose the outer phase's peak.
            raise RuntimeError(f"phase {name!r} opened inside phase {self._active!r}; phases do not nest")
        self._active = name
        self._start_t = time.perf_counter()
        self._sampler = None
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
            # The allocator has one peak counter: keep the run's peak before resetting it.
            self.run_peak = max(self.run_peak, int(torch.cuda.max_memory_allocated(self.device)))
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.backend == "tensors":
            if self._tensors is None:
                raise RuntimeError("the 'tensors' backend records inside `with tracker.tracking():` only")
            self._tensors.reset_peak()
        else:
            self._sampler = _RssSampler(self.interval)
        self._start = self._now()

    def end(self) -> PhaseRecord | None:
        """Close the current phase (no-op between phases) and return its record."""
        if self._active is None:
            return None
        name, self._active = self._active, None
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            self.run_peak = max(self.run_peak, peak)
        elif self.backend == "tensors":
            peak = self._tensors.peak
        else:
            peak = self._sampler.stop()
        record = PhaseRecord(name, self._start, max(peak, self._start), time.perf_counter() - self._start_t)
        self.records.append(record)
        return record

    def switch(self, name: str) -> None:
        """Close the current phase (if any) and start ``name``."""
        self.end()
        self.begin(name)

    # -- reports -------------------------------------------------------------------------------
    def peaks(self) -> dict[str, int]:
        """Peak bytes per phase name (the largest if a phase was recorded several times)."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.name] = max(out.get(r.name, 0), r.peak_bytes)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": str(self.device),
                "phases": [asdict(r) | {"delta_bytes": r.delta_bytes} for r in self.records]}

    def report(self, title: str = "measured memory") -> str:
        """A markdown table per phase name (aggregated over repeats): count, MiB at the start of
        the record with the highest peak, that peak, peak − start, and total seconds."""
        lines = [f"**{title}** (backend `{self.backend}`, device `{self.device}`)", "",
                 "| phase | count | start MiB | peak MiB | peak − start MiB | total s |",
                 "|---|---:|---:|---:|---:|---:|"]
        groups: dict[str, list[PhaseRecord]] = {}
        for r in self.records:
            groups.setdefault(r.name, []).append(r)
        for name, recs in groups.items():
            top = max(recs, key=lambda r: r.peak_bytes)
            lines.append(f"| {name} | {len(recs)} | {top.start_bytes / MIB:.1f} | {top.peak_bytes / MIB:.1f} | "
                         f"{top.delta_bytes / MIB:.1f} | {sum(r.seconds for r in recs):.3f} |")
        return "\n".join(lines)
