"""ViCHA masked image modeling as a per-chunk loss of the gradient cache (arXiv 2208.13628, §3.3;
official ``models/objectives/mae.py``, ``unimodal_mae``; ``configs/Pretrain.yaml``: ``mae: True``,
``mask_ratio: 0.75``).

For every image, 75% of its patches are removed; the vision tower encodes the rest and the model's
MIM decoder (:class:`vlscale.model.mim.MimDecoder`) predicts every patch's pixels. The loss of an
image is the mean squared error over its removed patches, against pixels normalised per patch
(MAE's ``norm_pix_loss``); the step's term is ``weight ×`` the mean over the batch.

It needs each image's pixels and a graph, but no other image: a per-chunk loss. The
:class:`MaskedImageModeling` object is the gradient cache's ``chunk_loss`` hook
(:class:`vlscale.gradcache.ChunkContext`): on each image chunk's re-forward it runs the masked
forward of that chunk through the engine and returns ``weight · Σ_chunk ℓ_i / B_local`` — summed
over the chunks, exactly the batch mean, so the cached step equals the plain big-batch step with
the same extra loss. Which patches are removed is drawn once per step for the whole local batch
from a generator seeded by (seed, step, rank): the same masks whatever the chunking, in both
passes, and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vlscale.gradcache import ChunkContext


def mim_loss(pred: Tensor, target: Tensor, keep: Tensor, *, norm_pix: bool = True) -> Tensor:
    """Per-image loss (B,): mean over the removed patches of the per-patch MSE (fp32).

    ``pred`` / ``target`` (B, N, P); ``keep`` (B, K) the indices of the patches the encoder saw."""
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    removed = torch.ones_like(per_patch).scatter(1, keep, 0.0)
    return (per_patch * removed).sum(dim=1) / removed.sum(dim=1).clamp_min(1.0)


def keep_indices(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator) -> Tensor:
    """(B, K) random patch indices to keep, K = ⌊N·(1 − mask_ratio)⌋ (at least one)."""
    keep = max(1, int(num_patches * (1.0 - mask_ratio)))
    noise = torch.rand(batch, num_patches, generator=generator)
    return noise.argsort(dim=1)[:, :keep]


class MaskedImageModeling:
    """The per-chunk MIM loss hook: ``start_step`` draws the step's masks, ``__call__`` scores a chunk."""

    def __init__(self, *, weight: float, num_patches: int, mask_ratio: float = 0.75, norm_pix: bool = True,
                 seed: int = 0, rank: int = 0) -> None:
        if weight < 0 or not 0.0 < mask_ratio < 1.0 or num_patches < 2:
            raise ValueError(f"need weight >= 0, mask_ratio in (0, 1) and >= 2 patches, got {weight}, "
                             f"{mask_ratio}, {num_patches}")
        self.weight, self.num_patches, self.mask_ratio = float(weight), int(num_patches), float(mask_ratio)
        self.norm_pix, self.seed, self.rank = bool(norm_pix), int(seed), int(rank)
        self.keep: Tensor | None = None

    def start_step(self, step: int, batch_size: int) -> None:
        """Draw the step's masks for the local batch (same on a replay or a resume)."""
        (state,) = np.random.SeedSequence([self.seed, step, self.rank, 0x313D]).generate_state(1, np.uint64)
        gen = torch.Generator().manual_seed(int(state) >> 1)
        self.keep = keep_indices(batch_size, self.num_patches, self.mask_ratio, gen)

    def __call__(self, ctx: ChunkContext) -> Tensor | None:
        if ctx.tower != "image" or self.weight == 0.0:
            return None
        if self.keep is None or self.keep.shape[0] != ctx.batch_size:
            raise RuntimeError("MaskedImageModeling: start_step(step, batch_size) was not called for this batch")
        pixels = ctx.inputs["pixels"]
        keep = self.keep[ctx.start : ctx.stop].to(pixels.device)
        out = ctx.forward(mim_pixels=pixels, mim_keep=keep)
        per_image = mim_loss(out["mim_pred"], out["mim_target"], keep, norm_pix=self.norm_pix)
        return self.weight * per_image.sum() / ctx.batch_size
