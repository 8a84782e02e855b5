"""Arrow shard data pipeline: build shards, stream them across ranks and workers, resume exactly.

Public API (the contract in docs/interfaces.md; details in docs/data.md)::

    from vlscale.data import ShardWriter, build_loader, Batch, SCHEMA_VERSION

Names are imported on first use (PEP 562): the shard tools (``vlscale shards``, the build
workers, ``vlscale.data.fs``) need pyarrow and Pillow, not torch, and start in a fraction of the
time when importing one submodule does not pull in the loader.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "collate", "tokenize": "collate", "ShardDataset": "dataset", "ShardLoader": "loader",
    "CaptionMasker": "collate", "build_loader": "loader", "DebiasedSchedule": "sampling",
    "ARROW_SCHEMA": "schema", "SCHEMA_VERSION": "schema",
    "ShardIndex": "stream", "write_synthetic_shards": "synthetic", "ImageTransform": "transforms",
    "build_transform": "transforms", "decode_image": "transforms", "ShardWriter": "writer", "WriteSummary": "writer",
}

__all__ = [*sorted(_EXPORTS), "DebiasedSampler"]


def __getattr__(name: str) -> Any:
    if name == "DebiasedSampler":  # the name docs/interfaces.md uses
        name = "DebiasedSchedule"
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlscale.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vlscale.data.{_EXPORTS[name]}"), name)
