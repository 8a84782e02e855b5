"""Two ViCHA forwards of a timm Vision Transformer trunk that timm's own ``forward`` does not offer.

* :func:`forward_with_tokens` — the trunk with extra tokens appended after the patch tokens
  (ViCHA's visual concepts: keyword tokens from the text tower join the image tokens before the
  first block, ``models/vit.py`` ``external_features`` in the official code). Padding tokens are
  masked out of every attention (an additive mask; ViCHA pads and attends to them). The pooled
  output and the hierarchical CLS features are taken from the image tokens only.
* :func:`forward_masked` — the trunk on a random subset of patches (MAE / ViCHA's masked image
  modeling encoder, ``models/objectives/mae.py``): patch embedding + position embedding, keep the
  given patches, prepend the prefix tokens, run the blocks and the final norm.

Both follow timm's ``VisionTransformer`` module layout (``patch_embed``, ``_pos_embed``,
``patch_drop``, ``norm_pre``, ``blocks``, ``norm``, ``forward_head``); other trunks are refused by
:func:`check_vit` with a clear error. Activation checkpointing follows ``trunk.grad_checkpointing``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_VIT_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "pos_embed", "cls_token")


def check_vit(trunk: nn.Module, what: str) -> None:
    """Raise ``ValueError`` unless ``trunk`` is a timm ViT with a class token and absolute positions."""
    missing = [p for p in _VIT_PARTS if not hasattr(trunk, p)]
    if missing or getattr(trunk, "cls_token", None) is None or getattr(trunk, "pos_embed", None) is None:
        raise ValueError(f"{what} needs a timm VisionTransformer with a class token and absolute position "
                         f"embeddings; {type(trunk).__name__} lacks {missing or ['cls_token / pos_embed']}")
    if getattr(trunk, "dynamic_img_size", False):
        raise ValueError(f"{what}: dynamic_img_size ViTs are not supported; build the tower at a fixed size")


def _run_blocks(trunk: nn.Module, x: Tensor, mask: Tensor | None, hier_idx: list[int]) -> tuple[Tensor, list[Tensor]]:
    """The blocks in order (checkpointed if the trunk is), collecting the CLS token after ``hier_idx``."""
    wanted = set(hier_idx)
    cls: dict[int, Tensor] = {}
    ckpt = bool(getattr(trunk, "grad_checkpointing", False)) and torch.is_grad_enabled()
    for i, blk in enumerate(trunk.blocks):
        if ckpt:
            x = checkpoint(blk, x, mask, use_reentrant=False)
        else:
            x = blk(x) if mask is None else blk(x, attn_mask=mask)
        if i in wanted:
            cls[i] = x[:, 0]
    return x, [cls[i] for i in hier_idx]


def forward_with_tokens(trunk: nn.Module, pixels: Tensor, extra: Tensor, extra_mask: Tensor | None,
                        hier_idx: list[int]) -> tuple[Tensor, list[Tensor]]:
    """(pooled image feature, CLS after each ``hier_idx`` block) with ``extra`` (B, T, width) tokens.

    ``extra_mask`` (B, T): 1 for real tokens, 0 for padding (masked out of every attention)."""
    x = trunk.patch_embed(pixels)
    x = trunk._pos_embed(x)
    x = trunk.patch_drop(x)
    x = trunk.norm_pre(x)
    n_image = x.shape[1]
    if extra.shape[0] != x.shape[0] or extra.shape[-1] != x.shape[-1]:
        raise ValueError(f"extra tokens {tuple(extra.shape)} do not fit image tokens {tuple(x.shape)}")
    x = torch.cat([x, extra.to(x.dtype)], dim=1)
    mask = None
    if extra_mask is not None:
        keep = torch.cat([extra_mask.new_ones(x.shape[0], n_image), extra_mask], dim=1).bool()
        # Additive (B, 1, 1, N): SDPA, timm's eager path and vlscale's xformers path all add it.
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
    x, hier = _run_blocks(trunk, x, mask, hier_idx)
    x = trunk.norm(x)[:, :n_image]  # pool over the image tokens only (a mean pool would see the concepts)
    return trunk.forward_head(x, pre_logits=True), hier


def num_patches(trunk: nn.Module) -> int:
    return int(trunk.patch_embed.num_patches)


def patch_size(trunk: nn.Module) -> int:
    size = trunk.patch_embed.patch_size
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise ValueError(f"masked image modeling needs square patches, got {tuple(size)}")
    return int(size[0])


def forward_masked(trunk: nn.Module, pixels: Tensor, keep: Tensor) -> Tensor:
    """Encoder output (B, prefix + K, width) for the patches ``keep`` (B, K) (long, patch indices)."""
    x = trunk.patch_embed(pixels)
    x = x.flatten(1, 2) if x.dim() == 4 else x
    pos = trunk.pos_embed
    n_prefix = int(getattr(trunk, "num_prefix_tokens", 1))
    pos_prefix = 0 if getattr(trunk, "no_embed_class", False) else n_prefix
    x = x + pos[:, pos_prefix:].to(x.dtype)
    x = torch.gather(x, 1, keep[:, :, None].expand(-1, -1, x.shape[-1]))
    prefix = [trunk.cls_token.expand(x.shape[0], -1, -1)]
    if getattr(trunk, "reg_token", None) is not None:
        prefix.append(trunk.reg_token.expand(x.shape[0], -1, -1))
    tokens = torch.cat(prefix, dim=1).to(x.dtype)
    if pos_prefix:
        tokens = tokens + pos[:, :pos_prefix].to(x.dtype)
    x = trunk.pos_drop(torch.cat([tokens, x], dim=1))
    x = trunk.norm_pre(x)
    x, _ = _run_blocks(trunk, x, None, [])
    return trunk.norm(x)
