"""The inputs ``vlscale shards build`` reads, cut into deterministic tasks.

Sources:

* ``folder``: a folder of images plus a captions file — CSV / TSV (header row) or JSONL — with an
  image-path column, a caption column and optional key and concepts (JSON list or ``|``-separated)
  columns, found by name (``image``/``file``/``filename``/``path``, ``caption``/``text``, ``key``)
  or given (``--image-column`` …);
* ``wds``: webdataset tar files (members grouped by key; image ``jpg/jpeg/png/webp``, caption
  ``txt``/``caption`` or ``json`` with a ``caption`` field);
* ``table``: Arrow (IPC file or stream) or Parquet tables with an image column (bytes, a Hugging
  Face ``Image`` struct ``{bytes, path}``, or paths) and a caption column.

A **task** is the unit of parallel work and of the output: one tar, one run of Parquet row groups
(or Arrow record batches) of about ``task_rows`` rows, or ``task_rows`` caption rows. Tasks depend
only on the inputs, so any number of workers, and any ``--part K/N`` split over machines, writes
the same shards. ``task_keys`` and ``task_pairs`` enumerate a task's pairs in the same order (the
first is the cheap pass that finds duplicate keys before anything is written).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from vlscale.data import fs

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PATH_COLS = ("image", "file", "filename", "path", "file_name")
_CAPTION_COLS = ("caption", "text", "txt")


@dataclass
class Pair:
    """One input pair; ``problem`` set when it is rejected before validation (with ``detail``)."""

    key: str
    caption: str = ""
    image: bytes | None = None
    path: str | None = None  # read lazily by the writer
    concepts: list[str] | None = None
    problem: str | None = None
    detail: str | None = None


@dataclass
class SourceSpec:
    """One input of a build: ``kind`` in {"folder", "wds", "table"} and its arguments.

    Column names default to auto-detection (folder) or ``image`` / ``caption`` (table);
    ``image_root`` resolves relative image paths of a table (default: the table's folder)."""

    name: str
    kind: str
    path: str
    captions: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    image_root: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in {"folder", "wds", "table"}:
            raise ValueError(f"source {self.name!r}: unknown kind {self.kind!r} (folder, wds, table)")
        if self.kind == "folder" and not self.captions:
            raise ValueError(f"source {self.name!r}: a folder source needs a captions file")


@dataclass(frozen=True)
class Task:
    """A deterministic slice of one source's input (see the module docstring)."""

    source: str
    index: int
    input: str
    units: tuple[int, ...] = ()  # table: row groups (Parquet) or record batches (Arrow)
    first_row: int = 0  # table: the file-level row number of the first row (for generated keys)
    rows: tuple = field(default=(), repr=False)  # folder: its caption rows, carried to the worker


def _concepts(value: object) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value)
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    return [c.strip() for c in text.split("|") if c.strip()]


def _pick(names: list[str], given: str | None, candidates: tuple[str, ...], what: str, where: str) -> str | None:
    if given is not None:
        if given not in names:
            raise ValueError(f"{where}: no column {given!r} for the {what} (columns: {names})")
        return given
    return next((n for n in candidates if n in names), None)


def read_captions(path: str) -> Iterator[dict]:
    """Rows of a CSV / TSV (by extension, header required) or JSONL captions file."""
    if not fs.is_url(path) and not Path(path).exists():
        raise ValueError(f"{path}: captions file does not exist")
    text = fs.read_bytes(path).decode("utf-8")
    if path.lower().endswith((".jsonl", ".json")):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON line: {e}") from e
        return
    delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
    yield from csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)


def _expand(pattern: str, what: str) -> list[str]:
    found = [loc for loc, _ in fs.list_files(pattern, "")] if any(c in pattern for c in "*?[") else [pattern]
    if not found:
        raise ValueError(f"{pattern}: no {what} match")
    return found


