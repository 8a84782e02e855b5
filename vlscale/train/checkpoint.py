"""Atomic, resumable checkpoints through the engine (DeepSpeed / FSDP2 DCP / local torch.save).

Layout under ``<run_dir>/checkpoints``::

    step_000200/
        engine/            the engine's own format: DeepSpeed save_checkpoint (ZeRO shards,
                           optimizer, lr scheduler, fp16 loss scaler), torch DCP (FSDP2), or
                           state.pt (local: model, optimizer, scheduler)
        latest             DeepSpeed's pointer to engine/ (so its zero_to_fp32.py needs no --tag)
        model.pt           every parameter's consolidated fp32 *master* value (+ persistent buffers):
                           weights for `vlscale eval`, `vlscale export`, `train.init_from`
        meta.json          step, world size, engine, ZeRO stage, precision, loader workers
        rank00000.pt ...   per rank: data-stream state (loader.state_dict()), RNG states, counters
        config.json        the resolved run config
    latest                 the name of the newest complete checkpoint (updated last)

Atomicity: every rank writes into ``.tmp-step_000200/``; after a barrier rank 0 renames it to
``step_000200`` and only then replaces ``latest`` (write to a temp file + ``os.replace``), so a
crash at any moment leaves either the previous checkpoint or the new one, never a torn one.
The run directory must be on a file system all ranks share (as DeepSpeed's own checkpoints need).

``model.pt`` comes from :meth:`EngineAdapter.master_params` (a collective under ZeRO-3 / FSDP2):
under fp16 / bf16 it holds the optimizer's fp32 masters, not the rounded working copy, so a run
started from it (``train.init_from``) or an export loses nothing. How a checkpoint resumes at
another world size is :mod:`vlscale.train.reshard`'s business.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vlscale.config import Config, save_config
from vlscale.engines.base import EngineAdapter

LATEST = "latest"
ENGINE_TAG = "engine"  # DeepSpeed's tag: its files live in <checkpoint>/engine/


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


def is_checkpoint(path: Path) -> bool:
    """A checkpoint folder (not a run dir or a checkpoints/ dir)."""
    return (path / "engine").exists() and (path / "rank00000.pt").is_file()


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """``--resume auto`` = the latest checkpoint if any; otherwise a checkpoint folder or run dir."""
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    path = Path(resume)
    if is_checkpoint(path):  # before `latest`: a checkpoint holds DeepSpeed's own `latest` too
        return path
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
        # DeepSpeed writes <path>/engine/{mp_rank_*, zero shards, zero_to_fp32.py} and <path>/latest
        # naming the tag, which DeepSpeed's own tools (zero_to_fp32.py) read when given no --tag.
        engine.raw.save_checkpoint(str(path), tag=ENGINE_TAG, client_state={}, save_latest=True)
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
        load_path, _ = engine.raw.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
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
    """Every parameter's whole fp32 master (:meth:`EngineAdapter.master_params`) and the module's
    persistent buffers, on CPU on rank 0 (None elsewhere). Collective: every rank must call it."""
    keep = _rank() == 0
    out: dict[str, torch.Tensor] = {}
    for name, value in engine.master_params():  # consumed whole on every rank (ZeRO-3 / FSDP2 gather)
        if keep:
            out[name] = value.detach().to("cpu", torch.float32).clone()
    if not keep:
        return None
    for name, value in engine.module.state_dict(keep_vars=True).items():
        if name not in out:  # buffers (e.g. BatchNorm statistics) are replicated, never sharded
            value = value.detach().cpu()
            out[name] = value.float() if value.is_floating_point() else value
    return out


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file + rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    world = engine.world_size
    extra = {"step": step, "world_size": world, "loader": loader.state_dict(), "rng": rng_state(),
             "trainer": dict(trainer_state),
             "scheduler": scheduler.state_dict() if scheduler is not None and engine.kind == "fsdp" else None}
    atomic_save(extra, tmp / f"rank{_rank():05d}.pt")
    if _rank() == 0:
        atomic_save(model_sd, tmp / "model.pt")
        save_config(cfg, tmp / "config.json")
        meta = {"step": step, "world_size": world, "engine": engine.kind,
                "zero_stage": int(engine.raw.zero_optimization_stage()) if engine.kind == "deepspeed" else None,
                "precision": cfg.train.precision, "global_batch_size": cfg.train.global_batch_size,
                "num_workers": cfg.data.num_workers}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
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


def load_engine(path: str | Path, *, engine: EngineAdapter, optimizer: Any, scheduler: Any) -> None:
    """Only the engine state (weights, optimizer, schedule) of a checkpoint of this world size."""
    path = Path(path)
    _load_engine(engine, optimizer, scheduler, path)
    extra = torch.load(path / f"rank{_rank():05d}.pt", map_location="cpu", weights_only=False)
    if extra.get("scheduler") is not None and scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])


def set_masters(engine: EngineAdapter, state: dict[str, torch.Tensor]) -> None:
    """Make the engine's fp32 masters exactly ``state`` (DeepSpeed under fp16 / bf16 built them from
    the rounded half-precision module). A collective under ZeRO-3; a no-op for other engines."""
    if engine.kind != "deepspeed":
        return
    from deepspeed.utils import safe_set_full_fp32_param

    fp16_masters = engine._fp16_stage0_masters() if hasattr(engine, "_fp16_stage0_masters") else {}
    for name, p in engine.module.named_parameters():
        value = state[name].to(engine.device, torch.float32)
        if id(p) in fp16_masters:
            fp16_masters[id(p)].copy_(value)
        elif hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value)


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


def saved_world_size(path: str | Path) -> int:
    """How many ranks wrote the checkpoint ``path``."""
    path = Path(path)
    meta = path / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["world_size"])
    return len(list(path.glob("rank*.pt")))  # checkpoints written before meta.json


def rank_states(path: str | Path) -> dict[int, dict[str, Any]]:
    """Every rank's saved extra state (loader position, RNG, counters) of checkpoint ``path``."""
    out = {}
    for f in sorted(Path(path).glob("rank*.pt")):
        out[int(f.stem[4:])] = torch.load(f, map_location="cpu", weights_only=False)
    return out


def weights_file(path: str | Path) -> Path:
    """The consolidated weights a path names: a checkpoint's ``model.pt`` (a checkpoint folder, a
    ``checkpoints/`` folder or a run dir: its latest), an export's ``model.safetensors``, or a file."""
    path = Path(path)
    if path.is_file():
        return path
    for name in ("model.pt", "model.safetensors"):
        if (path / name).is_file():
            return path / name
    resolved = resolve_resume(str(path), path / "checkpoints") if path.exists() else None
    if resolved is None:
        raise ValueError(f"{path}: no checkpoint found (expected model.pt, model.safetensors, or a run dir)")
    return resolved / "model.pt"


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of a checkpoint folder, a run's latest checkpoint or an export."""
    f = weights_file(path)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    return torch.load(f, map_location="cpu", weights_only=True)


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state`` into ``model`` in place, strictly (every parameter and buffer, same shapes).

    Works before any engine wraps the model, including a ZeRO-3 model partitioned at construction:
    its parameters are gathered, filled on rank 0 and re-partitioned (rank 0's values win)."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}; the checkpoint's "
                         "config.json has the model section it was trained with")
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
    with gather, torch.no_grad():
        for name, target in own.items():
            value = state[name]
            shape = tuple(getattr(target, "ds_shape", target.shape))
            if tuple(value.shape) != shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model's is {shape}")
            target.data.copy_(value.to(target.dtype))
