"""An ``accelerate launch``, read with accelerate's own classes into vlscale's launch resolver.

``accelerate launch`` exports its configuration (flags, or an ``accelerate config`` YAML) as
environment variables of the processes it starts, and ``accelerate.utils.DeepSpeedPlugin()`` /
``FullyShardedDataParallelPlugin()`` / ``TorchDynamoPlugin()`` read them exactly as an
``Accelerator`` would: every value here comes from those classes (and accelerate's
``parse_flag_from_env`` / ``parse_choice_from_env``), never from parsing the variables by hand.
Whether the user *set* a DeepSpeed option, rather than getting accelerate's default, is told by
whether the launcher exported its variable (accelerate exports only the options it was given).

Mapping: the DeepSpeed plugin → vlscale's DeepSpeed engine (stage, offload, clipping, precision,
``zero3_init``, or the ``deepspeed_config_file``); the FSDP plugin (``fsdp_version: 2``) → the FSDP2
engine (resharding, CPU offload, activation checkpointing, auto-wrap plan, bf16); a plain launch →
the local / DDP engine. Options vlscale cannot honour raise a ValueError naming them.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlscale.train.launchers import FSDPOptions, Resolver

# DeepSpeedPlugin attribute → (variable accelerate launch exports when given, ds_config key, option name)
_DS_OPTIONS = {
    "zero_stage": ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "zero_optimization.stage", "zero_stage"),
    "offload_optimizer_device": ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                                 "zero_optimization.offload_optimizer.device", "offload_optimizer_device"),
    "offload_param_device": ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "zero_optimization.offload_param.device",
                             "offload_param_device"),
    "gradient_clipping": ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", "gradient_clipping"),
    "gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps",
                                    "gradient_accumulation_steps"),
    "zero3_save_16bit_model": ("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
                               "zero_optimization.stage3_gather_16bit_weights_on_model_save", "zero3_save_16bit_model"),
}


_V2 = ("vlscale runs FSDP2 (torch fully_shard) only; set fsdp_version: 2 (--fsdp_version 2), the other fsdp_* "
       "settings carry over")


@dataclass
class AccelerateLaunch:
    """What an accelerate launch asks of vlscale, beyond the config fields it already set."""

    ds_user: dict[str, Any] | None = None
    """The DeepSpeed settings the user gave (flags, or the deepspeed_config_file's content)."""
    ds_labels: dict[str, str] = field(default_factory=dict)
    ds_label: str = "accelerate"
    ds_file: str = ""
    zero3_init: bool | None = None
    fsdp: FSDPOptions | None = None


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """accelerate's classes read os.environ: show them ``env`` (a faked one in tests) for a while."""
    if env is os.environ:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _refuse(option: str, why: str) -> ValueError:
    return ValueError(f"accelerate launch {option}: cannot be honoured by vlscale: {why}")


def read_accelerate(r: Resolver, env: Mapping[str, str]) -> AccelerateLaunch:
    """Apply an accelerate launch's settings to ``r`` (they win); return the rest for the spec."""
    with _environ(env):
        from accelerate.utils import TorchDynamoPlugin, parse_choice_from_env, parse_flag_from_env
        from accelerate.utils.dataclasses import DynamoBackend

        if TorchDynamoPlugin().backend != DynamoBackend.NO:
            raise _refuse("--dynamo_backend", "vlscale does not torch.compile the towers; use --dynamo_backend no")
        for flag, option in (("ACCELERATE_USE_MEGATRON_LM", "--use_megatron_lm"),
                             ("ACCELERATE_USE_PARALLELISM_CONFIG", "--use_parallelism_config")):
            if parse_flag_from_env(flag):
                raise _refuse(option, "vlscale is data-parallel (DeepSpeed ZeRO, FSDP2 or DDP); no tensor/context parallelism")
        _check_cpu(parse_flag_from_env("ACCELERATE_USE_CPU"), env)
        mp = parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no").lower()
        if mp not in ("no", "fp16", "bf16"):
            raise _refuse(f"--mixed_precision {mp}", "vlscale trains in fp32, fp16 (DeepSpeed) or bf16")
        if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
            return _deepspeed(r, env, mp)
        if parse_flag_from_env("ACCELERATE_USE_FSDP"):
            out = _fsdp(r)
        else:
            r.set_kind("local", "accelerate launch without DeepSpeed/FSDP (DDP)")
            out = AccelerateLaunch()
        if mp != "no":
            r.set("train.precision", mp, "accelerate mixed_precision")
        return out


def _check_cpu(use_cpu: bool, env: Mapping[str, str]) -> None:
    if not use_cpu:
        return
    if "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        # accelerate's simple launcher exports MASTER_* for num_processes > 1 but starts ONE process
        # (several CPU processes only through mpirun).
        raise _refuse("--cpu with --num_processes > 1", "accelerate started a single process (it runs several CPU "
                      "processes only through mpirun); use `accelerate launch --multi_gpu --num_processes N` "
                      "(torchrun + gloo on CPU) or launch/torchrun.sh")
    import torch

    if torch.cuda.is_available():
        raise _refuse("--cpu", "vlscale trains on the GPU when one is visible; hide them with CUDA_VISIBLE_DEVICES= "
                      "to train on the CPU")


def _set_path(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def _deepspeed(r: Resolver, env: Mapping[str, str], mp: str) -> AccelerateLaunch:
    from accelerate.utils import DeepSpeedPlugin

    try:
        plugin = DeepSpeedPlugin()
    except (ValueError, OSError) as exc:
        raise ValueError(f"accelerate DeepSpeed settings: {exc}") from exc
    if plugin.transformer_moe_cls_names:
        raise _refuse("--deepspeed_moe_layer_cls_names", "the dual encoder has no mixture-of-experts layers")
    if mp != "no":
        try:
            plugin.set_mixed_precision(mp)
        except ValueError as exc:
            raise ValueError(f"accelerate mixed_precision {mp}: {exc}") from exc
    out = AccelerateLaunch()
    recipe_kind = r.get("engine.kind")
    r.set_kind("deepspeed", "accelerate use_deepspeed")
    cfg_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if cfg_file != "none":
        out.ds_file, out.ds_label = cfg_file, f"accelerate deepspeed_config_file {cfg_file}"
        out.ds_user = {k: copy.deepcopy(v) for k, v in plugin.deepspeed_config.items() if k != "steps_per_print"}
    else:
        user: dict[str, Any] = {}
        for attr, (var, key, option) in _DS_OPTIONS.items():
            if var in env:
                _set_path(user, key, getattr(plugin, attr))
                out.ds_labels[key] = f"accelerate {option}"
        for kind in ("optimizer", "param"):
            if getattr(plugin, f"offload_{kind}_device") == "nvme":
                _set_path(user, f"zero_optimization.offload_{kind}.nvme_path",
                          getattr(plugin, f"offload_{kind}_nvme_path"))
        if mp != "no":
            for key in ("fp16", "bf16"):
                user[key] = dict(plugin.deepspeed_config[key])
                out.ds_labels[key] = "accelerate mixed_precision"
        if "ACCELERATE_DEEPSPEED_ZERO_STAGE" not in env and recipe_kind != "deepspeed":
            r.set("engine.zero_stage", int(plugin.zero_stage), "accelerate zero_stage (its default)")
        out.ds_user = user
    if "ACCELERATE_DEEPSPEED_ZERO3_INIT" in env:
        out.zero3_init = bool(plugin.zero3_init_flag)
        r.sources["zero3_init"] = "accelerate zero3_init_flag"
    return out


def _fsdp(r: Resolver) -> AccelerateLaunch:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    from vlscale.train.launchers import FSDPOptions

    try:
        plugin = FullyShardedDataParallelPlugin()
    except (ValueError, RuntimeError, ImportError) as exc:
        try:  # FSDP1's defaults ask for a GPU (sync_module_states); read just its version then
            version = FullyShardedDataParallelPlugin(sync_module_states=False, cpu_ram_efficient_loading=False).fsdp_version
        except (ValueError, RuntimeError, ImportError):
            version = None
        if version not in (None, 2):
            raise _refuse(f"--fsdp_version {version}", _V2) from exc
        raise ValueError(f"accelerate FSDP settings: {exc}") from exc
    if plugin.fsdp_version != 2:
        raise _refuse(f"--fsdp_version {plugin.fsdp_version}", _V2)
    # fsdp_cpu_ram_efficient_loading (on by default) only changes how transformers loads pretrained
    # weights under accelerate's own FSDP wrapping; vlscale builds the towers identically on every rank.
    for attr, why in (("activation_checkpointing_offload", "activations are checkpointed, not offloaded"),
                      ("ignored_modules", "every parameter of the dual encoder is sharded")):
        if getattr(plugin, attr):
            raise _refuse(f"--fsdp_{attr}", why)
    opts = FSDPOptions(reshard_after_forward=bool(plugin.reshard_after_forward),
                       offload_params=isinstance(plugin.cpu_offload, CPUOffloadPolicy))
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy:
        opts.wrap_classes = tuple(plugin.transformer_cls_names_to_wrap or ())
        if not opts.wrap_classes:
            r.note("accelerate fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP without class names: "
                   "vlscale shards each tower (name them with fsdp_transformer_layer_cls_to_wrap)")
    elif plugin.auto_wrap_policy is size_based_auto_wrap_policy:
        opts.wrap_min_params = int(plugin.min_num_params or 0)
    r.set_kind("fsdp", "accelerate use_fsdp")
    r.sources.update({"fsdp.reshard_after_forward": "accelerate fsdp_reshard_after_forward",
                      "fsdp.offload_params": "accelerate fsdp_offload_params",
                      "fsdp.shard_plan": "accelerate fsdp_auto_wrap_policy"})
    if plugin.activation_checkpointing:
        r.set("model.grad_checkpointing", True, "accelerate fsdp_activation_checkpointing")
    return AccelerateLaunch(fsdp=opts)
