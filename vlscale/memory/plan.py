"""The "will it fit" planner: a recipe (+ overrides) and a GPU → per-rank memory, strategies, a verdict.

:func:`plan_inputs` turns a :class:`vlscale.config.Config` into the arguments of
:func:`vlscale.memory.model.predict_memory` for a target world size and GPU, reading everything the
recipe already says (towers, precision, engine and ZeRO stage, the generated DeepSpeed buckets,
chunk size, embedding width, loss implementation) and counting what it does not (parameters and
per-row activations, on the meta device: no memory, no weights, no compute).
:func:`plan` then predicts the recipe's batch for three strategies and finds, for each, the largest
global batch whose predicted peak fits the GPU:

``naive``            open_clip's dense logits, no gradient cache (the baseline everyone starts from);
``fused``            vlscale's fused loss (O(B) statistics), no gradient cache;
``fused_gradcache``  the fused loss under gradient caching (activations of one chunk only).

The GPU's usable memory is ``gpu_memory − context_reserve`` (the CUDA context and cuBLAS workspaces
live outside PyTorch's allocator), and every prediction carries an ``allocator slack`` component of
``allocator_slack`` × its peak (the caching allocator's fragmentation and rounding).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from vlscale.memory import lossmem
from vlscale.memory.model import (
    GIB,
    MIB,
    MemoryEstimate,
    PrecisionSpec,
    deepspeed_bucket_bytes,
    fmt_bytes,
    max_global_batch,
    precision_spec,
    predict_memory,
)
from vlscale.memory.techmem import TechniqueMemory

STRATEGIES = ("naive", "fused", "fused_gradcache")
# ANCHORS.md "Tower costs": ViT-B/16 + BERT-base measured 83 MiB/pair of forward+backward peak on an
# H100 (bf16 autocast); the meta-device count of tensors saved for backward is 66.7 MiB/pair. The
# ratio (1.24, rounded up) covers the backward's transients and autocast's copies.
BACKWARD_TRANSIENT_FACTOR = 1.25
# CUDA context + cuBLAS/cuDNN workspaces: outside torch's allocator, so outside every prediction.
DEFAULT_CONTEXT_RESERVE = 0.75 * GIB
DEFAULT_ALLOCATOR_SLACK = 0.05
# DeepSpeed's default when the ds_config does not set it (the reduce bucket's is capped by the
# trainer: vlscale.train.deepspeed_json.reduce_bucket).
DS_PREFETCH_BUCKET = 5e7

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 1e3, "m": 2**20, "mib": 2**20, "mb": 1e6,
          "g": 2**30, "gib": 2**30, "gb": 1e9, "t": 2**40, "tib": 2**40, "tb": 1e12}


def parse_bytes(text: str | float) -> float:
    """``"32GiB"`` → bytes. Binary units (KiB, MiB, GiB, TiB, and bare K/M/G/T as nvidia-smi shows
    them), decimal ones (KB, MB, GB, TB), or a plain number of bytes."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read a memory size from {text!r}: write e.g. 32GiB, 80GB, 40960MiB")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


