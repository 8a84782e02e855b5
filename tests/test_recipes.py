"""The technique recipes: the full-size ones load, validate and cite a source for their settings; the
tiny ones (``zerovl``, ``brivl``, ``vicha``) run a few steps under ``deepspeed --num_gpus 2`` (gloo on
CPU, ZeRO-2, gradient cache, distributed loss) with their techniques switched on and logged."""

from __future__ import annotations

import json
import math
import socket
import subprocess
from pathlib import Path

import pytest

from vlscale.config import config_from_dict, load_recipe, recipe_path

TECHNIQUE_METRICS = {
    "zerovl": ["loss/contrastive", "mixup/lam"],
    "brivl": ["loss/momentum_i2t", "loss/momentum_t2i"],
    "vicha": ["loss/momentum", "loss/loss_hier0", "chunk_loss"],
}


@pytest.mark.parametrize("name", ["zerovl-v100", "brivl-v100", "vicha-v100", "zerovl", "brivl", "vicha"])
def test_technique_recipes_load(name: str) -> None:
    cfg = load_recipe(name)
    raw = json.loads(recipe_path(name).read_text())
    if name.endswith("-v100"):
        # Every technique setting says where it comes from (paper section or official file).
        assert all(f"techniques.{k}" in raw["sources"] for k in raw["techniques"]), name
        assert cfg.train.precision == "fp16" and cfg.engine.kind == "deepspeed"


def test_recipe_sources_must_name_real_fields() -> None:
    raw = json.loads(recipe_path("brivl-v100").read_text())
    assert raw["sources"]["techniques.momentum_queue"].endswith("QUEUE_SIZE 9600")
    raw["sources"]["techniques.queue"] = "a stale citation"
    with pytest.raises(ValueError, match=r"techniques\.queue"):
        config_from_dict(raw)


def test_paper_settings_of_the_full_recipes() -> None:
    brivl, vicha = load_recipe("brivl-v100"), load_recipe("vicha-v100")
    assert (brivl.techniques.momentum_queue, brivl.techniques.momentum) == (9600, 0.99)
    assert brivl.techniques.momentum_candidates == "positive_queue" and brivl.techniques.contrastive_weight == 0
    assert (brivl.model.freeze_image_layers, brivl.model.freeze_text_layers) == (3, 8)
    assert math.isclose(math.exp(brivl.model.init_logit_scale), 1 / 0.07) and not brivl.model.learn_logit_scale
    assert vicha.model.hier_image_layers == vicha.model.hier_text_layers == (-6, -5, -4, -3, -2)
    assert vicha.techniques.hier_weight == [0.1] * 5 and vicha.techniques.concept_mode == "image_tokens"
    assert (vicha.techniques.mim_weight, vicha.techniques.mim_mask_ratio) == (1.0, 0.75)
    assert (vicha.techniques.momentum_queue, vicha.techniques.momentum) == (65536, 0.995)


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlscale.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("shards"), n_train=32, n_eval=4, size=32)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", ["zerovl", "brivl", "vicha"])
def test_tiny_recipe_under_the_deepspeed_launcher(name: str, shards: dict[str, Path], tmp_path: Path) -> None:
    from vlscale.demo import child_env, launch_command

    run = tmp_path / "run"
    args = ["--recipe", name, f"train.run_dir={run}", f"data.train_shards={shards['train']}",
            f"data.eval_shards={shards['eval']}", "data.num_workers=0",
            "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 2, \"num_heads\": 2}",
            "model.text_config={\"num_hidden_layers\": 2, \"hidden_size\": 32, \"num_attention_heads\": 2, "
            "\"intermediate_size\": 64}", "model.embed_dim=16", "train.global_batch_size=12",
            "gradcache.chunk_size=4", "train.steps=2", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=2", "train.progress=false", "train.tensorboard=false", "eval.batch_size=10"]
    log = tmp_path / "launch.log"
    with log.open("w") as fh:
        proc = subprocess.run(launch_command("deepspeed", 2, _port(), args), env=child_env(2), stdout=fh,
                              stderr=subprocess.STDOUT, timeout=420)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{log.read_text()[-4000:]}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    for key in TECHNIQUE_METRICS[name]:
        assert key in steps[-1], (name, key, sorted(steps[-1]))
    assert any(r.get("eval/n_images") == 4 for r in records)  # evaluation ran (ViCHA: with the concepts)
    ckpt = run / "checkpoints" / "step_000002"
    if name != "zerovl":  # the momentum EMA and queues are checkpointed once, by rank 0
        import torch

        rank0 = torch.load(ckpt / "rank00000.pt", weights_only=False)["trainer"]["objective"]["momentum"]
        rank1 = torch.load(ckpt / "rank00001.pt", weights_only=False)["trainer"]["objective"]["momentum"]
        assert isinstance(rank0, dict) and int(rank0["queue_filled"]) == 24 and rank1 == "rank0"
