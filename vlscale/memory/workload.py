"""One rank's exact training-step workload, with the other ranks' embeddings simulated.

This is how a memory report checks "fits on W GPUs" on one device: rank 0 of W runs its own
``global_batch / W`` pairs through the real towers, the real loss backend
(:func:`vlscale.loss.contrastive.fused_loss` on local rows × all B columns, or the naive
open_clip-style logits) and a real optimizer step, while the columns that would come from the
other W−1 ranks are random unit vectors of the right shape. Collectives are replaced by their
memory footprint: the all-gather output is a B×D tensor, the column-statistics merge keeps the
partial statistics (values differ from a real run, sizes do not), the reduce-scatter keeps this
rank's B/W rows of the fp32 column gradient.

The step mirrors :class:`vlscale.gradcache.GradCache` (towers embedded separately, chunk by
chunk, no graph; loss and embedding gradients once in fp32; re-forward + surrogate backward per
chunk), but generates each chunk's inputs on the fly: at B = 1M on 8 ranks a rank's pixels alone
are 131,072 × 3 × 224² values (79 GB in fp32), which no host need hold for a memory measurement.
Each phase is recorded by a :class:`~vlscale.memory.tracker.MemoryTracker`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlscale.memory.towers import InputsFn
from vlscale.memory.tracker import MemoryTracker

TOWER_KEYS = {"image": ("pixels",), "text": ("tokens", "attention_mask")}


class ShardedAdam:
    """Memory-faithful stand-in for one rank of ZeRO-1 mixed-precision Adam.

    Holds the fp32 master copy, momentum and variance of this rank's 1/W slice of the flattened
    parameters (12Ψ/W bytes), makes the fp32 copy of that slice's gradient at ``step`` (4Ψ/W) and
    writes the updated slice back into the 16-bit parameters. Gradients stay full-size in the
    parameters' dtype (2Ψ), as under ZeRO-1; ZeRO-2 would keep only 2Ψ/W of them.
    """

    def __init__(self, params: list[nn.Parameter], world_size: int, *, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6) -> None:
        total = sum(p.numel() for p in params)
        self.size = math.ceil(total / world_size)
        self.pieces: list[tuple[nn.Parameter, int, int]] = []
        start = 0
        for p in params:  # the pieces of the first `size` flattened elements
            take = min(p.numel(), self.size - start)
            if take <= 0:
                break
            self.pieces.append((p, 0, take))
            start += take
        self.params = params
        self.master = torch.cat([p.detach().reshape(-1)[a:b].float() for p, a, b in self.pieces])
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0

    @torch.no_grad()
    def step(self) -> None:
        g = torch.zeros_like(self.master)  # the fp32 gradient partition, filled piece by piece
        offset = 0
        for p, a, b in self.pieces:
            if p.grad is not None:
                g[offset : offset + b - a].copy_(p.grad.reshape(-1)[a:b])
            offset += b - a
        self.t += 1
        b1, b2 = self.betas
        self.exp_avg.mul_(b1).add_(g, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        # The denominator reuses the gradient copy: one 4Ψ/W temporary, as a fused Adam step.
        denom = torch.sqrt(self.exp_avg_sq, out=g).div_(math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.master.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - b1**self.t))
        del g, denom
        offset = 0
        for p, a, b in self.pieces:
            p.reshape(-1)[a:b].copy_(self.master[offset : offset + b - a])
            offset += b - a

    def zero_grad(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()


class _SimulatedComm:
    """The distributed seam's collectives, reduced to their memory footprint on rank 0."""

    def __init__(self, local_rows: int) -> None:
        self.local_rows = local_rows

    def merge_col_lse(self, col_lse_partial: Tensor) -> Tensor:
        return col_lse_partial  # a real all-reduce returns a tensor of the same size

    def reduce_dk(self, dk_all: Tensor) -> Tensor:
        return dk_all[: self.local_rows].clone()  # this rank's share of the reduce-scatter

    def sum_scalar(self, x: Tensor) -> Tensor:
        return x


def _simulated_columns(local: Tensor, total: int) -> Tensor:
    """The all-gather output: this rank's rows first, then random unit rows for the others."""
    others = F.normalize(torch.randn(total - local.shape[0], local.shape[1], device=local.device), dim=-1)
    return torch.cat([local.detach(), others.to(local.dtype)])


