"""DeepSpeed engine adapter (ZeRO stages 0–3, fp32 / fp16 with dynamic loss scaling / bf16).

How the gradient cache maps onto DeepSpeed 0.19:

* Reduction control. ``engine.no_sync()`` asserts under ZeRO-2/3, so it is never used. For
  ZeRO 1/2/3 with DeepSpeed's own ZeRO optimizer, all chunk backwards of a step run inside
  ``engine.coalesce_grad_reduction()`` (from 0.19.2): gradients stay local and one reduction pass
  runs when the block exits. Elsewhere (stage 0, the BF16/FP16 optimizer wrappers, older
  DeepSpeed) each backward sets ``set_gradient_accumulation_boundary(boundary)`` so only the last
  chunk reduces.
* Scaling. ``engine.backward`` divides the loss by ``gradient_accumulation_steps`` unless
  ``scale_wrt_gas=False``; the cached gradient is already the gradient of the whole step's loss,
  so it is passed with ``scale_wrt_gas=False`` whatever the config says. The fp16 dynamic loss
  scale is applied by ``engine.backward`` to each chunk's surrogate — once per gradient, since
  gradients are linear in the surrogate — and the overflow check / skip / scale update happen in
  ``engine.step()`` exactly as for DeepSpeed's own accumulation.
* Inputs. With fp16/bf16 the module's weights are half precision; floating inputs (pixels) are
  cast to that dtype before the forward.
* CPU. DeepSpeed's shared-memory comm op is turned off before its comm starts
  (:mod:`vlscale.engines.ds_shm`: a C++ JIT build and a leaked 66 MB /dev/shm file per rank, for an
  op only inference uses).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlscale.engines.base import EngineAdapter, OptimizerLike, cast_floating
from vlscale.engines.ds_shm import skip_cpu_shm_comm

log = logging.getLogger(__name__)


class DeepSpeedEngine(EngineAdapter):
    """Adapter over ``deepspeed.initialize``. ``coalesce``: None = use it where supported."""

    kind = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: OptimizerLike | None,
        lr_scheduler: Any = None,
        ds_config: dict[str, Any] | str | None,
        process_group: dist.ProcessGroup | None = None,
        coalesce: bool | None = None,
    ) -> None:
        import deepspeed  # deferred: the loss / gradient cache never import DeepSpeed

        if ds_config is None:
            raise ValueError("the deepspeed engine needs ds_config (a dict or a JSON path)")
        if process_group is not None and dist.is_initialized() and process_group != dist.group.WORLD:
            # DeepSpeed data-parallelism always spans its own (world) group.
            raise ValueError("the deepspeed engine reduces over the world group; pass process_group=None")
        skip_cpu_shm_comm()
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            lr_scheduler=lr_scheduler,
            config=ds_config,
        )
        super().__init__(engine.module, engine, process_group)
        self.lr_scheduler = scheduler
        self._half_dtype = (
            torch.float16 if engine.fp16_enabled() else torch.bfloat16 if engine.bfloat16_enabled() else None
        )
        if engine.gradient_accumulation_steps() != 1:
            log.warning(
                "deepspeed: gradient_accumulation_steps=%d in ds_config; with the gradient cache one "
                "step() is one optimizer step and backward never divides by it (scale_wrt_gas=False)",
                engine.gradient_accumulation_steps())
        self._coalesce = self._resolve_coalesce(coalesce)
        self._in_coalesce = False
        log.info(
            "deepspeed engine: zero_stage=%d dtype=%s reduction=%s gas=%d",
            engine.zero_optimization_stage(),
            self._half_dtype or torch.float32,
            "coalesce_grad_reduction" if self._coalesce else "accumulation_boundary",
            engine.gradient_accumulation_steps(),
        )

    def _resolve_coalesce(self, requested: bool | None) -> bool:
        """Coalesced reduction needs ZeRO 1–3 and DeepSpeed's own ZeRO optimizer (not a wrapper)."""
        eng = self.raw
        supported = (
            hasattr(eng, "coalesce_grad_reduction")
            and eng.zero_optimization_stage() in (1, 2, 3)
            and hasattr(eng.optimizer, "_coalesce_grad_reduction")
            and not getattr(eng, "pipeline_parallelism", False)
        )
        if requested and not supported:
            raise ValueError(
                f"coalesce=True is not supported here (ZeRO stage {eng.zero_optimization_stage()}, "
                f"optimizer {type(eng.optimizer).__name__}); use coalesce=None or False"
            )
        return supported if requested is None else bool(requested)

    @property
    def zero_stage(self) -> int:
        return int(self.raw.zero_optimization_stage())

    @property
    def coalescing(self) -> bool:
        return self._coalesce

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        return self.raw(**cast_floating(inputs, self._half_dtype))

    def backward(self, surrogate: Tensor, *, boundary: bool) -> None:
        if not self._in_coalesce:
            # Inside coalesce_grad_reduction the reduction happens on exit; elsewhere the flag
            # decides whether this backward reduces (ZeRO 0/1) or finalises (ZeRO 2/3).
            self.raw.set_gradient_accumulation_boundary(boundary)
        self.raw.backward(surrogate, scale_wrt_gas=False)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        if not self._coalesce:
            yield
            return
        self.raw.set_gradient_accumulation_boundary(False)
        self._in_coalesce = True
        try:
            with self.raw.coalesce_grad_reduction():
                yield
        finally:
            self._in_coalesce = False
            # The flush on exit reduced everything; step() must see a boundary.
            self.raw.set_gradient_accumulation_boundary(True)

    def optimizer_step(self) -> bool:
        self.raw.step()  # on an fp16 overflow: skips the update and lowers the scale
        return bool(self.raw.was_step_applied())

    def zero_grad(self) -> None:
        opt = self.raw.optimizer
        if opt is not None and hasattr(opt, "zero_grad"):
            opt.zero_grad()
        self.raw.zero_grad()

    def master_params(self) -> Iterator[tuple[str, Tensor]]:
        """The fp32 masters, whole: ZeRO 1–3 and the bf16 optimizer through DeepSpeed's own
        ``safe_get_full_fp32_param`` (a collective per parameter); fp16 at ZeRO-0 from the
        FP16_Optimizer's fp32 groups; frozen parameters (no master) from the module, gathered under
        ZeRO-3. See :meth:`EngineAdapter.master_params`."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        fp16_masters = self._fp16_stage0_masters()
        for name, p in self.module.named_parameters():
            if id(p) in fp16_masters:
                yield name, fp16_masters[id(p)]
                continue
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is not None:
                yield name, full.detach()
            elif hasattr(p, "ds_id"):  # ZeRO-3 partitioned, no master (frozen): gather the module copy
                with deepspeed.zero.GatheredParameters([p]):
                    yield name, p.detach().float().clone()
            else:
                if p.requires_grad and p.dtype != torch.float32:
                    raise RuntimeError(f"deepspeed: no fp32 master found for trainable parameter {name!r} "
                                       f"({p.dtype}, optimizer {type(self.raw.optimizer).__name__})")
                yield name, p.detach().float()

    def _fp16_stage0_masters(self) -> dict[int, Tensor]:
        """id(module param) → fp32 master for DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer
        (ZeRO-0 with fp16), which keep their masters outside DeepSpeed's fragment mapping."""
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        opt = self.raw.optimizer
        if not isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)):
            return {}
        groups, out = opt.fp16_groups, {}
        if isinstance(opt, FP16_Optimizer):  # fused: one flat fp32 buffer per group
            for params, flat in zip(groups, opt.fp32_groups_flat):
                offset = 0
                for p in params:
                    out[id(p)] = flat.detach()[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
        else:  # unfused: one fp32 tensor per parameter
            for params, masters in zip(groups, opt.fp32_groups):
                out.update({id(p): m.detach() for p, m in zip(params, masters)})
        return out

    @property
    def loss_scale(self) -> float | None:
        if self._half_dtype is not torch.float16:
            return None
        return float(self.raw._get_optimizer_loss_scale())
