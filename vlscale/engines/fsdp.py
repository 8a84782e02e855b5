"""torch FSDP2 engine adapter (``torch.distributed.fsdp.fully_shard``).

The adapter applies ``fully_shard`` from outside the model (torchtitan style): first to each
module of the sharding plan (by default every direct child holding parameters — the towers and
heads), then to the root, which keeps the loose parameters such as ``logit_scale``. The optimizer
must therefore be built *after* sharding: pass a factory ``params -> Optimizer`` (an optimizer
instance is accepted only for a model the caller already sharded).

Reduction control: ``set_requires_gradient_sync(False)`` for every chunk but the last, so the
unsharded gradients accumulate locally and are reduce-scattered (averaged over ranks) once. A tower
that the last chunk does not run is still reduced: FSDP2's root post-backward callback runs the
post-backward of every parameter group that did not run in that backward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlscale.engines.base import EngineAdapter, OptimizerLike, build_optimizer

log = logging.getLogger(__name__)

ShardPlan = Iterable[nn.Module] | Callable[[nn.Module], Iterable[nn.Module]] | None


def _default_plan(model: nn.Module) -> list[nn.Module]:
    """Every direct child holding parameters; a container child (ModuleList / ModuleDict: no forward
    of its own, which fully_shard refuses — e.g. the hierarchical heads) contributes its items."""
    plan: list[nn.Module] = []
    for child in model.children():
        items = list(child.children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
        plan += [m for m in items if any(True for _ in m.parameters())]
    return plan


def _mesh(process_group: dist.ProcessGroup | None, device_type: str) -> Any:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if process_group is None or process_group == dist.group.WORLD:
        return init_device_mesh(device_type, (dist.get_world_size(),))
    return DeviceMesh.from_group(process_group, device_type)


class FSDPEngine(EngineAdapter):
    """FSDP2 adapter. ``param_dtype`` (e.g. bf16) enables a mixed-precision policy (fp32 reduce)."""

    kind = "fsdp"

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: OptimizerLike | None,
        lr_scheduler: Any = None,
        process_group: dist.ProcessGroup | None = None,
        shard_modules: ShardPlan = None,
        param_dtype: torch.dtype | None = None,
        reshard_after_forward: bool = True,
        offload_params: bool = False,
    ) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise ValueError("the fsdp engine needs an initialised process group (torch.distributed)")
        already_sharded = isinstance(model, FSDPModule)
        if not already_sharded:
            if isinstance(optimizer, torch.optim.Optimizer):
                raise ValueError(
                    "fsdp: pass an optimizer factory (params -> Optimizer); an optimizer built before "
                    "fully_shard holds the unsharded parameters"
                )
            device_type = next(model.parameters()).device.type
            mesh = _mesh(process_group, device_type)
            mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
            kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
            if mp is not None:
                kwargs["mp_policy"] = mp
            if offload_params:
                # Sharded parameters, gradients and the optimizer step live in host memory; each
                # module's parameters are copied to the device for its forward / backward. Pinned
                # host memory needs CUDA, so it is used only there.
                kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type == "cuda")
            plan = shard_modules(model) if callable(shard_modules) else shard_modules
            for sub in plan if plan is not None else _default_plan(model):
                fully_shard(sub, **kwargs)
            fully_shard(model, **kwargs)
        super().__init__(model, model, process_group)
        self.optimizer = build_optimizer(optimizer, model.parameters())
        self.lr_scheduler = lr_scheduler
        self.param_dtype, self.offload_params = param_dtype, offload_params
        log.info("fsdp engine: world_size=%d param_dtype=%s reshard_after_forward=%s cpu_offload=%s", self.world_size,
                 param_dtype or "fp32", reshard_after_forward, offload_params)

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        return self.raw(**inputs)

    def backward(self, surrogate: Tensor, *, boundary: bool) -> None:
        self.raw.set_requires_gradient_sync(boundary, recurse=True)
        surrogate.backward()

    def optimizer_step(self) -> bool:
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.zero_grad()
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def master_params(self) -> Iterator[tuple[str, Tensor]]:
        """FSDP2 keeps fp32 sharded parameters (``param_dtype`` only casts for compute): each one is
        all-gathered in turn (a collective, see :meth:`EngineAdapter.master_params`)."""
        for name, p in self.module.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            yield name, full.detach().float()
