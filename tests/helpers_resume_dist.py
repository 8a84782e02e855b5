"""Spawned 2-rank workers for tests/test_train_resume_dist.py: whole FSDP2 training runs through the Trainer.

One process group serves every run (start-up is the expensive part here): an uninterrupted run
with a checkpoint at step 2, its resume, a resume whose FSDP2 load is deliberately broken, and a
dropout-free run that records each rank's batches for the 1-rank comparison. Rank 0 writes the
losses as JSON.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TEXT = ("model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 64, \"hidden_dropout_prob\": %s, \"attention_probs_dropout_prob\": %s}")


def overrides(shards: str, run: Path, engine: str, *extra: str, dropout: float = 0.2) -> list[str]:
    return [
        f"engine.kind={engine}", "engine.zero_stage=0", f"train.run_dir={run}", f"data.train_shards={shards}",
        "data.eval_shards=", "data.num_workers=0",
        "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
        TEXT % (dropout, dropout), f"model.drop_path_rate={dropout}", "model.embed_dim=16",
        "train.global_batch_size=8", "gradcache.chunk_size=3", "train.warmup_steps=1", "train.lr=3e-3",
        "train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.keep_checkpoints=4",
        "train.steps=4", *extra,
    ]


def run(cfg_overrides: list[str], *, resume: str | None = None, record: list | None = None) -> dict[int, float]:
    from vlscale.config import load_recipe
    from vlscale.train.trainer import Trainer

    trainer = Trainer(load_recipe("tiny-cpu", cfg_overrides), resume=resume)
    if record is not None:
        step = trainer._train_step

        def recording(batch: Any) -> dict[str, float]:
            record.append({"pixels": batch.pixels.clone(), "tokens": batch.tokens.clone(),
                           "attention_mask": batch.attention_mask.clone(), "keys": list(batch.keys)})
            return step(batch)

        trainer._train_step = recording
    try:
        return trainer.fit()["losses"]
    finally:
        trainer.close()


def broken_fsdp_load(engine: Any, optimizer: Any, scheduler: Any, path: Path) -> None:
    """The FSDP2 load minus the optimizer state: what the test must catch."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict

    model_sd, optim_sd = get_state_dict(engine.module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "engine"))
    set_model_state_dict(engine.module, state["model"])  # the optimizer's moments are never restored


def fsdp_worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root, results = Path(out), {}
    try:
        from vlscale.train import checkpoint as ckpt

        results["full"] = run(overrides(shards, root / "full", "fsdp", "train.ckpt_every=2"))
        step2 = str(root / "full" / "checkpoints" / "step_000002")
        results["resumed"] = run(overrides(shards, root / "resumed", "fsdp"), resume=step2)
        good = ckpt._load_engine
        ckpt._load_engine = lambda engine, opt, sched, path: (
            broken_fsdp_load(engine, opt, sched, path) if engine.kind == "fsdp" else good(engine, opt, sched, path))
        try:
            results["broken"] = run(overrides(shards, root / "broken", "fsdp"), resume=step2)
        finally:
            ckpt._load_engine = good
        batches: list = []
        results["nodrop"] = run(overrides(shards, root / "nodrop", "fsdp", "train.ckpt_every=2", "train.steps=5",
                                          dropout=0.0), record=batches)
        torch.save(batches, root / f"batches_rank{rank}.pt")
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0 or "error" in results:
            (root / ("losses.json" if rank == 0 else f"error_rank{rank}.json")).write_text(json.dumps(results))
        dist.barrier()
        dist.destroy_process_group()
