"""Optimizer parameter groups with the usual weight-decay exclusions."""

from __future__ import annotations

from typing import Any

from torch import nn

_NO_DECAY_NAMES = ("logit_scale", "pos_embed", "cls_token", "reg_token", "dist_token", "position_embedding",
                   "position_ids", "relative_position_bias_table")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for weight matrices / conv kernels; none for biases, norms,
    ``logit_scale``, embeddings (token, position, class tokens) — decaying those only hurts.

    Frozen parameters are left out; an empty group is dropped. Only standard keys, so DeepSpeed's
    ZeRO optimizers and checkpoints take the groups as they are."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_decay_ids = _embedding_and_norm_params(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (p.ndim < 2 or id(p) in no_decay_ids or leaf == "bias"
                or any(k in name for k in _NO_DECAY_NAMES))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _embedding_and_norm_params(model: nn.Module) -> set[int]:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, norm_types) or "norm" in type(module).__name__.lower()
        if is_norm:
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids
