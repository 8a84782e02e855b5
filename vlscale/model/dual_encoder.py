"""``DualEncoder``: vision tower + text tower + projection heads + learnable temperature.

Single-device model code (engines wrap it from outside). One call may carry only one tower's
inputs — the gradient cache embeds the towers separately — and every call returns
``logit_scale`` so its gradient flows through whichever chunk produced it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlscale.model.attention import resolve_attn_impl
from vlscale.model.config import ModelConfig, hier_key
from vlscale.model.heads import ProjectionHead
from vlscale.model.tokenizer import build_tokenizer
from vlscale.model.towers import TextTower, VisionTower

log = logging.getLogger(__name__)


class DualEncoder(nn.Module):
    """CLIP-style dual encoder. ``forward(pixels=None, tokens=None, attention_mask=None) -> dict``.

    Keys: ``image`` (B, E) and ``text`` (B, E), L2-normalised, when their inputs are given;
    ``logit_scale`` (1,) = exp(clamp(t, max=max_logit_scale)) always; ``image_hier`` /
    ``text_hier`` (and ``…_hier1`` … for further levels) when hierarchical alignment is on."""

    def __init__(self, cfg: ModelConfig, *, tokenizer: Any | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_impl = resolve_attn_impl(cfg.attn_impl)
        self.tokenizer = tokenizer if tokenizer is not None else _maybe_tokenizer(cfg)
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        self.visual = VisionTower(cfg, self.attn_impl)
        self.textual = TextTower(cfg, self.attn_impl, vocab)
        e = cfg.embed_dim
        self.image_proj = ProjectionHead(self.visual.width, e, cfg.proj)
        self.text_proj = ProjectionHead(self.textual.width, e, cfg.proj)
        self.image_hier_proj = nn.ModuleList(
            ProjectionHead(w, e, cfg.proj, pre_norm=True) for w in self.visual.hier_widths)
        self.text_hier_proj = nn.ModuleList(
            ProjectionHead(w, e, cfg.proj, pre_norm=True) for w in self.textual.hier_widths)
        # Shape [1], not []: DeepSpeed's parameter broadcast breaks on 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)),
                                        requires_grad=cfg.learn_logit_scale)
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        log.info("DualEncoder: %s (%d attention layers) + %s, attention=%s, E=%d, %.2fM params",
                 cfg.vision_model, self.visual.n_attn, cfg.text_model, self.attn_impl, e,
                 sum(p.numel() for p in self.parameters()) / 1e6)

    def forward(self, pixels: Tensor | None = None, tokens: Tensor | None = None,
                attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        if pixels is None and tokens is None:
            raise ValueError("DualEncoder.forward needs pixels and/or tokens")
        if attention_mask is not None and tokens is None:
            raise ValueError("DualEncoder.forward got attention_mask without tokens")
        out: dict[str, Tensor] = {}
        if pixels is not None:
            out.update(self.encode_image(pixels))
        if tokens is not None:
            out.update(self.encode_text(tokens, attention_mask))
        out["logit_scale"] = self.scale()
        return out

    def encode_image(self, pixels: Tensor) -> dict[str, Tensor]:
        """``image`` (+ ``image_hier…``) embeddings, L2-normalised."""
        if pixels.dim() != 4:
            raise ValueError(f"pixels must be (B, C, H, W), got shape {tuple(pixels.shape)}")
        pooled, hier = self.visual(pixels)
        return self._project("image", pooled, hier, self.image_proj, self.image_hier_proj)

    def encode_text(self, tokens: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``text`` (+ ``text_hier…``) embeddings, L2-normalised."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L), got shape {tuple(tokens.shape)}")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape "
                             f"{tuple(tokens.shape)}")
        pooled, hier = self.textual(tokens, attention_mask)
        return self._project("text", pooled, hier, self.text_proj, self.text_hier_proj)

    @staticmethod
    def _project(tower: str, pooled: Tensor, hier: list[Tensor], head: nn.Module,
                 hier_heads: nn.ModuleList) -> dict[str, Tensor]:
        out = {tower: F.normalize(head(pooled), dim=-1)}
        for level, (feat, h) in enumerate(zip(hier, hier_heads)):
            out[hier_key(tower, level)] = F.normalize(h(feat), dim=-1)
        return out

    def scale(self) -> Tensor:
        """The logit multiplier s = exp(clamp(t)), shape (1,)."""
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (HF's applies in train mode only)."""
        self.visual.set_grad_checkpointing(enable)
        self.textual.set_grad_checkpointing(enable)

    def data_config(self) -> dict[str, Any]:
        """timm's resolved data config (input_size, mean, std, interpolation, crop_pct) for the vision tower."""
        return self.visual.data_config()

    def output_keys(self, tower: str) -> list[str]:
        """Embedding keys one tower's call returns (without ``logit_scale``)."""
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        return [tower] + [hier_key(tower, i) for i in range(self.cfg.n_hier)]


def _maybe_tokenizer(cfg: ModelConfig) -> Any | None:
    """The configured tokenizer, or ``None`` when the text tower has none of its own (the model is
    still usable with token ids from elsewhere; ``build_tokenizer`` then raises a clear error)."""
    try:
        return build_tokenizer(cfg)
    except ValueError:
        if cfg.tokenizer is not None or cfg.tokenizer_words:
            raise
        return None
