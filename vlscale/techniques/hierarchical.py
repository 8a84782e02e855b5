"""ViCHA hierarchical alignment (Shukor et al., arXiv 2208.13628, §3.1; official
``models/model_pretrain_kw_img.py`` ``hidden_states_ita``).

Besides the final embeddings, the CLS tokens of chosen intermediate layers of both towers get
their own projection heads (``ModelConfig.hier_image_layers`` / ``hier_text_layers``, or the
default pairing ``ModelConfig.hier_levels``: the n layers just below the last of each tower, in
order — ViCHA aligns 5). The DualEncoder returns them as ``image_hier`` / ``text_hier``, then
``image_hier1`` … for further levels. Each level adds a contrastive loss between the paired
layers with its own weight (``techniques.hier_weight``: one value, or one per level; ViCHA:
0.1 × [1, 1, 1, 1, 1]), so the lower layers are aligned too — cheap supervision that speeds up
learning with little data.

The levels use the model's one ``logit_scale`` and run through the fused / distributed loss like
the main term. Their mixup targets follow their inputs (:mod:`vlscale.techniques.mixup`): soft on
image-mix steps (the pixels, hence every image level, are mixed), the identity on text-mix steps
(only the final text embedding is mixed).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from vlscale.loss import contrastive_loss
from vlscale.model.config import hier_key


def hier_levels(embs: Mapping[str, Tensor]) -> int:
    """How many hierarchical levels ``embs`` holds (``image_hier``, ``image_hier1``, … paired with text)."""
    n = 0
    while hier_key("image", n) in embs or hier_key("text", n) in embs:
        if hier_key("image", n) not in embs or hier_key("text", n) not in embs:
            raise ValueError(f"hierarchical level {n}: {hier_key('image', n)!r} and {hier_key('text', n)!r} "
                             "must both be present")
        n += 1
    return n


def hierarchical_loss(embs: Mapping[str, Tensor], logit_scale: Tensor, *, weight: float | tuple[float, ...] = 0.1,
                      mix: tuple[Tensor, float] | None = None, impl: str = "auto",
                      process_group: object | None = None) -> tuple[Tensor | None, dict[str, float]]:
    """Σ_l weight_l · contrastive_loss(image_hier_l, text_hier_l) and the per-level values.

    Returns ``(None, {})`` when ``embs`` has no hierarchical outputs. ``weight``: one value for
    every level, or one per level."""
    n = hier_levels(embs)
    if n == 0:
        return None, {}
    weights = (weight,) * n if isinstance(weight, (int, float)) else tuple(weight)
    if len(weights) != n or any(w < 0 for w in weights):
        raise ValueError(f"need {n} non-negative hierarchical weights, got {weight}")
    total: Tensor | None = None
    parts: dict[str, float] = {}
    for level, w in enumerate(weights):
        value = contrastive_loss(embs[hier_key("image", level)], embs[hier_key("text", level)], logit_scale,
                                 mix=mix, impl=impl, process_group=process_group)
        parts[f"loss_hier{level}"] = float(value.detach())
        total = w * value if total is None else total + w * value
    return total, parts
