"""Inputs of the memory model measured from real towers: parameter counts and activation bytes.

* :func:`dual_encoder_params` builds :class:`vlscale.model.DualEncoder` on the meta device
  (random-init config, no weights, no download, no memory) and counts its parameters.
* :func:`saved_activation_bytes` counts the bytes autograd saves for backward per sample, on the
  meta device (no compute) or a real one. It is a *lower bound* of the forward+backward activation
  peak: it misses the backward's transient buffers and autocast's fp32 copies. On meta, attention is
  counted as a fused (flash) kernel saves it — output and log-sum-exp — as it runs on a GPU.
* :func:`measure_activation_cost` measures the forward+backward peak on a real device (CUDA
  allocator or :class:`~vlscale.memory.tracker.LiveTensorBytes` on CPU) at two chunk sizes and fits
  ``fixed + n · per_row``, so per-row activations and constant transients are told apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlscale.memory.tracker import MemoryTracker

# make_inputs(start, stop, device): inputs of rows [start, stop) of a rank's batch. The same rows
# must give the same inputs every time (the gradient cache re-forwards them).
InputsFn = Callable[[int, int, torch.device], dict[str, Tensor]]


def count_params(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements, each shared parameter once."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        if p.requires_grad or not trainable_only:
            seen[id(p)] = p.numel()
    return int(sum(seen.values()))


def meta_dual_encoder(**cfg: Any) -> nn.Module:
    """``vlscale.model.DualEncoder(ModelConfig(**cfg))`` on the meta device (no memory, no weights)."""
    from vlscale.model import DualEncoder, ModelConfig

    with torch.device("meta"):
        return DualEncoder(ModelConfig(**cfg))


def dual_encoder_params(vision_model: str = "vit_base_patch16_224", text_model: str = "bert-base-uncased",
                        embed_dim: int = 512, **cfg: Any) -> int:
    """Trainable parameters of a dual encoder built from config on the meta device."""
    return count_params(meta_dual_encoder(vision_model=vision_model, text_model=text_model,
                                          embed_dim=embed_dim, **cfg))


def pair_inputs(image_size: int = 224, context_length: int = 32, vocab: int = 1000, *,
                seed: int = 0) -> InputsFn:
    """Random (pixels, tokens) pairs, full-length text; rows [start, stop) are seeded by ``start``."""

    def make(start: int, stop: int, device: torch.device) -> dict[str, Tensor]:
        n = stop - start
        pixels = torch.empty(n, 3, image_size, image_size, device=device)
        tokens = torch.zeros(n, context_length, dtype=torch.long, device=device)
        if device.type != "meta":
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
            pixels.normal_(generator=gen)
            tokens.random_(1, vocab, generator=gen)
        return {"pixels": pixels, "tokens": tokens}

    return make


@contextlib.contextmanager
def _fused_attention_on_meta() -> Iterator[None]:
    """On meta tensors, run SDPA as the flash kernel (saves output + lse, not the L×L probabilities).

    The meta device otherwise dispatches SDPA to the math path, which saves the attention matrix
    that a GPU's fused kernels never store. transformers' check for an all-ones padding mask calls
    ``.item()``, impossible on meta; with full-length text the mask is all ones, so skip it.
    """
    original = F.scaled_dot_product_attention

    def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, **kw: Any) -> Tensor:
        if query.device.type != "meta":
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, **kw)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device="meta")
        # dropout in a fused kernel saves only an RNG seed, so count it without dropout.
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]

    patches: list[tuple[Any, str, Any]] = [(F, "scaled_dot_product_attention", sdpa)]
    try:
        from transformers import masking_utils

        if hasattr(masking_utils, "_ignore_bidirectional_mask_sdpa"):
            patches.append((masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: True))
    except ImportError:
        pass
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


def _forward_outputs(model: nn.Module, inputs: dict[str, Tensor], *, need_grad: bool = True) -> list[Tensor]:
    out = model(**inputs)
    if isinstance(out, Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out
    return [v for v in values if isinstance(v, Tensor) and (v.requires_grad or not need_grad)]


def saved_activation_bytes(model: nn.Module, make_inputs: InputsFn, *, n: int = 2,
                           dtype: torch.dtype | None = None) -> float:
    """Bytes saved for backward per sample by one forward of ``n`` samples (parameters excluded).

    Storages are counted once (views of one tensor share it). On the meta device nothing is
    computed; ``dtype`` casts the model in place (e.g. fp16, to count what a 16-bit engine saves).
    """
    device = next(model.parameters()).device
    if dtype is not None:
        model = model.to(dtype)
    params = {id(p) for p in model.parameters()}
    keep: list[Tensor] = []  # keep the bases alive so that ids are not reused while counting
    seen: set[Any] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        base = t._base if t._base is not None else t
        keep.append(base)
        key = id(base) if base.device.type == "meta" else (str(base.device), base.untyped_storage().data_ptr())
        if id(base) not in params and key not in seen:
            seen.add(key)
            total += base.untyped_storage().nbytes()
        return t

    inputs = make_inputs(0, n, device)
    if dtype is not None:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    ctx = _fused_attention_on_meta() if device.type == "meta" else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward_outputs(model, inputs)
    return total / n


def _fwd_bwd_peak(model: nn.Module, inputs: dict[str, Tensor], tracker: MemoryTracker, name: str,
                  autocast_dtype: torch.dtype | None, *, grad: bool = True) -> int:
    device = tracker.device
    with tracker.phase(name):
        ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx, torch.set_grad_enabled(grad):
            outs = _forward_outputs(model, inputs, need_grad=grad)
        if grad:
            torch.stack([o.float().square().mean() for o in outs]).sum().backward()
        del outs
    return tracker.records[-1].delta_bytes


@dataclass(frozen=True)
class ActivationCost:
    """Forward+backward activation peak of a chunk of n rows ≈ ``fixed + n · per_row`` bytes."""

    per_row: float
    fixed: float
    nograd_per_row: float = 0.0
    """Peak per row of a forward without a graph (gradient cache pass 1)."""


def measure_activation_cost(model: nn.Module, make_inputs: InputsFn, *, sizes: tuple[int, int] = (8, 24),
                            autocast_dtype: torch.dtype | None = None, backend: str = "auto") -> ActivationCost:
    """Measure the forward+backward activation peak at two chunk sizes; fit ``fixed + n · per_row``.

    The peak is counted above the memory live before the step; gradients are allocated by a
    warm-up step first (they are model states, not activations). ``fixed`` catches row-independent
    transients such as a dense word-embedding gradient. ``backend``: a :class:`MemoryTracker`
    backend; "auto" is the CUDA allocator on CUDA and the exact "tensors" count elsewhere (RSS is
    too coarse for this). Pick sizes large enough that the activations dominate the transients.
    """
    n1, n2 = sizes
    if not 0 < n1 < n2:
        raise ValueError(f"sizes must be increasing positive ints, got {sizes}")
    device = next(model.parameters()).device
    if backend == "auto":
        backend = "cuda" if device.type == "cuda" else "tensors"
    tracker = MemoryTracker(device, backend=backend)
    was_training = model.training
    model.train()
    try:
        with tracker.tracking():
            _fwd_bwd_peak(model, make_inputs(0, n1, device), tracker, "warmup", autocast_dtype)
            p1, p2 = (_fwd_bwd_peak(model, make_inputs(0, n, device), tracker, f"n={n}", autocast_dtype)
                      for n in (n1, n2))
            q1, q2 = (_fwd_bwd_peak(model, make_inputs(0, n, device), tracker, f"no-grad n={n}", autocast_dtype,
                                    grad=False) for n in (n1, n2))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    per_row = max(0.0, (p2 - p1) / (n2 - n1))
    return ActivationCost(per_row=per_row, fixed=max(0.0, p1 - per_row * n1),
                          nograd_per_row=max(q1 / n1, q2 / n2))


def chunk_cost(costs: dict[str, dict[str, float]], rows: int) -> tuple[float, float]:
    """``(per_row, fixed)`` of the tower whose chunk of ``rows`` costs most (``fixed + rows · per_row``).

    The gradient cache runs the towers one at a time, so a chunk holds ONE tower's activations: the
    largest per-row cost of one tower must not be combined with another tower's row-independent
    bytes (e.g. a text tower's dense word-embedding gradient).
    """
    top = max(costs.values(), key=lambda c: c.get("fixed", 0.0) + rows * c["per_row"])
    return float(top["per_row"]), float(top.get("fixed", 0.0))


def _block_count(tower: nn.Module) -> int:
    """Length of the tower's longest run of same-class blocks (ViT ``blocks``, BERT ``encoder.layer``)."""
    best = 1
    for mod in tower.modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > best:
            kinds = {type(child) for child in mod}
            if len(kinds) == 1:
                best = len(mod)
    return best


@dataclass(frozen=True)
class MetaCounts:
    """What :func:`meta_counts` counts of a recipe's dual encoder on the meta device."""

    params: int
    """Trainable parameters Ψ."""
    largest_unit: int
    """Parameters of the largest direct child (FSDP2's largest shard unit)."""
    largest_param: int
    """Elements of the largest trainable parameter (the optimizer's and the EMA's per-tensor temporaries)."""
    largest_embedding: int
    """Elements of the largest trainable embedding table (its backward makes a dense gradient)."""
    largest_group: int
    """Elements of the largest AdamW parameter group (:func:`vlscale.model.param_groups`): flattened
    into one fp32 partition by DeepSpeed, whose optimizer steps it as one tensor."""
    towers: dict[str, dict[str, float]]
    """Per tower: ``saved_per_row``, ``per_row``, ``nograd_per_row``, ``blocks`` (bytes, one row)."""
    mim_per_row: float = 0.0
    """Bytes saved for backward per image by the masked-image-modeling forward and its loss."""
    momentum_params: int = 0
    """Parameters of the fp32 momentum copy (the model without MIM decoder, nothing frozen)."""


class _MimStep(nn.Module):
    """The MIM hook's work on one chunk (vlscale.techniques.mim): the masked forward and its loss."""

    def __init__(self, model: nn.Module, norm_pix: bool) -> None:
        super().__init__()
        self.model, self.norm_pix = model, norm_pix

    def forward(self, mim_pixels: Tensor, mim_keep: Tensor) -> Tensor:
        from vlscale.techniques.mim import mim_loss

        out = self.model(mim_pixels=mim_pixels, mim_keep=mim_keep)
        return mim_loss(out["mim_pred"], out["mim_target"], mim_keep, norm_pix=self.norm_pix).sum()


def meta_counts(model_cfg: Any, dtype: torch.dtype, *, mim_mask_ratio: float | None = None,
                mim_norm_pix: bool = True, momentum: bool = False) -> MetaCounts:
    """Counted on the meta device (no memory, no weights): parameters, the largest tensors, and per
    tower the bytes saved for backward per row in ``dtype``, with the transient peak per row of a
    no-grad forward (one block's worth). Visual concept tokens (``concept_tokens > 0``) are counted
    at full length with the image tower. ``mim_mask_ratio``: also count the MIM forward + loss.

    With activation checkpointing a tower's cost is its stored block inputs plus one block's
    activations (the block the backward recomputes): the full count over the tower's block count.
    """
    import dataclasses

    kw = dataclasses.asdict(model_cfg)
    ckpt = bool(kw.pop("grad_checkpointing", False))
    model = meta_dual_encoder(**kw, grad_checkpointing=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    model.train()
    size, concepts = model_cfg.image_size or 224, int(getattr(model_cfg, "concept_tokens", 0) or 0)
    make = pair_inputs(image_size=size, context_length=model_cfg.context_length)

    def image_inputs(a: int, b: int, d: torch.device) -> dict[str, Tensor]:
        out = {"pixels": make(a, b, d)["pixels"]}
        if concepts:
            out["concept_tokens"] = torch.zeros(b - a, concepts, dtype=torch.long, device=d)
            out["concept_mask"] = torch.ones(b - a, concepts, dtype=torch.long, device=d)
        return out

    towers = {"image": (image_inputs, model.visual),
              "text": (lambda a, b, d: {"tokens": make(a, b, d)["tokens"]}, model.textual)}
    costs: dict[str, dict[str, float]] = {}
    for name, (inputs, tower) in towers.items():
        full = saved_activation_bytes(model, inputs, dtype=dtype)
        blocks = _block_count(tower)
        # A forward without a graph frees each block's intermediates before the next block runs.
        entry = {"saved_per_row": full, "per_row": full, "blocks": blocks, "nograd_per_row": full / blocks}
        if ckpt:
            model.set_grad_checkpointing(True)
            stored = saved_activation_bytes(model, inputs, dtype=dtype)
            model.set_grad_checkpointing(False)
            entry.update(per_row=stored + full / blocks, stored_per_row=stored)
        costs[name] = entry
    mim = 0.0
    if mim_mask_ratio is not None:
        from vlscale.model import vit

        patches = vit.num_patches(model.visual.trunk)
        keep = max(1, int(patches * (1.0 - mim_mask_ratio)))
        mim = saved_activation_bytes(_MimStep(model, mim_norm_pix), lambda a, b, d: {
            "mim_pixels": make(a, b, d)["pixels"],
            "mim_keep": torch.zeros(b - a, keep, dtype=torch.long, device=d)}, dtype=dtype)
    ema = 0
    if momentum:  # vlscale.techniques.momentum_copy: no MIM decoder, nothing frozen, no checkpointing
        ema = count_params(meta_dual_encoder(**{**kw, "mim_decoder_depth": 0, "freeze_image_layers": 0,
                                                "freeze_text_layers": 0}), trainable_only=False)
    from vlscale.model import param_groups

    groups = param_groups(model, 0.1)  # which group a parameter falls in does not depend on the value
    return MetaCounts(params=count_params(model),
                      largest_unit=max((count_params(c, trainable_only=False) for c in model.children()), default=0),
                      largest_param=max((p.numel() for p in trainable), default=0),
                      largest_embedding=max((t.numel() for t in tables), default=0),
                      largest_group=max((sum(p.numel() for p in g["params"]) for g in groups), default=0),
                      towers=costs, mim_per_row=mim, momentum_params=ema)
