"""Model construction for a run, including ZeRO-3 builds whose parameters are partitioned as created.

Under ZeRO-3 a model bigger than one device must never exist whole on a rank, so it cannot be
built first and partitioned by ``deepspeed.initialize`` afterwards. :func:`build_model` builds it
under DeepSpeed instead (the model code itself stays DeepSpeed-free):

* the Hugging Face text tower is created through ``_from_config`` (the towers' ``AutoModel.from_config``)
  while a ``HfDeepSpeedConfig`` is alive: transformers then builds it inside ``deepspeed.zero.Init``
  (each layer partitioned right after it is created) and runs its weight init gathered, module by
  module (``initialize_weights_zero3``); ``text_pretrained`` checkpoints load the same way;
* the timm vision tower and the small heads are built whole, then partitioned at once by
  ``deepspeed.zero.Init(module=model)``, before any optimizer or engine exists. They are not built
  under an outer ``zero.Init`` on purpose: timm (and ``ProjectionHead``) initialise child modules'
  weights from the parent's ``__init__`` (timm's ``named_apply``, not ``Module.apply``), and under
  ``zero.Init`` those children are already partitioned, so the init silently becomes a no-op on empty
  tensors (measured: every ViT block Linear kept PyTorch's default init, biases non-zero). Built whole,
  the vision tower gets exactly the weights a non-ZeRO build gets (same seed), and ``vision_weights``
  load as usual; the cost is one whole vision tower on a rank during construction (ViT-bigG, 1.8 B
  parameters, is 7.4 GB in fp32), while the text tower — the one that grows past a device — never is.

This is the path on CPU with several ranks too: a hang there (rank 1 compiling DeepSpeed's shm-comm
op while rank 0 waited on its shared-memory buffer) went away with the op
(:func:`vlscale.engines.ds_shm.skip_cpu_shm_comm`). The optimizer is built on the partitioned placeholders:
:func:`full_shapes` lets shape-based code (the weight-decay split reads ``p.ndim``) see the real
shapes of partitioned parameters.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from vlscale.config import Config
from vlscale.engines.ds_shm import skip_cpu_shm_comm
from vlscale.model import DualEncoder

log = logging.getLogger(__name__)


def zero_stage_of(ds_config: dict[str, Any] | None) -> int:
    """The ZeRO stage a DeepSpeed config dict asks for (0 without one)."""
    if not ds_config:
        return 0
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_model(cfg: Config, device: torch.device, *, ds_config: dict[str, Any] | None = None) -> DualEncoder:
    """The run's :class:`DualEncoder`: whole on ``device``, or partitioned at construction under ZeRO-3.

    ``ds_config`` is the run's DeepSpeed config (``to_deepspeed_config``); it only matters when
    ``cfg.engine.kind == "deepspeed"`` and its stage is 3. Seed the RNG before calling."""
    if cfg.engine.kind == "deepspeed" and zero_stage_of(ds_config) == 3:
        return build_zero3(cfg, ds_config)  # type: ignore[arg-type]
    return DualEncoder(cfg.model).to(device)


def build_zero3(cfg: Config, ds_config: dict[str, Any]) -> DualEncoder:
    """Build the model with every parameter a partitioned ZeRO-3 parameter (see the module docstring)."""
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    if not dist.is_initialized():
        raise ValueError("a ZeRO-3 build needs torch.distributed initialised (init_runtime does it)")
    if zero_stage_of(ds_config) != 3:
        raise ValueError(f"build_zero3 needs a ZeRO stage 3 ds_config, got stage {zero_stage_of(ds_config)}")
    skip_cpu_shm_comm()  # zero.Init below starts deepspeed.comm
    # transformers reads the config through a weak reference: it is ZeRO-3-aware only while this
    # object lives. It is dropped after construction so later HF calls in the process (another
    # model, evaluation) are not silently partitioned.
    hf_ds = HfDeepSpeedConfig(_init_config(ds_config))
    try:
        model = DualEncoder(cfg.model)
    finally:
        del hf_ds
    text_done = all(hasattr(p, "ds_id") for p in model.textual.parameters())
    if not text_done:  # e.g. a transformers version without the zero.Init path in _from_config
        log.warning("ZeRO-3 build: the text tower was not partitioned at creation; partitioning it now")
    # Everything not yet partitioned (vision tower, heads, logit_scale) is partitioned here, before
    # the optimizer or engine exist; rank 0's values are broadcast (every rank used the same seed).
    # zero.Init(module=...) keeps their dtype, while the text tower was created in the run's fp16 /
    # bf16 and DeepSpeed's ZeRO-3 optimizer needs one dtype (it casts only models it did not see
    # partitioned): cast them first, as DeepSpeed casts a whole model before building fp32 masters.
    half = _half_dtype(ds_config)
    if half is not None:
        for p in model.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(half)
    deepspeed.zero.Init(module=model, config_dict_or_path=_init_config(ds_config))
    total = sum(int(p.ds_numel) for p in model.parameters())
    local = sum(int(p.ds_tensor.numel()) for p in model.parameters())
    log.info("ZeRO-3 build: %.2fM parameters, %.2fM held by this rank (text tower partitioned at creation: %s)",
             total / 1e6, local / 1e6, text_done)
    return model


def trainable(model: nn.Module) -> int:
    """Trainable parameter count (whole tensors, also when ZeRO-3 has partitioned them)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)


def _half_dtype(ds_config: dict[str, Any]) -> torch.dtype | None:
    """The working dtype a DeepSpeed config trains in (None = fp32)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return None


def _init_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The config zero.Init parses. It checks the batch arithmetic against deepspeed.comm's world
    size, which reads 1 until ``deepspeed.initialize`` wraps the process group; partitioning does
    not depend on it, so the global batch is left for DeepSpeed to derive (micro × GAS × world)."""
    out = copy.deepcopy(ds_config)
    out.pop("train_batch_size", None)
    return out


def is_partitioned(params: Iterable[nn.Parameter]) -> bool:
    """True when every parameter is a ZeRO-3 parameter whose full value is not materialised."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return all(hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0
               for p in params)


@contextlib.contextmanager
def full_shapes(model: nn.Module) -> Iterator[None]:
    """Let partitioned ZeRO-3 parameters report their full shape (``.shape`` / ``.ndim``) for a while.

    A partitioned parameter's ``.data`` is an empty 1-D placeholder, so a split by ``p.ndim``
    (biases / gains vs weight matrices) would put every parameter in the no-decay group. Inside
    this block each placeholder is swapped for a zero-stride view of one element expanded to
    ``ds_shape`` (no memory); the parameter objects stay the same, so groups built here are the
    engine's parameters. Do not read values inside the block."""
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for p in model.parameters():
            if hasattr(p, "ds_shape") and p.data.numel() == 0 and tuple(p.ds_shape) != tuple(p.shape):
                swapped.append((p, p.data))
                p.data = torch.empty(1, dtype=p.dtype, device=p.device).expand(p.ds_shape)
        yield
    finally:
        for p, placeholder in swapped:
            p.data = placeholder
