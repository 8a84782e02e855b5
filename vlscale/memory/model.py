"""Predictive per-rank memory model for a contrastive training step (with or without gradient cache).

The model answers "does this configuration fit?" before any GPU time is spent. It adds up what
one rank holds, component by component, and takes the peak over the phases of a step, because the
components are not all alive at once:

``keys``       momentum contrast only: the EMA update and the momentum copy's keys, chunk by chunk.
``embed``      gradient cache pass 1: chunks embedded without a graph; the local embeddings grow
               (chunk pieces plus their concatenation: 2× the local embeddings at the end).
``loss``       the loss over local rows × gathered columns and d(loss)/d(embeddings).
``reforward``  pass 3: one chunk re-forwarded with a graph and back-propagated into the parameters'
               gradients (created by this phase: every engine's step frees them); the embeddings'
               cached gradients are still referenced by the step (the embeddings themselves are
               dropped after the loss, as :class:`vlscale.gradcache.GradCache` does).
``fwd_bwd``    without gradient cache: activations of the whole local batch plus the loss.
``step``       the optimizer step: its temporaries over the states and the gradients.

Model states follow the ZeRO paper (Rajbhandari et al., 2020) with Ψ parameters on W ranks:
mixed-precision Adam holds 2Ψ (16-bit params) + 2Ψ (16-bit grads) + 12Ψ (fp32 master, momentum,
variance); ZeRO-1 partitions the 12Ψ, ZeRO-2 the gradients too, ZeRO-3 everything. fp32 training
holds 4Ψ + 4Ψ + 8Ψ and partitions the same way. They are three components (parameters, gradients,
optimizer states) because the gradients live only from a step's backward to its optimizer step.
The loss's components follow its backend (:mod:`vlscale.memory.lossmem`), the techniques add theirs
(:mod:`vlscale.memory.techmem`). All sizes are bytes; "GiB" is 2³⁰ bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vlscale.memory.lossmem import LOSS_IMPLS, loss_components
from vlscale.memory.techmem import TechniqueMemory

GIB = float(2**30)
MIB = float(2**20)

def fmt_bytes(n: float | None) -> str:
    """Bytes as GiB / MiB / KiB, whichever reads best."""
    if n is None:
        return "–"
    if n == 0:
        return "0"
    a = abs(n)
    if a >= GIB:
        return f"{n / GIB:.2f} GiB"
    if a >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


@dataclass(frozen=True)
class PrecisionSpec:
    """Bytes per parameter of each model state."""

    param: int
    """Working (forward/backward) copy of the parameters."""
    grad: int
    """Gradients as the backward produces them."""
    optim: int
    """Optimizer states incl. any fp32 master copy (Adam mixed precision: 4 + 4 + 4)."""
    step_grad: int
    """fp32 copy of the gradient partition made for the optimizer step (0 if grads are fp32)."""

    @property
    def total(self) -> int:
        return self.param + self.grad + self.optim


PRECISIONS: dict[str, PrecisionSpec] = {
    "fp16": PrecisionSpec(param=2, grad=2, optim=12, step_grad=4),
    "bf16": PrecisionSpec(param=2, grad=2, optim=12, step_grad=4),
    "fp32": PrecisionSpec(param=4, grad=4, optim=8, step_grad=0),
}


def precision_spec(precision: str | PrecisionSpec) -> PrecisionSpec:
    """The :class:`PrecisionSpec` for a name ("fp16", "bf16", "fp32") or a spec given as is."""
    if isinstance(precision, PrecisionSpec):
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or a PrecisionSpec, got {precision!r}")
    return PRECISIONS[precision]


def model_state_bytes(params: int, world_size: int, zero_stage: int, precision: str | PrecisionSpec) -> float:
    """Per-rank bytes of parameters, gradients and optimizer states under ZeRO ``zero_stage``.

    Mixed precision: 16Ψ (stage 0), 4Ψ + 12Ψ/W (1), 2Ψ + 14Ψ/W (2), 16Ψ/W (3).
    """
    _check_positive(params=params, world_size=world_size)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    s = precision_spec(precision)
    w = float(world_size)
    per_param = {
        0: s.param + s.grad + s.optim,
        1: s.param + s.grad + s.optim / w,
        2: s.param + (s.grad + s.optim) / w,
        3: (s.param + s.grad + s.optim) / w,
    }[zero_stage]
    return params * per_param


@dataclass
class MemoryEstimate:
    """A per-rank prediction: components (bytes), which are live in which phase, and the peak."""

    components: dict[str, float]
    phases: dict[str, list[str]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def breakdown(self) -> dict[str, float]:
        """Bytes per component (alias of ``components``)."""
        return dict(self.components)

    def phase_bytes(self) -> dict[str, float]:
        """Bytes live in each phase (sum of that phase's components)."""
        return {p: sum(self.components[c] for c in names) for p, names in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        pb = self.phase_bytes()
        return max(pb, key=pb.__getitem__)

    @property
    def total(self) -> float:
        """The predicted peak: the largest phase."""
        return max(self.phase_bytes().values())

    def fits(self, cap_bytes: float) -> bool:
        return self.total <= cap_bytes

    def carried(self) -> dict[str, set[str]]:
        """Per phase, the components alive when it starts (the rest is what the phase allocates):
        those of the previous phase it keeps; for a step's first phase, what survives a step — the
        parameters, optimizer states and technique state, the gradients when they persist. Gathered
        ZeRO-3 parameters are released after each module, so they count as a phase's own."""
        out: dict[str, set[str]] = {}
        prev: list[str] | None = None
        for phase, names in self.phases.items():
            if prev is None:
                kept = set(self.phases[list(self.phases)[-1]]) - {"optimizer step transient", "momentum keys"}
                if not self.config.get("grads_persistent"):
                    kept.discard("gradients")
            else:
                kept = set(prev)
            out[phase] = (kept & set(names)) - {"zero-3 gathered params"}
            prev = names
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"config": dict(self.config), "components": dict(self.components),
                "phases": {p: list(c) for p, c in self.phases.items()}, "phase_bytes": self.phase_bytes(),
                "peak_phase": self.peak_phase, "total": self.total}

    def table(self, title: str | None = None) -> str:
        """A markdown table: each component in GiB, a mark per phase it is live in, phase totals."""
        names = list(self.phases)
        lines = [f"**{title}**", ""] if title else []
        lines += ["| component | GiB | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]
        for comp, nbytes in self.components.items():
            marks = " | ".join("x" if comp in self.phases[p] else "" for p in names)
            lines.append(f"| {comp} | {nbytes / GIB:.3f} | {marks} |")
        totals = " | ".join(f"{v / GIB:.2f}" for v in self.phase_bytes().values())
        lines.append(f"| **phase total** | | {totals} |")
        lines += ["", f"peak: **{self.total / GIB:.2f} GiB** in phase `{self.peak_phase}`"]
        return "\n".join(lines)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def state_bytes(params: int, world_size: int, zero_stage: int, precision: str | PrecisionSpec) -> dict[str, float]:
    """:func:`model_state_bytes` split into parameters, gradients and optimizer states (per rank)."""
    s, w = precision_spec(precision), float(world_size)
    return {"parameters": params * s.param / (w if zero_stage == 3 else 1.0),
            "gradients": params * s.grad / (w if zero_stage >= 2 else 1.0),
            "optimizer states": params * s.optim / (w if zero_stage >= 1 else 1.0)}


def predict_memory(
    *,
    params: int,
    world_size: int,
    zero_stage: int,
    precision: str | PrecisionSpec,
    global_batch: int,
    chunk: int | None,
    embed_dim: int,
    act_bytes_per_pair: float,
    loss_impl: str = "triton",
    emb_bytes: int = 4,
    input_bytes_per_pair: float = 0.0,
    loss_block: tuple[int, int] | None = None,
    loss_workspace_bytes: float | None = None,
    zero3_live_params: int | None = None,
    engine_buffer_bytes: float = 0.0,
    chunk_act_bytes_per_row: float | None = None,
    act_fixed_bytes: float = 0.0,
    step_transient_bytes: float | None = None,
    nograd_act_bytes_per_row: float = 0.0,
    grad_transient_bytes: float = 0.0,
    grads_copied: bool = False,
    grads_persistent: bool = False,
    grads_unreduced: bool = False,
    gpu_sms: int = 132,
    techniques: TechniqueMemory | None = None,
) -> MemoryEstimate:
    """Predict one rank's peak memory for one training step.

    Args:
        params: trainable parameters Ψ of the whole dual encoder.
        world_size: ranks W; the local batch is ``global_batch / W`` (must divide).
        zero_stage: 0–3 (stage 0 = plain data parallel).
        precision: "fp16" / "bf16" (mixed-precision Adam) or "fp32", or a :class:`PrecisionSpec`.
        global_batch: contrastive batch B over all ranks.
        chunk: gradient-cache chunk per rank (rows re-forwarded at once); ``None``: no gradient cache.
        embed_dim: embedding width D.
        act_bytes_per_pair: activation bytes of one row of a chunk for forward + backward (both
            towers; gradient cache runs the towers separately, so the larger tower's share is
            enough — the pair is a conservative bound).
        loss_impl: "naive" (dense logits) or a fused backend: "triton", "triton-banded",
            "triton-fused", "compiled", "chunked" (:mod:`vlscale.memory.lossmem`).
        emb_bytes: bytes per element of the embeddings handed to the loss (fp32 leaves: 4).
        input_bytes_per_pair: device bytes of one pair's inputs (pixels + tokens); the inputs of
            one chunk (gradient cache) or of the local batch (no cache) are counted.
        loss_block: (rows, columns) of the chunked / compiled backends' tiles (default: theirs).
        loss_workspace_bytes: override of the loss's working buffers (e.g. measured).
        zero3_live_params: parameters gathered at once under ZeRO-3 (default: DeepSpeed's
            prefetch bucket, 5·10⁷ elements, at most Ψ).
        engine_buffer_bytes: engine communication buckets (DeepSpeed's reduce/all-gather buckets).
        chunk_act_bytes_per_row: activation bytes of one chunk row when the towers run one at a
            time (gradient cache): the larger tower's cost. Default: ``act_bytes_per_pair``.
        act_fixed_bytes: activation-phase bytes independent of the rows (e.g. a dense embedding
            gradient in the backward); the intercept of :func:`~vlscale.memory.towers.measure_activation_cost`.
        step_transient_bytes: temporaries of the optimizer step. Default: the fp32 copy of the
            gradient partition this rank steps (``PrecisionSpec.step_grad`` bytes per parameter).
        nograd_act_bytes_per_row: transient peak per row of a no-grad forward (gradient cache pass 1).
        grad_transient_bytes: the dense gradient of the largest embedding table (vocabulary × width
            in the gradients' dtype). A backward makes it as a new tensor before adding it into the
            accumulated gradient (or copying it into the engine's buffer); it is the last product of
            its tower's backward, made once the chunk's activations are freed, so the phase holds
            the larger of the two: the component is its excess over the activations.
        grads_copied: the engine copies every gradient a backward produces into its own buffer
            (DeepSpeed ZeRO 1–3): the transient occurs at every backward. Otherwise (local engine,
            FSDP2) only when a gradient already exists, i.e. from a tower's second chunk on.
        grads_persistent: the gradients' storage lives across steps (DeepSpeed ZeRO-3's flat
            partition buffer); otherwise it is created by the backward and freed by the step.
        grads_unreduced: gradient cache under DeepSpeed ZeRO-1/2's coalesced reduction (what
            :class:`~vlscale.engines.DeepSpeedEngine` uses): the chunk backwards leave each rank's
            whole gradients (Ψ × grad bytes) on the parameters; one reduction after the last chunk,
            its activations freed, fills the bucket, then the partition. Reforward then holds the
            whole gradients plus the larger of a chunk's backward and the bucket (measured: docs/memory.md).
        gpu_sms: streaming multiprocessors of the GPU (the Triton forward's grid of partials).
        techniques: momentum contrast, hierarchical levels, MIM (:class:`TechniqueMemory`).
    """
    _check_positive(params=params, world_size=world_size, global_batch=global_batch, embed_dim=embed_dim)
    for name, v in {"act_bytes_per_pair": act_bytes_per_pair, "input_bytes_per_pair": input_bytes_per_pair,
                    "engine_buffer_bytes": engine_buffer_bytes, "act_fixed_bytes": act_fixed_bytes,
                    "chunk_act_bytes_per_row": chunk_act_bytes_per_row or 0.0,
                    "step_transient_bytes": step_transient_bytes or 0.0,
                    "nograd_act_bytes_per_row": nograd_act_bytes_per_row,
                    "grad_transient_bytes": grad_transient_bytes}.items():
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {v!r}")
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
    if global_batch % world_size:
        raise ValueError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    b_local = global_batch // world_size
    if chunk is not None and not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    spec = precision_spec(precision)
    tech = techniques or TechniqueMemory()
    rows = b_local if chunk is None else min(chunk, b_local)
    per_row = act_bytes_per_pair if chunk is None or chunk_act_bytes_per_row is None else chunk_act_bytes_per_row
    step_transient = (spec.step_grad * params / (world_size if zero_stage >= 1 else 1)
                      if step_transient_bytes is None else step_transient_bytes)
    d, n_emb = embed_dim, tech.embeddings_per_tower

    comps: dict[str, float] = state_bytes(params, world_size, zero_stage, spec)
    live = 0.0
    if zero_stage == 3:
        live = spec.param * min(params, zero3_live_params if zero3_live_params is not None else 50_000_000)
    activations = rows * float(per_row) + act_fixed_bytes
    accumulates = grads_copied or (chunk is not None and b_local > rows)
    comps.update({
        "zero-3 gathered params": live,
        "engine buffers": float(engine_buffer_bytes),
        "optimizer step transient": float(step_transient),
        "inputs": rows * float(input_bytes_per_pair),
        "activations": activations,
        "embedding-gradient transient": max(0.0, grad_transient_bytes - activations) if accumulates else 0.0,
        "local embeddings": 2.0 * n_emb * b_local * d * emb_bytes,
        "embedding grads": 2.0 * n_emb * b_local * d * 4,
    })
    unreduced = grads_unreduced and chunk is not None and zero_stage in (1, 2)
    if unreduced:
        backward_bytes = comps["inputs"] + activations + comps["embedding-gradient transient"]
        comps["unreduced gradients beyond the partition"] = params * spec.grad - comps["gradients"]
        comps["reduce bucket beyond the backward"] = max(0.0, comps.pop("engine buffers") - backward_bytes)
    comps.update(loss_components(tech.loss_terms(), loss_impl, b_local=b_local, global_batch=global_batch, d=d,
                                 emb_bytes=emb_bytes, sms=gpu_sms, tile=loss_block))
    if loss_workspace_bytes is not None:
        comps["loss workspace"] = float(loss_workspace_bytes)
    # DeepSpeed allocates its reduce bucket at a step's first backward and releases it after the
    # optimizer step (``_release_ipg_buffers``); FSDP2's unsharded gradients live between the backward
    # of the first chunk and the reduce-scatter: engine buffers belong to the backward phases. So do
    # the gradients (set to None by every engine's step), except ZeRO-3's flat partition buffer.
    base = ["parameters", "optimizer states", "zero-3 gathered params"]
    kept = ["gradients"] if grads_persistent else []
    backward = ["engine buffers", "inputs", "activations", "embedding-gradient transient"]
    loss = ["local embeddings", "embedding grads", "gathered columns", "column grad partials",
            "loss statistics", "loss workspace"]
    if chunk is None:
        phases = {"fwd_bwd": [*base, "gradients", *backward, *loss],
                  "step": [*base, "gradients", "optimizer step transient"]}
    else:
        # Pass 1 ends with the chunk pieces and their concatenation alive at once.
        comps["embedding pieces"] = comps["local embeddings"]
        comps["no-grad forward transient"] = rows * float(nograd_act_bytes_per_row)
        phases = {"embed": [*base, *kept, "inputs", "local embeddings", "embedding pieces",
                            "no-grad forward transient"],
                  "loss": [*base, *kept, *loss],
                  "reforward": [*base, "gradients", *backward, "embedding grads"],
                  "step": [*base, "gradients", "optimizer step transient"]}
        if unreduced:
            phases["reforward"] = [*base, "gradients", "unreduced gradients beyond the partition",
                                   "reduce bucket beyond the backward",
                                   *(c for c in backward if c != "engine buffers"), "embedding grads"]
    extra = tech.components(b_local=b_local, rows=rows, d=d, nograd_per_row=nograd_act_bytes_per_row,
                            reforward_rows=rows)
    if tech.momentum:  # the key pass runs before the step's first phase
        phases = {"keys": [*base, *kept, "inputs"], **phases}
    for name, (nbytes, where) in extra.items():
        comps[name] = nbytes
        for phase in where:
            if phase in phases:
                phases[phase].append(name)
    config = {"params": params, "world_size": world_size, "zero_stage": zero_stage,
              "precision": precision if isinstance(precision, str) else asdict(precision),
              "global_batch": global_batch, "local_batch": b_local, "chunk": chunk, "embed_dim": d,
              "act_bytes_per_pair": act_bytes_per_pair, "loss_impl": loss_impl, "emb_bytes": emb_bytes,
              "input_bytes_per_pair": input_bytes_per_pair, "loss_block": list(loss_block) if loss_block else None,
              "loss_workspace_bytes": loss_workspace_bytes, "engine_buffer_bytes": engine_buffer_bytes,
              "chunk_act_bytes_per_row": chunk_act_bytes_per_row, "act_fixed_bytes": act_fixed_bytes,
              "step_transient_bytes": step_transient_bytes, "nograd_act_bytes_per_row": nograd_act_bytes_per_row,
              "grad_transient_bytes": grad_transient_bytes, "grads_copied": grads_copied,
              "grads_persistent": grads_persistent, "grads_unreduced": grads_unreduced, "gpu_sms": gpu_sms,
              "techniques": tech.to_dict()}
    return MemoryEstimate(comps, phases, config)


def deepspeed_bucket_bytes(zero_stage: int, precision: str | PrecisionSpec, *,
                           reduce_bucket_size: float = 5e8, overlap_comm: bool = False) -> float:
    """Bytes of DeepSpeed's contiguous gradient-reduction buckets (ZeRO 1–3, ``contiguous_gradients``).

    ``reduce_bucket_size`` elements each (DeepSpeed's default 5·10⁸ — not capped by the model size),
    two with ``overlap_comm``. ZeRO-1 stages the fp32 accumulator, ZeRO-2/3 the 16-bit gradients.
    """
    if zero_stage == 0:
        return 0.0
    spec = precision_spec(precision)
    elem = 4 if zero_stage == 1 else spec.grad
    return float(reduce_bucket_size) * elem * (2 if overlap_comm else 1)


def max_global_batch(cap_bytes: float, *, world_size: int, multiple_of: int | None = None,
                     limit: int = 2**40, **kwargs: Any) -> int:
    """Largest global batch (a multiple of ``multiple_of``, default W) whose predicted peak ≤ cap.

    ``kwargs`` are :func:`predict_memory`'s other arguments (without ``global_batch``). Returns 0
    when even the smallest batch does not fit. The prediction is monotone in the batch, so the
    answer is found by doubling then bisection.
    """
    _check_positive(cap_bytes=cap_bytes, world_size=world_size)
    step = multiple_of or world_size
    if step % world_size:
        raise ValueError(f"multiple_of {step} must be a multiple of world_size {world_size}")

    def fits(k: int) -> bool:
        return predict_memory(world_size=world_size, global_batch=k * step, **kwargs).total <= cap_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi * step > limit:
            return lo * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step
