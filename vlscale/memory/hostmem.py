"""Host (CPU) memory of the data path: the local batches of pixels a rank holds at once.

The GPU-side plan (:mod:`vlscale.memory.plan`) is the hard limit at small batches; at ZeroVL's
1,048,576 pairs over 8 ranks the host is the next one. Each rank holds its whole local batch for the
step (the gradient cache copies it to the device chunk by chunk), and its loader prepares more:

* ``data.num_workers × data.prefetch_factor`` batches in the DataLoader's queues (shared memory),
* one in the pin-memory thread / being collated, and the one being trained: ``+ 2``
  (no workers: the one being trained and the next one's collate);
* with ``data.pixel_dtype=float32`` and image mixup, the mixed copy of the step's batch (``+ 1``);
  with ``uint8`` the mix happens on the device, chunk by chunk.

With ``data.part_size`` the loader's unit is a part of the local batch (:mod:`vlscale.train.assemble`):
the host holds the one step buffer the parts are copied into (one local batch), plus
``num_workers × prefetch_factor + 1`` *parts* in flight (the queues, and the part being copied in).
At 1M pairs over 8 ranks with 8 workers, parts of 256 rows take a rank from 356 GB to ~20 GB.

A pixel is 1 byte as uint8, 4 as float32. 131,072 images of 3 × 224² are 19.7 GB as uint8 and 78.9 GB
as float32, per batch. :func:`host_batch_memory` computes the total; :func:`check_host_memory`
compares it with one machine's memory for the ranks it runs (the preflight's check). A multi-rank
run checks every machine: each rank reports :func:`host_identity`, :func:`group_hosts` gives each
machine with its memory and its rank count (:func:`vlscale.train.preflight.preflight_all_ranks`).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from vlscale.divisors import divisors

GB = 1e9
LARGE_BATCH = 4096  # local batches from here on are worth splitting into parts (data.part_size)


def _part_hint(micro: int) -> int:
    """A data.part_size to suggest: the largest divisor of ``micro`` up to 256."""
    return max(d for d in divisors(micro) if d <= 256)


def image_side(cfg: Any) -> int:
    """Side of the training images: data.image_size, else model.image_size, else timm's default
    input size for model.vision_model (224 when timm does not know it)."""
    if cfg.data.image_size:
        return int(cfg.data.image_size)
    if cfg.model.image_size:
        return int(cfg.model.image_size)
    try:
        import timm

        return int(timm.models.get_pretrained_cfg(cfg.model.vision_model).input_size[-1])
    except Exception:  # an unknown or custom model: the common size
        return 224


def host_batch_memory(cfg: Any, world_size: int, *, side: int | None = None) -> dict[str, Any]:
    """Per-rank host bytes of the data path for ``cfg`` on ``world_size`` ranks (see the module text)."""
    from vlscale.train.launchers import resolve_batch

    micro, _, _ = resolve_batch(cfg.train, world_size)
    side = side or image_side(cfg)
    dtype = cfg.data.pixel_dtype
    per_image = 3 * side * side * (1 if dtype == "uint8" else 4)
    workers, prefetch = cfg.data.num_workers, cfg.data.prefetch_factor
    part = cfg.data.part_size if 0 < cfg.data.part_size < micro else 0  # part_size = micro: whole batches
    mixed_copy = dtype == "float32" and cfg.techniques.mixup
    per_row = per_image + cfg.model.context_length * 16  # pixels + tokens and mask (int64)
    batch_bytes = micro * per_row
    if part:  # one step buffer (+ the mixed copy), and parts in flight
        batches, parts = 1 + mixed_copy, workers * prefetch + 1
    else:
        batches, parts = workers * prefetch + 2 + mixed_copy, 0
    total = batches * batch_bytes + parts * part * per_row
    what = f"× ({dtype} 3×{side}² + tokens)"
    if part:
        formula = (f"1 step buffer{' + 1 mixed copy' if mixed_copy else ''} of {micro:,} + (num_workers {workers} × "
                   f"prefetch_factor {prefetch} + 1) parts of {part:,} (data.part_size) {what}")
    else:
        formula = (f"(num_workers {workers} × prefetch_factor {prefetch} + 2"
                   + (" + 1 mixed copy" if mixed_copy else "") + f") local batches of {micro:,} {what}")
    return {"local_batch": micro, "image_side": side, "pixel_dtype": dtype, "bytes_per_image": per_image,
            "part_size": part, "batches_held": batches, "parts_held": parts, "batch_bytes": batch_bytes,
            "bytes_per_rank": total, "min_bytes_per_rank": batch_bytes, "formula": formula}


def ranks_per_node(world_size: int) -> int:
    """Ranks sharing this machine: the launcher's LOCAL_WORLD_SIZE (torchrun, accelerate) or
    LOCAL_SIZE (deepspeed), else ``world_size`` (one node)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return min(int(value), world_size)
    return world_size


