"""The typed run config: recipes, overrides, validation errors, the DeepSpeed JSON and its checks."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from vlscale.config import (
    Config,
    TrainConfig,
    config_to_dict,
    load_config,
    load_recipe,
    save_config,
)
from vlscale.demo_data import COLORS, HORIZONTAL, PREFIXES, SHAPES, VERTICAL
from vlscale.train.dsconfig import resolve_batch, to_deepspeed_config
from vlscale.train.launchers import resolve_launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny-cpu", "zerovl-v100", "fsdp2"])
def test_named_recipes_load_and_roundtrip(name: str, tmp_path: Path) -> None:
    cfg = load_recipe(name)
    assert cfg.recipe == name
    path = save_config(cfg, tmp_path / "config.json")
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)


def test_zerovl_recipe_matches_the_paper_setup() -> None:
    cfg = load_recipe("zerovl-v100")
    assert (cfg.model.vision_model, cfg.model.text_model) == ("vit_base_patch16_224", "bert-base-uncased")
    assert (cfg.train.precision, cfg.engine.kind, cfg.engine.zero_stage) == ("fp16", "deepspeed", 2)
    assert cfg.gradcache.enabled and cfg.gradcache.chunk_size == 256
    assert not cfg.model.learn_logit_scale and cfg.techniques.mixup and cfg.data.debiased
    ds = to_deepspeed_config(cfg, world_size=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (16384, 2048)
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2


def test_fsdp2_recipe() -> None:
    cfg = load_recipe("fsdp2")
    assert cfg.engine.kind == "fsdp" and cfg.train.precision == "bf16" and cfg.model.grad_checkpointing


def test_overrides_are_typed() -> None:
    cfg = load_recipe("tiny-cpu", ["train.lr=3e-4", "train.steps=7", "train.tensorboard=false",
                                   "eval.ks=1,3", "model.vision_kwargs={\"depth\": 2}", "model.image_size=48"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.steps == 7 and cfg.train.tensorboard is False
    assert cfg.eval.ks == [1, 3] and cfg.model.vision_kwargs == {"depth": 2} and cfg.model.image_size == 48


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown key 'train.lrr'; did you mean lr"),
        ("trian.lr=1", "unknown key 'trian'; did you mean train"),
        ("train.lr", "must look like section.key=value"),
        ("train.lr=fast", "train.lr='fast' must be float"),
        ("train.steps=2.5", "train.steps=2.5 must be an integer"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("train.precision=fp8", "not one of ['fp32', 'fp16', 'bf16']"),
        ("train.tensorboard=maybe", "must be a boolean"),
        ("engine.zero_stage=4", "engine.zero_stage must be 0..3"),
        ("train.grad_accum_steps=2", "train.grad_accum_steps must be 1"),
        ("model.embed_dim=0", "embed_dim must be a positive int"),
    ],
)
def test_bad_overrides_raise_clear_errors(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_recipe("tiny-cpu", [override])


def test_inconsistent_sections_are_rejected() -> None:
    with pytest.raises(ValueError, match="fp16 needs dynamic loss scaling"):
        load_recipe("tiny-cpu", ["engine.kind=local", "engine.zero_stage=0", "train.precision=fp16"])
    with pytest.raises(ValueError, match="only apply to kind='deepspeed'"):
        load_recipe("tiny-cpu", ["engine.kind=local"])  # the recipe's zero_stage=2 left behind
    with pytest.raises(ValueError, match="no recipe 'nope'"):
        load_recipe("nope")


def test_batch_arithmetic() -> None:
    assert resolve_batch(TrainConfig(global_batch_size=96), 3) == (32, 1, 96)
    assert resolve_batch(TrainConfig(global_batch_size=96, micro_batch_size=48), 2) == (48, 1, 96)
    with pytest.raises(ValueError, match=r"global_batch_size=100 must equal .* world size \(3\) = 99"):
        resolve_batch(TrainConfig(global_batch_size=100), 3)
    with pytest.raises(ValueError, match="batch arithmetic"):
        resolve_batch(TrainConfig(global_batch_size=96, micro_batch_size=40), 2)
    with pytest.raises(ValueError, match="batch arithmetic"):
        resolve_batch(TrainConfig(global_batch_size=2), 4)  # fewer pairs than ranks


def test_generated_deepspeed_config() -> None:
    cfg = load_recipe("tiny-cpu", ["train.global_batch_size=64", "train.grad_clip=0.5"])
    ds = to_deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_clipping"]) == (32, 0.5)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"]
    assert not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    with pytest.raises(ValueError, match="batch arithmetic"):
        to_deepspeed_config(cfg, world_size=3)


def _user_config(tmp_path: Path, body: dict) -> Config:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    return load_recipe("tiny-cpu", ["train.global_batch_size=64", f"engine.ds_config={path}"])


def test_user_deepspeed_config_is_completed(tmp_path: Path) -> None:
    cfg = _user_config(tmp_path, {"train_batch_size": "auto", "zero_optimization": {"stage": 2, "reduce_bucket_size": 12345},
                                  "communication_data_type": "fp32"})
    ds = to_deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 12345 and ds["communication_data_type"] == "fp32"
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (64, 32)


def test_user_deepspeed_config_wins_with_one_line_per_conflict(tmp_path: Path) -> None:
    """The user's ds_config wins for what it sets (stage, precision, clipping, batch, buckets); the
    recipe fills the rest; each change is one line naming both sides."""
    cfg = _user_config(tmp_path, {"train_batch_size": 128, "gradient_clipping": 0.3, "fp16": {"enabled": True},
                                  "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e8}})
    spec = resolve_launch(cfg, environ={}, world_size=2)
    c, ds, label = spec.config, spec.ds_config, f"ds_config {cfg.engine.ds_config}"
    assert (c.engine.zero_stage, c.train.precision, c.train.grad_clip, c.train.global_batch_size) == (3, "fp16", 0.3, 128)
    assert (ds["zero_optimization"]["stage"], ds["zero_optimization"]["stage3_max_live_parameters"]) == (3, 1e8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["fp16"]["loss_scale"]) == (128, 64, 0)
    assert sorted(spec.conflicts) == sorted([
        f"engine.zero_stage: 3 from {label} overrides 2 from the recipe tiny-cpu",
        f"train.global_batch_size: 128 from {label} overrides 64 from the recipe tiny-cpu",
        f"train.grad_clip: 0.3 from {label} overrides 1.0 from the recipe tiny-cpu",
        f"train.precision: 'fp16' from {label} overrides 'fp32' from the recipe tiny-cpu",
    ])
    assert to_deepspeed_config(cfg, world_size=2) == ds  # the re-export gives the same JSON
    # Explicitly off: fp32 even where the recipe trains in fp16.
    path = tmp_path / "off.json"
    path.write_text('{"fp16": {"enabled": false}, "train_micro_batch_size_per_gpu": 512}')
    spec = resolve_launch(load_recipe("zerovl-v100", [f"engine.ds_config={path}"]), environ={}, world_size=8)
    assert (spec.config.train.precision, spec.config.train.global_batch_size) == ("fp32", 4096)


def test_user_deepspeed_config_older_bfloat16_key(tmp_path: Path) -> None:
    """DeepSpeed still accepts its older "bfloat16" block: it must set train.precision too (else the
    engine would run bf16 while the trainer believes fp32); both names at once is an error."""
    spec = resolve_launch(_user_config(tmp_path, {"bfloat16": {"enabled": True}}), environ={}, world_size=2)
    assert spec.config.train.precision == "bf16" and spec.ds_config["bf16"]["enabled"] is True
    assert "bfloat16" not in spec.ds_config
    with pytest.raises(ValueError, match="older name 'bfloat16'"):
        resolve_launch(_user_config(tmp_path, {"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}),
                       environ={}, world_size=2)


def test_user_deepspeed_optimizer_and_scheduler_blocks_are_honoured(tmp_path: Path) -> None:
    cfg = _user_config(tmp_path, {
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": "auto", "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 7, "total_num_steps": "auto"}}})
    spec = resolve_launch(cfg, environ={}, world_size=2)
    t = spec.config.train
    assert (t.lr, t.beta1, t.beta2, t.eps, t.weight_decay, t.warmup_steps) == (2e-4, 0.9, 0.95, 1e-6, 0.1, 7)
    assert "optimizer" not in spec.ds_config  # applied to the client torch AdamW instead
    assert spec.ds_scheduler and spec.ds_config["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "warmup_num_steps": 7, "total_num_steps": t.steps, "warmup_min_ratio": 0.0, "warmup_type": "linear",
        "cos_min_ratio": t.min_lr_ratio}}
    assert any(line.startswith("train.lr: 0.0002 from ds_config") for line in spec.conflicts)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, "optimizer {'type': 'Lamb'"),
        ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "cannot be honoured: vlscale trains with torch AdamW"),
        ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, "optimizer params ['amsgrad'] cannot be honoured"),
        ({"scheduler": {"type": "Cosine"}}, "scheduler type 'Cosine' is not one of DeepSpeed's"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 cannot be honoured"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param device=cpu needs ZeRO stage 3"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": True},
         "zero_force_ds_cpu_optimizer=true cannot be honoured"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16 and bf16 are both enabled"),
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16}, "train_batch_size=64 != train_micro_batch_size"),
    ],
)
def test_user_deepspeed_config_what_cannot_be_honoured(tmp_path: Path, body: dict, message: str) -> None:
    cfg = _user_config(tmp_path, body)
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_launch(cfg, environ={}, world_size=2)


def test_zero_offload_with_the_client_optimizer(tmp_path: Path) -> None:
    """ZeRO-Offload refuses a client optimizer unless zero_force_ds_cpu_optimizer is false: set it."""
    cfg = _user_config(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                        "offload_param": {"device": "cpu"}}})
    spec = resolve_launch(cfg, environ={}, world_size=2)
    assert spec.ds_config["zero_force_ds_cpu_optimizer"] is False
    assert (spec.summary()["offload_optimizer"], spec.summary()["offload_param"]) == ("cpu", "cpu")
    assert spec.summary()["sources"]["offload_param"] == f"ds_config {cfg.engine.ds_config}"


def test_user_deepspeed_config_missing_or_broken(tmp_path: Path) -> None:
    cfg = load_recipe("tiny-cpu", [f"engine.ds_config={tmp_path / 'missing.json'}"])
    with pytest.raises(ValueError, match="no such file"):
        to_deepspeed_config(cfg, world_size=2)
    (tmp_path / "bad.json").write_text("{not json")
    cfg = load_recipe("tiny-cpu", [f"engine.ds_config={tmp_path / 'bad.json'}"])
    with pytest.raises(ValueError, match="not valid JSON"):
        to_deepspeed_config(cfg, world_size=2)


def test_tiny_recipe_vocabulary_covers_the_demo_captions() -> None:
    """Every word the demo's caption templates can produce has its own token (no char fallback)."""
    from vlscale.model.tokenizer import build_tokenizer

    words = set(COLORS) | set(SHAPES)
    for template in (*VERTICAL, *HORIZONTAL, *PREFIXES):
        words |= set(re.sub(r"\{\w\}", " ", template).split())
    tok = build_tokenizer(load_recipe("tiny-cpu").model)
    assert {w: tok.tokenize(w) for w in words} == {w: [w] for w in words}


