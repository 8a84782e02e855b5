"""DeepSpeed's CPU shared-memory comm op: vlscale turns it off, and finds the buffers it left behind.

DeepSpeed's torch comm backend JIT-compiles ``deepspeed_shm_comm`` when its comm starts on the CPU
accelerator (30–90 s of C++ on a fresh machine; a compiler killed for memory there once failed a
run), and every rank it starts maps a 66 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` file that
nothing ever removes: /dev/shm is RAM, so each CPU run leaks 66 MB per rank until reboot (312 such
files, 20 GB, had piled up on the development machine). Only ``inference_all_reduce``
(tensor-parallel inference) uses the op; training collectives go through torch.distributed.

* :func:`skip_cpu_shm_comm` marks the op unavailable before DeepSpeed's comm starts
  (``VLSCALE_DS_SHM_COMM=1`` keeps DeepSpeed's default);
* :func:`shm_buffers` lists leftover buffers, each with whether a live process still maps it, and
  :func:`free_stale_shm_buffers` deletes the ones none does (``vlscale doctor --free-shm``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHM_COMM_ENV = "VLSCALE_DS_SHM_COMM"
SHM_DIR = "/dev/shm"
SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


def skip_cpu_shm_comm() -> bool:
    """On DeepSpeed's CPU accelerator, mark its shm-comm op unavailable so its comm backend does
    not build it; returns whether it did. Call before anything starts ``deepspeed.comm``
    (``deepspeed.initialize``, ``zero.Init``)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if os.environ.get(SHM_COMM_ENV, "0") not in ("", "0") or get_accelerator().device_name() != "cpu":
        return False
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return False
    compatible = deepspeed.ops.__compatible_ops__  # one dict per process: the edit persists
    if compatible.get(builder.NAME, False):
        compatible[builder.NAME] = False
        log.info("deepspeed on CPU: its shm-comm op (inference all-reduce only) is not built; %s=1 builds it",
                 SHM_COMM_ENV)
    return True


def _mapped_paths() -> set[str]:
    """The path of every file a live process (that this user may inspect) maps or holds open."""
    seen: set[str] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].startswith("/"):
                        seen.add(parts[5].rstrip("\n").removesuffix(" (deleted)"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                seen.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # the process ended, or is not ours to read
            continue
    return seen


def shm_buffers(shm_dir: str | None = None) -> list[dict[str, Any]]:
    """DeepSpeed's shm-comm buffers in ``shm_dir`` (default /dev/shm): path, bytes, and ``in_use``
    (a live process maps or holds it open)."""
    root = Path(shm_dir or SHM_DIR)
    files = sorted(f for f in root.glob(SHM_BUFFERS) if f.is_file()) if root.is_dir() else []
    if not files:
        return []
    mapped = _mapped_paths()
    return [{"path": str(f), "bytes": f.stat().st_size, "in_use": str(f) in mapped or str(f.resolve()) in mapped}
            for f in files]


def free_stale_shm_buffers(shm_dir: str | None = None) -> tuple[int, int]:
    """Delete the buffers no live process uses; returns (files, bytes) freed."""
    files = freed = 0
    for buf in shm_buffers(shm_dir):
        if buf["in_use"]:
            continue
        try:
            os.unlink(buf["path"])
        except OSError:  # gone meanwhile, or another user's (/dev/shm is sticky)
            continue
        files, freed = files + 1, freed + buf["bytes"]
    if files:
        log.info("freed %d stale DeepSpeed shm buffers (%.2f GiB)", files, freed / 2**30)
    return files, freed
