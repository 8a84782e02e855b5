"""Image decoding and the train / eval transforms (PIL), configured from a timm data config.

Transforms return ``uint8`` HWC arrays; conversion to float and normalisation happen once per
batch in the collate (one vectorised op instead of one per image). Random choices come from a
``random.Random`` passed in by the caller, seeded per batch, so a resumed run reproduces the
same crops (``random.Random`` rather than numpy: a scalar draw costs ~0.1 µs instead of ~2 µs).

Train-time options: the RandomResizedCrop area range ``scale`` (open_clip's 0.9–1 by default;
ZeroVL uses 0.6–1), horizontal flips, and torchvision's AutoAugment / RandAugment
(``auto_augment``, applied to the cropped image, as ZeroVL's ``[random_resize_crop, autoaug]``).
"""

from __future__ import annotations

import functools
import io
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


AUTO_AUGMENT_HELP = ("'' (off), 'autoaugment' (torchvision AutoAugment, ImageNet policy: ZeroVL's choice), "
                     "'autoaugment-cifar10', 'autoaugment-svhn', 'randaugment' (N=2 ops, magnitude M=9), "
                     "'randaugment-n<N>-m<M>' (N >= 1, 0 <= M <= 30)")


def parse_auto_augment(spec: str) -> tuple[str, dict[str, Any]] | None:
    """``spec`` -> (torchvision class name, its arguments), or None when off; raises on bad specs."""
    text = (spec or "").strip().lower()
    if text in ("", "none", "off"):
        return None
    m = re.fullmatch(r"autoaugment(?:-(imagenet|cifar10|svhn))?", text)
    if m:
        return "AutoAugment", {"policy": m.group(1) or "imagenet"}
    m = re.fullmatch(r"randaugment(?:-n(\d+)-m(\d+))?", text)
    if m:
        n, mag = (int(m.group(1)), int(m.group(2))) if m.group(1) else (2, 9)
        if n >= 1 and 0 <= mag <= 30:  # torchvision's 31 magnitude bins
            return "RandAugment", {"num_ops": n, "magnitude": mag}
    raise ValueError(f"auto_augment={spec!r} is not understood; use {AUTO_AUGMENT_HELP}")


@functools.lru_cache(maxsize=8)
def _auto_augment_op(spec: str) -> Any:
    # lazy: torchvision is imported only when an auto_augment policy is asked for
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy, RandAugment

    name, kwargs = parse_auto_augment(spec)  # type: ignore[misc]
    if name == "AutoAugment":
        return AutoAugment(AutoAugmentPolicy(kwargs["policy"]))
    return RandAugment(**kwargs)


