"""BatchNorm running statistics under the gradient cache: one update per step, not per forward.

A cached step runs every chunk forward twice (no-grad embed, then re-forward), and activation
checkpointing can add a third run. Left alone, a BatchNorm layer would move its running
statistics once per chunk per run. Instead:

* embed pass (:func:`single_update`): each layer's running statistics move *once*, by its usual
  momentum, towards the mean of its chunks' batch statistics — as one big-batch step would, with
  the big batch's statistics replaced by the average of the chunks' (``num_batches_tracked`` + 1);
* re-forward pass (:func:`frozen`): the statistics are restored afterwards, untouched.

What still differs from a big batch (and cannot be avoided without a second no-grad pass): each
chunk is *normalised* with its own statistics (ghost batch norm), and the variance average is the
mean of per-chunk unbiased variances, not the big batch's variance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorms(module: nn.Module) -> list[BatchNorm]:
    """The BatchNorm layers that would update running statistics in this forward."""
    return [m for m in module.modules()
            if isinstance(m, BatchNorm) and m.training and m.track_running_stats and m.running_mean is not None]


@contextlib.contextmanager
def single_update(layers: list[BatchNorm]) -> Iterator[None]:
    """During the block, the k-th call of a layer uses momentum 1/(k+1), so its running buffers
    hold the mean of the chunk statistics; afterwards they are blended in with the layer's own
    momentum (or cumulative-average factor) as a single update."""
    saved = []
    handles = []
    for m in layers:
        calls = [0]

        def pre_hook(mod: nn.Module, args: object, calls: list[int] = calls) -> None:
            mod.momentum = 1.0 / (calls[0] + 1)
            calls[0] += 1

        saved.append((m, m.momentum, m.running_mean.clone(), m.running_var.clone(),
                      m.num_batches_tracked.clone(), calls))
        handles.append(m.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for m, momentum, mean0, var0, n0, calls in saved:
                m.momentum = momentum
                if calls[0] == 0:
                    continue
                factor = momentum if momentum is not None else 1.0 / float(n0 + 1)
                m.running_mean.copy_(torch.lerp(mean0, m.running_mean, factor))
                m.running_var.copy_(torch.lerp(var0, m.running_var, factor))
                m.num_batches_tracked.copy_(n0 + 1)


@contextlib.contextmanager
def frozen(layers: list[BatchNorm]) -> Iterator[None]:
    """Restore the layers' buffers after the block (the re-forward must not update them)."""
    saved = [[b.detach().clone() for b in m.buffers()] for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(layers, saved):
                for b, s in zip(m.buffers(), bufs):
                    b.copy_(s)