def plan_tasks(spec: SourceSpec, task_rows: int) -> list[Task]:
    """The tasks of one source, in input order."""
    if spec.kind == "wds":
        return [Task(spec.name, i, tar) for i, tar in enumerate(_expand(spec.path, "tar files"))]
    if spec.kind == "folder":
        rows = list(read_captions(spec.captions or ""))
        if rows:
            names = list(rows[0])
            where = str(spec.captions)
            cols = (_pick(names, spec.image_column, _PATH_COLS, "image path", where),
                    _pick(names, spec.caption_column, _CAPTION_COLS, "caption", where),
                    _pick(names, spec.key_column, ("key",), "key", where))
            if cols[0] is None or cols[1] is None:
                raise ValueError(f"{where}: no {'image path' if cols[0] is None else 'caption'} column (looked for "
                                 f"{list(_PATH_COLS if cols[0] is None else _CAPTION_COLS)}; found {names}); "
                                 "name it with --image-column / --caption-column")
            rows = [(str(r.get(cols[0]) or ""), str(r.get(cols[1]) or ""), r.get(cols[2]) if cols[2] else None,
                     r.get("concepts")) for r in rows]
        return [Task(spec.name, i, spec.captions or "", rows=tuple(rows[a: a + task_rows]))
                for i, a in enumerate(range(0, len(rows), task_rows))]
    tasks: list[Task] = []
    for path in _expand(spec.path, "tables"):
        sizes = _table_units(path)
        if sizes is None:  # an Arrow stream: one sequential task
            tasks.append(Task(spec.name, len(tasks), path))
            continue
        first, units, rows = 0, [], 0
        for u, n in enumerate(sizes):
            units.append(u)
            rows += n
            if rows >= task_rows or u == len(sizes) - 1:
                tasks.append(Task(spec.name, len(tasks), path, units=tuple(units), first_row=first))
                first, units, rows = first + rows, [], 0
    return tasks


def _open_input(path: str) -> pa.NativeFile:
    filesystem, inner = fs.filesystem(path)
    try:
        return fs.retry(lambda: filesystem.open_input_file(inner), path)
    except fs.StorageError as e:
        raise ValueError(str(e)) from e