@dataclass
class PlanInputs:
    """Everything a prediction depends on, as the report shows it (bytes unless said otherwise)."""

    recipe: str
    params: int
    """Trainable parameters Ψ (meta-device count of the recipe's DualEncoder)."""
    world_size: int
    engine: str
    zero_stage: int
    """ZeRO stage whose formula gives the model states (FSDP2 full sharding: 3)."""
    precision: str
    """train.precision (tower arithmetic)."""
    states_precision: str
    """Precision spec of the model states: fp16/bf16 = 16-bit weights + fp32 Adam master (DeepSpeed);
    fp32 = fp32 weights/grads/Adam (local engine under autocast, FSDP2's sharded fp32 parameters)."""
    global_batch: int
    chunk: int
    """Gradient-cache chunk per rank (the recipe's, also used by ``fused_gradcache`` when it is off)."""
    gradient_cache: bool
    """Whether the recipe itself runs the gradient cache."""
    embed_dim: int
    act_bytes_per_pair: float
    """Forward+backward activation peak of one pair, both towers (no gradient cache)."""
    chunk_act_bytes_per_row: float
    """The same for the larger tower alone (the gradient cache runs the towers one at a time)."""
    nograd_act_bytes_per_row: float
    act_fixed_bytes: float
    act_source: str
    input_bytes_per_pair: float
    engine_buffer_bytes: float
    zero3_live_params: int | None
    step_transient_bytes: float | None
    fused_impl: str
    """The fused loss's backend on the target device (:func:`vlscale.memory.lossmem.resolve_impl`)."""
    offload: str
    """DeepSpeed offload in the ds_config: "" (none), "optimizer" or "optimizer+params" (host memory)."""
    gpu_memory: float
    context_reserve: float
    allocator_slack: float
    device_kind: str = lossmem.DEFAULT_KIND
    """The target GPU kind (``--gpu``) or the device measured on: picks the loss backend."""
    gpu_sms: int = 132
    """Its streaming multiprocessors (the Triton forward's grid of partial statistics)."""
    fused_impl_why: str = ""
    grad_transient_bytes: float = 0.0
    """The largest embedding table's dense gradient (see :func:`predict_memory`)."""
    grads_copied: bool = False
    grads_persistent: bool = False
    grads_unreduced: bool = False
    """DeepSpeed ZeRO-1/2 with the gradient cache: whole gradients until one coalesced reduction."""
    techniques: dict[str, Any] = field(default_factory=dict)
    """:class:`~vlscale.memory.techmem.TechniqueMemory` fields (empty: the plain symmetric loss)."""
    host: dict[str, Any] = field(default_factory=dict)
    """Host memory of the data path per rank (:func:`vlscale.memory.hostmem.host_batch_memory`)."""
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> float:
        return self.gpu_memory - self.context_reserve

    def predict_kwargs(self, strategy: str) -> dict[str, Any]:
        """:func:`predict_memory` arguments (without ``global_batch``) for one strategy."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        cached = strategy == "fused_gradcache"
        return dict(params=self.params, world_size=self.world_size, zero_stage=self.zero_stage,
                    precision=self._spec(), chunk=self.chunk if cached else None,
                    embed_dim=self.embed_dim, act_bytes_per_pair=self.act_bytes_per_pair,
                    loss_impl="naive" if strategy == "naive" else self.fused_impl,
                    input_bytes_per_pair=self.input_bytes_per_pair, engine_buffer_bytes=self.engine_buffer_bytes,
                    zero3_live_params=self.zero3_live_params, act_fixed_bytes=self.act_fixed_bytes,
                    chunk_act_bytes_per_row=self.chunk_act_bytes_per_row if cached else None,
                    nograd_act_bytes_per_row=self.nograd_act_bytes_per_row,
                    step_transient_bytes=self.step_transient_bytes, grad_transient_bytes=self.grad_transient_bytes,
                    grads_copied=self.grads_copied, grads_persistent=self.grads_persistent,
                    grads_unreduced=self.grads_unreduced, gpu_sms=self.gpu_sms,
                    techniques=TechniqueMemory(**self.techniques))

    def _spec(self) -> PrecisionSpec:
        """Bytes per parameter on the device: offloaded optimizer states (and parameters) live on the host."""
        spec = precision_spec(self.states_precision)
        if "optimizer" in self.offload:
            spec = dataclasses.replace(spec, optim=0, step_grad=0)
        if "params" in self.offload:
            spec = dataclasses.replace(spec, param=0)
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"usable": self.usable}


def with_slack(est: MemoryEstimate, fraction: float) -> MemoryEstimate:
    """``est`` plus an "allocator slack" component of ``fraction`` × its peak, live in every phase."""
    comps = dict(est.components)
    comps["allocator slack"] = fraction * est.total
    phases = {p: [*names, "allocator slack"] for p, names in est.phases.items()}
    return MemoryEstimate(comps, phases, dict(est.config) | {"allocator_slack": fraction})


def plan_inputs(cfg: Any, *, world_size: int, gpu_memory: float, act_mib_per_pair: float | None = None,
                context_reserve: float = DEFAULT_CONTEXT_RESERVE, allocator_slack: float = DEFAULT_ALLOCATOR_SLACK,
                fused_impl: str | None = None, tower_costs: dict[str, dict[str, float]] | None = None,
                device_kind: str | lossmem.DeviceKind | None = None) -> PlanInputs:
    """The prediction inputs of ``cfg`` (a :class:`vlscale.config.Config`) on ``world_size`` GPUs.

    ``act_mib_per_pair``: a measured forward+backward activation cost per pair (MiB, both towers),
    used instead of the meta-device count. ``tower_costs``: measured per-tower costs
    (``{"image"|"text": {"per_row", "fixed", "nograd_per_row"}}``, from
    :func:`vlscale.memory.towers.measure_activation_cost`), used instead of either.
    ``device_kind``: the target GPU (a :data:`~vlscale.memory.lossmem.DEVICE_KINDS` name, ``sm_XY``
    or a :class:`~vlscale.memory.lossmem.DeviceKind`); it decides what ``loss.impl=auto`` runs.
    ``fused_impl``: the fused backend instead of the recipe's ``loss.impl``.
    """
    import torch

    from vlscale import config as vlscale_config
    from vlscale.memory.hostmem import host_batch_memory
    from vlscale.memory.towers import chunk_cost, meta_counts
    from vlscale.train.deepspeed_json import DS_REDUCE_BUCKET, reduce_bucket
    from vlscale.train.dsconfig import resolve_batch

    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"--world-size must be a positive integer, got {world_size!r}")
    if not 0 <= allocator_slack < 1:
        raise ValueError(f"allocator slack must be a fraction in [0, 1), got {allocator_slack}")
    if context_reserve < 0 or gpu_memory <= context_reserve:
        raise ValueError(f"GPU memory {gpu_memory / GIB:.2f} GiB leaves nothing after the "
                         f"{context_reserve / GIB:.2f} GiB reserved for the CUDA context; give a larger --gpu-memory")
    _, _, global_batch = resolve_batch(cfg.train, world_size)  # the batch arithmetic, said clearly
    notes: list[str] = []
    if device_kind is None:
        notes.append(f"no --gpu given: the loss backend is the one a {lossmem.DEFAULT_KIND} runs (compute "
                     "capability ≥ 8.0); pass --gpu v100 (or another kind) for the GPU you will use")
    kind = device_kind if isinstance(device_kind, lossmem.DeviceKind) else \
        lossmem.device_kind(device_kind or lossmem.DEFAULT_KIND)
    impl, why = lossmem.resolve_impl(fused_impl or cfg.loss.impl, kind)
    precision, engine, tech = cfg.train.precision, cfg.engine.kind, cfg.techniques
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    counts = meta_counts(cfg.model, dtype, mim_mask_ratio=tech.mim_mask_ratio if tech.mim_weight > 0 else None,
                         mim_norm_pix=tech.mim_norm_pix, momentum=tech.momentum_queue > 0)
    params = counts.params
    stage, states, buffers, live, step_tr, offload = 0, "fp32", 0.0, None, None, ""
    fixed = 0.0
    if engine == "deepspeed":
        stage, states = cfg.engine.zero_stage, precision
        zero = vlscale_config.to_deepspeed_config(cfg, world_size).get("zero_optimization", {})
        devices = {k: (zero.get(f"offload_{k}") or {}).get("device", "none") for k in ("optimizer", "param")}
        offload = "+".join(n for n, k in (("optimizer", "optimizer"), ("params", "param"))
                           if devices[k] in ("cpu", "nvme"))
        bucket = reduce_bucket({"zero_optimization": zero}, params)  # what the trainer sets (capped at Ψ)
        buffers = deepspeed_bucket_bytes(stage, precision, reduce_bucket_size=float(
            bucket if bucket is not None else zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
            overlap_comm=bool(zero.get("overlap_comm", False)))  # (the default only at stage 0: 0 bytes)
        if stage == 3:
            live = int(float(zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET)))
        # DeepSpeed flattens each AdamW group into one fp32 partition (ZeRO 1-3; FP16/BF16_Optimizer
        # at stage 0) and the client torch AdamW (single-tensor) steps it as one tensor, group by group:
        # sqrt(v) and its quotient (8 bytes per element of the largest group's partition) plus, in
        # mixed precision, the fp32 copy of that partition's 16-bit gradient (4 more). fp32 at stage 0
        # steps the module's own parameters: the largest parameter's two temporaries.
        shard = world_size if stage >= 1 else 1
        if stage == 0 and precision == "fp32":
            step_tr = 8.0 * counts.largest_param
        else:
            step_tr = (8.0 + 4.0 * (precision != "fp32")) * -(-counts.largest_group // shard)
        step_tr = 0.0 if offload else step_tr  # an offloaded step runs on the host
    elif engine == "fsdp":
        # FSDP2: fp32 parameters, gradients and Adam states sharded (16Ψ/W); the largest shard unit
        # gathered in 16 bits; without gradient sync (all chunks but the last) the unsharded
        # gradients accumulate locally in fp32.
        stage, live = 3, counts.largest_unit * (2 if precision != "fp32" else 1)
        buffers = 4.0 * params if cfg.gradcache.enabled else 0.0
        # torch's single-tensor AdamW (vlscale.train.optim): sqrt(v) and its quotient, one shard at a time.
        step_tr = 2 * 4.0 * -(-counts.largest_param // world_size)
        notes.append("FSDP2: model states as ZeRO-3 with fp32 shards; unsharded fp32 gradients "
                     "accumulate between chunks (engine buffers)")
    else:
        # torch's single-tensor AdamW (foreach=False, vlscale.train.optim) makes sqrt(v) and its
        # quotient for one parameter at a time: two temporaries the size of the largest one.
        step_tr = 2 * 4.0 * counts.largest_param
        if precision != "fp32":
            fixed = 2.0 * params  # autocast's 16-bit weight copies during forward/backward
    grad_bytes = precision_spec(states).grad
    if tower_costs is not None:
        costs, source = tower_costs, "measured on this device"
    else:
        costs = {t: {**c, "per_row": c["per_row"] * BACKWARD_TRANSIENT_FACTOR, "fixed": 0.0}
                 for t, c in counts.towers.items()}
        source = (f"meta-device count of tensors saved for backward ({precision}) × {BACKWARD_TRANSIENT_FACTOR} "
                  "for the backward's transients (calibrated on ViT-B/16 + BERT-base, ANCHORS.md)")
        if cfg.model.grad_checkpointing:
            source += "; activation checkpointing: stored block inputs + one recomputed block"
    gc = cfg.gradcache
    chunk = max(gc.chunk_size, gc.image_chunk_size, gc.text_chunk_size)
    pair = sum(c["per_row"] for c in costs.values())
    chunk_row, tower_fixed = chunk_cost(costs, chunk)
    if act_mib_per_pair is not None:
        if not act_mib_per_pair > 0:
            raise ValueError(f"--act-mib-per-pair must be positive, got {act_mib_per_pair}")
        # Scale the towers' split to the given pair cost (the larger tower keeps its share).
        chunk_row *= act_mib_per_pair * MIB / pair
        pair, source = act_mib_per_pair * MIB, "given (--act-mib-per-pair)"
    fixed += tower_fixed
    size, length = cfg.model.image_size or 224, cfg.model.context_length
    concept_bytes = 2 * cfg.model.concept_tokens * 8  # concept token ids + mask (int64) beside each image
    momentum = tech.momentum_queue > 0
    techniques = TechniqueMemory(
        contrastive=tech.contrastive_weight > 0, hier_levels=cfg.model.n_hier if tech.hier_on else 0,
        momentum_params=counts.momentum_params, queue_size=tech.momentum_queue,
        candidates=tech.momentum_candidates if momentum else "batch_queue",
        # master_params() builds each whole fp32 master (DeepSpeed ZeRO / bf16 optimizer, FSDP2 gather);
        # the local engine's parameters are the fp32 masters themselves.
        ema_transient_bytes=4.0 * counts.largest_param if momentum and (
            engine == "fsdp" or (engine == "deepspeed" and (stage >= 1 or precision == "bf16"))) else 0.0,
        mim_act_bytes_per_row=counts.mim_per_row * BACKWARD_TRANSIENT_FACTOR)
    return PlanInputs(
        recipe=cfg.recipe, params=params, world_size=world_size, engine=engine, zero_stage=stage, precision=precision,
        states_precision=states, global_batch=global_batch, chunk=chunk, gradient_cache=gc.enabled,
        embed_dim=cfg.model.embed_dim,
        act_bytes_per_pair=pair, chunk_act_bytes_per_row=chunk_row,
        nograd_act_bytes_per_row=max(c.get("nograd_per_row", 0.0) for c in costs.values()),
        act_fixed_bytes=fixed, act_source=source,
        input_bytes_per_pair=3 * size * size * 4 + 2 * length * 8 + concept_bytes, engine_buffer_bytes=buffers,
        zero3_live_params=live, step_transient_bytes=step_tr, fused_impl=impl, offload=offload,
        gpu_memory=gpu_memory, context_reserve=context_reserve, allocator_slack=allocator_slack,
        device_kind=kind.name, gpu_sms=kind.sms or 132, fused_impl_why=why,
        grad_transient_bytes=float(grad_bytes * counts.largest_embedding),
        grads_copied=engine == "deepspeed" and stage >= 1, grads_persistent=engine == "deepspeed" and stage == 3,
        grads_unreduced=engine == "deepspeed" and stage in (1, 2) and gc.enabled,
        techniques=techniques.to_dict(), notes=notes,
        host=host_batch_memory(cfg, world_size, side=cfg.data.image_size or size))


def predict(inputs: PlanInputs, strategy: str, global_batch: int) -> MemoryEstimate:
    """One strategy's prediction at ``global_batch``, with the allocator slack."""
    est = predict_memory(global_batch=global_batch, **inputs.predict_kwargs(strategy))
    return with_slack(est, inputs.allocator_slack)


