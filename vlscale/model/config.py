"""``ModelConfig``: everything that decides the shape of a :class:`~vlscale.model.DualEncoder`.

A typed dataclass validated in ``__post_init__`` (bad values raise ``ValueError`` naming the
field). It is a plain-data object, so the training config can nest it and write it to JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ATTN_IMPLS = ("auto", "sdpa", "eager", "xformers")
PROJ_KINDS = ("linear", "mlp")
TEXT_POOLINGS = ("cls", "mean")


@dataclass
class ModelConfig:
    """Architecture and initialisation of the dual encoder."""

    vision_model: str = "vit_tiny_patch16_224"
    """Any timm model name (``timm.list_models()``); built with ``num_classes=0``."""

    vision_weights: str | None = None
    """Local weights for the vision tower: a ``.safetensors`` / ``.pth`` / ``.bin`` file or a folder
    holding one (``model.safetensors``, ``pytorch_model.bin``, ``open_clip_pytorch_model.bin``).
    ``None``: random init. Never downloads."""

    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``{"patch_size": 8}``)."""

    image_size: int | None = None
    """Input resolution. ``None``: the timm model's default. Passed to timm as ``img_size`` for
    models that take it (ViTs) and reported by ``DualEncoder.data_config()``."""

    text_model: str = "bert-tiny"
    """A local folder with a transformers ``config.json`` (weights loaded from it when
    ``text_pretrained``), a named config from :data:`vlscale.model.towers.TEXT_CONFIGS`
    (``"bert-base-uncased"``, ``"minilm-l6"``, ``"bert-tiny"``, ...), or a transformers
    ``model_type`` such as ``"bert"`` (random init; sizes from ``text_config``)."""

    text_pretrained: bool = False
    """Load the text tower's weights from ``text_model`` (a folder, or ``"minilm-l6"``)."""

    text_config: dict[str, Any] = field(default_factory=dict)
    """Overrides applied to the text tower's transformers config (e.g. ``{"num_hidden_layers": 2}``)."""

    text_pooling: str = "cls"
    """How the text tower's tokens become one vector: ``"cls"`` (first token, BERT / ZeroVL) or
    ``"mean"`` (masked mean, sentence-transformers / MiniLM)."""

    tokenizer: str | None = None
    """A folder / ``tokenizer.json`` / ``vocab.txt`` path. ``None``: the text tower's own tokenizer
    (its folder, or the bundled uncased BERT vocabulary for BERT-vocabulary named configs)."""

    tokenizer_words: tuple[str, ...] = ()
    """Build a tiny WordPiece tokenizer from this word list instead (tiny CPU recipes); the text
    tower's ``vocab_size`` is then set to the tokenizer's size."""

    context_length: int = 32
    """Maximum number of text tokens (the tokenizer truncates / pads to it)."""

    embed_dim: int = 512
    """Width E of the shared embedding space."""

    proj: str = "linear"
    """Projection head: ``"linear"`` (bias-free, CLIP) or ``"mlp"`` (Linear–GELU–Linear)."""

    init_logit_scale: float = math.log(1 / 0.07)
    """Initial value of the learnable log-scale ``t``; the model returns ``exp(clamp(t))``."""

    max_logit_scale: float = math.log(100.0)
    """Upper clamp of ``t`` (CLIP: log 100)."""

    learn_logit_scale: bool = True
    """``False`` freezes the temperature (ZeroVL trains with a fixed 0.02)."""

    grad_checkpointing: bool = False
    """Activation checkpointing in both towers (timm ``set_grad_checkpointing``, HF
    ``gradient_checkpointing_enable``): less activation memory, one extra forward."""

    attn_impl: str = "auto"
    """``"auto"`` (SDPA; xformers on CUDA devices older than sm_80 when installed), ``"sdpa"``,
    ``"eager"`` or ``"xformers"`` (CUDA only; asking for it without CUDA/xformers is an error)."""

    hier_image_layers: tuple[int, ...] = ()
    """ViCHA hierarchical alignment: 0-based vision block (ViT) / stage (CNN) indices whose pooled
    outputs get their own projection head; negative counts from the end. Empty: disabled."""

    hier_text_layers: tuple[int, ...] = ()
    """The text tower's 0-based layer indices paired with ``hier_image_layers`` (same length)."""

    hier_levels: int = 0
    """ViCHA's default layer pairing, used when ``hier_image_layers`` / ``hier_text_layers`` are empty:
    the ``hier_levels`` layers just below the last one in each tower, lowest with lowest (layers
    ``-(n+1) … -2`` of both). ViCHA aligns 5 levels (official ``configs/Pretrain.yaml``
    ``num_hidden_align: 5``; ``hidden_states_ita`` pairs ``[-(n+1):-1]`` of both towers): ViT-B/16
    blocks 6–10 with BERT layers 6–10 here (0-based). 0 = only the explicit lists."""

    freeze_image_layers: int = 0
    """Freeze the vision tower's stem and its first N block groups (timm coarse groups: ViT blocks,
    CNN stages); frozen parameters get no gradient and no optimizer state. BriVL trains only
    EfficientNet stages 3–6 (N = 3). 0 = train everything."""

    freeze_text_layers: int = 0
    """Freeze the text tower's embeddings and its first N layers (BriVL: 8 of RoBERTa-base's 12)."""

    concept_tokens: int = 0
    """ViCHA visual concepts as image-side tokens: the image's concept words, tokenised to at most this
    many tokens (ViCHA: 55), are encoded by the text tower's embeddings + first ``concept_layers``
    layers, projected to the vision width and appended to the patch tokens (a timm ViT). Fed at
    training (sampled) and evaluation (all). 0 = off (``techniques.concept_mode`` must then not be
    ``image_tokens``)."""

    concept_layers: int = 2
    """Text-tower layers that encode the concept tokens (ViCHA: ``num_hidden_layers_kw: 2``; 0 = the
    token embeddings only). The layers are the text tower's own (shared weights)."""

    mim_decoder_depth: int = 0
    """Blocks of the masked-image-modeling decoder (ViCHA: 2); 0 = no decoder (MIM off)."""

    mim_decoder_width: int = 0
    """Width of the MIM decoder (0 = the vision tower's width; ViCHA: 768)."""

    mim_decoder_heads: int = 16
    """Attention heads of the MIM decoder blocks (ViCHA: 16)."""

    drop_path_rate: float = 0.0
    """Stochastic depth in the vision tower."""

    def __post_init__(self) -> None:
        self.tokenizer_words = tuple(self.tokenizer_words)
        self.hier_image_layers = tuple(int(i) for i in self.hier_image_layers)
        self.hier_text_layers = tuple(int(i) for i in self.hier_text_layers)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("proj", self.proj, PROJ_KINDS)
        _check_choice("text_pooling", self.text_pooling, TEXT_POOLINGS)
        for name in ("vision_model", "text_model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"ModelConfig.{name} must be a non-empty string")
        for name in ("embed_dim", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise ValueError(f"ModelConfig.image_size must be None or an int >= 8, got {self.image_size!r}")
        if not math.isfinite(self.init_logit_scale) or not math.isfinite(self.max_logit_scale):
            raise ValueError("ModelConfig.init_logit_scale / max_logit_scale must be finite")
        if self.init_logit_scale > self.max_logit_scale:
            raise ValueError(
                f"ModelConfig.init_logit_scale ({self.init_logit_scale:.4g}) exceeds max_logit_scale "
                f"({self.max_logit_scale:.4g})"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"ModelConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        for name in ("hier_levels", "freeze_image_layers", "freeze_text_layers", "concept_tokens",
                     "concept_layers", "mim_decoder_depth", "mim_decoder_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an int >= 0, got {value!r}")
        if self.mim_decoder_heads < 1:
            raise ValueError(f"ModelConfig.mim_decoder_heads must be >= 1, got {self.mim_decoder_heads}")
        if self.hier_levels and not self.hier_image_layers and not self.hier_text_layers:
            default = tuple(range(-(self.hier_levels + 1), -1))  # the n layers below the last, in order
            self.hier_image_layers, self.hier_text_layers = default, default
        elif self.hier_levels and len(self.hier_image_layers) != self.hier_levels:
            raise ValueError(f"ModelConfig.hier_levels={self.hier_levels} but hier_image_layers has "
                             f"{len(self.hier_image_layers)} entries: give one or the other")
        if len(self.hier_image_layers) != len(self.hier_text_layers):
            raise ValueError(
                "ModelConfig.hier_image_layers and hier_text_layers must pair up (same length), got "
                f"{self.hier_image_layers} and {self.hier_text_layers}"
            )
        if self.tokenizer_words and self.tokenizer is not None:
            raise ValueError("ModelConfig: give either tokenizer or tokenizer_words, not both")
        if self.tokenizer_words and self.text_pretrained:
            raise ValueError(
                "ModelConfig.tokenizer_words builds a new vocabulary, which a pretrained text tower "
                "cannot read: drop text_pretrained or tokenizer_words"
            )

    @property
    def n_hier(self) -> int:
        """Number of hierarchical-alignment levels (0 when disabled)."""
        return len(self.hier_image_layers)


def hier_key(tower: str, level: int) -> str:
    """Output key of hierarchical level ``level``: ``image_hier``, ``image_hier1``, ``image_hier2`` …"""
    return f"{tower}_hier" if level == 0 else f"{tower}_hier{level}"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {value!r}")
