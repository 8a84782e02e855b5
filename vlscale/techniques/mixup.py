"""ZeroVL coin-flipping mixup (Cui et al., arXiv 2112.09331, §3.3).

Each step flips a coin: heads mixes the *images* (pixels) with the reversed batch, tails mixes
the *text embeddings* with the reversed batch (text is discrete, so it is mixed after the
encoder). ``lam ~ Beta(α, α)`` with α = 0.1 (mostly close to 0 or 1). Only one modality is mixed
per step, so every mixed sample still has two true partners: sample i in the batch is
``lam·x_i + (1−lam)·x_{B−1−i}``, whose targets are lam on pair i and 1−lam on pair B−1−i — exactly
the loss's ``mix=(labels_b, lam)`` with ``labels_b = arange(B).flip(0)``.

Mixing text embeddings happens inside the loss function, on the (detached-leaf) embeddings the
gradient cache hands it, so the cached gradient flows back through the mix into each chunk.

Draws are a pure function of (seed, step): every rank flips the same coin and draws the same
lam without communicating, and a resumed run replays them exactly. Pixels are mixed once, before
the gradient cache's first pass, so both passes (and the momentum keys) see the same mixed images.

Targets follow the inputs, term by term. A contrastive term compares a query side with a key side;
its targets are soft (``lam`` on the pair itself, ``1 − lam`` on the reversed partner) exactly when
ONE of the two sides holds mixed samples, and the identity when neither does
(:meth:`MixPlan.targets`; both sides mixed has no such target and is refused). What is mixed:

=========================================  ====================  ====================
embedding                                  image step            text step
=========================================  ====================  ====================
``image`` / ``image_hier…`` (online)       mixed (pixels)        plain
``text`` (online, the final embedding)     plain                 mixed (after encoder)
``text_hier…`` (online)                    plain                 plain
momentum image keys (from the pixels)      mixed                 plain
momentum text keys                         plain                 plain
=========================================  ====================  ====================

so the contrastive term is soft on every mixed step, the hierarchical levels and the momentum
image→text direction only on image steps, and the momentum text→image direction on both.

Per step::

    plan = mixup.plan(step, local_batch, offset=rank * local_batch)
    pixels = plan.mix_pixels(pixels)                       # before the (chunked) forward
    # inside loss_fn(embs):
    loss = contrastive_loss(embs["image"], plan.mix_text(embs["text"]), embs["logit_scale"],
                            mix=plan.mix(device), process_group=pg)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("image", "text", "none")


@dataclass(frozen=True)
class MixPlan:
    """One step's mixup decision. ``mode``: which modality is mixed ("none": no mixup this step)."""

    mode: str
    lam: float
    batch_size: int
    offset: int = 0

    @property
    def labels_b(self) -> Tensor:
        """Partner of each local row, in global indices: ``offset + arange(B).flip(0)``."""
        return torch.arange(self.batch_size).flip(0) + self.offset

    def mix(self, device: torch.device | str | None = None) -> tuple[Tensor, float] | None:
        """``(labels_b, lam)`` for :func:`vlscale.loss.contrastive_loss`, or ``None`` when unmixed."""
        if self.mode == "none":
            return None
        return self.labels_b.to(device), self.lam

    @property
    def mixes_image(self) -> bool:
        """This step mixes the pixels (every image-side embedding and momentum image key is mixed)."""
        return self.mode == "image"

    @property
    def mixes_text(self) -> bool:
        """This step mixes the final text embeddings (only those: see the module docstring)."""
        return self.mode == "text"

    def targets(self, *, query_mixed: bool, key_mixed: bool, device: torch.device | str | None = None,
                local: bool = False) -> tuple[Tensor, float] | None:
        """The ``mix`` argument of one loss term whose query / key sides are (not) mixed: soft targets
        when exactly one side is, ``None`` (identity) when neither. ``local=True`` gives partners as
        indices into this rank's rows (for terms computed without gathering)."""
        if query_mixed and key_mixed:
            raise ValueError("a loss term with both sides mixed has no reversed-pair targets")
        if not (query_mixed or key_mixed) or self.mode == "none":
            return None
        labels_b = torch.arange(self.batch_size).flip(0) if local else self.labels_b
        return labels_b.to(device), self.lam

    def mix_pixels(self, pixels: Tensor) -> Tensor:
        """``lam·x + (1−lam)·x.flip(0)`` when this step mixes images, else ``pixels`` unchanged."""
        if self.mode != "image":
            return pixels
        _check_batch(pixels, self.batch_size, "pixels")
        return mix_reversed(pixels, self.lam)

    def image_lam(self, pixels: Tensor) -> float | None:
        """``lam`` when this step mixes images (checking ``pixels``' batch), else None: for a caller
        that mixes the pixels itself, chunk by chunk (:class:`vlscale.train.pixels.PixelFeed`)."""
        if self.mode != "image":
            return None
        _check_batch(pixels, self.batch_size, "pixels")
        return float(self.lam)

    def mix_text(self, text_emb: Tensor, *, renormalize: bool = True) -> Tensor:
        """Mix (B, E) text embeddings when this step mixes text (re-L2-normalised by default, so
        the mixed embedding lives on the sphere like the image embeddings it is compared with)."""
        if self.mode != "text":
            return text_emb
        _check_batch(text_emb, self.batch_size, "text_emb")
        mixed = mix_reversed(text_emb, self.lam)
        return F.normalize(mixed, dim=-1) if renormalize else mixed


def mix_pair(x: Tensor, partner: Tensor, lam: float) -> Tensor:
    """``lam·x + (1−lam)·partner``: the one mixing arithmetic (whole batches here, chunks in
    :class:`vlscale.train.pixels.PixelFeed`), so both give the same bits."""
    return lam * x + (1.0 - lam) * partner


def mix_reversed(x: Tensor, lam: float) -> Tensor:
    """``lam·x + (1−lam)·x.flip(0)`` along the batch dimension."""
    return mix_pair(x, x.flip(0), lam)


def _check_batch(x: Tensor, batch_size: int, name: str) -> None:
    if x.shape[0] != batch_size:
        raise ValueError(f"{name} has batch {x.shape[0]} but the mix plan was drawn for {batch_size}")


class CoinFlipMixup:
    """Draws a :class:`MixPlan` per step.

    ``prob``: probability that a step uses mixup at all (ZeroVL: 1.0); ``p_image``: probability
    that a mixed step mixes images rather than text (ZeroVL: 0.5); ``alpha``: Beta(α, α)."""

    def __init__(self, alpha: float = 0.1, p_image: float = 0.5, prob: float = 1.0, seed: int = 0) -> None:
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        for name, p in (("p_image", p_image), ("prob", prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"mixup {name} must be in [0, 1], got {p}")
        self.alpha, self.p_image, self.prob, self.seed = float(alpha), float(p_image), float(prob), int(seed)

    def plan(self, step: int, batch_size: int, *, offset: int = 0) -> MixPlan:
        """The decision for ``step`` (same on every rank); ``offset`` = this rank's first global row."""
        if step < 0 or batch_size < 1:
            raise ValueError(f"need step >= 0 and batch_size >= 1, got {step}, {batch_size}")
        rng = np.random.default_rng([self.seed, step])
        use, coin, lam = rng.random(), rng.random(), float(rng.beta(self.alpha, self.alpha))
        if use >= self.prob:
            return MixPlan("none", 1.0, batch_size, offset)
        return MixPlan("image" if coin < self.p_image else "text", lam, batch_size, offset)
