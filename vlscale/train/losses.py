"""The training objective handed to the gradient cache: ``loss_fn(embs) -> (loss, metrics)``.

``embs`` holds the model's outputs for the whole per-rank batch as detached fp32 leaves (the
gradient cache differentiates the loss w.r.t. them). The objective is the symmetric contrastive
loss of :mod:`vlscale.loss` over all ranks' pairs, plus, when enabled:

- ZeroVL coin-flip mixup: the step's :class:`~vlscale.techniques.mixup.MixPlan` mixes the text
  embeddings here (pixels were mixed before the forward) and soft targets go to the loss;
- ViCHA hierarchical alignment: the same loss on each intermediate-layer pair
  (``image_hier``/``text_hier``, …), weighted by ``techniques.hier_weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from vlscale.config import Config
from vlscale.loss import contrastive_loss
from vlscale.model import hier_key

LossFn = Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, float]]]


class Objective:
    """Callable loss for :meth:`vlscale.gradcache.GradCache.step`; ``plan`` is set per step."""

    def __init__(self, cfg: Config, *, process_group: Any, module: nn.Module) -> None:
        self.impl = cfg.loss.impl
        self.process_group = process_group
        self.hier_weight = cfg.techniques.hier_weight
        self.n_hier = getattr(getattr(module, "cfg", None), "n_hier", 0)
        if self.hier_weight > 0 and self.n_hier == 0:
            raise ValueError("techniques.hier_weight > 0 needs model.hier_image_layers / hier_text_layers")
        self.plan: Any = None  # the step's mixup plan (None: no mixup)

    def _pair_loss(self, image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
        mix = None
        if self.plan is not None:
            text = self.plan.mix_text(text)
            mix = self.plan.mix(image.device)
        return contrastive_loss(image, text, scale, mix=mix, impl=self.impl, process_group=self.process_group)

    def __call__(self, embs: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        scale = embs["logit_scale"]
        main = self._pair_loss(embs["image"], embs["text"], scale)
        metrics = {"logit_scale": float(scale.detach().reshape(-1)[0]), "loss/contrastive": float(main.detach())}
        loss = main
        for level in range(self.n_hier if self.hier_weight > 0 else 0):
            extra = self._pair_loss(embs[hier_key("image", level)], embs[hier_key("text", level)], scale)
            metrics[f"loss/hier{level}"] = float(extra.detach())
            loss = loss + self.hier_weight * extra
        if self.plan is not None:
            metrics["mixup/lam"] = float(self.plan.lam)
            metrics["mixup/image"] = float(self.plan.mode == "image")
        return loss, metrics


def build_loss_fn(cfg: Config, *, process_group: Any, module: nn.Module) -> Objective:
    """The run's objective (see the module docstring)."""
    return Objective(cfg, process_group=process_group, module=module)
