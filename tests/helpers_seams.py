"""Workers and data of ``test_seams.py``: the parts built in parallel, run together.

* :func:`corrupt_debiased_shards` — two sources (``a``: 61 rows, ``b``: 45 + an extra shard of 6
  whose first 4 images are truncated): under debiased sampling on 2 ranks with global batch 12,
  rank 0's step 7 comes out short (the skipped samples outnumber its spares);
* :func:`two_rank_worker` — a whole 2-rank Trainer run (local engine, gloo) of the zerovl recipe
  with momentum contrast on those shards; it records each rank's batch keys and mixup partners per
  step, then calls ``Trainer._even`` with a 0-row batch on one rank;
* :func:`engine_worker` — run as a script (DeepSpeed cannot be set up again in a process whose
  group was destroyed): the vicha recipe with mixup and a frozen text layer, started from one
  local checkpoint (``train.init_from``) under ``accelerate launch`` settings for DeepSpeed ZeRO-2
  and ZeRO-3 with bf16.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TEXT = ('model.text_config={"num_hidden_layers": %d, "hidden_size": 32, "num_attention_heads": 2, '
        '"intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}')
SMALL = ["data.eval_shards=", "data.num_workers=0", "model.drop_path_rate=0.0", "model.embed_dim=16",
         "train.warmup_steps=1", "train.lr=3e-3", "train.log_every=1", "train.progress=false",
         "train.tensorboard=false", "train.keep_checkpoints=4"]
LOCAL = ["engine.kind=local", "engine.zero_stage=0"]


def corrupt_debiased_shards(out: Path) -> Path:
    import pyarrow as pa

    from vlscale.data.schema import schema_with_metadata
    from vlscale.data.synthetic import synthetic_image, write_synthetic_shards

    write_synthetic_shards(out, {"a": 61, "b": 45}, rows_per_batch=6, image_size=(8, 8))
    rng = np.random.default_rng(0)
    rows = {"key": [f"b-x{i}" for i in range(6)], "image": [synthetic_image(rng, (8, 8)) for _ in range(6)],
            "caption": ["a photo of b"] * 6, "source": ["b"] * 6, "concepts": [None] * 6}
    for i in range(4):
        rows["image"][i] = rows["image"][i][:30]  # truncated: undecodable
    table = pa.Table.from_pydict(rows, schema=schema_with_metadata({"b": 6}))
    with pa.OSFile(str(out / "b-extra.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return out


def zerovl_overrides(shards: str, run: Path, *extra: str) -> list[str]:
    """The zerovl recipe (debiased sampling, mixup, caption masking) + momentum contrast, shrunk."""
    return [*LOCAL, f"train.run_dir={run}", f"data.train_shards={shards}", *SMALL, "model.image_size=32",
            'model.vision_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}', TEXT % 1,
            "train.global_batch_size=12", "gradcache.chunk_size=4", "train.steps=7", "train.ckpt_every=4",
            "techniques.momentum_queue=16", *extra]


def record_steps(trainer: Any, out: list[dict]) -> None:
    """Wrap ``trainer._train_step``: each step's batch keys / sources and its mixup partners."""
    step, prepare = trainer._train_step, trainer.objective.prepare

    def prepared(i: int, batch: Any, inputs: dict) -> dict:
        inputs = prepare(i, batch, inputs)
        plan = trainer.objective.plan
        out[-1]["partners"] = plan.labels_b.tolist() if plan is not None and plan.mode != "none" else None
        return inputs

    def recording(batch: Any) -> dict:
        out.append({"keys": list(batch.keys), "source": sorted(set(batch.source))})
        return step(batch)

    trainer.objective.prepare = prepared
    trainer._train_step = recording


