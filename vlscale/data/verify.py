"""``verify_shard``: is a shard intact? Checksums first, decoding only when asked.

Every record batch's bytes are read and their CRC-32 compared with the one in the shard's footer
(and in ``manifest.json`` when there is one); a mismatch is traced to the damaged rows through
the per-row CRC-32s, so the report names the shard, the record batch and the keys. ``decode``
also decodes every image and checks every caption. Shards written before checksums existed are
checked for structure only, and say so.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import pyarrow as pa

from vlscale.data import fs
from vlscale.data.manifest import ShardEntry, describe_shard
from vlscale.data.schema import row_crc32
from vlscale.data.transforms import decode_image


@dataclass
class Finding:
    """One problem: its kind, where (shard, record batch, keys), and a sentence for people."""

    kind: str
    shard: str
    batch: int | None = None
    keys: list[str] = field(default_factory=list)
    message: str = ""


def _damaged_keys(batch: pa.RecordBatch, row_crcs: list[int] | None) -> list[str] | None:
    if row_crcs is None or len(row_crcs) != batch.num_rows:
        return None
    keys, images, captions = (batch.column(c).to_pylist() for c in ("key", "image", "caption"))
    return [k for k, img, cap, crc in zip(keys, images, captions, row_crcs)
            if row_crc32(str(k), img or b"", cap or "") != crc]


def verify_shard(location: str, *, size: int | None = None, expected: ShardEntry | None = None,
                 decode: bool = False, storage: fs.StorageOptions | None = None) -> tuple[list[Finding], bool]:
    """Problems found in one shard (empty when sound) and whether it carries checksums."""
    try:
        entry = describe_shard(location, size, options=storage)
    except ValueError as e:
        return [Finding("unreadable_shard", location, message=str(e))], False
    found: list[Finding] = []
    if expected is not None and (expected.bytes, expected.batches) != (entry.bytes, entry.batches):
        found.append(Finding("manifest_mismatch", location, message=f"{location}: differs from its manifest.json "
                             "entry (size, record batches or checksums): rerun `vlscale shards index`"))
    has_crc = all(b[3] is not None for b in entry.batches)
    f = fs.RangeFile(location, storage)
    first_row = 0
    for i, (offset, length, rows, crc) in enumerate(entry.batches):
        where = f"{location}: record batch {i} (rows {first_row}-{first_row + rows - 1})"
        first_row += rows
        try:
            data = f.read_at(offset, length)
        except (fs.StorageError, OSError) as e:
            found.append(Finding("unreadable_batch", location, i, message=f"{where}: {e}"))
            continue
        actual = zlib.crc32(data)
        try:
            batch = pa.ipc.read_record_batch(pa.py_buffer(data), entry.schema)
            batch.validate(full=True)
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            batch, broken = None, str(e)
        if crc is not None and actual != crc:
            keys = _damaged_keys(batch, entry.row_crc32[i] if entry.row_crc32 else None) if batch is not None else None
            names = f"damaged key(s) {keys}" if keys else "keys unknown (the batch's structure is damaged)"
            found.append(Finding("checksum_mismatch", location, i, keys or [],
                                 f"{where}: checksum mismatch (stored {crc:08x}, read {actual:08x}): {names}"))
            continue
        if batch is None:
            found.append(Finding("invalid_batch", location, i, message=f"{where}: invalid record batch: {broken}"))
            continue
        if decode:
            found += _decode_findings(batch, location, i, where)
    f.close()
    if entry.counts and sum(entry.counts.values()) != entry.rows:
        found.append(Finding("metadata_count_mismatch", location,
                             message=f"{location}: per-source counts {entry.counts} do not add up to {entry.rows} rows"))
    return found, has_crc


def _decode_findings(batch: pa.RecordBatch, location: str, i: int, where: str) -> list[Finding]:
    out = []
    keys = batch.column("key").to_pylist()
    for key, img, cap in zip(keys, batch.column("image").to_pylist(), batch.column("caption").to_pylist()):
        if not (cap or "").strip():
            out.append(Finding("empty_caption", location, i, [key], f"{where}: key {key!r}: empty caption"))
        try:
            decode_image(img)
        except Exception as e:
            out.append(Finding("unreadable_image", location, i, [key], f"{where}: key {key!r}: image does not "
                               f"decode ({type(e).__name__})"))
    return out