def largest_batch(inputs: PlanInputs, strategy: str) -> int:
    """Largest global batch (a multiple of W) whose peak, slack included, fits the usable memory."""
    cap = inputs.usable / (1.0 + inputs.allocator_slack)  # slack is a fraction of the peak
    kw = inputs.predict_kwargs(strategy)
    world = kw.pop("world_size")
    return max_global_batch(cap, world_size=world, multiple_of=world, **kw)


_ADVICE = {
    "reforward": "a smaller gradcache.chunk_size or model.grad_checkpointing=true",
    "fwd_bwd": "gradcache.enabled=true (only one chunk's activations are then alive)",
    "loss": "fewer pairs per rank (more ranks), never the naive loss at this batch",
    "embed": "a smaller gradcache.chunk_size (pass 1 holds a chunk's no-grad forward)",
    "step": "a higher ZeRO stage or more ranks (model and optimizer states)",
    "parameters": "ZeRO-3 or FSDP2 (parameters sharded) or more ranks",
    "optimizer states": "a higher ZeRO stage, more ranks, or optimizer offload in your ds_config",
    "gradients": "ZeRO-2 or higher (gradients sharded) or more ranks",
    "momentum copy": "a smaller model: the fp32 momentum copy is whole on every rank whatever the engine",
    "MIM forward": "a smaller gradcache.chunk_size (each image chunk runs its MIM forward too)",
    "engine buffers": "a smaller zero_optimization.reduce_bucket_size in your ds_config (engine.ds_config)",
    "activations": "a smaller gradcache.chunk_size or model.grad_checkpointing=true",
    "loss workspace": "the fused loss instead of dense logits",
}


