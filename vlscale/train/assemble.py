"""A training step assembled from parts (``data.part_size``): the loader's unit is a part of the
local batch, and ``n = micro / part_size`` consecutive parts of a rank make its step.

Why parts: with whole local batches as the loader's unit, each worker decodes a whole 131,072-image
batch alone and the host holds ``num_workers × prefetch_factor + 2`` of them (356 GB per rank at
1M pairs over 8 ranks). With parts every worker works on every step (the DataLoader visits the
workers round-robin) and the host holds ``num_workers × prefetch_factor`` parts in flight plus the
one step being assembled / trained (:mod:`vlscale.memory.hostmem`).

Assembly: on CUDA into one reusable step buffer in page-locked memory, each part copied in as it
arrives (so the part is freed at once) and the step's tensors are views of the buffer. The
gradient cache copies chunks of it to the device with ``non_blocking=True``, so before the buffer
is overwritten by the next step the device is synchronised. The buffer is registered with
``cudaHostRegister`` rather than taken from torch's pinned caching allocator, which rounds every
block up to a power of two (a 19.7 GB step would pin 32 GB). Elsewhere the parts are concatenated.

Grouping never reads past a step's last part: a checkpoint between steps then saves the loader's
position at a step boundary, and an epoch's incomplete last group is a short step (the trainer
evens the ranks' rows, ``Trainer._even``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from vlscale.data.collate import SAMPLE_FIELDS, Batch

log = logging.getLogger(__name__)
_TENSORS = ("pixels", "tokens", "attention_mask")


def rng_isolated(loader: Iterable[Batch]) -> Iterator[Batch]:
    """One pass over ``loader``, each fetch under a forked global torch RNG (a DataLoader iterator
    draws its base seed from it: dropout / mixup must not depend on where a run was resumed)."""
    it = None
    while True:
        with torch.random.fork_rng(devices=[]):
            it = iter(loader) if it is None else it
            part = next(it, None)
        if part is None:
            return
        yield part


def group_parts(parts: Iterable[Batch], n: int) -> Iterator[list[Batch]]:
    """Consecutive groups of ``n`` parts; the last group may be shorter (never empty)."""
    if n <= 0:
        raise ValueError(f"parts per step must be positive, got {n}")
    it = iter(parts)
    while group := list(_take(it, n)):  # stops at n: never asks the loader for the next step's first part
        yield group


def concat_steps(parts: Iterable[Batch], n: int) -> Iterator[Batch]:
    """Steps as plain concatenations of ``n`` consecutive parts (CPU, re-splits)."""
    for group in group_parts(parts, n):
        yield Batch.concat(group)


class PinnedStep:
    """One page-locked host buffer of ``rows`` rows per tensor field, reused step after step."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows, self.device = rows, device
        self.buffers: dict[str, torch.Tensor] = {}
        self._registered: list[torch.Tensor] = []

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        shape = (self.rows, *like.shape[1:])
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype:
            if buf is not None:
                self._release(buf)
            self.buffers[name] = buf = self._page_locked(shape, like.dtype)
        return buf

    def _page_locked(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype)
        nbytes = buf.numel() * buf.element_size()
        try:
            ok = nbytes and int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0
        except (RuntimeError, AttributeError):  # a build without the runtime bindings
            ok = False
        if ok:
            self._registered.append(buf)  # unregistered in close(), before the memory is freed
            return buf
        log.warning("cudaHostRegister failed for a %.1f GB step buffer: using torch's pinned allocator",
                    nbytes / 1e9)
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def fill(self, group: Iterable[Batch]) -> Batch | None:
        """Copy the parts of one step into the buffer as they arrive; the step's views (None: no part)."""
        torch.cuda.synchronize(self.device)  # the last step's non_blocking chunk copies read this buffer
        at, views, lists, last = 0, {}, {name: [] for name in SAMPLE_FIELDS if name not in _TENSORS}, None
        for part in group:
            stop = at + len(part)
            if stop > self.rows:
                raise ValueError(f"the parts of one step hold more than the local batch of {self.rows} rows")
            for name in _TENSORS:
                value = getattr(part, name)
                views[name] = None if value is None else self._buffer(name, value)
                if value is not None and len(part):
                    views[name][at:stop].copy_(value)
            for name, out in lists.items():
                value = getattr(part, name)
                lists[name] = None if value is None or out is None else out + list(value)
            at, last = stop, part
            del part  # the part's tensors are freed now, not at the end of the step
        if last is None:
            return None
        views = {name: None if buf is None else buf[:at] for name, buf in views.items()}
        return Batch(**views, **lists, worker=last.worker, state=last.state, stats=last.stats)

    def _release(self, buf: torch.Tensor) -> None:
        if any(b is buf for b in self._registered):
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
            self._registered = [b for b in self._registered if b is not buf]

    def close(self) -> None:
        for buf in list(self._registered):
            self._release(buf)
        self.buffers = {}


class StepAssembler:
    """Turns a rank's stream of parts into its steps (``parts_per_step=1``: the units as they are)."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows, self.device = rows, device
        self.pinned = PinnedStep(rows, device) if device.type == "cuda" else None

    def steps(self, parts: Iterable[Batch], parts_per_step: int) -> Iterator[Batch]:
        if parts_per_step == 1:
            yield from parts
            return
        if self.pinned is None:
            yield from concat_steps(parts, parts_per_step)
            return
        it = iter(parts)
        while (step := self.pinned.fill(_take(it, parts_per_step))) is not None:
            yield step

    def close(self) -> None:
        if self.pinned is not None:
            self.pinned.close()


def _take(it: Iterator[Batch], n: int) -> Iterator[Batch]:
    """Up to ``n`` parts of ``it`` (fewer at the end of the epoch), one at a time."""
    for _ in range(n):
        part = next(it, None)
        if part is None:
            return
        yield part


__all__ = ["PinnedStep", "StepAssembler", "concat_steps", "group_parts", "rng_isolated"]