def two_rank_worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res: dict[str, Any] = {}
    try:
        from vlscale.config import load_recipe
        from vlscale.data import Batch
        from vlscale.train.trainer import Trainer

        trainer = Trainer(load_recipe("zerovl", zerovl_overrides(shards, Path(out) / "run")))
        steps: list[dict] = []
        record_steps(trainer, steps)
        try:
            res["summary"] = trainer.fit()
            res["steps"] = steps
            # A step where one rank has no rows at all is skipped by every rank, the rest counted.
            n = 0 if rank == 0 else 4
            empty = Batch(pixels=torch.zeros(n, 3, 32, 32), tokens=torch.zeros(n, 16, dtype=torch.long),
                          attention_mask=torch.zeros(n, 16, dtype=torch.long), source=["a"] * n,
                          keys=[str(i) for i in range(n)], captions=[""] * n)
            before = trainer.counters["trimmed_samples"]
            res["empty_step"] = [trainer._even(empty) is None, trainer.counters["trimmed_samples"] - before]
        finally:
            trainer.close()
    except Exception:
        res["error"] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()
        dist.destroy_process_group()


# -- DeepSpeed under accelerate's settings (one process, run as a script) ----------------------------
ACCELERATE = {2: ["--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "bf16", "--num_processes", "1"],
              3: ["--use_deepspeed", "--zero_stage", "3", "--mixed_precision", "bf16", "--num_processes", "1"]}


def vicha_overrides(shards: str, run: Path, *extra: str) -> list[str]:
    """The vicha recipe (concept tokens, hierarchy, MIM, momentum) + mixup + a frozen text layer, shrunk."""
    return [f"train.run_dir={run}", f"data.train_shards={shards}", *SMALL,
            'model.vision_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}', TEXT % 2,
            "model.mim_decoder_width=32", "train.global_batch_size=8", "gradcache.chunk_size=3",
            "techniques.momentum_queue=16", "techniques.mixup=true", "model.freeze_text_layers=1", *extra]


def _as_trained(value: torch.Tensor, trainer: Any, name: str) -> torch.Tensor:
    """A loaded weight as the run holds it: a frozen parameter has no fp32 master under DeepSpeed,
    only the bf16 working copy (trainable ones keep their exact fp32 value as the master)."""
    frozen = not dict(trainer.model.named_parameters())[name].requires_grad
    return value.to(torch.bfloat16).float() if frozen else value


def engine_worker(shards: str, tmp: str, out: str) -> None:
    """A local fp32 checkpoint (1 step), then 2 steps from its weights under ZeRO-2 and ZeRO-3 (bf16,
    set the way ``accelerate launch`` sets them): the engine each ran, its losses, and whether the
    momentum EMA started at the loaded weights (the masters: exact for the trained parameters)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_launchers import accelerate_env

    from vlscale.config import load_recipe
    from vlscale.train.checkpoint import load_model_weights
    from vlscale.train.launchers import resolve_launch
    from vlscale.train.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # the trainers share it (they do not own it)
    res: dict[str, Any] = {}
    try:
        init = Path(tmp) / "init"
        cfg = load_recipe("vicha", vicha_overrides(shards, init, *LOCAL, "train.steps=1"))
        trainer = Trainer(cfg, spec=resolve_launch(cfg, environ={}, world_size=1))
        trainer.fit()
        trainer.close()
        weights = load_model_weights(init)
        for stage, argv in ACCELERATE.items():
            cfg = load_recipe("vicha", vicha_overrides(shards, Path(tmp) / f"z{stage}", f"train.init_from={init}",
                                                       "train.steps=2"))
            spec = resolve_launch(cfg, environ=accelerate_env(argv, world=1), world_size=1)
            trainer = Trainer(cfg, spec=spec)
            try:
                ema = dict(trainer.objective.momentum.ema.named_parameters())
                raw = trainer.engine.raw
                res[f"z{stage}"] = {
                    "engine": [raw.zero_optimization_stage(), raw.bfloat16_enabled()],
                    "ema_is_init": all(torch.equal(v, _as_trained(weights[k], trainer, k)) for k, v in ema.items()),
                    "losses": trainer.fit()["losses"]}
            finally:
                trainer.close()
    except Exception:
        res["error"] = traceback.format_exc()
    finally:
        Path(out).write_text(json.dumps(res))
        dist.destroy_process_group()
