"""The DeepSpeed JSON of a run: generated from the :class:`~vlscale.config.Config`, or a user's own.

Generating it from the typed config keeps one source of truth: the batch arithmetic
(``train_batch_size = micro × gradient_accumulation_steps × world``), the precision and the ZeRO
stage can never drift from what the trainer does. A user's own ``engine.ds_config`` JSON is still
accepted (for bucket sizes, offload, communication tuning…), filled in from the config where it is
silent or says ``"auto"``, and rejected with a clear message where it contradicts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlscale.config import Config, TrainConfig


def resolve_batch(train: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(per-rank micro batch, gradient-accumulation steps, global batch), arithmetic checked."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    gas, glob = train.grad_accum_steps, train.global_batch_size
    micro = train.micro_batch_size or glob // (gas * world_size)
    if micro < 1 or micro * gas * world_size != glob:
        raise ValueError(
            f"batch arithmetic: train.global_batch_size={glob} must equal micro_batch_size ({micro}) × "
            f"grad_accum_steps ({gas}) × world size ({world_size}) = {micro * gas * world_size}"
        )
    return micro, gas, glob


def _generated(cfg: Config, world_size: int) -> dict[str, Any]:
    micro, gas, glob = resolve_batch(cfg.train, world_size)
    precision = cfg.train.precision
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    if cfg.engine.zero_stage >= 2:
        # Gradient caching back-propagates several chunks into the same gradients before one
        # reduction; contiguous buckets keep that from fragmenting memory.
        zero.update(contiguous_gradients=True, overlap_comm=False)
    return {
        "train_batch_size": glob,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
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


def _check_user(user: dict[str, Any], gen: dict[str, Any], source: str) -> None:
    """Reject a user ds_config that contradicts the config (values "auto" are filled in)."""
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ValueError(f"{source}: remove {key!r}: the trainer owns AdamW and the cosine schedule "
                             "(set train.lr / train.warmup_steps / train.weight_decay instead)")
    checks = {
        "train_batch_size": gen["train_batch_size"],
        "train_micro_batch_size_per_gpu": gen["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": gen["gradient_accumulation_steps"],
        "gradient_clipping": gen["gradient_clipping"],
    }
    for key, want in checks.items():
        have = user.get(key, "auto")
        if have != "auto" and have != want:
            raise ValueError(f"{source}: {key}={have} contradicts the config ({want}); "
                             "fix one of them (batch keys come from train.global_batch_size / world size)")
    stage = user.get("zero_optimization", {}).get("stage", "auto")
    if stage != "auto" and stage != gen["zero_optimization"]["stage"]:
        raise ValueError(f"{source}: zero_optimization.stage={stage} contradicts engine.zero_stage="
                         f"{gen['zero_optimization']['stage']}")
    for key in ("fp16", "bf16"):
        enabled = user.get(key, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != gen[key]["enabled"]:
            raise ValueError(f"{source}: {key}.enabled={enabled} contradicts train.precision")


def _fill(user: dict[str, Any], gen: dict[str, Any]) -> dict[str, Any]:
    out = dict(gen)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(gen.get(key), dict):
            out[key] = _fill(value, gen[key])
        elif value != "auto":
            out[key] = value
    return out


def to_deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks (batch arithmetic asserted).

    With ``cfg.engine.ds_config`` set, that JSON is read, checked against ``cfg`` (ValueError on
    any contradiction) and completed from it.
    """
    gen = _generated(cfg, world_size)
    if not cfg.engine.ds_config:
        out = gen
    else:
        path = Path(cfg.engine.ds_config)
        if not path.is_file():
            raise ValueError(f"engine.ds_config: no such file {str(path)!r}")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"engine.ds_config: {path} is not valid JSON: {exc}") from exc
        _check_user(user, gen, f"engine.ds_config {path}")
        out = _fill(user, gen)
    glob, micro, gas = (out["train_batch_size"], out["train_micro_batch_size_per_gpu"],
                        out["gradient_accumulation_steps"])
    if glob != micro * gas * world_size:  # the invariant DeepSpeed itself asserts, said clearly
        raise ValueError(f"ds_config: train_batch_size {glob} != micro {micro} × GAS {gas} × world {world_size}")
    return out