def machine_memory() -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) bytes of this machine from /proc/meminfo; None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemTotal"], info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def host_identity() -> dict[str, Any]:
    """This rank's machine: its host name and (MemTotal, MemAvailable) bytes (None where unknown)."""
    return {"host": socket.gethostname(), "memory": machine_memory()}


def group_hosts(identities: list[dict[str, Any]]) -> list[tuple[str, tuple[int, int] | None, int]]:
    """Every rank's :func:`host_identity` → ``(host, memory, ranks on it)`` per machine, in rank order
    of first appearance; a machine's memory is the smallest its ranks read (None if none could)."""
    hosts: dict[str, list[Any]] = {}
    for ident in identities:
        entry = hosts.setdefault(str(ident["host"]), [None, 0])
        mem = ident.get("memory")
        if mem is not None:
            mem = (int(mem[0]), int(mem[1]))
            entry[0] = mem if entry[0] is None else (min(entry[0][0], mem[0]), min(entry[0][1], mem[1]))
        entry[1] += 1
    return [(host, mem, n) for host, (mem, n) in hosts.items()]


def check_host_memory(cfg: Any, world_size: int, *, memory: tuple[int, int] | None = None,
                      local_ranks: int | None = None, host: str | None = None) -> tuple[str | None, str | None]:
    """(error, warning) about the data path's host memory on one machine (None: fine / unknown):
    this one, or ``host`` (named in the messages) with its ``memory`` and ``local_ranks``.

    Error: one local batch per rank already exceeds the machine's total memory. Warning: the
    estimate with the loader's batches in flight exceeds the memory available now."""
    memory = memory if memory is not None or host is not None else machine_memory()
    if memory is None:
        return None, None
    total, available = memory
    ranks = local_ranks or ranks_per_node(world_size)
    est = host_batch_memory(cfg, world_size)
    fixes = []
    if est["pixel_dtype"] == "float32":
        fixes.append("data.pixel_dtype=uint8 (a quarter of the bytes)")
    if not est["part_size"] and est["local_batch"] >= LARGE_BATCH:
        fixes.append(f"data.part_size={_part_hint(est['local_batch'])} (workers make parts of the local batch: "
                     "one step buffer + workers × prefetch parts in flight)")
    if cfg.data.num_workers:
        fixes.append("fewer data.num_workers or a lower data.prefetch_factor")
    fixes.append("more nodes (fewer ranks per node) or a smaller train.global_batch_size")
    machine = host or "this machine"
    where = (f"{ranks} rank(s) on {machine}, each holding {est['formula']} = "
             f"{est['bytes_per_rank'] / GB:.1f} GB")
    if est["min_bytes_per_rank"] * ranks > total:
        return (f"host memory: one local batch per rank ({est['min_bytes_per_rank'] / GB:.1f} GB × {ranks} ranks) "
                f"exceeds {machine}'s {total / GB:.1f} GB; use " + ", or ".join(
                    [f for f in fixes if f.startswith("data.pixel_dtype")] + fixes[-1:])), None
    if est["bytes_per_rank"] * ranks > available:
        return None, (f"host memory: {where}, {est['bytes_per_rank'] * ranks / GB:.1f} GB in all, more than the "
                      f"{available / GB:.1f} GB available now; try " + ", ".join(fixes))
    return None, None


__all__ = ["check_host_memory", "group_hosts", "host_batch_memory", "host_identity", "image_side", "machine_memory",
           "ranks_per_node"]
