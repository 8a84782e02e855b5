"""The one small interface every training engine (DeepSpeed, FSDP2, local) sits behind.

The gradient cache and the training loop only ever talk to an :class:`EngineAdapter`: run the
model's forward *through* the engine (so ZeRO-3 / FSDP2 parameter hooks fire), back-propagate a
scalar while saying whether this backward is a gradient-reduction boundary, step the optimizer.
Everything engine-specific (loss scaling, reduction control, sharding) stays inside the adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# An optimizer, or a factory building one from parameters (FSDP2 needs the factory because
# fully_shard replaces the parameters with DTensors; DeepSpeed accepts both).
OptimizerLike = torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class EngineAdapter:
    """Base class: forward / backward-with-boundary / optimizer step over one wrapped model.

    Subclasses set ``kind`` and implement ``forward``, ``backward``, ``optimizer_step`` and
    ``zero_grad``. ``optimizer_step`` also clears the gradients (as DeepSpeed's ``step`` does),
    so each step starts from zero.
    """

    kind: str = "base"

    def __init__(self, module: nn.Module, raw: Any, process_group: dist.ProcessGroup | None) -> None:
        self.module = module
        self.raw = raw
        self.process_group = process_group

    # -- topology --------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.process_group)

    # -- the contract ------------------------------------------------------------------------
    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def backward(self, surrogate: Tensor, *, boundary: bool) -> None:
        """Back-propagate a scalar; only a ``boundary`` backward may reduce gradients."""
        raise NotImplementedError

    def optimizer_step(self) -> bool:
        """Apply the optimizer (and scheduler) and clear gradients; False if the step was skipped."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    # -- optional hooks the gradient cache uses ------------------------------------------------
    def micro_step(self, *, boundary: bool) -> contextlib.AbstractContextManager[None]:
        """Context around one chunk's re-forward *and* backward (DDP's no_sync needs both)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Context around all backward passes of one step (DeepSpeed coalesces reductions here)."""
        yield

    def master_params(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, full fp32 value)`` of every parameter of :attr:`module`, in ``named_parameters`` order.

        The value is the optimizer's fp32 *master* copy where the engine keeps one (DeepSpeed fp16 /
        bf16, ZeRO partitions), gathered whole; never the half-precision working copy. Frozen
        parameters (no master) come from the module, cast to fp32. Under ZeRO-3 and FSDP2 this is a
        collective: every rank must consume the whole iterator, in the same order. The tensors are
        read-only views or fresh copies on the engine's device: never modify them.
        """
        for name, p in self.module.named_parameters():
            yield name, p.detach().float()

    @property
    def loss_scale(self) -> float | None:
        """The current dynamic fp16 loss scale, or None when the engine does not scale."""
        return None

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")


def cast_floating(inputs: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Cast floating-point inputs (pixels) to the engine's compute dtype; integer ids stay."""
    if dtype is None:
        return inputs
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def build_optimizer(optimizer: OptimizerLike | None, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """An optimizer instance from an instance or a factory (ValueError when missing)."""
    if optimizer is None:
        raise ValueError("an optimizer (instance or factory params -> Optimizer) is required")
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        built = optimizer(params)
        if not isinstance(built, torch.optim.Optimizer):
            raise ValueError(f"optimizer factory returned {type(built).__name__}, not a torch Optimizer")
        return built
    raise ValueError(f"optimizer must be a torch Optimizer or a factory, got {type(optimizer).__name__}")
