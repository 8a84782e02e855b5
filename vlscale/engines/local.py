"""The local engine: plain torch on one process, or several processes without a wrapper engine.

Three modes, picked once from what the caller hands over:

* one process: backward is a plain ``Tensor.backward``;
* a ``DistributedDataParallel`` model: non-boundary chunks run inside ``DDP.no_sync()`` (which
  must enclose the forward too, hence :meth:`micro_step`), the boundary chunk reduces. DDP must
  be built with ``find_unused_parameters=True`` because each chunk runs only one tower;
* a plain model under a process group with several ranks: gradients accumulate locally and are
  averaged across ranks in one flat all-reduce after the boundary backward (exact, and immune to
  towers that a chunk does not touch).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vlscale.engines.base import EngineAdapter, OptimizerLike, build_optimizer

log = logging.getLogger(__name__)


class LocalEngine(EngineAdapter):
    """Plain torch / DDP engine. ``autocast_dtype`` runs forwards under ``torch.autocast``."""

    kind = "local"

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: OptimizerLike | None,
        lr_scheduler: Any = None,
        process_group: dist.ProcessGroup | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        module = model.module if isinstance(model, DDP) else model
        super().__init__(module, model, process_group)
        self.optimizer = build_optimizer(optimizer, module.parameters())
        self.lr_scheduler = lr_scheduler
        self.autocast_dtype = autocast_dtype
        self._ddp = isinstance(model, DDP)
        if self._ddp and not model.find_unused_parameters:
            raise ValueError(
                "DDP models need find_unused_parameters=True under the gradient cache "
                "(each chunk runs one tower only)"
            )
        self._manual_allreduce = not self._ddp and self.world_size > 1
        log.info("local engine: mode=%s world_size=%d", self._mode(), self.world_size)

    def _mode(self) -> str:
        return "ddp" if self._ddp else ("allreduce" if self._manual_allreduce else "single")

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        if self.autocast_dtype is None:
            return self.raw(**inputs)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.raw(**inputs)

    def micro_step(self, *, boundary: bool) -> contextlib.AbstractContextManager[None]:
        if self._ddp and not boundary:
            return self.raw.no_sync()
        return contextlib.nullcontext()

    def backward(self, surrogate: Tensor, *, boundary: bool) -> None:
        surrogate.backward()
        if boundary and self._manual_allreduce:
            self._allreduce_grads()

    @torch.no_grad()
    def _allreduce_grads(self) -> None:
        """Average every gradient over ranks in one flat buffer (params without grad count as 0)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # keep the flat layout identical on every rank
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=self.process_group)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def optimizer_step(self) -> bool:
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.zero_grad()
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
