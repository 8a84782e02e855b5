"""What started this run, and the one resolved engine spec that the trainer builds from.

vlscale runs under four launchers: ``deepspeed`` (its launcher sets ``CROSS_SIZE`` / ``LOCAL_SIZE``),
``torchrun`` (``TORCHELASTIC_RUN_ID``), ``accelerate launch`` (``ACCELERATE_*`` / ``FSDP_*``) and a
plain ``python``. Whatever started it, :func:`resolve_launch` merges three layers into one
:class:`EngineSpec`, in this order of precedence:

1. the user's launcher configuration: accelerate's DeepSpeed / FSDP plugin (read with accelerate's
   own classes, :mod:`vlscale.train.accelerate_env`) and a user's DeepSpeed JSON
   (``--deepspeed_config`` / ``engine.ds_config``, :mod:`vlscale.train.deepspeed_json`) — what they
   set wins;
2. the recipe and its command-line overrides fill the rest;
3. vlscale's generated DeepSpeed JSON fills whatever neither says.

Every setting the first layer changes is one conflict line (logged once, on rank 0, at start-up);
an option vlscale cannot honour raises a ValueError naming it, before any model is built. The spec
(stage, offload, precision, world size, launcher and the source of each) is written to
``<run_dir>/engine.json`` beside ``ds_config.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlscale.config import Config, TrainConfig, config_from_dict, config_to_dict
from vlscale.train import deepspeed_json as dsj

log = logging.getLogger(__name__)

LAUNCHERS = ("accelerate", "deepspeed", "torchrun", "env", "plain")
# Settings reported in engine.json with their source ("recipe" unless a launcher layer set them).
REPORTED = ("engine.kind", "engine.zero_stage", "train.precision", "train.global_batch_size", "train.grad_clip",
            "train.lr", "offload_optimizer", "offload_param", "zero3_init", "model.grad_checkpointing",
            "fsdp.reshard_after_forward", "fsdp.offload_params", "fsdp.shard_plan", "optimizer", "lr_schedule")


def detect_launcher(environ: Mapping[str, str]) -> str:
    """Which launcher started this process, from the variables each one sets for its workers."""
    if any(k in environ for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP",
                                  "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND")):
        return "accelerate"  # its single-node DeepSpeed / FSDP launches run torchrun underneath
    if "CROSS_SIZE" in environ and "LOCAL_SIZE" in environ:
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun"
    if "WORLD_SIZE" in environ:
        return "env"  # another launcher (a cluster script) exporting torch.distributed's variables
    return "plain"


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


class Resolver:
    """The recipe's config as a mutable mapping, recording who changed what (one line per conflict)."""

    def __init__(self, cfg: Config) -> None:
        self.raw = config_to_dict(cfg)
        self.recipe = f"recipe {cfg.recipe}" if cfg.recipe else "config"
        self.sources: dict[str, str] = {}
        self.conflicts: list[str] = []
        self.notes: list[str] = []

    def get(self, key: str) -> Any:
        section, name = key.split(".")
        return self.raw[section][name]

    def set(self, key: str, value: Any, source: str) -> None:
        """``key`` = ``value`` because ``source`` says so (a changed value is a conflict line)."""
        old = self.get(key)
        if old != value and key not in self.sources:
            self.conflicts.append(f"{key}: {value!r} from {source} overrides {old!r} from the {self.recipe}")
        elif old != value:
            self.conflicts.append(f"{key}: {value!r} from {source} overrides {old!r} from {self.sources[key]}")
        section, name = key.split(".")
        self.raw[section][name] = value
        self.sources[key] = source

    def set_kind(self, kind: str, source: str) -> None:
        """Switch the engine; leaving DeepSpeed drops the recipe's ZeRO stage and ds_config with it."""
        old = self.get("engine.kind")
        if old != kind:
            was = f"deepspeed ZeRO-{self.get('engine.zero_stage')}" if old == "deepspeed" else old
            self.conflicts.append(f"engine.kind: {kind!r} from {source} overrides {was!r} from the {self.recipe}")
            if kind != "deepspeed":
                self.raw["engine"].update(zero_stage=0, ds_config="")
            self.raw["engine"]["kind"] = kind
        self.sources["engine.kind"] = source

    def note(self, line: str) -> None:
        self.notes.append(line)

    def build(self) -> Config:
        return config_from_dict(self.raw)


