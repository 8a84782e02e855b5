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

from vlscale.model import freeze, vit
from vlscale.model.attention import resolve_attn_impl
from vlscale.model.config import ModelConfig, hier_key
from vlscale.model.heads import ProjectionHead
from vlscale.model.mim import MimDecoder, patchify
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
        # ViCHA visual concepts as image tokens: text-tower states projected to the vision width.
        self.concept_proj = nn.Linear(self.textual.width, self.visual.width) if cfg.concept_tokens else None
        self.mim_decoder = _mim_decoder(cfg, self.visual) if cfg.mim_decoder_depth else None
        frozen = (freeze.freeze_vision_layers(self.visual.trunk, cfg.freeze_image_layers)
                  + freeze.freeze_text_layers(self.textual.trunk, cfg.freeze_text_layers))
        if frozen:
            log.info("DualEncoder: froze %.2fM parameters (first %d vision / %d text layers)", frozen / 1e6,
                     cfg.freeze_image_layers, cfg.freeze_text_layers)
        # Shape [1], not []: DeepSpeed's parameter broadcast breaks on 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)),
                                        requires_grad=cfg.learn_logit_scale)
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        log.info("DualEncoder: %s (%d attention layers) + %s, attention=%s, E=%d, %.2fM params",
                 cfg.vision_model, self.visual.n_attn, cfg.text_model, self.attn_impl, e,
                 sum(p.numel() for p in self.parameters()) / 1e6)

    def forward(self, pixels: Tensor | None = None, tokens: Tensor | None = None,
                attention_mask: Tensor | None = None, concept_tokens: Tensor | None = None,
                concept_mask: Tensor | None = None, mim_pixels: Tensor | None = None,
                mim_keep: Tensor | None = None) -> dict[str, Tensor]:
        """``concept_tokens`` / ``concept_mask`` (B, Lc): the images' concept words (ViCHA, with
        ``ModelConfig.concept_tokens``). ``mim_pixels`` + ``mim_keep`` (B, K): the masked-image-modeling
        forward instead, returning ``mim_pred`` / ``mim_target`` (B, patches, patch²·3)."""
        if mim_pixels is not None:
            if pixels is not None or tokens is not None or mim_keep is None:
                raise ValueError("DualEncoder.forward: mim_pixels goes with mim_keep and nothing else")
            return {**self.masked_image_modeling(mim_pixels, mim_keep), "logit_scale": self.scale()}
        if pixels is None and tokens is None:
            raise ValueError("DualEncoder.forward needs pixels and/or tokens")
        if attention_mask is not None and tokens is None:
            raise ValueError("DualEncoder.forward got attention_mask without tokens")
        if concept_tokens is not None and pixels is None:
            raise ValueError("DualEncoder.forward got concept_tokens without pixels")
        out: dict[str, Tensor] = {}
        if pixels is not None:
            out.update(self.encode_image(pixels, concept_tokens, concept_mask))
        if tokens is not None:
            out.update(self.encode_text(tokens, attention_mask))
        out["logit_scale"] = self.scale()
        return out

    def encode_image(self, pixels: Tensor, concept_tokens: Tensor | None = None,
                     concept_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``image`` (+ ``image_hier…``) embeddings, L2-normalised; with the images' concept tokens
        when the model was built for them (ViCHA)."""
        _check_pixels(pixels)
        if concept_tokens is None:
            pooled, hier = self.visual(pixels)
        else:
            if self.concept_proj is None:
                raise ValueError("concept_tokens given but the model has no concept path: set "
                                 "model.concept_tokens > 0")
            if concept_tokens.shape[0] != pixels.shape[0]:
                raise ValueError(f"concept_tokens batch {concept_tokens.shape[0]} != pixels batch {pixels.shape[0]}")
            states, _ = self.textual(concept_tokens, concept_mask, prefix_layers=self.cfg.concept_layers)
            pooled, hier = self.visual(pixels, self.concept_proj(states), concept_mask)
        return self._project("image", pooled, hier, self.image_proj, self.image_hier_proj)

    def concept_inputs(self, concepts: list[list[str]] | None) -> dict[str, Tensor]:
        """``concept_tokens`` / ``concept_mask`` for a batch's concept lists (every concept, in order,
        space-separated, truncated to ``concept_tokens``); ``{}`` when the model has no concept path.
        Evaluation feeds these (ViCHA feeds all concepts at test time)."""
        if self.concept_proj is None:
            return {}
        if concepts is None:
            raise ValueError("this model takes visual concepts as image tokens (model.concept_tokens > 0) but "
                             "the data has no 'concepts' column: mine them with `vlscale concepts`")
        if self.tokenizer is None:
            raise ValueError("concept tokens need the model's tokenizer")
        texts = [" ".join(c.strip() for c in cs if c and c.strip()) for cs in concepts]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.cfg.concept_tokens,
                             return_tensors="pt")
        return {"concept_tokens": enc["input_ids"], "concept_mask": enc["attention_mask"]}

    def masked_image_modeling(self, pixels: Tensor, keep: Tensor) -> dict[str, Tensor]:
        """Predictions of every patch from the ``keep`` (B, K) patches, and the pixel targets."""
        if self.mim_decoder is None:
            raise ValueError("masked image modeling needs model.mim_decoder_depth > 0")
        _check_pixels(pixels)
        latent, _ = self.visual(pixels, mim_keep=keep)
        return {"mim_pred": self.mim_decoder(latent, keep),
                "mim_target": patchify(pixels, vit.patch_size(self.visual.trunk))}

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


def _check_pixels(pixels: Tensor) -> None:
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be (B, C, H, W), got shape {tuple(pixels.shape)}")
    if not pixels.is_floating_point():
        raise ValueError(f"pixels are {pixels.dtype}: the model takes normalised float pixels. uint8 batches "
                         "(data.pixel_dtype='uint8', build_loader(pixel_dtype='uint8')) are normalised with the "
                         "loader transform's mean / std by vlscale.data.collate.normalize (the trainer does it "
                         "on the device, per chunk)")


def _mim_decoder(cfg: ModelConfig, visual: VisionTower) -> MimDecoder:
    vit.check_vit(visual.trunk, "masked image modeling")
    n_prefix = int(getattr(visual.trunk, "num_prefix_tokens", 1))
    return MimDecoder(visual.width, vit.num_patches(visual.trunk), vit.patch_size(visual.trunk),
                      dim=cfg.mim_decoder_width or visual.width, depth=cfg.mim_decoder_depth,
                      heads=cfg.mim_decoder_heads, num_prefix=n_prefix)


def _maybe_tokenizer(cfg: ModelConfig) -> Any | None:
    """The configured tokenizer, or ``None`` when the text tower has none of its own (the model is
    still usable with token ids from elsewhere; ``build_tokenizer`` then raises a clear error)."""
    try:
        return build_tokenizer(cfg)
    except ValueError:
        if cfg.tokenizer is not None or cfg.tokenizer_words:
            raise
        return None