def contrastive_step_loss(img: Tensor, txt: Tensor, scale: Tensor, *, global_batch: int, impl: str) -> Tensor:
    """Rank 0's share of the global symmetric loss: local rows × all ``global_batch`` columns."""
    b_local = img.shape[0]
    if impl == "naive":
        # open_clip ClipLoss with gather_with_grad: both modalities gathered, B_local×B logits.
        img_all = torch.cat([img, _simulated_columns(img, global_batch)[b_local:]])
        txt_all = torch.cat([txt, _simulated_columns(txt, global_batch)[b_local:]])
        labels = torch.arange(b_local, device=img.device)
        s = scale.reshape(())
        return 0.5 * (F.cross_entropy(s * img @ txt_all.T, labels) + F.cross_entropy(s * txt @ img_all.T, labels))
    from vlscale.loss.backends import get_backend
    from vlscale.loss.contrastive import fused_loss, symmetric_plan

    plan = symmetric_plan(b_local, num_total=global_batch, offset=0, device=img.device)
    return fused_loss(img, txt, scale, plan, backend=get_backend(impl, img.device),
                      k_all=_simulated_columns(txt, global_batch), comm=_SimulatedComm(b_local))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _tower_inputs(make_inputs: InputsFn, tower: str, start: int, stop: int,
                  device: torch.device) -> dict[str, Tensor]:
    return {k: v for k, v in make_inputs(start, stop, device).items() if k in TOWER_KEYS[tower]}


def _chunks(rows: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, chunk):
        yield start, min(start + chunk, rows)


def _embed(model: nn.Module, make_inputs: InputsFn, b_local: int, chunk: int, device: torch.device,
           autocast: torch.dtype | None) -> tuple[dict[str, Tensor], Tensor]:
    pieces: dict[str, list[Tensor]] = {"image": [], "text": []}
    scale = None
    with torch.no_grad():
        for tower in pieces:
            for start, stop in _chunks(b_local, chunk):
                with _autocast(device, autocast):
                    out = model(**_tower_inputs(make_inputs, tower, start, stop, device))
                pieces[tower].append(out[tower].float())
                scale = out["logit_scale"].float()
                del out
    return {t: torch.cat(p) for t, p in pieces.items()}, scale


def _reforward(model: nn.Module, make_inputs: InputsFn, grads: dict[str, Tensor], scale_grad: Tensor,
               chunk: int, device: torch.device, autocast: torch.dtype | None) -> None:
    b_local = grads["image"].shape[0]
    spans = [(t, a, b) for t in ("image", "text") for a, b in _chunks(b_local, chunk)]
    for i, (tower, start, stop) in enumerate(spans):
        with _autocast(device, autocast):
            out = model(**_tower_inputs(make_inputs, tower, start, stop, device))
        surrogate = (out[tower].float() * grads[tower][start:stop]).sum()
        if i == len(spans) - 1:  # logit_scale gets its gradient exactly once
            surrogate = surrogate + (out["logit_scale"].float() * scale_grad).sum()
        surrogate.backward()
        del out, surrogate


def run_rank_step(model: nn.Module, make_inputs: InputsFn, optimizer: torch.optim.Optimizer | ShardedAdam, *,
                  world_size: int, global_batch: int, chunk: int | None, loss_impl: str,
                  tracker: MemoryTracker, autocast: torch.dtype | None = None) -> float:
    """Run one training step of rank 0 of ``world_size``, recording each phase in ``tracker``.

    ``model(pixels=...)`` / ``model(tokens=...)`` must return ``{"image" | "text": (n, D),
    "logit_scale": (1,)}`` (:class:`vlscale.model.DualEncoder`). ``chunk=None`` runs the whole local
    batch with a graph (no gradient cache). Returns the loss (rank 0's share; a float).
    """
    if global_batch % world_size:
        raise ValueError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
    device = tracker.device
    b_local = global_batch // world_size
    if chunk is None:
        with tracker.phase("fwd_bwd"):
            with _autocast(device, autocast):
                img = model(**_tower_inputs(make_inputs, "image", 0, b_local, device))
                txt = model(**_tower_inputs(make_inputs, "text", 0, b_local, device))
            loss = contrastive_step_loss(img["image"].float(), txt["text"].float(), img["logit_scale"].float(),
                                         global_batch=global_batch, impl=loss_impl)
            loss.backward()
            del img, txt
    else:
        with tracker.phase("embed"):
            embs, scale = _embed(model, make_inputs, b_local, chunk, device, autocast)
        with tracker.phase("loss"):
            leaves = {k: v.requires_grad_(True) for k, v in embs.items()}
            scale = scale.requires_grad_(True)
            loss = contrastive_step_loss(leaves["image"], leaves["text"], scale,
                                         global_batch=global_batch, impl=loss_impl)
            loss.backward()
            grads = {k: v.grad for k, v in leaves.items()}
            # As GradCache does: the replay needs only the gradients, not the embeddings.
            del embs, leaves
        with tracker.phase("reforward"):
            _reforward(model, make_inputs, grads, scale.grad, chunk, device, autocast)
        del grads
    with tracker.phase("step"):
        optimizer.step()
        # Keep the gradient buffers (as engines do): they are part of the model states.
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.zero_grad(set_to_none=False)
        else:
            optimizer.zero_grad()
    return float(loss.detach())
