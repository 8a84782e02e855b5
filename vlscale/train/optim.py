"""AdamW with weight-decay exclusions and the warmup + cosine learning-rate schedule.

The exclusions (biases, norms, embeddings, ``logit_scale``: decaying those only hurts) are the
model part's :func:`vlscale.model.param_groups`; this module builds the optimizer on them and the
schedule the trainer steps once per applied optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from vlscale.model import param_groups


def build_adamw(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float) -> torch.optim.AdamW:
    # foreach=False: the same arithmetic on CPU and GPU, and DeepSpeed's ZeRO wrappers step it
    # on flat partitions where the multi-tensor path brings nothing.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=False)


def adamw_factory(model: nn.Module, **kwargs: float | tuple[float, float]) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """A ``params -> AdamW`` factory for engines that shard before building the optimizer (FSDP2).

    The parameters handed over are ignored: fully_shard swaps them in place on ``model``, so the
    groups are rebuilt from the (now sharded) model by name.
    """
    return lambda _params: build_adamw(model, **kwargs)  # type: ignore[arg-type]


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=warmup, total=total, min_ratio=min_ratio))
