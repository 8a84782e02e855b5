"""Atomic, resumable checkpoints through the engine (DeepSpeed / FSDP2 DCP / local torch.save).

Layout under ``<run_dir>/checkpoints``::

    step_000200/
        engine/            the engine's own format: DeepSpeed save_checkpoint (ZeRO shards,
                           optimizer, lr scheduler, fp16 loss scaler), torch DCP (FSDP2), or
                           state.pt (local: model, optimizer, scheduler)
        model.pt           the consolidated model weights (fp32) for `vlscale eval` / export
        rank00000.pt ...   per rank: data-stream state (loader.state_dict()), RNG states, counters
        config.json        the resolved run config
    latest                 the name of the newest complete checkpoint (updated last)

Atomicity: every rank writes into ``.tmp-step_000200/``; after a barrier rank 0 renames it to
``step_000200`` and only then replaces ``latest`` (write to a temp file + ``os.replace``), so a
crash at any moment leaves either the previous checkpoint or the new one, never a torn one.
The run directory must be on a file system all ranks share (as DeepSpeed's own checkpoints need).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlscale.config import Config, save_config
from vlscale.engines.base import EngineAdapter

LATEST = "latest"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def rng_state() -> dict[str, Any]:
    """Every RNG the training step draws from (dropout, mixup, data transforms)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None when there is none yet."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not path.is_dir():
        raise ValueError(f"{pointer} names {path.name!r}, which does not exist (deleted by hand?)")
    return path


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """``--resume auto`` = the latest checkpoint if any; otherwise a checkpoint folder or run dir."""
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    path = Path(resume)
    if (path / LATEST).is_file():
        return latest_checkpoint(path)
    if (path / "checkpoints" / LATEST).is_file():
        return latest_checkpoint(path / "checkpoints")
    if (path / "engine").exists():
        return path
    raise ValueError(f"--resume {resume}: not a checkpoint folder, a checkpoints/ dir or a run dir")


# --------------------------------------------------------------------------- engine states


def _save_engine(engine: EngineAdapter, optimizer: Any, scheduler: Any, path: Path) -> None:
    if engine.kind == "deepspeed":
        # DeepSpeed writes <path>/engine/{mp_rank_*, zero shards}; its own `latest` is not used.
        engine.raw.save_checkpoint(str(path), tag="engine", client_state={}, save_latest=False)
    elif engine.kind == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(engine.module, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "engine"))
    else:
        if _rank() == 0:  # the local engine keeps identical replicas
            (path / "engine").mkdir(parents=True, exist_ok=True)
            torch.save({"model": engine.module.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None},
                       path / "engine" / "state.pt")


def _load_engine(engine: EngineAdapter, optimizer: Any, scheduler: Any, path: Path) -> None:
    if engine.kind == "deepspeed":
        load_path, _ = engine.raw.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {path / 'engine'}")
    elif engine.kind == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(engine.module, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "engine"))
        set_state_dict(engine.module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = torch.load(path / "engine" / "state.pt", map_location="cpu", weights_only=False)
        engine.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])


def consolidated_state_dict(engine: EngineAdapter) -> dict[str, torch.Tensor] | None:
    """Full fp32 model weights on rank 0 (None elsewhere). Collective: every rank must call it."""
    if engine.kind == "deepspeed" and engine.raw.zero_optimization_stage() == 3:
        sd = engine.raw._zero3_consolidated_16bit_state_dict()
    elif engine.kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = engine.module.state_dict()
    if _rank() != 0 or sd is None:
        return None
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in sd.items()}


# --------------------------------------------------------------------------- save / load


def save_checkpoint(ckpt_dir: str | Path, step: int, *, engine: EngineAdapter, optimizer: Any, scheduler: Any,
                    loader: Any, cfg: Config, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write a complete checkpoint for ``step`` atomically; every rank must call it."""
    ckpt_dir = Path(ckpt_dir)
    name = checkpoint_name(step)
    tmp, final = ckpt_dir / f".tmp-{name}", ckpt_dir / name
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftovers
        tmp.mkdir(parents=True)
    _barrier()
    _save_engine(engine, optimizer, scheduler, tmp)
    model_sd = consolidated_state_dict(engine)
    extra = {"step": step, "loader": loader.state_dict(), "rng": rng_state(), "trainer": dict(trainer_state),
             "scheduler": scheduler.state_dict() if scheduler is not None and engine.kind == "fsdp" else None}
    torch.save(extra, tmp / f"rank{_rank():05d}.pt")
    if _rank() == 0:
        torch.save(model_sd, tmp / "model.pt")
        save_config(cfg, tmp / "config.json")
    _barrier()
    if _rank() == 0:
        if final.exists():  # re-saving the same step (e.g. the final step also hit ckpt_every)
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = ckpt_dir / f".{LATEST}.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, ckpt_dir / LATEST)  # the commit point
        _prune(ckpt_dir, keep)
    _barrier()
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, *, engine: EngineAdapter, optimizer: Any, scheduler: Any,
                    loader: Any) -> dict[str, Any]:
    """Restore engine, data stream and RNG states from ``path``; returns {"step", "trainer"}."""
    path = Path(path)
    _load_engine(engine, optimizer, scheduler, path)
    rank_file = path / f"rank{_rank():05d}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{path} has no state for rank {_rank()} (saved with fewer ranks?)")
    extra = torch.load(rank_file, map_location="cpu", weights_only=False)
    if extra.get("scheduler") is not None and scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])
    loader.load_state_dict(extra["loader"])
    set_rng_state(extra["rng"])
    return {"step": int(extra["step"]), "trainer": extra.get("trainer", {})}


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of a checkpoint folder (or of a run's latest checkpoint)."""
    path = Path(path)
    if not (path / "model.pt").is_file():
        resolved = resolve_resume(str(path), path / "checkpoints")
        if resolved is None:
            raise ValueError(f"{path}: no checkpoint found")
        path = resolved
    return torch.load(path / "model.pt", map_location="cpu", weights_only=True)
