"""uint8 pixels from the loader to the device, normalised (and mixed) one chunk at a time.

At ZeroVL's scale one rank's local batch is 131,072 images (1,048,576 pairs over 8 ranks): 79 GB
as normalised fp32, 20 GB as the uint8 the decoder produced. With ``data.pixel_dtype="uint8"`` (the
trainer's default) the loader's workers, the pin-memory thread, the prefetch queue and the step
all hold uint8; :class:`PixelFeed` — the gradient cache's feed (:data:`vlscale.gradcache.transfer.
ChunkFeed`) — copies a chunk's rows to the device and only there makes them float:

* normalisation ``x · 1/(255·std) − mean/std`` by :func:`vlscale.data.collate.normalize`, the
  function of the collate's float path, so both give bit-identical pixels;
* ZeroVL's image mixup ``lam·x + (1−lam)·x.flip(0)``: row ``i`` of the step is mixed with row
  ``B−1−i``, so the chunk ``[start, stop)`` copies its partner rows ``[B−stop, B−start)`` too and
  mixes on the device — the arithmetic of :func:`vlscale.techniques.mixup.mix_reversed`, without
  a mixed copy of the batch on the host.

Float pixels (already normalised, e.g. from ``build_loader``'s default) pass through normalisation
untouched. The per-chunk loss (masked image modeling) and the momentum keys read the fed chunk, so
every consumer sees the same pixels as with the float path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vlscale.data.collate import normalize
from vlscale.gradcache.transfer import chunk_to, rows_to
from vlscale.techniques.mixup import mix_pair


@dataclass(frozen=True)
class PixelFeed:
    """A gradient-cache feed: chunk rows to ``device``, uint8 pixels normalised with ``mean`` /
    ``std`` (per channel, of [0, 1] values), and mixed with their reversed partners when ``lam``
    is set (this step mixes images). ``mean`` / ``std`` may be None when the pixels are float."""

    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    lam: float | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("PixelFeed needs both mean and std, or neither")
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"PixelFeed: mixup lam must be in [0, 1], got {self.lam}")

    def with_lam(self, lam: float | None) -> PixelFeed:
        """The same normalisation with this step's image-mix coefficient (None: no image mix)."""
        return PixelFeed(self.mean, self.std, lam)

    def __call__(self, inputs: dict[str, Tensor], start: int, stop: int, device: torch.device) -> dict[str, Tensor]:
        out = chunk_to({k: v for k, v in inputs.items() if k != "pixels"}, start, stop, device)
        if "pixels" not in inputs:
            return out
        pixels = inputs["pixels"]
        x = self.normalize(rows_to(pixels, start, stop, device))
        if self.lam is not None:
            rows = pixels.shape[0]
            partner = self.normalize(rows_to(pixels, rows - stop, rows - start, device)).flip(0)
            x = mix_pair(x, partner, self.lam)
        out["pixels"] = x
        return out

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> normalised fp32 on ``pixels``' device; float pixels unchanged."""
        if pixels.is_floating_point():
            return pixels
        if pixels.dtype != torch.uint8:
            raise ValueError(f"pixels must be uint8 or floating point, got {pixels.dtype}")
        if self.mean is None or self.std is None:
            raise ValueError("uint8 pixels need the data transform's mean and std to be normalised: "
                             "build PixelFeed(mean, std) from the loader's transform")
        return normalize(pixels, self.mean, self.std)


__all__ = ["PixelFeed"]