def apply_auto_augment(img: Image.Image, spec: str, rng: random.Random) -> Image.Image:
    """torchvision's AutoAugment / RandAugment on ``img``, its draws seeded from ``rng``.

    torchvision draws from the global torch RNG; the draw happens under a forked RNG seeded from
    ``rng``, so the result is a pure function of the batch position (a resume replays it) and the
    caller's global torch state is left as it was."""
    import torch

    op = _auto_augment_op(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(63))
        return op(img)


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image; raises on corrupt or truncated data."""
    img = Image.open(io.BytesIO(data))  # in-memory source: nothing to close
    img.load()  # truncated data raises here (PIL.ImageFile.LOAD_TRUNCATED_IMAGES stays False)
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Crop + resize to ``size`` (H, W). Train: random-resized crop (torchvision's algorithm),
    optional horizontal flip, then optional AutoAugment / RandAugment (``auto_augment``, see
    ``parse_auto_augment``); eval: resize the short side to ``size / crop_pct`` and center crop."""

    size: tuple[int, int]
    train: bool
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    draft: bool = False  # JPEG DCT-domain downscaling when the crop is >= 2x the output (see decode_transform)
    auto_augment: str = ""  # torchvision AutoAugment / RandAugment after the crop (train only)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r} not in {sorted(_RESAMPLE)}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        check_crop_scale(self.scale)
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")
        if parse_auto_augment(self.auto_augment) is not None:
            if not self.train:
                raise ValueError(f"auto_augment={self.auto_augment!r} is a train-time augmentation (train=False here)")
            _auto_augment_op(self.auto_augment)  # import torchvision here, once, not in every forked worker

    def __call__(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        """Transform a decoded image."""
        return self._finish(img, self._box(img.width, img.height, rng), rng)

    def decode_transform(self, data: bytes, rng: random.Random) -> np.ndarray:
        """Decode encoded bytes and transform them; raises on corrupt or truncated data.

        The crop box depends only on the image size, known from the header, so with ``draft``
        a JPEG whose crop is at least twice the output size is decoded by libjpeg at 1/2, 1/4
        or 1/8 scale (never below the output resolution): far less decode and resize work on
        large photos, a slightly different (DCT-domain) downscaling filter. Same RNG use as
        ``__call__``, so the crop is the same either way.
        """
        img = Image.open(io.BytesIO(data))
        box = self._box(img.width, img.height, rng)
        if self.draft and img.format == "JPEG":
            h, w = self.size
            factor = min((box[2] - box[0]) / w, (box[3] - box[1]) / h)
            if factor >= 2:
                full = img.size
                img.draft("RGB", (math.ceil(full[0] / factor), math.ceil(full[1] / factor)))
                sx, sy = img.width / full[0], img.height / full[1]
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        img.load()  # truncated data raises here
        return self._finish(img if img.mode == "RGB" else img.convert("RGB"), box, rng)

    def _box(self, width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
        return self._random_box(width, height, rng) if self.train else self._center_box(width, height)

    def _finish(self, img: Image.Image, box: tuple[float, float, float, float], rng: random.Random) -> np.ndarray:
        h, w = self.size
        out = img.resize((w, h), _RESAMPLE[self.interpolation], box=box)
        if self.train and self.hflip > 0 and rng.random() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.auto_augment:  # after the draws above: a run without it keeps today's crops
            out = apply_auto_augment(out, self.auto_augment, rng)
        return np.asarray(out, dtype=np.uint8)

    def _random_box(self, width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= width and 0 < ch <= height:
                x, y = rng.randint(0, width - cw), rng.randint(0, height - ch)
                return (x, y, x + cw, y + ch)
        # fallback (as torchvision): the whole image, clamped to the allowed aspect range
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            cw, ch = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            cw, ch = round(height * self.ratio[1]), height
        else:
            cw, ch = width, height
        x, y = (width - cw) // 2, (height - ch) // 2
        return (x, y, x + cw, y + ch)

    def _center_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        # timm's eval geometry (Resize(floor(size / crop_pct)) then CenterCrop(size), with
        # torchvision's integer rounding) expressed as a box of the original image, so the image
        # is resampled once: same pixels as the two-step pipeline at a fraction of the cost.
        h, w = self.size
        if h == w:  # resize the short side, keep the aspect ratio (torchvision Resize(int))
            short = math.floor(h / self.crop_pct)
            if width <= height:
                rw, rh = short, int(short * height / width)
            else:
                rw, rh = int(short * width / height), short
        else:  # timm resizes to the exact (H, W) / crop_pct for non-square inputs
            rh, rw = math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
        top, left = round((rh - h) / 2.0), round((rw - w) / 2.0)
        sx, sy = width / rw, height / rh
        return (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


def check_crop_scale(scale: tuple[float, float]) -> tuple[float, float]:
    """Validate a RandomResizedCrop area range: ``0 < lo <= hi <= 1``."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must be (lo, hi) with 0 < lo <= hi <= 1 (fractions of the image area; "
                         f"open_clip 0.9-1, ZeroVL 0.6-1), got {tuple(scale)}")
    return float(scale[0]), float(scale[1])


def build_transform(*, train: bool, image_size: int | tuple[int, int] | None = 224,
                    data_config: Mapping | None = None, scale: tuple[float, float] = (0.9, 1.0),
                    hflip: float = 0.0, draft: bool | None = None, auto_augment: str = "") -> ImageTransform:
    """Transform from a timm data config (``input_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct``, as returned by ``timm.data.resolve_data_config``) or a plain ``image_size``.
    ``draft`` (JPEG reduced-scale decoding) defaults to on for training and off for evaluation,
    where pixels should match timm's reference preprocessing. ``scale`` and ``auto_augment`` are
    train-time options (see ``ImageTransform``)."""
    cfg = dict(data_config or {})
    if "input_size" in cfg:
        _, h, w = cfg["input_size"]
    elif image_size is None:
        raise ValueError("give image_size or a data_config with input_size")
    else:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    interpolation = cfg.get("interpolation") or "bicubic"
    return ImageTransform(size=(int(h), int(w)), train=train, interpolation=str(interpolation),
                          crop_pct=float(cfg.get("crop_pct") or 0.875), scale=tuple(scale), hflip=hflip,
                          mean=tuple(cfg.get("mean", OPENAI_MEAN)), std=tuple(cfg.get("std", OPENAI_STD)),
                          draft=train if draft is None else draft, auto_augment=auto_augment)