def recipe_strategy(inputs: PlanInputs) -> str:
    return "fused_gradcache" if inputs.gradient_cache else "fused"


def plan(inputs: PlanInputs, *, sweep_points: int = 24) -> dict[str, Any]:
    """Predictions at the recipe's batch for every strategy, their largest batches, the verdict, and
    a sweep of peak memory vs global batch (for the plot). All sizes in bytes."""
    strategies: dict[str, Any] = {}
    for name in STRATEGIES:
        est = predict(inputs, name, inputs.global_batch)
        kw = inputs.predict_kwargs(name)
        strategies[name] = {
            "loss_impl": kw["loss_impl"], "gradient_cache": kw["chunk"] is not None, "chunk": kw["chunk"],
            "peak_bytes": est.total, "peak_phase": est.peak_phase, "fits": est.total <= inputs.usable,
            "largest_global_batch": largest_batch(inputs, name), "estimate": est.to_dict()}
    chosen = recipe_strategy(inputs)
    est = predict(inputs, chosen, inputs.global_batch)
    top = max(2 * inputs.global_batch, *(2 * s["largest_global_batch"] for s in strategies.values()))
    w = inputs.world_size
    lo, hi = math.log2(w), math.log2(max(top, 2 * w))
    batches = sorted({w * max(1, round(2 ** (lo + (hi - lo) * i / (sweep_points - 1)) / w))
                      for i in range(sweep_points)} | {inputs.global_batch})
    sweep = {"global_batch": batches,
             "peak_bytes": {n: [predict(inputs, n, b).total for b in batches] for n in STRATEGIES}}
    return {"inputs": inputs.to_dict(), "strategies": strategies, "chosen": {"strategy": chosen,
            "global_batch": inputs.global_batch}, "estimate": est, "sweep": sweep,
            "verdict": verdict(inputs, strategies, chosen)}


