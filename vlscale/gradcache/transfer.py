"""Move one chunk of a (possibly host-resident) batch to the engine's device, right before its forward.

At scale one rank's local batch does not fit on the GPU (1,048,576 pairs over 8 ranks is ~79 GB
of fp32 pixels per rank), so the gradient cache accepts inputs that live on the host and copies
only the rows of the chunk about to run — once for the no-grad embedding pass, once for the
re-forward. The whole batch is never moved. Pinned host memory is copied with
``non_blocking=True`` (the copy is queued on the current stream, so it is ordered before the
forward that reads it, and the host does not wait); pageable memory is copied synchronously.
Inputs already on the engine's device are only sliced (views, no copy).

A *feed* (:data:`ChunkFeed`) is what turns ``(inputs, start, stop, device)`` into one chunk's model
inputs; :func:`chunk_to` is the default. The trainer's feed (:class:`vlscale.train.pixels.PixelFeed`)
also normalises uint8 pixels and applies the step's image mixup on the device, chunk by chunk, so the
host holds the batch as uint8 (a quarter of fp32) and no mixed copy of it is ever made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

ChunkFeed = Callable[[dict[str, Tensor], int, int, torch.device], dict[str, Tensor]]
"""``feed(inputs, start, stop, device)`` -> the model inputs of rows ``[start, stop)`` on ``device``."""


def on_device(t: Tensor, device: torch.device) -> bool:
    """Whether ``t`` already lives on ``device`` (a CPU device with or without index is the CPU)."""
    if t.device.type != device.type:
        return False
    return device.type == "cpu" or device.index is None or t.device.index == device.index


def move(t: Tensor, device: torch.device) -> Tensor:
    """Copy ``t`` to ``device``; asynchronous when ``t`` is in pinned host memory."""
    locked = t.device.type == "cpu" and device.type != "cpu" and t.is_pinned()
    return t.to(device, non_blocking=locked)


def rows_to(t: Tensor, start: int, stop: int, device: torch.device) -> Tensor:
    """Rows ``[start, stop)`` of ``t`` on ``device``: a view when already there, else a copy of
    those rows only (the slice is taken on the source device, then moved)."""
    rows = t[start:stop]
    return rows if on_device(rows, device) else move(rows, device)


def chunk_to(inputs: dict[str, Tensor], start: int, stop: int, device: torch.device) -> dict[str, Tensor]:
    """Rows ``[start, stop)`` of every input, on ``device`` (:func:`rows_to`)."""
    return {name: rows_to(value, start, stop, device) for name, value in inputs.items()}


def pinned(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Host tensors in page-locked memory, so the per-chunk copies to the device are asynchronous
    (tensors made after a loader pinned its batch, e.g. by mixup or concept tokens, are not); a
    no-op without CUDA."""
    if not torch.cuda.is_available():
        return inputs
    return {k: v.pin_memory() if v.device.type == "cpu" and not v.is_pinned() else v for k, v in inputs.items()}


def describe(inputs: dict[str, Tensor], device: torch.device) -> str | None:
    """A one-line note on host-resident inputs (None when every input is already on ``device``)."""
    away = {k: v for k, v in inputs.items() if not on_device(v, device)}
    if not away:
        return None
    locked = all(v.device.type == "cpu" and device.type != "cpu" and v.is_pinned() for v in away.values())
    where = sorted({str(v.device) for v in away.values()})
    mode = "pinned, non_blocking copies" if locked else "pageable, synchronous copies (pin them to overlap)"
    return f"gradcache: inputs {sorted(away)} on {where}, moved to {device} one chunk at a time ({mode})"
