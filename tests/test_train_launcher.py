"""Two ranks under the real DeepSpeed launcher (``deepspeed --num_gpus 2 --module vlscale.train``, gloo on
CPU): ZeRO-2, gradient cache, distributed loss, evaluation on rank 0, DeepSpeed checkpoints — and
resuming from DeepSpeed's checkpoint of step 2 reproduces step 3's loss of the uninterrupted run.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from vlscale.demo import child_env, launch_command
from vlscale.demo_data import build_demo_dataset


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _overrides(shards: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        "--recipe", "tiny-cpu", f"train.run_dir={run}", f"data.train_shards={shards['train']}",
        f"data.eval_shards={shards['eval']}", "data.num_workers=0",
        "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
        "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 64}",
        "model.embed_dim=16", "train.global_batch_size=12", "gradcache.chunk_size=4", "train.steps=3",
        "train.warmup_steps=1", "train.lr=3e-3", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "train.keep_checkpoints=3", "eval.batch_size=10", *extra,
    ]


def _launch(args: list[str], log: Path) -> None:
    cmd = launch_command("deepspeed", 2, _port(), args)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=child_env(2), stdout=fh, stderr=subprocess.STDOUT, timeout=420)
    assert proc.returncode == 0, f"launcher failed ({proc.returncode}):\n{log.read_text()[-4000:]}"


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_launcher_zero2_two_ranks_and_exact_resume(tmp_path: Path) -> None:
    shards = build_demo_dataset(tmp_path / "shards", n_train=40, n_eval=4, size=32)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _launch(_overrides(shards, full, "train.ckpt_every=2", "train.eval_every=3"), tmp_path / "full.log")

    ds = json.loads((full / "ds_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["zero_optimization"]["stage"]) == (12, 6, 2)
    losses = _losses(full)
    assert sorted(losses) == [1, 2, 3]
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("eval/n_images") == 4 for r in records)  # rank 0 evaluated the held-out shards
    ckpt = full / "checkpoints" / "step_000002"
    assert {"rank00000.pt", "rank00001.pt", "model.pt", "config.json"} <= {p.name for p in ckpt.iterdir()}
    engine_files = {p.name for p in (ckpt / "engine").rglob("*.pt")}
    assert any("optim_states" in name for name in engine_files), engine_files  # ZeRO-2 partitions
    assert len(json.loads((full / "memory.json").read_text())["ranks"]) == 2

    _launch(_overrides(shards, resumed, "--resume", str(ckpt)), tmp_path / "resumed.log")
    again = _losses(resumed)
    assert sorted(again) == [3]
    assert again[3] == losses[3], f"resumed step 3 loss {again[3]!r} != uninterrupted {losses[3]!r}"
