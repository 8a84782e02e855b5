"""Resuming a checkpoint at another world size: the engine state, and the rest of the data stream.

**Engine state.** What each engine can read at a new world size:

* local: ``engine/state.pt`` holds the whole model, AdamW and the schedule (replicas): as is;
* FSDP2: torch DCP re-shards on load: as is;
* DeepSpeed ZeRO-0: the optimizer lives whole in ``mp_rank_00_model_states.pt``: as is;
* DeepSpeed ZeRO 1–3: the optimizer partitions are per rank ("DP world size of 2 but the current
  world size is 1"). DeepSpeed's own answer is its *universal checkpoint*, and vlscale uses it:
  rank 0 converts ``engine/`` once with ``deepspeed.checkpoint.ds_to_universal`` into
  ``engine_universal/`` (beside it, atomically), and every rank loads that with
  ``load_universal_checkpoint`` — each parameter's fp32 master, Adam moments and step, whatever the
  stage and precision. Chosen over re-deriving the moments from vlscale's own consolidated file
  because it is DeepSpeed's tested path for exactly this, needs nothing extra at every save (the
  moments would double a checkpoint's size), and stays right as DeepSpeed's layouts change.

**Data stream.** The loader splits each epoch's rows over ``ranks × workers`` streams, and a
saved position means something only in that split. So the rest of the interrupted epoch is read
with the split it started with — each old rank's stream from its saved position — and the old
ranks' batches are concatenated in rank order into the same *global* batches the old run would
have made, then cut into the new ranks' shares (:class:`ResplitLoader`) — by each old rank's
nominal rows, so an old batch left short by skipped samples shortens only the new rank covering
its missing rows (the trainer evens the step out) and no row is read twice. Under debiased
sampling every step of the re-split stays one source (the old ranks' step k is the old global
step k). With ``data.part_size`` each old rank's parts (of the checkpoint's part size) are first
assembled into its old steps, and the re-split epoch yields whole steps. A resume that changes
``data.part_size`` at the same world size goes through the same path: the saved positions mean
something only in the old parts, so the epoch ends in them and the new part size starts with the next. From the next epoch on, the new split takes over. Every row is seen exactly once per epoch and the global batches are
exactly the uninterrupted run's; only dropout and the other per-rank random draws differ (they
are seeded per rank, and there are other ranks now), so losses match to rounding, not bit for bit.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from vlscale.data.collate import Batch
from vlscale.train.assemble import concat_steps

log = logging.getLogger(__name__)
UNIVERSAL_TAG = "engine_universal"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def universal_checkpoint(path: Path, *, rank: int) -> str:
    """Convert ``path/engine`` to DeepSpeed's universal format once (rank 0; every rank waits);
    returns the tag to load (``engine_universal``)."""
    out = path / UNIVERSAL_TAG
    if rank == 0 and not out.is_dir():
        tmp = path / f".{UNIVERSAL_TAG}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / "engine"),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        log.info("converting %s to a DeepSpeed universal checkpoint (another world size): %s", path, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {path / 'engine'} (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    _barrier()
    if not out.is_dir():
        raise RuntimeError(f"{out} is missing after the conversion on rank 0 (is the run dir on a shared file system?)")
    return UNIVERSAL_TAG


def load_engine_resharded(engine: Any, optimizer: Any, scheduler: Any, path: Path, extra0: dict[str, Any]) -> None:
    """Load the engine state of checkpoint ``path`` written at another world size (see the module doc)."""
    from vlscale.train.checkpoint import _load_engine

    if engine.kind == "deepspeed" and engine.raw.zero_optimization_stage() >= 1:
        tag = universal_checkpoint(path, rank=dist.get_rank() if dist.is_initialized() else 0)
        config = engine.raw._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.raw.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        finally:
            config.load_universal_checkpoint = before
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load the universal checkpoint {path / tag}")
        return
    _load_engine(engine, optimizer, scheduler, path)
    if extra0.get("scheduler") is not None and scheduler is not None:
        scheduler.load_state_dict(extra0["scheduler"])


def old_stream_states(states: dict[int, dict[str, Any]], saved_world: int) -> tuple[int, dict[int, dict]]:
    """(the world size of the split in progress, its ranks' loader states) from every rank file.

    A rank file of a run that is itself still re-splitting holds the old ranks' states it reads."""
    old_world, out = saved_world, {}
    for rank, extra in states.items():
        loader = extra["loader"]
        if "resplit" in loader:
            old_world = int(loader["resplit"]["world_size"])
            out.update({int(r): st for r, st in loader["resplit"]["states"].items()})
        else:
            out[rank] = loader
    missing = sorted(set(range(old_world)) - set(out))
    if missing:
        raise ValueError(f"the checkpoint lacks the data-stream state of rank(s) {missing} of its {old_world}-rank "
                         "split: resume at its world size until that epoch ends")
    return old_world, out


def needs_resplit(states: dict[int, dict[str, Any]], part_size: int) -> bool:
    """Whether the checkpoint's data stream must be finished in its own split: it is still
    re-splitting, or its loader made parts of another size than ``data.part_size`` now."""
    loaders = [extra["loader"] for extra in states.values()]
    return any("resplit" in st or int(st.get("config", {}).get("part_size", 0)) != part_size for st in loaders)


class ResplitLoader:
    """The rest of an epoch in the old split's global batches, cut into this rank's share; then
    ``next_loader`` (this world's split) from the following epoch. Quacks like ``ShardLoader``."""

    def __init__(self, make_loader: Callable[..., Any], states: dict[int, dict], *,
                 old_world: int, rank: int, world: int, micro: int, next_loader: Any) -> None:
        self.next_loader, self.old_world = next_loader, old_world
        self.rank, self.world, self.micro = rank, world, micro
        global_batch = micro * world
        if global_batch % old_world:
            raise ValueError(f"cannot re-split: the global batch {global_batch} does not split over the checkpoint's "
                             f"{old_world} ranks")
        self.old_micro = global_batch // old_world
        lo, hi = rank * micro, (rank + 1) * micro
        self.sources = [r for r in range(old_world) if r * self.old_micro < hi and (r + 1) * self.old_micro > lo]
        self.old: dict[int, Any] = {}
        for r in self.sources:
            cfg = states[r]["config"]
            loader = make_loader(r, old_world, self.old_micro, int(cfg["num_workers"]),
                                 part_size=int(cfg.get("part_size", 0)))
            loader.load_state_dict(states[r])
            self.old[r] = loader
        self.epoch = int(states[self.sources[0]]["epoch"])
        self.active = True
        self.dropped = 0
        log.info("data: the rest of epoch %d is read in the checkpoint's %d-rank split (old ranks %s for rank %d), "
                 "then this run's %d-rank split", self.epoch, old_world, self.sources, rank, world)

    @property
    def parts_per_step(self) -> int:
        """1 during the re-split epoch (it yields whole steps), then the new split's."""
        return 1 if self.active else self.next_loader.parts_per_step

    @property
    def stats(self) -> dict[str, int]:
        total: Counter = Counter(self.next_loader.stats)
        if self.active:
            for loader in self.old.values():
                total.update(loader.stats)
        return dict(total)

    def __iter__(self) -> Iterator[Batch]:
        if not self.active:
            yield from self.next_loader
            return
        iters = {r: concat_steps(loader, loader.parts_per_step) for r, loader in self.old.items()}
        lo, hi = self.rank * self.micro, (self.rank + 1) * self.micro
        while True:
            parts = {r: next(it, None) for r, it in iters.items()}
            if any(b is None for b in parts.values()):
                self.dropped += sum(len(b) for b in parts.values() if b is not None)
                for it in iters.values():  # drain: the old loaders end their pass (and epoch)
                    self.dropped += sum(len(b) for b in it)
                break
            # Cut by each old rank's NOMINAL positions, not by the concatenation's: an old batch
            # made short by skipped samples then shortens only the new rank(s) covering its missing
            # tail, and new ranks that share an old rank still split its rows exactly once.
            yield Batch.concat([parts[r].rows(max(lo, r * self.old_micro) - r * self.old_micro,
                                              min(hi, (r + 1) * self.old_micro) - r * self.old_micro)
                                for r in self.sources])
        if self.dropped:
            log.warning("data: %d rows of the re-split epoch %d were left over (the old ranks' streams ended unevenly)",
                        self.dropped, self.epoch)
        self.active = False
        self.next_loader.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        if not self.active:
            return self.next_loader.state_dict()
        # Only the old ranks this rank reads: together, the new ranks' files cover every old rank.
        states = {r: loader.state_dict() for r, loader in self.old.items()}
        return {"resplit": {"world_size": self.old_world, "states": {str(r): st for r, st in states.items()}},
                "worker_states": {"resplit": True}, "epoch": self.epoch, "stats": self.stats}

