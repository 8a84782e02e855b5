"""Arrow shard data pipeline: build shards, stream them across ranks and workers, resume exactly.

Public API (the contract in docs/interfaces.md; details in docs/data.md)::

    from vlscale.data import ShardWriter, build_loader, Batch, SCHEMA_VERSION
"""

from vlscale.data.collate import Batch, CaptionMasker, tokenize
from vlscale.data.dataset import ShardDataset
from vlscale.data.loader import ShardLoader, build_loader
from vlscale.data.sampling import DebiasedSchedule
from vlscale.data.schema import ARROW_SCHEMA, SCHEMA_VERSION
from vlscale.data.stream import ShardIndex
from vlscale.data.synthetic import write_synthetic_shards
from vlscale.data.transforms import ImageTransform, build_transform, decode_image
from vlscale.data.writer import ShardWriter, WriteSummary

DebiasedSampler = DebiasedSchedule  # name used in docs/interfaces.md

__all__ = [
    "ARROW_SCHEMA",
    "SCHEMA_VERSION",
    "Batch",
    "CaptionMasker",
    "DebiasedSampler",
    "DebiasedSchedule",
    "ImageTransform",
    "ShardDataset",
    "ShardIndex",
    "ShardLoader",
    "ShardWriter",
    "WriteSummary",
    "build_loader",
    "build_transform",
    "decode_image",
    "tokenize",
    "write_synthetic_shards",
]
