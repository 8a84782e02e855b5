"""The decoder of ViCHA's masked image modeling objective (MAE-style, on the vision tower).

ViCHA (Shukor et al., arXiv 2208.13628; official ``models/objectives/mae.py``, "unimodal" MAE) masks
75% of the patches, encodes the rest with the vision tower, and reconstructs every patch's pixels
with a small decoder: a linear map to the decoder width, a learned mask token for each removed
patch, fixed 2-D sine-cosine position embeddings, a few transformer blocks, a norm, and a linear
map to ``patch² · 3`` pixel values. The loss (in :mod:`vlscale.techniques.mim`) is the mean
squared error on the removed patches, against per-patch normalised pixels.

The decoder exists only for training (it is part of the model's parameters so every engine shards
and checkpoints it like the rest); evaluation and export never call it.
"""

from __future__ import annotations

import functools
import math

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn


def sincos_2d(dim: int, grid: int) -> Tensor:
    """(grid², dim) fixed 2-D sine-cosine position embeddings (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for axis in (ys.reshape(-1), xs.reshape(-1)):
        angles = axis[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class MimDecoder(nn.Module):
    """Latent (B, prefix + K, width) of the kept patches → pixel predictions (B, N, patch² · 3)."""

    def __init__(self, width: int, num_patches: int, patch: int, *, dim: int, depth: int, heads: int,
                 num_prefix: int = 1) -> None:
        super().__init__()
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"masked image modeling needs a square patch grid, got {num_patches} patches")
        if dim % heads:
            raise ValueError(f"mim decoder width {dim} is not divisible by its {heads} heads")
        self.num_patches, self.num_prefix = num_patches, num_prefix
        self.embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed (not learned) position embeddings, as in MAE; the prefix tokens get zeros.
        pos = torch.cat([torch.zeros(num_prefix, dim), sincos_2d(dim, grid)])[None]
        self.register_buffer("pos_embed", pos, persistent=False)
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, keep: Tensor) -> Tensor:
        b, k = keep.shape
        x = self.embed(latent)
        prefix, kept = x[:, : self.num_prefix], x[:, self.num_prefix :]
        if kept.shape[1] != k:
            raise ValueError(f"mim decoder: {kept.shape[1]} kept tokens but {k} kept indices")
        full = self.mask_token.to(x.dtype).expand(b, self.num_patches, -1).clone()
        full = full.scatter(1, keep[:, :, None].expand(-1, -1, x.shape[-1]), kept)  # unshuffle
        x = torch.cat([prefix, full], dim=1) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, self.num_prefix :]


def patchify(pixels: Tensor, patch: int) -> Tensor:
    """(B, 3, H, W) → (B, (H/p)·(W/p), p·p·3), row-major patches, channels last within a patch."""
    b, c, h, w = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)
