"""Tiny synthetic shards (random-colour JPEGs with captions) for tests, smoke runs and demos."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from vlscale.data.writer import ShardWriter, WriteSummary


def synthetic_image(rng: np.random.Generator, size: tuple[int, int] = (24, 32), fmt: str = "JPEG") -> bytes:
    """Encoded bytes of a small smooth random image (a colour gradient plus noise)."""
    h, w = size
    base = rng.integers(0, 256, size=3)
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(-80, 80, size=3)
    arr = np.clip(base + ramp + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_synthetic_shards(out_dir: str | Path, sources: Mapping[str, int], *, seed: int = 0,
                           rows_per_batch: int = 16, target_shard_bytes: int = 64 << 10,
                           image_size: tuple[int, int] = (24, 32), concepts: bool = False,
                           overwrite: bool = False) -> list[WriteSummary]:
    """Write ``sources[name]`` pairs per source; keys are ``"<name>-<i>"``, captions name the key."""
    rng = np.random.default_rng(seed)
    summaries = []
    for name, n in sources.items():
        with ShardWriter(out_dir, name, rows_per_batch=rows_per_batch, target_shard_bytes=target_shard_bytes,
                         overwrite=overwrite) as w:
            for i in range(n):
                w.add(image_bytes=synthetic_image(rng, image_size), caption=f"a photo number {i} of {name}",
                      key=f"{name}-{i}", concepts=[name, f"c{i % 3}"] if concepts else None)
        summaries.append(w.summary)
    return summaries
