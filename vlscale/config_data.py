"""The ``data`` section of the run configuration (:class:`DataConfig`), and the field check helper
every section uses. Kept apart from :mod:`vlscale.config` (which re-exports both) so that each file
stays about one concern; ``vlscale.configdoc`` documents the fields from the docstrings here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"config: {name} {msg}")


@dataclass
class DataConfig:
    """Where the Arrow shards are and how batches are made from them."""

    train_shards: str | list[str] = ""
    """Training shards: a folder (its manifest.json, else every *.arrow in it), a glob, a shard file,
    or a URL of any of these (s3://, gs://, hf://, https://); several as a list or comma-separated."""
    eval_shards: str = ""
    """Held-out shards for periodic / final retrieval evaluation, same forms as train_shards ('' = none)."""
    image_size: int = 0
    """Side of the square image fed to the vision tower (0 = the model's own input size)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""
    prefetch_factor: int = 2
    """Units (local batches, or parts with part_size) each worker prepares ahead; a rank's host
    memory holds about num_workers × prefetch_factor + 2 of them (``vlscale memory plan`` prints the total)."""
    part_size: int = 0
    """Rows of the loader's unit, a part of the per-rank batch (must divide it; 0 = the whole local
    batch). A step is micro / part_size consecutive parts, so every worker works on every step and
    the host holds one step buffer + num_workers × prefetch_factor parts, not as many local batches
    (docs/data.md). Changes which samples share a step, not which are seen."""
    pixel_dtype: Literal["uint8", "float32"] = "uint8"
    """How training pixels travel from the loader to the device: 'uint8' (the decoded values: a quarter
    of fp32's host memory and copies, normalised and mixed on the device chunk by chunk) or 'float32'
    (normalised in the workers). The model sees bit-identical pixels either way."""
    augment: bool = True
    """Train-time image augmentation: random resized crops (area ``crop_scale``) and ``auto_augment``;
    false = a plain resize of the whole image. Never flips (captions say left / right)."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """RandomResizedCrop area range, fractions of the image (open_clip 0.9–1; ZeroVL 0.6–1)."""
    auto_augment: str = ""
    """torchvision policy applied after the crop at train time: '' (off), 'autoaugment' (ImageNet
    policy, as ZeroVL), 'autoaugment-cifar10' / '-svhn', 'randaugment' (N=2, M=9) or
    'randaugment-n<N>-m<M>'. Needs ``augment``."""
    text_mask_prob: float = 0.0
    """ZeroVL caption augmentation at train time: each caption token (special tokens excluded) is
    picked with this probability (ZeroVL 0.2; 0 = off) and masked, replaced or deleted per
    ``text_mask_split``; seeded per (seed, step, sample), so a resume replays it."""
    text_mask_split: tuple[float, float, float] = (0.5, 0.1, 0.4)
    """Fractions of the picked tokens that become the tokenizer's mask token / a random token /
    are deleted (ZeroVL: 0.5, 0.1, 0.4). A mask fraction > 0 needs a tokenizer with a mask token."""
    debiased: bool = False
    """ZeroVL debiased sampling: every global batch (all ranks at one step) from one source, the
    source drawn with probability proportional to the rows it has left (docs/data.md)."""
    on_error: Literal["raise", "skip"] = "skip"
    """An unreadable shard or record batch (missing, truncated, 403/404 object): skip and count it
    (data/unreadable_shard, data/unreadable_batch), or stop the run with an error naming it."""
    io_retries: int = 8
    """Retries of a transient object-storage error (5xx, throttling, timeout, reset), with
    exponential backoff and jitter; counted as data/io_retries. Credentials come from the standard
    chains (AWS_PROFILE / AWS_ACCESS_KEY_ID / instance role, GOOGLE_APPLICATION_CREDENTIALS), never
    from this config; the S3 endpoint from AWS_ENDPOINT_URL."""
    readahead: int = 8
    """Record batches each remote stream reads ahead in background threads (0 = none)."""
    io_threads: int = 4
    """Background reader threads per data-loading process (remote shards)."""
    cache_dir: str = ""
    """Local folder caching remote record batches so later epochs read locally ('' = no cache)."""
    cache_size: str = "64GB"
    """Size bound of cache_dir (e.g. 500GB); least recently used record batches are evicted."""

    def __post_init__(self) -> None:
        _check(self.image_size == 0 or self.image_size >= 8, "data.image_size",
               f"must be 0 (from the model) or >= 8, got {self.image_size}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        _check(self.part_size >= 0, "data.part_size", f"must be >= 0 (0 = whole local batches), got {self.part_size}")
        _check(self.pixel_dtype in ("uint8", "float32"), "data.pixel_dtype",
               f"must be 'uint8' or 'float32', got {self.pixel_dtype!r}")
        for name in ("io_retries", "readahead"):
            _check(getattr(self, name) >= 0, f"data.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.io_threads >= 1, "data.io_threads", f"must be >= 1, got {self.io_threads}")
        if self.cache_dir:  # the size only matters with a cache (and parsing it imports the data package)
            from vlscale.data.fs import parse_size

            _check(parse_size(self.cache_size, "data.cache_size") > 0, "data.cache_size",
                   f"must be positive, got {self.cache_size!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = [n for n in ("crop_scale", "auto_augment", "text_mask_prob", "text_mask_split")
                   if getattr(self, n) != defaults[n]]
        if changed:  # checked by the data stack's own validators, imported only when needed (no torch otherwise)
            _check_augmentation(self, changed)


def _check_augmentation(data: DataConfig, changed: list[str]) -> None:
    from vlscale.data.collate import check_text_mask
    from vlscale.data.transforms import check_crop_scale, parse_auto_augment

    checks = {"crop_scale": lambda: check_crop_scale(data.crop_scale),
              "auto_augment": lambda: parse_auto_augment(data.auto_augment),
              "text_mask_prob": lambda: check_text_mask(data.text_mask_prob, (1, 0, 0)),
              "text_mask_split": lambda: check_text_mask(0.0, data.text_mask_split)}
    for name in changed:
        try:
            checks[name]()
        except ValueError as e:
            raise ValueError(f"config: data.{name}: {e}") from None
    _check(data.augment or not parse_auto_augment(data.auto_augment), "data.auto_augment",
           f"is {data.auto_augment!r}, which needs data.augment=true (augment=false turns image augmentation off)")


__all__ = ["DataConfig"]
