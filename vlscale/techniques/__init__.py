"""vlscale.techniques: the paper techniques on top of the contrastive loss.

* ZeroVL coin-flipping mixup — :class:`CoinFlipMixup` / :class:`MixPlan`;
* WenLan / BriVL cross-modal momentum contrast — :class:`MomentumContrast`;
* ViCHA hierarchical alignment — :func:`hierarchical_loss`;
* ViCHA visual concepts — :class:`ConceptSampler`.

(ZeroVL's decoupled gradient accumulation is :mod:`vlscale.gradcache`; its debiased sampling is
:mod:`vlscale.data`.) Importing this package imports :mod:`vlscale.loss`.
"""

from vlscale.techniques.concepts import ConceptSampler
from vlscale.techniques.hierarchical import hier_levels, hierarchical_loss
from vlscale.techniques.mixup import CoinFlipMixup, MixPlan, mix_reversed
from vlscale.techniques.momentum import MomentumContrast

__all__ = ["CoinFlipMixup", "ConceptSampler", "MixPlan", "MomentumContrast", "hier_levels", "hierarchical_loss",
           "mix_reversed"]
