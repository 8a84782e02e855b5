"""Freezing the first layers of a tower (WenLan / BriVL trains partial backbones).

BriVL's official code trains only the top of each backbone: EfficientNet stages 3–6 (stem and
stages 0–2 frozen) and the last 4 of RoBERTa's layers (``BriVL-code-inference/models/vl_model.py``,
``init_param``). Here "the first N layers" of a tower means its input embedding (the stem) plus its
first N blocks:

* vision: timm's coarse parameter groups (``model.group_matcher(coarse=True)``, the grouping timm
  uses for layer-wise lr decay): group 0 is the stem (patch / position embeddings, class token, or a
  CNN's first conv), groups 1… are the blocks (ViT blocks, CNN stages). The trunk's final norm sits
  in the last block's group, so freezing every block freezes the whole trunk;
* text: the transformers model's embeddings and its first N encoder layers.

Frozen parameters get ``requires_grad=False`` before any optimizer or engine exists, so they get
no gradient and no optimizer state (``param_groups`` skips them; DeepSpeed is handed only trainable
parameters; FSDP2 shards them but never reduces a gradient for them). Their buffers (BatchNorm
running statistics) still update in train mode, as in BriVL.
"""

from __future__ import annotations

from torch import nn


def vision_layer_groups(trunk: nn.Module) -> list[list[str]]:
    """Parameter names of the stem, then of each block group, in order (timm coarse groups)."""
    matcher = getattr(trunk, "group_matcher", None)
    if matcher is None:
        raise ValueError(f"{type(trunk).__name__} has no timm group_matcher: cannot tell its first layers "
                         "apart; use a timm model or freeze_image_layers=0")
    from timm.models import group_parameters

    groups = group_parameters(trunk, matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def text_layer_list(trunk: nn.Module) -> nn.ModuleList:
    """The transformers encoder's list of layers (BERT / RoBERTa ``encoder.layer``, others ``layers``)."""
    for path in ("encoder.layer", "encoder.layers", "layers", "layer", "transformer.layer"):
        obj: object = trunk
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the layer list of the text model {type(trunk).__name__} "
                     "(looked for encoder.layer, encoder.layers, layers)")


def text_embeddings(trunk: nn.Module) -> nn.Module:
    """The module that turns token ids into the first hidden states."""
    emb = getattr(trunk, "embeddings", None)
    if isinstance(emb, nn.Module):
        return emb
    return trunk.get_input_embeddings()


def freeze_vision_layers(trunk: nn.Module, n: int) -> int:
    """Freeze the stem and the first ``n`` block groups; returns the number of frozen parameters."""
    if n <= 0:
        return 0
    groups = vision_layer_groups(trunk)
    if n > len(groups) - 1:
        raise ValueError(f"freeze_image_layers={n} but the vision tower has {len(groups) - 1} block groups")
    names = {name for group in groups[: n + 1] for name in group}
    return _freeze(trunk, names)


def freeze_text_layers(trunk: nn.Module, n: int) -> int:
    """Freeze the embeddings and the first ``n`` encoder layers; returns the number of frozen parameters."""
    if n <= 0:
        return 0
    layers = text_layer_list(trunk)
    if n > len(layers):
        raise ValueError(f"freeze_text_layers={n} but the text tower has {len(layers)} layers")
    modules = [text_embeddings(trunk), *layers[:n]]
    count = 0
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                count += p.numel()
    return count


def _freeze(module: nn.Module, names: set[str]) -> int:
    count = 0
    for name, p in module.named_parameters():
        if name in names and p.requires_grad:
            p.requires_grad_(False)
            count += p.numel()
    return count
