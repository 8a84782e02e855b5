"""Training engines behind one small interface: DeepSpeed (ZeRO 0–3), torch FSDP2, local (torch/DDP).

``build_engine(kind, model, ...)`` wraps a single-device model from outside; the gradient cache
and the training loop use only the :class:`EngineAdapter` methods. DeepSpeed is imported only
when the ``deepspeed`` kind is built.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from vlscale.engines.base import EngineAdapter, OptimizerLike

__all__ = ["ENGINE_KINDS", "EngineAdapter", "build_engine"]

ENGINE_KINDS = ("local", "deepspeed", "fsdp")


def build_engine(
    kind: str,
    model: nn.Module,
    *,
    optimizer: OptimizerLike | None = None,
    lr_scheduler: Any = None,
    ds_config: dict[str, Any] | str | None = None,
    process_group: dist.ProcessGroup | None = None,
    **options: Any,
) -> EngineAdapter:
    """Wrap ``model`` in the engine ``kind``; ``options`` go to the adapter's constructor.

    local: ``autocast_dtype``. deepspeed: ``coalesce`` (None = where supported).
    fsdp: ``shard_modules``, ``param_dtype``, ``reshard_after_forward``, ``offload_params``.
    """
    if kind == "local":
        from vlscale.engines.local import LocalEngine

        return LocalEngine(model, optimizer=optimizer, lr_scheduler=lr_scheduler, process_group=process_group, **options)
    if kind == "deepspeed":
        from vlscale.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(
            model, optimizer=optimizer, lr_scheduler=lr_scheduler, ds_config=ds_config,
            process_group=process_group, **options,
        )
    if kind == "fsdp":
        from vlscale.engines.fsdp import FSDPEngine

        return FSDPEngine(model, optimizer=optimizer, lr_scheduler=lr_scheduler, process_group=process_group, **options)
    raise ValueError(f"unknown engine kind {kind!r}; expected one of {ENGINE_KINDS}")
