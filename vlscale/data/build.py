"""Readers for the inputs ``vlscale shards build`` accepts, and the build loop over several sources.

Sources (each yields ``Pair``s; a pair whose image cannot be found carries ``missing`` instead):

* ``folder``: a folder of images plus a captions file — CSV / TSV (header row) or JSONL — with an
  image-path column (``image``/``file``/``filename``/``path``), a ``caption``/``text`` column,
  and optional ``key`` and ``concepts`` (JSON list or ``|``-separated) columns;
* ``wds``: webdataset tar files (members grouped by key; image ``jpg/jpeg/png/webp``, caption
  ``txt``/``caption`` or ``json`` with a ``caption`` field);
* ``table``: an Arrow (IPC file or stream) or Parquet table with an image-bytes column (plain
  binary or a Hugging Face ``Image`` struct with ``bytes``) and a caption column.
"""

from __future__ import annotations

import csv
import glob
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from vlscale.data.writer import ShardWriter, WriteSummary, safe_prefix

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PATH_COLS = ("image", "file", "filename", "path", "file_name")
_CAPTION_COLS = ("caption", "text", "txt")


@dataclass
class Pair:
    key: str
    caption: str
    image: bytes | None = None
    path: Path | None = None  # read lazily by the writer; no image and no path = missing file
    concepts: list[str] | None = None


@dataclass
class SourceSpec:
    """One input of a build: ``kind`` in {"folder", "wds", "table"} and its arguments."""

    name: str
    kind: str
    path: str
    captions: str | None = None  # folder: the captions file
    image_column: str = "image"  # table
    caption_column: str = "caption"  # table

    def __post_init__(self) -> None:
        if self.kind not in {"folder", "wds", "table"}:
            raise ValueError(f"source {self.name!r}: unknown kind {self.kind!r} (folder, wds, table)")
        if self.kind == "folder" and not self.captions:
            raise ValueError(f"source {self.name!r}: a folder source needs a captions file")


def _concepts(value: object) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value)
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    return [c.strip() for c in text.split("|") if c.strip()]


def _pick(row: dict, names: tuple[str, ...], what: str, where: str) -> str:
    for n in names:
        if n in row:
            return n
    raise ValueError(f"{where}: no {what} column (looked for {list(names)}; found {sorted(row)})")


def read_captions(path: str | Path) -> Iterator[dict]:
    """Rows of a CSV / TSV (by extension, header required) or JSONL captions file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: captions file does not exist")
    if path.suffix.lower() in {".jsonl", ".json"}:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: invalid JSON line: {e}") from e
        return
    delimiter = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter=delimiter)


def folder_pairs(root: str | Path, captions: str | Path) -> Iterator[Pair]:
    root = Path(root)
    cols: tuple[str, str] | None = None
    for row in read_captions(captions):
        if cols is None:
            cols = (_pick(row, _PATH_COLS, "image path", str(captions)), _pick(row, _CAPTION_COLS, "caption", str(captions)))
        rel = str(row.get(cols[0]) or "")
        yield Pair(key=str(row.get("key") or Path(rel).stem), caption=str(row.get(cols[1]) or ""),
                   path=root / rel if rel else root / "<empty path>", concepts=_concepts(row.get("concepts")))


def wds_pairs(pattern: str) -> Iterator[Pair]:
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not files:
        raise ValueError(f"{pattern}: no tar files match")
    for tar_path in files:
        try:
            yield from _tar_pairs(tar_path)
        except tarfile.TarError as e:
            raise ValueError(f"{tar_path}: unreadable tar file: {e}") from e


def _tar_pairs(tar_path: str) -> Iterator[Pair]:
    def emit(key: str, parts: dict[str, bytes]) -> Pair:
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        meta = json.loads(parts["json"]) if "json" in parts else {}
        text = parts.get("txt") or parts.get("caption")
        caption = text.decode("utf-8", "replace") if text is not None else str(meta.get("caption", ""))
        return Pair(key=key, caption=caption, image=image, concepts=_concepts(meta.get("concepts")))

    with tarfile.open(tar_path, "r:*") as tar:
        key, parts = None, {}
        for member in tar:  # webdataset groups consecutive members by the name before the first dot
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            stem, _, ext = base.partition(".")
            prefix = member.name[: len(member.name) - len(base)] + stem
            if prefix != key and key is not None:
                yield emit(key, parts)
                parts = {}
            key = prefix
            parts[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield emit(key, parts)


def _open_table(path: str) -> pa.Table:
    try:
        if path.endswith(".parquet"):
            return pq.read_table(path)
        with pa.memory_map(path, "r") as src:
            try:
                return pa.ipc.open_file(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                return pa.ipc.open_stream(src).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: unreadable table: {e}") from e


def table_pairs(path: str, image_column: str = "image", caption_column: str = "caption") -> Iterator[Pair]:
    table = _open_table(path)
    for col in (image_column, caption_column):
        if col not in table.column_names:
            raise ValueError(f"{path}: missing column {col!r} (columns: {table.column_names})")
    for batch in table.to_batches(max_chunksize=256):
        images = batch.column(image_column)
        if pa.types.is_struct(images.type):  # Hugging Face Image feature: {bytes, path}
            images = images.field("bytes")
        keys = batch.column("key").to_pylist() if "key" in batch.schema.names else [None] * batch.num_rows
        concepts = batch.column("concepts").to_pylist() if "concepts" in batch.schema.names else [None] * batch.num_rows
        for i, (img, cap) in enumerate(zip(images.to_pylist(), batch.column(caption_column).to_pylist())):
            yield Pair(key=str(keys[i] if keys[i] is not None else f"{Path(path).stem}-{i}"), caption=cap or "",
                       image=img or b"", concepts=_concepts(concepts[i]))


def source_pairs(spec: SourceSpec) -> Iterator[Pair]:
    if spec.kind == "folder":
        return folder_pairs(spec.path, spec.captions or "")
    if spec.kind == "wds":
        return wds_pairs(spec.path)
    return table_pairs(spec.path, spec.image_column, spec.caption_column)


def build_shards(specs: list[SourceSpec], out_dir: str | Path, *, target_shard_bytes: int = 256 << 20,
                 rows_per_batch: int = 128, overwrite: bool = False, progress: bool = True) -> list[WriteSummary]:
    """Write every source into ``out_dir`` (one shard series per source); one summary per source."""
    prefixes = [safe_prefix(s.name) for s in specs]
    if len(set(prefixes)) != len(prefixes):  # two sources must never write the same file names
        raise ValueError(f"source names must be unique as file prefixes, got {[s.name for s in specs]}")
    # open every writer first so an existing-shard error happens before anything is written
    writers = [ShardWriter(out_dir, s.name, target_shard_bytes=target_shard_bytes, rows_per_batch=rows_per_batch,
                           overwrite=overwrite) for s in specs]
    for spec, writer in zip(specs, writers):
        bar = tqdm(desc=f"{spec.name}", unit=" pairs", disable=not progress)
        for pair in source_pairs(spec):
            if pair.image is None and pair.path is None:
                writer.reject("missing_file")
            elif pair.image is None:
                writer.add_file(pair.path, caption=pair.caption, key=pair.key, concepts=pair.concepts)
            else:
                writer.add(image_bytes=pair.image, caption=pair.caption, key=pair.key, concepts=pair.concepts)
            bar.update(1)
            bar.set_postfix(written=writer.summary.written, rejected=sum(writer.summary.rejected.values()),
                            refresh=False)
        bar.close()
        writer.close()
    return [w.summary for w in writers]
