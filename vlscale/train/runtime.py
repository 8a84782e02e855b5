"""Process-level set-up of a training run: torch.distributed, the device, seeds, logging.

Every launcher (``deepspeed``, ``torchrun``, plain ``python``) ends up here. A single process
without launcher variables still gets a one-rank process group when the engine needs one
(DeepSpeed and FSDP2 always do), on a free loopback port.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vlscale.config import Config
from vlscale.doctor import check_torch_build

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where this process sits: its rank, the world, its device, and whether it owns the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group the loss gathers over (None = one rank: no collectives)."""
        return dist.group.WORLD if self.world_size > 1 else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_runtime(cfg: Config) -> Runtime:
    """Initialise torch.distributed when needed (gloo on CPU, nccl on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        # A torch build without kernels for this GPU (e.g. a V100 under the default CUDA 13 wheels)
        # fails here, naming the fix, instead of at the first CUDA op.
        check_torch_build(device)
        torch.cuda.set_device(device)
    owns = False
    if (world > 1 or cfg.engine.kind in ("deepspeed", "fsdp")) and not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = cfg.engine.backend if cfg.engine.backend != "auto" else ("nccl" if cuda else "gloo")
        if backend == "nccl" and not cuda:
            raise ValueError("engine.backend='nccl' needs CUDA; use gloo (or auto) on CPU")
        dist.init_process_group(backend)
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def rows_per_rank(rows: int, rt: Runtime) -> list[int]:
    """Every rank's ``rows`` (an all-gather of W integers; every rank must call it)."""
    if rt.world_size == 1:
        return [rows]
    mine = torch.tensor([rows], dtype=torch.long, device=rt.device)
    out = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(out, mine, group=rt.process_group)
    return [int(n) for n in out]


def even_rows(batch: Any, rt: Runtime, *, counters: dict[str, int], step: int) -> Any:
    """This rank's share of step ``step``'s batch, cut so that every rank holds the same rows; None
    when some rank has none (every rank then skips the step).

    A rank's batch can come out short: debiased sampling refills skipped (corrupt) samples from
    spare rows only while they last, and a world-size change re-splits short old batches. Every
    rank then keeps the smallest rank's row count (a W-int all-gather per step; the trimmed rows
    are counted in ``counters["trimmed_samples"]``). Equal rows are what the rest of the step
    assumes: ZeRO-3 / FSDP2 gather parameters for every chunk's forward, so all ranks must run the
    same number of chunks, and the mixup partners are global rows ``rank × rows + i``."""
    sizes = rows_per_rank(len(batch), rt)
    keep = min(sizes)
    if keep == max(sizes):
        return batch if keep else None
    trimmed = sum(sizes) - keep * len(sizes)
    counters["trimmed_samples"] += trimmed
    if rt.is_main:
        log.warning("step %d: the ranks' batches have %s rows (skipped samples); every rank keeps %d, %d "
                    "samples trimmed%s", step, sizes, keep, trimmed, " and the step skipped" if not keep else "")
    return batch.rows(0, keep) if keep else None


def shutdown(rt: Runtime) -> None:
    """barrier + destroy_process_group: without it a fraction of gloo runs abort at exit."""
    if rt.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings elsewhere (one copy of each message, not one per rank)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"[%(asctime)s r{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
