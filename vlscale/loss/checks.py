"""Input validation for the contrastive losses: every bad input raises a ``ValueError`` naming it.

Shape, dtype and device checks are free (metadata only). Value checks (non-finite embeddings or
scale, labels out of range) need the data, so they are batched into ONE device→host transfer per
loss call rather than one per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings(*named: tuple[str, Tensor], paired: bool) -> None:
    """Rank 2, floating, non-empty, one dtype, one device, one D; ``paired``: equal row counts."""
    first_name, first = named[0]
    for name, x in named:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have rank 2 (rows, D), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
        if x.device != first.device:
            raise ValueError(f"device mismatch: {first_name} on {first.device}, {name} on {x.device}")
        if x.dtype != first.dtype:
            raise ValueError(f"dtype mismatch: {first_name} is {first.dtype}, {name} is {x.dtype}")
        if x.shape[1] != first.shape[1]:
            raise ValueError(f"D mismatch: {first_name} has D={first.shape[1]}, {name} has D={x.shape[1]}")
    if paired and named[1][1].shape[0] != first.shape[0]:
        raise ValueError(
            f"shape mismatch: {first_name} has {first.shape[0]} rows but {named[1][0]} has "
            f"{named[1][1].shape[0]} (they are paired row by row)"
        )


def check_scale(scale: Tensor, device: torch.device) -> None:
    """``logit_scale``: one floating element, shape [] or [1], on the embeddings' device."""
    if scale.dim() > 1 or scale.numel() != 1:
        raise ValueError(f"logit_scale must have shape [] or [1], got {tuple(scale.shape)}")
    if not scale.is_floating_point():
        raise ValueError(f"logit_scale must be a floating tensor, got {scale.dtype}")
    if scale.device != device:
        raise ValueError(f"device mismatch: embeddings on {device}, logit_scale on {scale.device}")


def _check_index(name: str, idx: Tensor, m: int, device: torch.device) -> Tensor:
    if not isinstance(idx, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of indices")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {idx.dtype}")
    if idx.shape != (m,):
        raise ValueError(f"{name} must have shape ({m},) (one per row), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"device mismatch: embeddings on {device}, {name} on {idx.device}")
    return idx.long()


def check_labels(labels: Tensor | None, m: int, n: int, device: torch.device) -> Tensor:
    """Positive key index per query row; default ``arange(m)`` (needs ``n ≥ m``)."""
    if labels is None:
        if n < m:
            raise ValueError(f"labels=None means labels=arange({m}) but keys has only {n} rows; pass labels")
        return torch.arange(m, device=device)
    return _check_index("labels", labels, m, device)


def check_mix(mix: object, m: int, n: int, device: torch.device) -> tuple[Tensor, float] | None:
    """``mix=(labels_b, lam)`` → ``(labels_b as int64, lam as float)`` with 0 ≤ lam ≤ 1."""
    if mix is None:
        return None
    if not isinstance(mix, (tuple, list)) or len(mix) != 2:
        raise ValueError("mix must be a pair (labels_b, lam)")
    labels_b = _check_index("mix labels", mix[0], m, device)
    lam = float(mix[1])
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(f"mix lam must lie in [0, 1], got {lam}")
    return labels_b, lam


def check_values(
    tensors: list[tuple[str, Tensor]], indices: list[tuple[str, Tensor, int]], scale: Tensor
) -> None:
    """Finite embeddings and scale, scale > 0, indices within ``[0, n)``: one host sync for all."""
    tensors = [*tensors, ("logit_scale", scale)]
    flags = [torch.isfinite(x).all() for _, x in tensors]
    flags += [((i >= 0) & (i < n)).all() for _, i, n in indices]
    flags.append((scale > 0).all())
    ok = torch.stack(flags).tolist()
    for (name, _), good in zip(tensors, ok):
        if not good:
            raise ValueError(f"{name} contains non-finite values (NaN or Inf)")
    for (name, idx, n), good in zip(indices, ok[len(tensors) :]):
        if not good:
            raise ValueError(
                f"{name} out of range: values must lie in [0, {n}), got min {int(idx.min())} max {int(idx.max())}"
            )
    if not ok[-1]:
        raise ValueError(f"logit_scale must be > 0 (it is the multiplier exp(t)), got {float(scale.reshape(()))}")