def verdict(inputs: PlanInputs, strategies: dict[str, Any], chosen: str) -> str:
    """One line: does the recipe's batch fit with its own strategy, what fits otherwise, what to change."""
    s = strategies[chosen]
    where = f"global batch {inputs.global_batch:,} on {inputs.world_size} × {fmt_bytes(inputs.gpu_memory)}"
    others = "; ".join(f"{n} up to {strategies[n]['largest_global_batch']:,}" for n in STRATEGIES if n != chosen)
    if s["fits"]:
        return (f"FITS: {where} with {chosen}: peak {fmt_bytes(s['peak_bytes'])} of {fmt_bytes(inputs.usable)} "
                f"usable (largest global batch {s['largest_global_batch']:,}; {others})")
    if s["largest_global_batch"] == 0:
        smallest = predict(inputs, chosen, inputs.world_size)
        phase = smallest.peak_phase
        part = max(smallest.phases[phase], key=smallest.components.__getitem__)
        return (f"DOES NOT FIT at any batch: {where} with {chosen}: even {inputs.world_size} pairs need "
                f"{fmt_bytes(smallest.total)} > {fmt_bytes(inputs.usable)} usable, mostly {part} "
                f"({fmt_bytes(smallest.components[part])}, phase `{phase}`); try {_ADVICE.get(part, _ADVICE['step'])}")
    return (f"DOES NOT FIT: {where} with {chosen}: peak {fmt_bytes(s['peak_bytes'])} > {fmt_bytes(inputs.usable)} "
            f"usable in phase `{s['peak_phase']}`; largest that fits {s['largest_global_batch']:,} "
            f"({others}); try {_ADVICE.get(s['peak_phase'], 'more ranks')}")
