"""Record and replay the random-number state of one chunk's forward.

The gradient cache embeds a chunk twice: once without a graph, once with. Dropout and drop-path
must draw the same masks both times, or the re-forward's gradient belongs to a different function
than the one whose embeddings fed the loss. Only the generators that the forward can touch are
recorded: the CPU generator always, and the CUDA generator of the model's device when the model is
on a GPU (no CUDA query happens for CPU models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RngState:
    """The CPU generator state and, for a CUDA model, that device's generator state."""

    cpu: Tensor
    cuda: Tensor | None = None
    cuda_device: int | None = None


def _cuda_index(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def capture(device: torch.device) -> RngState:
    """Snapshot the generators a forward on ``device`` draws from."""
    index = _cuda_index(device)
    cuda = torch.cuda.get_rng_state(index) if index is not None else None
    return RngState(cpu=torch.get_rng_state(), cuda=cuda, cuda_device=index)


def restore(state: RngState) -> None:
    """Put the generators back to ``state`` (the next draws repeat the recorded ones)."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, state.cuda_device)


@contextlib.contextmanager
def preserved(device: torch.device) -> Iterator[None]:
    """Run a block (the replays) and leave the generators as they were before it."""
    index = _cuda_index(device)
    with torch.random.fork_rng(devices=[] if index is None else [index], device_type="cuda"):
        yield
