"""``vlscale shards build | info | verify``: build Arrow shards, inspect them, check them.

Examples::

    vlscale shards build out/ --folder coco images/ captions.csv --wds cc3m 'cc3m/*.tar' \\
        --table sbu sbu.parquet --shard-size 256MB
    vlscale shards info out/
    vlscale shards verify out/ --decode
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

from vlscale.data.build import SourceSpec, build_shards
from vlscale.data.schema import check_schema, read_metadata
from vlscale.data.stream import list_shards, open_shard
from vlscale.data.transforms import decode_image

_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "kib": 1 << 10, "mb": 1 << 20, "mib": 1 << 20, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``"256MB"`` -> bytes (binary units: KB = KiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 512KB, 256MB, 1GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlscale shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write shards from one or more sources")
    b.add_argument("out", help="output folder")
    b.add_argument("--folder", nargs=3, action="append", default=[], metavar=("NAME", "IMAGE_DIR", "CAPTIONS"),
                   help="images folder + captions CSV/TSV/JSONL")
    b.add_argument("--wds", nargs=2, action="append", default=[], metavar=("NAME", "TARS"),
                   help="webdataset tar file or glob")
    b.add_argument("--table", nargs=2, action="append", default=[], metavar=("NAME", "PATH"),
                   help="Arrow or Parquet table with image bytes")
    b.add_argument("--image-column", default="image", help="image column of --table inputs")
    b.add_argument("--caption-column", default="caption", help="caption column of --table inputs")
    b.add_argument("--shard-size", type=parse_size, default=parse_size("256MB"), help="target bytes per shard")
    b.add_argument("--rows-per-batch", type=int, default=128, help="rows per record batch")
    b.add_argument("--overwrite", action="store_true", help="replace existing shards of the same sources")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--summary-json", help="also write the summary to this file")
    i = sub.add_parser("info", help="rows, sources, batches and sizes of shards")
    i.add_argument("shards", nargs="+", help="shard folder(s) or files")
    i.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="read every record batch (and optionally decode every image)")
    v.add_argument("shards", nargs="+")
    v.add_argument("--decode", action="store_true", help="decode every image and check captions")
    return p


def _build(args: argparse.Namespace) -> int:
    specs = [SourceSpec(n, "folder", d, captions=c) for n, d, c in args.folder]
    specs += [SourceSpec(n, "wds", t) for n, t in args.wds]
    specs += [SourceSpec(n, "table", t, image_column=args.image_column, caption_column=args.caption_column)
              for n, t in args.table]
    if not specs:
        print("vlscale shards build: give at least one --folder, --wds or --table source", file=sys.stderr)
        return 2
    summaries = build_shards(specs, args.out, target_shard_bytes=args.shard_size, rows_per_batch=args.rows_per_batch,
                             overwrite=args.overwrite, progress=not args.no_progress)
    for s in summaries:
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(s.rejected.items())) or "none"
        print(f"{s.source}: wrote {s.written} pairs in {len(s.shards)} shard(s) ({s.bytes / 2**20:.1f} MiB); "
              f"rejected {sum(s.rejected.values())} ({rejected})")
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump([s.as_dict() for s in summaries], f, indent=2)
    return 0


def shard_info(path: str) -> dict:
    """Rows, record batches, per-source counts and schema version of one shard."""
    reader = open_shard(path)
    check_schema(reader.schema, path)
    meta = read_metadata(reader.schema)
    rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return {"path": path, "rows": rows, "record_batches": reader.num_record_batches,
            "schema_version": meta.get("schema_version"), "counts": meta.get("counts", {}),
            "has_concepts": "concepts" in reader.schema.names}


def _info(args: argparse.Namespace) -> int:
    infos = [shard_info(p) for p in list_shards(args.shards)]
    totals: Counter = Counter()
    for info in infos:
        totals.update(info["counts"])
    if args.json:
        print(json.dumps({"shards": infos, "counts": dict(totals), "rows": sum(i["rows"] for i in infos)}, indent=2))
        return 0
    for info in infos:
        print(f"{info['path']}: {info['rows']} rows in {info['record_batches']} record batches, "
              f"schema v{info['schema_version']}, sources {info['counts']}")
    print(f"total: {sum(i['rows'] for i in infos)} rows in {len(infos)} shard(s); per source {dict(totals)}")
    return 0


def verify_shard(path: str, *, decode: bool) -> Counter:
    """Problems found in one shard, by kind (empty when the shard is sound)."""
    problems: Counter = Counter()
    try:
        info = shard_info(path)
        reader = open_shard(path)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            batch.validate(full=True)
            if not decode:
                continue
            for img, cap in zip(batch.column("image").to_pylist(), batch.column("caption").to_pylist()):
                if not (cap or "").strip():
                    problems["empty_caption"] += 1
                try:
                    decode_image(img)
                except Exception:
                    problems["unreadable_image"] += 1
        if info["counts"] and sum(info["counts"].values()) != info["rows"]:
            problems["metadata_count_mismatch"] += 1
    except (ValueError, OSError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        problems["unreadable_shard"] += 1
    return problems


def _verify(args: argparse.Namespace) -> int:
    total: Counter = Counter()
    paths = list_shards(args.shards)
    for path in paths:
        problems = verify_shard(path, decode=args.decode)
        if problems:
            print(f"{path}: {dict(problems)}")
        total.update(problems)
    print(f"verified {len(paths)} shard(s): " + (f"problems {dict(total)}" if total else "ok"))
    return 1 if total else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"build": _build, "info": _info, "verify": _verify}[args.cmd](args)
    except (ValueError, FileExistsError) as e:
        print(f"vlscale shards {args.cmd}: error: {e}", file=sys.stderr)
        return 1
