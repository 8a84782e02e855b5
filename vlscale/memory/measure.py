"""Measuring a recipe's memory on the current device, to put beside the prediction.

Two ways, both ending in the same report (:mod:`vlscale.memory.report`):

* :func:`measure_trainer` — a few real steps of the recipe through :class:`vlscale.train.trainer.Trainer`
  (its engine, gradient cache, loss and optimizer; on generated shards when the recipe's data is
  absent). The trainer records the peak of each phase (:class:`vlscale.memory.phases.StepPhases`)
  into ``memory.json``; this reads it back. Under ``deepspeed`` / ``torchrun`` every rank runs it.
* :func:`measure_simulated` — ONE rank of ``world_size`` running its exact workload
  (:func:`vlscale.memory.workload.run_rank_step`: local rows × all B columns, the other ranks'
  embeddings simulated, ZeRO-1-like :class:`~vlscale.memory.workload.ShardedAdam` states), on CUDA
  under ``torch.cuda.set_per_process_memory_fraction`` (``memory_cap``) with an allocator snapshot
  for https://pytorch.org/memory_viz. How "fits on 8 × V100-32GB" is shown on one large GPU. On CPU
  the same workload runs (the cap is then checked, not enforced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vlscale.memory.lossmem import FUSED_IMPLS
from vlscale.memory.model import GIB
from vlscale.memory.tracker import MemoryTracker

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def device_memory(device: torch.device, world_size: int = 1) -> float:
    """Memory one rank may use: the CUDA device's, or this host's RAM shared by ``world_size`` ranks."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return float(psutil.virtual_memory().total) / world_size


def _shards_present(path: str) -> bool:
    p = Path(path) if path else None
    return bool(p) and p.exists() and (p.is_file() or any(p.glob("**/*.arrow")) or any(p.glob("**/*.parquet")))