@dataclass
class FSDPOptions:
    """How the FSDP2 engine shards: the accelerate plugin's settings vlscale honours."""

    reshard_after_forward: bool = True
    offload_params: bool = False
    wrap_classes: tuple[str, ...] = ()
    """Also shard every module of these class names (accelerate's transformer_based_wrap)."""
    wrap_min_params: int = 0
    """Also shard modules holding at least this many parameters (accelerate's size_based_wrap)."""

    def shard_modules(self, model: Any) -> list[Any]:
        """Modules to ``fully_shard`` before the root, descendants before their ancestors: the
        wrap policy's picks plus every tower / head (vlscale's own plan)."""
        picked: list[Any] = []
        if self.wrap_classes:
            found = {type(m).__name__ for m in model.modules()}
            missing = sorted(set(self.wrap_classes) - found)
            if missing:
                raise ValueError(f"accelerate fsdp_transformer_layer_cls_to_wrap: no module of class {missing} in the "
                                 f"model; its layer classes include {sorted(found)}")
            picked = [m for m in model.modules() if type(m).__name__ in self.wrap_classes and m is not model]
        elif self.wrap_min_params:
            picked = _by_size(model, self.wrap_min_params)
        towers = [c for c in model.children() if any(True for _ in c.parameters())]
        chosen = {id(m) for m in picked + towers}
        # Reversed pre-order puts every module after all of its descendants (FSDP2 shards inside-out).
        return [m for m in reversed(list(model.modules())) if id(m) in chosen]

    def plan_name(self) -> str:
        if self.wrap_classes:
            return f"classes {','.join(self.wrap_classes)} + towers + root"
        if self.wrap_min_params:
            return f"modules >= {self.wrap_min_params} params + towers + root"
        return "towers + root (vlscale's plan)"


