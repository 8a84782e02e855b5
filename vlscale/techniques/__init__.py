"""vlscale.techniques: the paper techniques on top of the contrastive loss.

* ZeroVL coin-flipping mixup — :class:`CoinFlipMixup` / :class:`MixPlan` (per-term targets);
* WenLan / BriVL cross-modal momentum contrast — :class:`MomentumContrast` (fp32 EMA of the
  master weights, B + K or BriVL's 1 + K candidates: :func:`positive_queue_nce`);
* ViCHA hierarchical alignment — :func:`hierarchical_loss`;
* ViCHA visual concepts — :class:`ConceptSampler`; mining them: ``vlscale concepts``
  (:mod:`vlscale.techniques.mining`);
* ViCHA masked image modeling — :class:`MaskedImageModeling`, a gradient-cache per-chunk loss.

(ZeroVL's decoupled gradient accumulation is :mod:`vlscale.gradcache`; its debiased sampling is
:mod:`vlscale.data`.) Importing this package imports :mod:`vlscale.loss` and :mod:`vlscale.gradcache`.
"""

from vlscale.techniques.candidates import positive_queue_nce, row_lse
from vlscale.techniques.concepts import ConceptSampler
from vlscale.techniques.hierarchical import hier_levels, hierarchical_loss
from vlscale.techniques.mim import MaskedImageModeling, mim_loss
from vlscale.techniques.mixup import CoinFlipMixup, MixPlan, mix_reversed
from vlscale.techniques.momentum import MomentumContrast, momentum_copy

__all__ = ["CoinFlipMixup", "ConceptSampler", "MaskedImageModeling", "MixPlan", "MomentumContrast", "hier_levels",
           "hierarchical_loss", "mim_loss", "mix_reversed", "momentum_copy", "positive_queue_nce", "row_lse"]