def ensure_shards(cfg: Any, out: Path, *, steps: int, rank: int = 0, timeout: float = 900.0) -> str:
    """The recipe's training shards, or generated ones (two sources, enough rows for ``steps``
    batches on every rank and loader worker) under ``out/data``; rank 0 writes, others wait."""
    if _shards_present(cfg.data.train_shards):
        return cfg.data.train_shards
    from vlscale.data.synthetic import write_synthetic_shards

    target, done = out / "data", out / "data" / ".complete"
    if rank == 0 and not done.exists():
        rows = max(64, 2 * (steps + 1) * cfg.train.global_batch_size)
        write_synthetic_shards(target, {"synthetic-a": rows // 2, "synthetic-b": rows - rows // 2}, overwrite=True,
                               rows_per_batch=max(16, cfg.train.global_batch_size // 64))
        done.write_text("ok\n")
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: no generated shards in {target} after {timeout:.0f} s")
        time.sleep(0.5)
    return str(target)


def measure_trainer(recipe: str, overrides: list[str], out: Path, *, steps: int = 3, backend: str = "auto",
                    keep_checkpoints: bool = False) -> dict[str, Any] | None:
    """Run ``steps`` real training steps of the recipe; returns ``{"memory": memory.json, "cfg": Config}``
    on rank 0 (None elsewhere). The first step is a warm-up; the others' phases are recorded."""
    from vlscale.config import load_recipe
    from vlscale.train.trainer import train

    if steps < 2:
        raise ValueError(f"--steps must be >= 2 (the first step only warms up), got {steps}")
    rank = int(os.environ.get("RANK", "0"))
    run = out / "run"
    shards = ensure_shards(load_recipe(recipe, overrides), out, steps=steps, rank=rank)
    mine = [f"train.steps={steps}", f"train.run_dir={run}", f"train.memory_phase_steps={steps - 1}",
            f"train.memory_backend={backend}", "train.eval_every=0", "train.ckpt_every=0", "train.log_every=1",
            "train.progress=false", "train.tensorboard=false", f"data.train_shards={shards}", "data.eval_shards="]
    cfg = load_recipe(recipe, [*overrides, *mine])
    train(cfg)
    if rank != 0:
        return None
    if not keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return {"memory": json.loads((run / "memory.json").read_text()), "cfg": cfg}


def _vocab(model: torch.nn.Module) -> int:
    tok = getattr(model, "tokenizer", None)
    return min(1000, len(tok)) if tok is not None else 1000


def measure_simulated(cfg: Any, *, world_size: int, device: torch.device, memory_cap: float | None = None,
                      backend: str = "auto", snapshot: Path | None = None,
                      cost_sizes: tuple[int, int] = (4, 8)) -> dict[str, Any]:
    """Rank 0 of ``world_size``: one warm-up step (one chunk per rank), then the recipe's global
    batch, each phase recorded. Returns the measurement, the tower costs and what ran."""
    from vlscale.loss.backends import get_backend
    from vlscale.memory.towers import count_params, measure_activation_cost, pair_inputs
    from vlscale.memory.workload import ShardedAdam, run_rank_step
    from vlscale.model import DualEncoder, ModelConfig

    batch, gc = cfg.train.global_batch_size, cfg.gradcache
    if world_size < 1 or batch % world_size:
        raise ValueError(f"global batch {batch} must be a multiple of --simulate-world-size {world_size}")
    chunk = max(gc.chunk_size, gc.image_chunk_size, gc.text_chunk_size) if gc.enabled else None
    impl = get_backend(cfg.loss.impl, device).name
    dtype = _DTYPES[cfg.train.precision]
    result: dict[str, Any] = {"world_size": world_size, "global_batch": batch, "local_rows": batch // world_size,
                              "chunk": chunk, "loss_impl": impl, "dtype": str(dtype), "oom": None,
                              "memory_cap_bytes": memory_cap, "cap_enforced": False}
    if memory_cap is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap / total), device)
        result["cap_enforced"] = True
    tracker = MemoryTracker(device, backend=backend)
    model_cfg = ModelConfig(**dataclasses.asdict(cfg.model))
    with tracker.tracking():  # the "tensors" backend counts the parameters too
        model = DualEncoder(model_cfg).to(device=device, dtype=dtype)
    base = pair_inputs(image_size=cfg.model.image_size or 224, context_length=cfg.model.context_length,
                       vocab=_vocab(model))

    def make(start: int, stop: int, dev: torch.device) -> dict[str, torch.Tensor]:
        return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in base(start, stop, dev).items()}

    costs: dict[str, dict[str, float]] = {}
    for tower, keys in (("image", ("pixels",)), ("text", ("tokens",))):
        only = (lambda ks: lambda a, b, d: {k: v for k, v in make(a, b, d).items() if k in ks})(keys)
        c = measure_activation_cost(model, only, sizes=cost_sizes,
                                    backend="cuda" if device.type == "cuda" else "tensors")
        costs[tower] = {"per_row": c.per_row, "fixed": c.fixed, "nograd_per_row": c.nograd_per_row}
    with tracker.tracking():
        optimizer = ShardedAdam([p for p in model.parameters() if p.requires_grad], world_size)
        warm = world_size * (chunk or 1)
        run_rank_step(model, make, optimizer, world_size=world_size, global_batch=warm, chunk=chunk,
                      loss_impl=impl, tracker=tracker)
        tracker.records.clear()
        recording = _start_snapshot(device) if snapshot is not None else False
        t0 = time.perf_counter()
        try:
            result["loss"] = run_rank_step(model, make, optimizer, world_size=world_size, global_batch=batch,
                                           chunk=chunk, loss_impl=impl, tracker=tracker)
        except torch.cuda.OutOfMemoryError as err:  # the answer "does not fit", with the phase it hit
            tracker.end()
            result["oom"] = {"after_phases": [r.name for r in tracker.records], "error": str(err)[:500]}
        result["step_seconds"] = time.perf_counter() - t0
        if recording:
            result["snapshot"] = _dump_snapshot(snapshot)
    phases = {r.name: {"start_bytes": r.start_bytes, "peak_bytes": r.peak_bytes, "delta_bytes": r.delta_bytes,
                       "seconds": r.seconds} for r in tracker.records}
    result.update(params=count_params(model), tower_costs=costs,
                  measured={"backend": tracker.backend, "device": _device_name(device), "phases": phases,
                            "absolute": tracker.backend == "cuda",
                            "what": f"rank 0 of {world_size} simulated, one step at global batch {batch:,}"},
                  peak_bytes=max((p["peak_bytes"] for p in phases.values()), default=0))
    if memory_cap is not None:
        result["fits_cap"] = result["oom"] is None and result["peak_bytes"] <= memory_cap
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _start_snapshot(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        return True
    except Exception:  # private API: absent or changed in this torch; the report says so
        return False


def _dump_snapshot(path: Path) -> str | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return str(path)
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            torch.cuda.memory._record_memory_history(enabled=None)


def simulated_plan_inputs(plan_inputs: Any, result: dict[str, Any]) -> Any:
    """The plan's inputs changed to what :func:`measure_simulated` runs: 16-bit (or fp32) weights,
    ZeRO-1-like states, no engine buffers, the measured tower costs and the loss it used."""
    from vlscale.memory.towers import chunk_cost

    costs = result["tower_costs"]
    per_row, fixed = chunk_cost(costs, min(plan_inputs.chunk, result["local_rows"]))
    spec = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(result["dtype"], "fp32")
    return dataclasses.replace(
        plan_inputs, zero_stage=1, states_precision=spec, engine_buffer_bytes=0.0, zero3_live_params=None,
        step_transient_bytes=4.0 * -(-plan_inputs.params // result["world_size"]),  # ShardedAdam's fp32 partition
        act_bytes_per_pair=sum(c["per_row"] for c in costs.values()),
        chunk_act_bytes_per_row=per_row, act_fixed_bytes=fixed,
        nograd_act_bytes_per_row=max(c["nograd_per_row"] for c in costs.values()),
        act_source="measured on this device (two chunk sizes, fitted)",
        fused_impl=result["loss_impl"] if result["loss_impl"] in FUSED_IMPLS else "chunked",
        # run_rank_step keeps the gradient buffers between steps (zeroed, not freed).
        grads_copied=False, grads_persistent=True,
        notes=[*plan_inputs.notes, "simulated rank: 16-bit (or fp32) weights with ShardedAdam (ZeRO-1-like "
               f"states: full gradients, 1/{result['world_size']} of the fp32 master + moments), no DeepSpeed "
               "buckets, inputs generated per chunk"])


def cap_note(result: dict[str, Any]) -> str:
    cap = result.get("memory_cap_bytes")
    if cap is None:
        return ""
    state = "enforced with torch.cuda.set_per_process_memory_fraction" if result["cap_enforced"] else \
        "not enforced (CUDA only)"
    fits = "fits" if result.get("fits_cap") else "does NOT fit"
    return f"Memory cap {cap / GIB:.2f} GiB {state}: {fits} (measured peak {result['peak_bytes'] / GIB:.2f} GiB)."
