"""The DeepSpeed JSON of a run: generated from the resolved config, completed by a user's own ds_config.

Generating it from the typed config keeps one source of truth: the batch arithmetic
(``train_batch_size = micro × world``), the precision and the ZeRO stage never drift from what the
trainer does. A user's own DeepSpeed config (``--deepspeed_config``, ``engine.ds_config``, accelerate's
``deepspeed_config_file`` or its DeepSpeed flags) follows DeepSpeed's conventions and **wins for what it
sets**: :func:`fold_user_config` first writes its stage, precision, clipping, batch sizes and
optimizer hyper-parameters into the config (each change recorded as one conflict line by the
resolver of :mod:`vlscale.train.launchers`), then :func:`complete` fills everything it leaves out or
marks ``"auto"`` from that config. What vlscale cannot honour is an error naming the key:

* ``gradient_accumulation_steps`` > 1: the gradient cache already splits the batch into chunks, and
  accumulating separate contrastive batches would shrink the negatives (grow ``train_batch_size``);
* an ``optimizer`` other than Adam/AdamW: vlscale trains with torch AdamW (the weight-decay
  exclusions of the model, the same arithmetic on CPU and GPU). An Adam/AdamW block is honoured:
  its ``lr``/``betas``/``eps``/``weight_decay`` become the trainer's (DeepSpeed's FusedAdam /
  CPUAdam implement the same update; torch's needs no op compilation);
* ``offload_param`` below stage 3 (DeepSpeed partitions parameters only at stage 3).

A ``scheduler`` block is honoured as DeepSpeed itself does it: DeepSpeed builds that scheduler (the
trainer then passes none); values it leaves out or marks ``"auto"`` come from the config (linear
warmup from 0 to ``train.lr`` over ``train.warmup_steps``, ``train.steps``, ``train.min_lr_ratio``).
With the optimizer offloaded, ``zero_force_ds_cpu_optimizer`` is set to false: DeepSpeed otherwise
refuses a client (torch) optimizer under ZeRO-Offload.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlscale.config import Config

if TYPE_CHECKING:
    from vlscale.train.launchers import Resolver

SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")
_ADAM_KEYS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "fused", "bias_correction"}
OFF = ("none", None)


def read_user_config(path: str | Path, what: str) -> dict[str, Any]:
    """A user's DeepSpeed JSON file as a dict (ValueError naming ``what`` when missing or broken)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: no such file {str(path)!r}")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is not valid JSON: {exc}") from exc
    if not isinstance(user, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got {type(user).__name__}")
    if "bfloat16" in user:  # DeepSpeed's older name for the bf16 block, still accepted by DeepSpeed
        if "bf16" in user:
            raise ValueError(f"{what}: {path} has both 'bf16' and its older name 'bfloat16'; keep 'bf16'")
        user["bf16"] = user.pop("bfloat16")
    return user


def generated(cfg: Config, micro: int, world_size: int) -> dict[str, Any]:
    """vlscale's own DeepSpeed config for ``cfg`` (already resolved) on ``world_size`` ranks."""
    precision = cfg.train.precision
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    if cfg.engine.zero_stage >= 2:
        # Gradient caching back-propagates several chunks into the same gradients before one
        # reduction; contiguous buckets keep that from fragmenting memory.
        zero.update(contiguous_gradients=True, overlap_comm=False)
    return {
        "train_batch_size": micro * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
        # The trainer passes torch AdamW as a client optimizer (DeepSpeed's fused/CPU Adam would
        # JIT-compile for tens of seconds and behave differently on CPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _given(value: Any) -> bool:
    return value is not None and value != "auto"


def fold_user_config(r: Resolver, user: dict[str, Any], label: Callable[[str], str], world_size: int) -> bool:
    """Write what ``user`` sets into the resolver's config (the user wins); True = DeepSpeed builds
    the ``scheduler`` block. ``label(key)`` names where a key came from (for conflict lines)."""
    zero = user.get("zero_optimization") or {}
    if _given(zero.get("stage")):
        r.set("engine.zero_stage", int(zero["stage"]), label("zero_optimization.stage"))
    _fold_precision(r, user, label)
    if _given(user.get("gradient_clipping")):
        r.set("train.grad_clip", float(user["gradient_clipping"]), label("gradient_clipping"))
    gas = user.get("gradient_accumulation_steps")
    if _given(gas) and int(gas) != 1:
        raise ValueError(
            f"{label('gradient_accumulation_steps')}: gradient_accumulation_steps={gas} cannot be honoured: the "
            "gradient cache already splits each contrastive batch into chunks, and accumulating separate "
            "batches would shrink the negatives; grow train_batch_size (train.global_batch_size) instead")
    _fold_batch(r, user, label, world_size)
    if "optimizer" in user:
        _fold_optimizer(r, user["optimizer"], label("optimizer"))
    if "amp" in user and (user["amp"] or {}).get("enabled"):
        raise ValueError(f"{label('amp')}: NVIDIA apex amp cannot be honoured; use fp16 or bf16 instead")
    return _fold_scheduler(r, user, label("scheduler"))


def _fold_precision(r: Resolver, user: dict[str, Any], label: Callable[[str], str]) -> None:
    on = {k: (user.get(k) or {}).get("enabled") for k in ("fp16", "bf16")}
    if on["fp16"] is True and on["bf16"] is True:
        raise ValueError(f"{label('fp16')}: fp16 and bf16 are both enabled; enable one")
    for key in ("fp16", "bf16"):
        if on[key] is True:
            r.set("train.precision", key, label(f"{key}.enabled"))
            return
    # Both explicitly off (or one off, the other absent) = fp32; "auto" / absent = the config decides.
    said_off = [k for k in ("fp16", "bf16") if on[k] is False]
    if said_off and r.get("train.precision") in said_off:
        r.set("train.precision", "fp32", label(f"{r.get('train.precision')}.enabled"))


def _fold_batch(r: Resolver, user: dict[str, Any], label: Callable[[str], str], world: int) -> None:
    total, micro = user.get("train_batch_size"), user.get("train_micro_batch_size_per_gpu")
    if _given(total) and _given(micro) and int(total) != int(micro) * world:
        raise ValueError(f"{label('train_batch_size')}: train_batch_size={total} != train_micro_batch_size_per_gpu "
                         f"{micro} × world size {world} (× gradient_accumulation_steps 1)")
    if _given(micro):
        r.set("train.global_batch_size", int(micro) * world, label("train_micro_batch_size_per_gpu"))
        if r.get("train.micro_batch_size") not in (0, int(micro)):
            r.set("train.micro_batch_size", int(micro), label("train_micro_batch_size_per_gpu"))
    elif _given(total):
        r.set("train.global_batch_size", int(total), label("train_batch_size"))
        if r.get("train.micro_batch_size"):  # derived from the new global batch instead
            r.set("train.micro_batch_size", 0, label("train_batch_size"))


def _fold_optimizer(r: Resolver, block: dict[str, Any], where: str) -> None:
    kind = str((block or {}).get("type", "")).lower()
    params = dict((block or {}).get("params") or {})
    if kind not in ("adam", "adamw") or params.get("adam_w_mode") is False or params.get("bias_correction") is False:
        raise ValueError(
            f"{where}: optimizer {block!r} cannot be honoured: vlscale trains with torch AdamW (decoupled "
            "weight decay, bias correction, the model's weight-decay exclusions); remove the block or use "
            '{"type": "AdamW", "params": {"lr": ..., "betas": [...], "eps": ..., "weight_decay": ...}}')
    unknown = sorted(set(params) - _ADAM_KEYS)
    if unknown:
        raise ValueError(f"{where}: optimizer params {unknown} cannot be honoured by vlscale's AdamW "
                         f"(it takes {sorted(_ADAM_KEYS - {'adam_w_mode', 'torch_adam', 'fused', 'bias_correction'})})")
    if _given(params.get("lr")):
        r.set("train.lr", float(params["lr"]), f"{where} lr")
    if _given(params.get("betas")):
        b1, b2 = params["betas"]
        r.set("train.beta1", float(b1), f"{where} betas")
        r.set("train.beta2", float(b2), f"{where} betas")
    for key in ("eps", "weight_decay"):
        if _given(params.get(key)):
            r.set(f"train.{key}", float(params[key]), f"{where} {key}")
    r.note(f"{where}: {block.get('type')} applied to vlscale's torch AdamW (same update; the model's "
           "weight-decay exclusions kept)")
    r.sources["optimizer"] = f"{where} ({block.get('type')}) on torch AdamW"


def _fold_scheduler(r: Resolver, user: dict[str, Any], where: str) -> bool:
    block = user.get("scheduler")
    if not block:
        return False
    kind = block.get("type")
    if kind not in SCHEDULERS:
        raise ValueError(f"{where}: scheduler type {kind!r} is not one of DeepSpeed's {list(SCHEDULERS)}")
    params = dict(block.get("params") or {})
    if _given(params.get("warmup_num_steps")):
        r.set("train.warmup_steps", int(params["warmup_num_steps"]), f"{where} warmup_num_steps")
    if _given(params.get("warmup_max_lr")):
        r.set("train.lr", float(params["warmup_max_lr"]), f"{where} warmup_max_lr")
    if _given(params.get("total_num_steps")) and int(params["total_num_steps"]) != r.get("train.steps"):
        r.note(f"{where}: {kind} decays over total_num_steps={params['total_num_steps']}, "
               f"the run has train.steps={r.get('train.steps')}")
    r.sources["lr_schedule"] = f"{where} ({kind}, built by DeepSpeed)"
    return True


def scheduler_params(cfg: Config, block: dict[str, Any]) -> dict[str, Any]:
    """The ``scheduler`` block with what it leaves out or marks "auto" filled from ``cfg``."""
    t = cfg.train
    fills = {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": max(1, t.warmup_steps),
             "warmup_type": "linear", "total_num_steps": t.steps, "warmup_min_ratio": 0.0,
             "cos_min_ratio": t.min_lr_ratio}
    accepted = {"WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
                "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                                  "total_num_steps"),
                "WarmupCosineLR": ("warmup_min_ratio", "warmup_num_steps", "warmup_type", "total_num_steps",
                                   "cos_min_ratio")}
    params = dict(block.get("params") or {})
    for key in accepted.get(block["type"], ()):
        if not _given(params.get(key)):
            params[key] = fills[key]
    left = sorted(k for k, v in params.items() if v == "auto")
    if left:
        raise ValueError(f"ds_config scheduler {block['type']}: no value for {left} (vlscale fills only "
                         "the Warmup* schedulers' keys); give numbers")
    return {"type": block["type"], "params": params}


def _fill(user: dict[str, Any], gen: dict[str, Any], path: str, dropped: list[str]) -> dict[str, Any]:
    out = dict(gen)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(gen.get(key), dict):
            out[key] = _fill(value, gen[key], f"{path}{key}.", dropped)
        elif value == "auto":
            if key not in gen:
                dropped.append(path + key)  # DeepSpeed's own default applies
        else:
            out[key] = copy.deepcopy(value)
    return out


def complete(cfg: Config, micro: int, world_size: int, user: dict[str, Any] | None,
             notes: list[str] | None = None) -> dict[str, Any]:
    """The DeepSpeed config the engine gets: vlscale's, overlaid with what ``user`` sets."""
    gen = generated(cfg, micro, world_size)
    if not user:
        return gen
    dropped: list[str] = []
    out = _fill({k: v for k, v in user.items() if k != "optimizer"}, gen, "", dropped)
    if dropped and notes is not None:
        notes.append(f"ds_config: 'auto' left to DeepSpeed's defaults: {', '.join(dropped)}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        out[key] = gen[key]  # the user's values were folded into the config; these are the checked ones
    if "scheduler" in out:
        out["scheduler"] = scheduler_params(cfg, out["scheduler"])
    zero = out["zero_optimization"]
    stage = int(zero.get("stage", 0))
    opt_dev = (zero.get("offload_optimizer") or {}).get("device", "none")
    param_dev = (zero.get("offload_param") or {}).get("device", "none")
    if param_dev not in OFF and stage != 3:
        raise ValueError(f"offload_param device={param_dev} needs ZeRO stage 3 (stage {stage}): DeepSpeed "
                         "partitions parameters only at stage 3; use stage 3 or offload the optimizer only")
    if opt_dev not in OFF:
        if stage == 0:
            raise ValueError(f"offload_optimizer device={opt_dev} needs ZeRO stage 1-3 (stage 0)")
        if out.get("zero_force_ds_cpu_optimizer") is True:
            raise ValueError("zero_force_ds_cpu_optimizer=true cannot be honoured: vlscale passes torch AdamW "
                             "(a client optimizer), which DeepSpeed then refuses under ZeRO-Offload; remove it")
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def offload_devices(ds_config: dict[str, Any] | None) -> tuple[str, str]:
    """(optimizer, parameter) offload devices of a DeepSpeed config ("none" when not offloaded)."""
    zero = (ds_config or {}).get("zero_optimization") or {}
    dev = [((zero.get(k) or {}).get("device") or "none") for k in ("offload_optimizer", "offload_param")]
    return str(dev[0]), str(dev[1])


DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


def reduce_bucket(ds_config: dict[str, Any], trainable_params: int) -> int | None:
    """The reduce bucket vlscale sets: DeepSpeed allocates ``reduce_bucket_size`` elements for its
    contiguous gradient bucket at every step's first backward whatever the model's size (2 GB of
    fp32 for a 5M-parameter model), so when the config leaves it unset (or ``"auto"``) it is capped
    at the trainable parameter count — the whole model's gradients still fit in one bucket, so the
    reduction is unchanged. None: ZeRO stage 0, or the config sets it (the user's value wins)."""
    zero = ds_config.get("zero_optimization") or {}
    if int(zero.get("stage", 0) or 0) < 1 or _given(zero.get("reduce_bucket_size")):
        return None
    return int(min(DS_REDUCE_BUCKET, max(1, trainable_params)))


def with_reduce_bucket(ds_config: dict[str, Any], trainable_params: int) -> dict[str, Any]:
    """``ds_config`` with :func:`reduce_bucket` applied (a copy; unchanged when it gives None)."""
    size = reduce_bucket(ds_config, trainable_params)
    if size is None:
        return ds_config
    out = copy.deepcopy(ds_config)
    out["zero_optimization"]["reduce_bucket_size"] = size
    return out