@dataclass
class EngineSpec:
    """Everything the trainer needs to build its engine, and where each setting came from."""

    launcher: str
    world_size: int
    config: Config
    micro_batch: int
    ds_config: dict[str, Any] | None = None
    ds_scheduler: bool = False
    """DeepSpeed builds the lr schedule from the ds_config's ``scheduler`` block."""
    zero3_init: bool = True
    """ZeRO-3: partition parameters as they are created (``deepspeed.zero.Init``)."""
    fsdp: FSDPOptions = field(default_factory=FSDPOptions)
    recipe: str = "recipe"
    sources: dict[str, str] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.config.engine.kind

    def summary(self, engine: Any = None) -> dict[str, Any]:
        """The resolved settings as JSON-able data (``engine.json``); ``engine`` adds what it reports."""
        cfg = self.config
        opt_dev, param_dev = dsj.offload_devices(self.ds_config)
        out: dict[str, Any] = {
            "launcher": self.launcher, "world_size": self.world_size, "engine": self.kind,
            "zero_stage": cfg.engine.zero_stage if self.kind == "deepspeed" else None,
            "offload_optimizer": opt_dev if self.kind == "deepspeed" else None,
            "offload_param": param_dev if self.kind == "deepspeed" else
            ("cpu" if self.kind == "fsdp" and self.fsdp.offload_params else "none"),
            "precision": cfg.train.precision, "global_batch_size": cfg.train.global_batch_size,
            "micro_batch_size": self.micro_batch, "grad_clip": cfg.train.grad_clip,
            "zero3_init": self.zero3_init if self.kind == "deepspeed" and cfg.engine.zero_stage == 3 else None,
            "grad_checkpointing": bool(getattr(cfg.model, "grad_checkpointing", False)),
            "lr_schedule": "deepspeed" if self.ds_scheduler else "vlscale warmup + cosine",
            "fsdp": ({"reshard_after_forward": self.fsdp.reshard_after_forward,
                      "offload_params": self.fsdp.offload_params, "shard_plan": self.fsdp.plan_name()}
                     if self.kind == "fsdp" else None),
            "sources": self._sources(),
            "conflicts": list(self.conflicts), "notes": list(self.notes),
        }
        if engine is not None:
            out["engine_reported"] = _reported(engine)
        return out

    def _sources(self) -> dict[str, str]:
        """Where each setting that applies to this engine came from."""
        skip = {"deepspeed": ("fsdp.",), "fsdp": ("engine.zero_stage", "offload_", "zero3_init")}.get(
            self.kind, ("fsdp.", "engine.zero_stage", "offload_", "zero3_init"))
        defaults = {"optimizer": "torch AdamW from the recipe's train.* fields",
                    "lr_schedule": "vlscale warmup + cosine from the recipe's train.* fields",
                    "offload_optimizer": "vlscale default (none)", "offload_param": "vlscale default (none)",
                    "zero3_init": "vlscale default (partition at creation)"}
        return {k: self.sources.get(k, defaults.get(k, self.recipe)) for k in REPORTED if not k.startswith(skip)}

    def headline(self) -> str:
        """One line: engine, stage, offload, precision, world size, launcher."""
        s = self.summary()
        if self.kind == "deepspeed":
            eng = f"deepspeed ZeRO-{s['zero_stage']} (offload optimizer={s['offload_optimizer']}, param={s['offload_param']})"
        elif self.kind == "fsdp":
            eng = (f"fsdp2 (reshard_after_forward={self.fsdp.reshard_after_forward}, cpu offload="
                   f"{self.fsdp.offload_params}, plan: {self.fsdp.plan_name()})")
        else:
            eng = "local" + (" (DDP-style all-reduce)" if self.world_size > 1 else "")
        return (f"engine: {eng}, {s['precision']}, world size {self.world_size}, global batch "
                f"{s['global_batch_size']} ({s['micro_batch_size']}/rank), launched by {self.launcher}")

    def log(self) -> None:
        """Log the headline, every conflict (one line each) and notes. Call on one rank only."""
        log.info("%s", self.headline())
        for line in self.conflicts:
            log.warning("launch setting: %s", line)
        for line in self.notes:
            log.info("launch note: %s", line)

    def write(self, run_dir: str | Path, engine: Any = None) -> Path:
        """Write ``engine.json`` (and ``ds_config.json`` for DeepSpeed) atomically."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        files = {"engine.json": self.summary(engine)}
        if self.ds_config is not None:
            files["ds_config.json"] = self.ds_config
        for name, data in files.items():
            tmp = run_dir / f".{name}.tmp"
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
            tmp.replace(run_dir / name)
        return run_dir / "engine.json"


def _by_size(model: Any, min_params: int) -> list[Any]:
    """torch's size-based wrap: a module whose parameters not already in a picked descendant
    number at least ``min_params`` (the root is sharded anyway)."""
    picked: list[Any] = []

    def visit(module: Any) -> int:
        n = sum(p.numel() for p in module.parameters(recurse=False)) + sum(visit(c) for c in module.children())
        if module is not model and n >= min_params:
            picked.append(module)
            return 0
        return n

    visit(model)
    return picked


def _reported(engine: Any) -> dict[str, Any]:
    """What the live engine says it runs (the proof that the spec took effect)."""
    if engine.kind == "deepspeed":
        raw = engine.raw
        return {"zero_stage": int(raw.zero_optimization_stage()), "offload_optimizer": bool(raw.zero_offload_optimizer()),
                "offload_param": bool(raw.zero_offload_param()), "fp16": bool(raw.fp16_enabled()),
                "bf16": bool(raw.bfloat16_enabled()), "world_size": int(raw.world_size)}
    if engine.kind == "fsdp":
        try:  # the root's parameter group carries the policy fully_shard was given (private torch API)
            policy = type(engine.module._get_fsdp_state()._fsdp_param_group.offload_policy).__name__
        except AttributeError:
            policy = "unknown"
        return {"world_size": engine.world_size, "offload_policy": policy,
                "param_dtype": str(getattr(engine, "param_dtype", None))}
    return {"world_size": engine.world_size}


def resolve_launch(cfg: Config, *, environ: Mapping[str, str] | None = None,
                   world_size: int | None = None) -> EngineSpec:
    """Merge the launcher's settings, a user's ds_config and the recipe into one :class:`EngineSpec`.

    ``environ`` defaults to ``os.environ`` (tests pass a faked one); ``world_size`` to its
    ``WORLD_SIZE``. Raises ValueError naming any option that cannot be honoured.
    """
    env = os.environ if environ is None else environ
    launcher = detect_launcher(env)
    world = world_size or (_group_size() if environ is None else None) or int(env.get("WORLD_SIZE", "1"))
    r = Resolver(cfg)
    acc = None
    if launcher == "accelerate":
        from vlscale.train.accelerate_env import read_accelerate

        acc = read_accelerate(r, env)
    user, labels, default_label = None, {}, ""
    if r.get("engine.ds_config"):
        path = r.get("engine.ds_config")
        if acc is not None and acc.ds_file:
            raise ValueError(f"two DeepSpeed configs: accelerate's deepspeed_config_file {acc.ds_file} and "
                             f"engine.ds_config / --deepspeed_config {path}; keep one")
        user, default_label = dsj.read_user_config(path, "--deepspeed_config / engine.ds_config"), f"ds_config {path}"
    if acc is not None and acc.ds_user is not None:
        user = _overlay(user or {}, acc.ds_user)  # accelerate's flags are the most specific layer
        labels, default_label = acc.ds_labels, default_label or acc.ds_label
    ds_scheduler = False
    if r.get("engine.kind") == "deepspeed" and user is not None:
        def label(key: str) -> str:
            return labels.get(key) or labels.get(key.split(".")[0]) or default_label

        ds_scheduler = dsj.fold_user_config(r, user, label, world)
    _check_precision(r)
    resolved = r.build()
    micro, _, _ = resolve_batch(resolved.train, world)
    ds_config = None
    if resolved.engine.kind == "deepspeed":
        ds_config = dsj.complete(resolved, micro, world, user, r.notes)
        opt_dev, param_dev = dsj.offload_devices(ds_config)
        for key, dev in (("offload_optimizer", opt_dev), ("offload_param", param_dev)):
            if dev not in dsj.OFF:
                r.sources.setdefault(key, labels.get(f"zero_optimization.{key}.device") or default_label)
    return EngineSpec(launcher=launcher, world_size=world, config=resolved, micro_batch=micro,
                      ds_config=ds_config, ds_scheduler=ds_scheduler,
                      zero3_init=acc.zero3_init if acc is not None and acc.zero3_init is not None else True,
                      fsdp=acc.fsdp if acc is not None and acc.fsdp is not None else FSDPOptions(),
                      recipe=r.recipe, sources=r.sources, conflicts=r.conflicts, notes=r.notes)


def _group_size() -> int | None:
    """The world size of an already initialised process group (a caller that set one up itself)."""
    dist = sys.modules.get("torch.distributed")  # never imports torch just to ask
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return None


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_precision(r: Resolver) -> None:
    if r.get("train.precision") == "fp16" and r.get("engine.kind") != "deepspeed":
        src = r.sources.get("train.precision", r.recipe)
        raise ValueError(
            f"train.precision fp16 (from {src}) cannot be honoured by the {r.get('engine.kind')} engine (from "
            f"{r.sources.get('engine.kind', r.recipe)}): fp16 needs dynamic loss scaling, which vlscale runs under "
            "DeepSpeed only; use bf16, or DeepSpeed (accelerate --use_deepspeed / --deepspeed_config)")


def to_deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks (batch arithmetic asserted).

    With ``cfg.engine.ds_config`` set, that JSON wins for what it sets and is completed from
    ``cfg`` (see :mod:`vlscale.train.deepspeed_json`). No launcher environment is consulted.
    """
    spec = resolve_launch(cfg, environ={}, world_size=world_size)
    if spec.ds_config is None:  # another engine: what DeepSpeed would get for the same settings
        return dsj.complete(spec.config, spec.micro_batch, world_size, None)
    return spec.ds_config