def test_cli_print_config_and_errors() -> None:
    from vlscale.train.cli import main

    assert main(["--recipe", "tiny-cpu", "train.lr=1e-2", "--print-config"]) == 0
    assert main(["--recipe", "tiny-cpu", "train.nope=1"]) == 2


@pytest.mark.parametrize("script", ["deepspeed.sh", "torchrun.sh"])
def test_launcher_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], check=True)


def test_recipe_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('description = "a user recipe"\n[train]\nlr = 0.002\nsteps = 9\n[engine]\nkind = "local"\n'
                    '[model]\nembed_dim = 32\n')
    cfg = load_recipe(str(path), ["train.steps=11"])
    assert (cfg.train.lr, cfg.train.steps, cfg.engine.kind, cfg.model.embed_dim) == (0.002, 11, "local", 32)
    path.write_text("[train]\nlr = 0.002\n[nonsense]\nx = 1\n")
    with pytest.raises(ValueError, match="unknown key 'nonsense'"):
        load_recipe(str(path))


def test_reduce_bucket_is_capped_at_the_model_unless_the_user_sets_it() -> None:
    """DeepSpeed allocates reduce_bucket_size elements whatever the model's size: vlscale caps an
    unset (or "auto") bucket at the trainable parameter count; a user's value and stage 0 are left."""
    from vlscale.train.deepspeed_json import reduce_bucket, with_reduce_bucket

    zero2 = {"zero_optimization": {"stage": 2}}
    assert reduce_bucket(zero2, 5_070_000) == 5_070_000
    assert reduce_bucket(zero2, 10**10) == 500_000_000
    assert reduce_bucket({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, 123) == 123
    assert reduce_bucket({"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345}}, 10**9) is None
    assert reduce_bucket({"zero_optimization": {"stage": 0}}, 10**6) is None
    capped = with_reduce_bucket(zero2, 777)
    assert capped["zero_optimization"]["reduce_bucket_size"] == 777 and "reduce_bucket_size" not in zero2["zero_optimization"]
