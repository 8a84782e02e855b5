"""Launch resolution in-process: what `accelerate launch` / `deepspeed` / `torchrun` ask for, and what runs.

The environment each test resolves is the one accelerate's own launcher code exports for the
worker processes (its argument parser, ``_validate_launch_command`` and ``prepare_*_env``), plus the
variables torchrun adds — so the flags and YAML answers are the users', not hand-written variables.
The launched end-to-end runs are in ``test_train_launcher.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vlscale.config import load_recipe
from vlscale.train.launchers import detect_launcher, resolve_launch

ROOT = Path(__file__).resolve().parents[1]
WORKER = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
          "TORCHELASTIC_RUN_ID": "none"}


def accelerate_env(argv: list[str], world: int = 2) -> dict[str, str]:
    """The environment a worker of ``accelerate launch <argv> -m vlscale.train`` sees (launcher's part)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args([*argv, "-m", "vlscale.train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config if defaults else [])
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
        return {k: v for k, v in env.items() if os.environ.get(k) != v}  # one process: no worker variables
    return {**{k: v for k, v in env.items() if os.environ.get(k) != v}, **WORKER, "WORLD_SIZE": str(world)}


def tiny(*extra: str):
    return load_recipe("tiny-cpu", ["train.global_batch_size=12", *extra])


def test_detect_launcher() -> None:
    assert detect_launcher({}) == "plain"
    assert detect_launcher({"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}) == "torchrun"
    assert detect_launcher({"WORLD_SIZE": "2", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}) == "deepspeed"
    assert detect_launcher({"WORLD_SIZE": "2"}) == "env"
    assert detect_launcher(accelerate_env(["--num_processes", "2", "--use_deepspeed"])) == "accelerate"
    assert detect_launcher(accelerate_env(["--multi_gpu", "--num_processes", "2"])) == "accelerate"


def test_accelerate_deepspeed_flags_win_with_one_line_per_conflict() -> None:
    env = accelerate_env(["--num_processes", "2", "--use_deepspeed", "--zero_stage", "3", "--offload_optimizer_device",
                          "cpu", "--offload_param_device", "cpu", "--gradient_clipping", "0.5", "--mixed_precision",
                          "bf16", "--zero3_init_flag", "false"])
    spec = resolve_launch(tiny(), environ=env)
    cfg, ds = spec.config, spec.ds_config
    assert (spec.launcher, spec.kind, cfg.engine.zero_stage, cfg.train.precision, cfg.train.grad_clip) == (
        "accelerate", "deepspeed", 3, "bf16", 0.5)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["gradient_clipping"] == 0.5
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 6
    assert spec.zero3_init is False
    assert sorted(spec.conflicts) == [
        "engine.zero_stage: 3 from accelerate zero_stage overrides 2 from the recipe tiny-cpu",
        "train.grad_clip: 0.5 from accelerate gradient_clipping overrides 1.0 from the recipe tiny-cpu",
        "train.precision: 'bf16' from accelerate mixed_precision overrides 'fp32' from the recipe tiny-cpu",
    ]
    summary = spec.summary()
    assert (summary["offload_optimizer"], summary["offload_param"], summary["world_size"]) == ("cpu", "cpu", 2)
    assert summary["sources"]["offload_param"] == "accelerate offload_param_device"
    assert summary["sources"]["zero3_init"] == "accelerate zero3_init_flag"
    assert summary["sources"]["train.lr"] == "recipe tiny-cpu"
    assert "ZeRO-3 (offload optimizer=cpu, param=cpu), bf16, world size 2" in spec.headline()


def test_accelerate_without_flags_keeps_the_recipe_and_fills_a_non_deepspeed_recipe() -> None:
    spec = resolve_launch(tiny(), environ=accelerate_env(["--num_processes", "2", "--use_deepspeed"]))
    assert (spec.config.engine.zero_stage, spec.conflicts) == (2, [])  # accelerate's defaults are not statements
    spec = resolve_launch(tiny("engine.kind=local", "engine.zero_stage=0"),
                          environ=accelerate_env(["--num_processes", "2", "--use_deepspeed"]))
    assert (spec.kind, spec.config.engine.zero_stage) == ("deepspeed", 2)
    assert spec.sources["engine.zero_stage"] == "accelerate zero_stage (its default)"


TINY_CPU_ANSWERS = ["--num_processes", "2", "--use_deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "none",
                    "--offload_param_device", "none", "--gradient_clipping", "1.0", "--mixed_precision", "no"]


@pytest.mark.parametrize(("argv", "recipe", "world"), [
    (["--config_file", str(ROOT / "launch" / "accelerate" / "zerovl-v100.yaml")], "zerovl-v100", 8),
    (["--config_file", str(ROOT / "launch" / "accelerate" / "fsdp2.yaml")], "fsdp2", 8),
    (TINY_CPU_ANSWERS, "tiny-cpu", 2)])
def test_readme_accelerate_answers_reproduce_their_recipes(argv: list[str], recipe: str, world: int) -> None:
    env = accelerate_env(argv, world=world)
    cfg = load_recipe(recipe)
    spec = resolve_launch(cfg, environ=env)
    assert spec.conflicts == [], spec.conflicts
    assert (spec.kind, spec.config.train.precision) == (cfg.engine.kind, cfg.train.precision)
    if spec.kind == "deepspeed":
        assert spec.ds_config["zero_optimization"]["stage"] == cfg.engine.zero_stage
        assert spec.ds_config["fp16"]["enabled"] == (cfg.train.precision == "fp16")
    else:
        assert spec.fsdp.reshard_after_forward and not spec.fsdp.offload_params
        assert spec.config.model.grad_checkpointing


def test_accelerate_deepspeed_config_file_wins(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7, "stage3_prefetch_bucket_size": '
                    '"auto"}, "fp16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto"}')
    env = accelerate_env(["--num_processes", "2", "--use_deepspeed", "--deepspeed_config_file", str(path),
                          "--mixed_precision", "fp16"])
    spec = resolve_launch(tiny(), environ=env)
    zero = spec.ds_config["zero_optimization"]
    assert (zero["stage"], zero["reduce_bucket_size"], spec.config.train.precision) == (3, 5e7, "fp16")
    assert "stage3_prefetch_bucket_size" not in zero  # "auto" with nothing to fill: DeepSpeed's default
    label = f"accelerate deepspeed_config_file {path}"
    assert f"engine.zero_stage: 3 from {label} overrides 2 from the recipe tiny-cpu" in spec.conflicts
    assert any("stage3_prefetch_bucket_size" in n for n in spec.notes)
    with pytest.raises(ValueError, match="two DeepSpeed configs"):
        resolve_launch(tiny(f"engine.ds_config={path}"), environ=env)


def test_accelerate_fsdp2_settings_and_shard_plan() -> None:
    from vlscale.model import DualEncoder

    env = accelerate_env(["--num_processes", "2", "--use_fsdp", "--fsdp_version", "2", "--fsdp_offload_params", "true",
                          "--fsdp_activation_checkpointing", "true", "--fsdp_reshard_after_forward", "false",
                          "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                          "--fsdp_transformer_layer_cls_to_wrap", "Block,BertLayer", "--mixed_precision", "bf16"])
    spec = resolve_launch(tiny(), environ=env)
    assert (spec.kind, spec.config.train.precision, spec.config.model.grad_checkpointing) == ("fsdp", "bf16", True)
    assert (spec.fsdp.reshard_after_forward, spec.fsdp.offload_params) == (False, True)
    assert spec.conflicts[0] == ("engine.kind: 'fsdp' from accelerate use_fsdp overrides 'deepspeed ZeRO-2' "
                                 "from the recipe tiny-cpu")
    assert spec.config.engine.zero_stage == 0 and spec.ds_config is None
    model = DualEncoder(tiny("model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 2, \"num_heads\": 2}").model)
    plan = spec.fsdp.shard_modules(model)
    names = [type(m).__name__ for m in plan]
    assert names.count("Block") == 2 and names.count("BertLayer") == 2
    assert {model.visual, model.textual} <= set(plan) and model not in plan
    order = {id(m): i for i, m in enumerate(plan)}
    for m in plan:  # FSDP2 shards inside-out: every planned descendant comes first
        assert all(order[id(d)] < order[id(m)] for d in m.modules() if d is not m and id(d) in order)
    spec.fsdp.wrap_classes = ("NoSuchLayer",)
    with pytest.raises(ValueError, match=r"no module of class \['NoSuchLayer'\]"):
        spec.fsdp.shard_modules(model)
    spec.fsdp.wrap_classes, spec.fsdp.wrap_min_params = (), 5000
    assert all(sum(p.numel() for p in m.parameters()) >= 5000 for m in spec.fsdp.shard_modules(model)
               if m not in (model.visual, model.textual) and not list(m.children()))


def test_plain_accelerate_launch_runs_the_local_engine() -> None:
    spec = resolve_launch(tiny(), environ=accelerate_env(["--multi_gpu", "--num_processes", "2"]))
    assert (spec.kind, spec.world_size) == ("local", 2)
    assert spec.conflicts == ["engine.kind: 'local' from accelerate launch without DeepSpeed/FSDP (DDP) overrides "
                              "'deepspeed ZeRO-2' from the recipe tiny-cpu"]
    with pytest.raises(ValueError, match=r"train.precision fp16 \(from recipe zerovl-v100\) cannot be honoured by "
                                         r"the local engine .* use bf16, or DeepSpeed"):
        resolve_launch(load_recipe("zerovl-v100"), environ=accelerate_env(["--multi_gpu", "--num_processes", "8"], 8))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--use_fsdp", "--fsdp_version", "1"], "--fsdp_version 1: cannot be honoured by vlscale: vlscale runs FSDP2"),
        (["--use_deepspeed", "--gradient_accumulation_steps", "4"],
         "accelerate gradient_accumulation_steps: gradient_accumulation_steps=4 cannot be honoured"),
        (["--multi_gpu", "--dynamo_backend", "inductor"], "--dynamo_backend: cannot be honoured"),
        (["--cpu"], "--cpu with --num_processes > 1: cannot be honoured"),
        (["--use_deepspeed", "--zero_stage", "2", "--offload_param_device", "cpu"],
         "offload_param device=cpu needs ZeRO stage 3"),
        (["--use_fsdp", "--fsdp_version", "2", "--mixed_precision", "fp16"],
         "train.precision fp16 (from accelerate mixed_precision) cannot be honoured by the fsdp engine"),
        (["--use_fsdp", "--fsdp_version", "2", "--fsdp_activation_checkpointing", "true",
          "--fsdp_activation_checkpointing_offload", "true"], "--fsdp_activation_checkpointing_offload: cannot be honoured"),
    ],
)
def test_options_vlscale_cannot_honour_fail_naming_them(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_launch(tiny(), environ=accelerate_env(["--num_processes", "2", *argv]))


def test_user_ds_config_blocks_and_zero_offload_take_effect_in_the_engine(tmp_path: Path) -> None:
    """One in-process DeepSpeed rank: the optimizer block's hyper-parameters reach torch AdamW, the
    scheduler block's WarmupCosineLR drives the rates, the optimizer is offloaded (client AdamW)."""
    import json

    import torch

    from vlscale.demo_data import build_demo_dataset
    from vlscale.train.trainer import Trainer

    shards = build_demo_dataset(tmp_path / "shards", n_train=24, n_eval=2, size=32)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.8, 0.9], "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 2, "total_num_steps": 4,
                                                           "cos_min_ratio": 0.1}}}))
    cfg = load_recipe("tiny-cpu", [
        f"train.run_dir={tmp_path / 'run'}", f"data.train_shards={shards['train']}", "data.eval_shards=",
        "data.num_workers=0", "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
        "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 64}", "model.embed_dim=16", "train.global_batch_size=8", "gradcache.chunk_size=4",
        "train.steps=4", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
        f"engine.ds_config={ds}"])
    trainer = Trainer(cfg, spec=resolve_launch(cfg, environ={}))
    try:
        raw = trainer.engine.raw
        assert raw.zero_offload_optimizer() and raw.zero_optimization_stage() == 2
        assert type(trainer.scheduler).__name__ == "WarmupCosineLR" and trainer.scheduler.org_lrs[0] == 2e-3
        groups = raw.optimizer.optimizer.param_groups  # the torch AdamW under DeepSpeed's ZeRO wrapper
        assert {g["betas"] for g in groups} == {(0.8, 0.9)} and {g["weight_decay"] for g in groups} == {0.0, 0.01}
        trainer.fit()
    finally:
        trainer.close()
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    # The reference: DeepSpeed's own WarmupCosineLR with the block's values (linear warmup filled in),
    # stepped once per optimizer step; its first iterations give 0 (warmup starts at iteration -1).
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    ref = WarmupCosineLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3), warmup_num_steps=2,
                         total_num_steps=4, cos_min_ratio=0.1, warmup_type="linear")
    want = []
    for _ in range(4):
        want.append(ref.get_last_lr()[0])
        ref.step()
    assert lrs == pytest.approx(want) and lrs[2] > 0, (lrs, want)
    engine = json.loads((tmp_path / "run" / "engine.json").read_text())
    assert engine["engine_reported"]["offload_optimizer"] and engine["lr_schedule"] == "deepspeed"