def _table_units(path: str) -> list[int] | None:
    """Rows per Parquet row group / Arrow record batch; ``None`` for an Arrow stream."""
    try:
        f = _open_input(path)
        if path.endswith(".parquet"):
            meta = pq.ParquetFile(f).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        try:
            reader = pa.ipc.open_file(f)
            return [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        except pa.ArrowInvalid:
            return None
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: unreadable table (truncated or not Arrow / Parquet): {e}") from e


def _table_batches(task: Task, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    path = task.input
    try:
        f = _open_input(path)
        if path.endswith(".parquet"):
            yield from pq.ParquetFile(f).iter_batches(row_groups=list(task.units), columns=columns, batch_size=1024)
        elif task.units:
            reader = pa.ipc.open_file(f)
            for u in task.units:
                batch = reader.get_batch(u)
                yield batch.select(columns) if columns else batch
        else:
            for batch in pa.ipc.open_stream(f):
                yield batch.select(columns) if columns else batch
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: unreadable table (truncated or not Arrow / Parquet): {e}") from e


# --------------------------------------------------------------------------- per-kind pairs
def _folder_pairs(task: Task, spec: SourceSpec, keys_only: bool) -> Iterator[Pair]:
    for rel, caption, key, concepts in task.rows:
        # default key: the path without its extension ("a/1.jpg" and "b/1.jpg" are different pairs)
        key = str(key) if key not in (None, "") else str(Path(rel).with_suffix(""))
        if keys_only:
            yield Pair(key)
        elif not rel:
            yield Pair(key, caption, problem="missing_file", detail="empty image path")
        else:
            yield Pair(key, caption, path=fs.join(spec.path, rel), concepts=_concepts(concepts))


def _tar_groups(tar: tarfile.TarFile, read: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    """webdataset grouping: consecutive members sharing the name before the first dot form one
    sample; a repeated extension starts a new sample with the same key (a duplicate key)."""
    key, parts = None, {}
    for member in tar:
        if not member.isfile():
            continue
        base = member.name.rsplit("/", 1)[-1]
        stem, _, ext = base.partition(".")
        prefix = member.name[: len(member.name) - len(base)] + stem
        ext = ext.lower()
        if key is not None and (prefix != key or ext in parts):
            yield key, parts
            parts = {}
        key = prefix
        parts[ext] = tar.extractfile(member).read() if read else b""
    if key is not None:
        yield key, parts


def _tar_end_ok(tar: tarfile.TarFile) -> bool:
    """A complete tar ends with two zero blocks after its last member; a cut one does not."""
    try:
        tar.fileobj.seek(tar.offset)
        tail = tar.fileobj.read(1024)
    except (OSError, EOFError, tarfile.TarError):
        return False
    return len(tail) == 1024 and not tail.strip(b"\0")


def _local_copy(location: str) -> BinaryIO:
    """A remote file copied to a temporary local file in one buffered read (a tar is parsed
    in 512-byte headers: one range request each would be thousands of round trips)."""
    filesystem, inner = fs.filesystem(location)

    def download() -> BinaryIO:
        out = tempfile.TemporaryFile()
        with filesystem.open_input_stream(inner, buffer_size=16 << 20) as src:
            while chunk := src.read(16 << 20):
                out.write(chunk)
        out.seek(0)
        return out

    return fs.retry(download, location)


def _wds_pairs(task: Task, keys_only: bool) -> Iterator[Pair]:
    try:
        f = _local_copy(task.input) if fs.is_url(task.input) else _open_input(task.input)
        with tarfile.open(fileobj=f, mode="r:*") as tar:
            for key, parts in _tar_groups(tar, read=not keys_only):
                if keys_only:
                    yield Pair(key)
                    continue
                image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                meta = json.loads(parts["json"]) if parts.get("json") else {}
                text = parts.get("txt") or parts.get("caption")
                caption = text.decode("utf-8", "replace") if text is not None else str(meta.get("caption", ""))
                if image is None:
                    yield Pair(key, caption, problem="missing_file", detail="no jpg/jpeg/png/webp member")
                else:
                    yield Pair(key, caption, image=image, concepts=_concepts(meta.get("concepts")))
            complete = _tar_end_ok(tar)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        complete = False
        detail = f"{type(e).__name__}: {e}"
    else:
        detail = "no end-of-archive marker (cut at a member boundary)"
    if not complete:
        yield Pair(task.input, problem="truncated_input", detail=f"tar file is truncated: {detail}")


def _table_pairs(task: Task, spec: SourceSpec, keys_only: bool) -> Iterator[Pair]:
    image_col = spec.image_column or "image"
    caption_col = spec.caption_column or "caption"
    stem = Path(task.input).stem if not fs.is_url(task.input) else fs.basename(task.input).rsplit(".", 1)[0]
    root = spec.image_root or fs.parent(task.input)
    row = task.first_row
    for batch in _table_batches(task):
        names = batch.schema.names
        for col in (image_col, caption_col):
            if col not in names:
                raise ValueError(f"{task.input}: missing column {col!r} (columns: {names}); name the columns with "
                                 "--image-column / --caption-column")
        key_col = _pick(names, spec.key_column, ("key",), "key", task.input)
        keys = batch.column(key_col).to_pylist() if key_col else [None] * batch.num_rows
        keys = [str(k) if k is not None else f"{stem}-{row + i}" for i, k in enumerate(keys)]
        row += batch.num_rows
        if keys_only:
            yield from (Pair(k) for k in keys)
            continue
        images = batch.column(image_col)
        paths: list = [None] * batch.num_rows
        if pa.types.is_struct(images.type):  # Hugging Face Image feature: {bytes, path}
            if images.type.get_field_index("path") >= 0:
                paths = images.field("path").to_pylist()
            images = images.field("bytes")
        elif pa.types.is_string(images.type) or pa.types.is_large_string(images.type):
            images, paths = pa.nulls(batch.num_rows, pa.binary()), images.to_pylist()  # a column of paths
        concepts = batch.column("concepts").to_pylist() if "concepts" in names else [None] * batch.num_rows
        captions = batch.column(caption_col).to_pylist()
        for i, img in enumerate(images.to_pylist()):
            pair = Pair(keys[i], captions[i] or "", concepts=_concepts(concepts[i]))
            if img:
                pair.image = img
            elif paths[i]:  # bytes not embedded (datasets saved with image paths only): read the file
                pair.path = paths[i] if fs.is_url(paths[i]) or paths[i].startswith("/") else fs.join(root, paths[i])
            else:
                pair.problem, pair.detail = "unreadable_image", "image column is empty (no bytes, no path)"
            yield pair


def task_pairs(task: Task, spec: SourceSpec, *, keys_only: bool = False) -> Iterator[Pair]:
    """The pairs of one task in input order (``keys_only``: just their keys, reading no image)."""
    if spec.kind == "folder":
        return _folder_pairs(task, spec, keys_only)
    if spec.kind == "wds":
        return _wds_pairs(task, keys_only)
    return _table_pairs(task, spec, keys_only)


def task_keys(task: Task, spec: SourceSpec) -> list[str]:
    """The keys of one task's pairs, in the order ``task_pairs`` yields them."""
    return [p.key for p in task_pairs(task, spec, keys_only=True) if p.problem != "truncated_input"]
