"""Run metrics: JSONL (always), TensorBoard (optional), a tqdm progress bar — all on rank 0 only.

``metrics.jsonl`` holds one JSON object per logged step (``{"step": 10, "loss": ..., "lr": ...}``)
and one per evaluation (``{"step": 300, "eval/image_to_text_R@1": ...}``), appended and flushed at
once so that a crash loses nothing and a resumed run continues the same file.

Each step appears once. A run that starts at step ``s`` (a resume from the checkpoint of step
``s``, or 0 for a fresh run) first drops every record after ``s`` — the steps a crashed run logged
past its last checkpoint, which the resumed run is about to redo — by rewriting the file
atomically; TensorBoard gets the same cut through ``SummaryWriter(purge_step=s + 1)``.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

NOT_SKIPS = ("samples", "dropped_tail", "short_batch")
"""Loader counters that are not samples skipped for bad data (besides the remote-read ``io_*``)."""


def data_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """``data/<counter>`` for the loader's counters, and ``data/skipped``: the samples skipped for bad
    data, by any reason — not the epoch-end rows (dropped_tail), the count of short batches
    (short_batch), the delivered samples or the remote-read counters (io_*)."""
    out = {f"data/{k}": float(v) for k, v in stats.items()}
    out["data/skipped"] = float(sum(v for k, v in stats.items() if k not in NOT_SKIPS and not k.startswith("io_")))
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def memory_stats(device: torch.device) -> dict[str, float]:
    """Current / peak host memory and, on CUDA, peak allocated device memory (MiB)."""
    import psutil

    out = {"mem/rss_mib": psutil.Process().memory_info().rss / 2**20, "mem/peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        out["mem/cuda_max_alloc_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def purge_after(path: Path, step: int) -> int:
    """Drop the records of ``path`` (metrics.jsonl) logged after ``step``; returns how many went.

    The file is rewritten through a temp file + rename, so a crash here leaves either the old or
    the new file. A torn last line (a crash mid-write) is dropped too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        from vlscale.data.fs import write_bytes  # atomic: temp file + rename

        write_bytes(str(path), "".join(f"{line}\n" for line in kept).encode())
        log.info("%s: dropped %d records after step %d (re-done by this run)", path, dropped, step)
    return dropped


class MetricsLogger:
    """Writes metrics on rank 0; a no-op object on the other ranks (``enabled=False``)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, start_step: int) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        purge_after(self.path, start_step)
        self._file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        """One optimizer step done (progress bar only)."""
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        """A line on rank 0's console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
