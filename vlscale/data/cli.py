"""``vlscale shards build | info | verify | index``: build Arrow shards, inspect, check and index them.

Examples::

    vlscale shards build out/ --folder coco images/ captions.csv --wds cc3m 'cc3m/*.tar' \\
        --table sbu sbu.parquet --shard-size 256MB --workers 8
    vlscale shards build s3://bucket/cc12m --wds cc12m 'cc12m/*.tar' --part 3/16   # machine 3 of 16
    vlscale shards index s3://bucket/cc12m          # after all parts: manifest.json, summary, rejected
    vlscale shards info out/
    vlscale shards verify out/ [--decode]

Exit status: 0 when all is well; 1 when a source wrote nothing, an input was truncated or
unreadable, a shard failed verification, or the command was refused; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

from vlscale.data import fs
from vlscale.data.build import BuildOptions, SourceReport, build_shards
from vlscale.data.manifest import MANIFEST_NAME, ShardEntry, describe_shard, read_manifest
from vlscale.data.schema import SHARD_SUFFIX
from vlscale.data.sources import SourceSpec
from vlscale.data.stream import shard_refs

def parse_size(text: str) -> int:
    """``"256MB"`` -> bytes (binary units: KB = KiB)."""
    try:
        return fs.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def parse_part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"bad part {text!r}; use K/N with 0 <= K < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlscale shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write shards from one or more sources (parallel, resumable)")
    b.add_argument("out", help="output folder or URL (s3://bucket/prefix, gs://...)")
    b.add_argument("--folder", nargs=3, action="append", default=[], metavar=("NAME", "IMAGE_DIR", "CAPTIONS"),
                   help="images folder + captions CSV/TSV/JSONL")
    b.add_argument("--wds", nargs=2, action="append", default=[], metavar=("NAME", "TARS"),
                   help="webdataset tar file or glob")
    b.add_argument("--table", nargs=2, action="append", default=[], metavar=("NAME", "PATH"),
                   help="Arrow or Parquet table(s) (file or glob) with image bytes or paths")
    b.add_argument("--image-column", help="image column (--table: bytes / HF Image / paths; --folder: paths)")
    b.add_argument("--caption-column", help="caption column of --table / --folder inputs")
    b.add_argument("--key-column", help="key column of --table / --folder inputs (default: 'key' if present)")
    b.add_argument("--image-root", help="folder that relative image paths in a --table are relative to "
                                        "(default: the table's folder)")
    b.add_argument("--shard-size", type=parse_size, default=parse_size("256MB"), help="target bytes per shard")
    b.add_argument("--rows-per-batch", type=int, default=128, help="rows per record batch")
    b.add_argument("--task-rows", type=int, default=8192, help="pairs per task of --folder / --table inputs")
    b.add_argument("--workers", type=int, default=0, help="build processes (default: the CPU count)")
    b.add_argument("--part", type=parse_part, default=(0, 1), metavar="K/N",
                   help="build only part K of N (one per machine); then run `vlscale shards index OUT`")
    b.add_argument("--validate", choices=["full", "fast", "none"], default="full",
                   help="full: decode every image; fast: header + end marker (catches truncation); none")
    b.add_argument("--duplicates", choices=["reject", "keep"], default="reject",
                   help="a key seen before in the same source: reject and count it (default), or keep it")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier build of the same sources")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--summary-json", help="also write this run's per-source summary to this file")
    i = sub.add_parser("info", help="rows, sources, batches and sizes of shards")
    i.add_argument("shards", nargs="+", help="shard folder(s), globs, files or URLs")
    i.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="check every record batch's checksum (and optionally decode every image)")
    v.add_argument("shards", nargs="+")
    v.add_argument("--decode", action="store_true", help="also decode every image and check captions")
    x = sub.add_parser("index", help="write manifest.json (+ summary, rejected list) for a shard folder or URL")
    x.add_argument("folder")
    x.add_argument("--checksums", action="store_true",
                   help="compute checksums for shards that carry none (reads every byte)")
    return p


def _print_report(r: SourceReport) -> None:
    rejected = ", ".join(f"{k}: {v}" for k, v in sorted(r.rejected.items())) or "none"
    resumed = f"; {r.resumed} of {r.tasks} task(s) already done" if r.resumed else ""
    print(f"{r.source}: wrote {r.written} pairs in {r.shards} shard(s) ({r.bytes / 2**20:.1f} MiB); "
          f"rejected {sum(r.rejected.values())} ({rejected}){resumed}")
    for path in r.truncated_inputs:
        print(f"{r.source}: truncated input {path} (its readable pairs were written)", file=sys.stderr)
    for path, why in r.failed_inputs.items():
        print(f"{r.source}: failed input {path}: {why}", file=sys.stderr)


def _build(args: argparse.Namespace) -> int:
    cols = {"image_column": args.image_column, "caption_column": args.caption_column, "key_column": args.key_column}
    specs = [SourceSpec(n, "folder", d, captions=c, **cols) for n, d, c in args.folder]
    specs += [SourceSpec(n, "wds", t) for n, t in args.wds]
    specs += [SourceSpec(n, "table", t, image_root=args.image_root, **cols) for n, t in args.table]
    if not specs:
        print("vlscale shards build: give at least one --folder, --wds or --table source", file=sys.stderr)
        return 2
    options = BuildOptions(target_shard_bytes=args.shard_size, rows_per_batch=args.rows_per_batch,
                           task_rows=args.task_rows, validate=args.validate, duplicates=args.duplicates)
    reports = build_shards(specs, args.out, options=options, workers=args.workers, part=args.part,
                           overwrite=args.overwrite, progress=not args.no_progress)
    for r in reports:
        _print_report(r)
    if args.summary_json:
        fs.write_bytes(args.summary_json, json.dumps([r.as_dict() for r in reports], indent=2).encode())
    failed = [r.source for r in reports if r.failed_inputs or r.truncated_inputs]
    empty = [r for r in reports if r.written == 0 and r.tasks and not r.failed_inputs]
    for r in empty:
        why = ", ".join(f"{k}: {v}" for k, v in r.rejected.most_common()) or "the inputs hold no pairs"
        print(f"{r.source}: error: no pair written ({why}); see rejected.jsonl", file=sys.stderr)
    if args.part != (0, 1):
        print(f"part {args.part[0]}/{args.part[1]} done; when every part is, run `vlscale shards index {args.out}`")
    elif not failed:
        print(f"manifest: {fs.join(args.out, MANIFEST_NAME)}")
    return 1 if failed or empty else 0


def shard_info(path: str, entry: ShardEntry | None = None) -> dict:
    """Rows, record batches, bytes, per-source counts of one shard (from its manifest entry if given)."""
    entry = entry or describe_shard(path)
    return {"path": path, "rows": entry.rows, "record_batches": len(entry.batches), "bytes": entry.bytes,
            "counts": entry.counts, "has_concepts": entry.concepts,
            "checksums": all(b[3] is not None for b in entry.batches)}


def _info(args: argparse.Namespace) -> int:
    infos = [shard_info(p, e) for p, e, _ in shard_refs(args.shards)]
    totals: Counter = Counter()
    for info in infos:
        totals.update(info["counts"])
    if args.json:
        print(json.dumps({"shards": infos, "counts": dict(totals), "rows": sum(i["rows"] for i in infos)}, indent=2))
        return 0
    for info in infos:
        print(f"{info['path']}: {info['rows']} rows in {info['record_batches']} record batches, "
              f"{info['bytes'] / 2**20:.1f} MiB, sources {info['counts']}")
    print(f"total: {sum(i['rows'] for i in infos)} rows in {len(infos)} shard(s); per source {dict(totals)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from vlscale.data.verify import verify_shard

    total: Counter = Counter()
    unchecked = 0
    refs = []
    for item in fs.split_locations(args.shards):
        expected = read_manifest(fs.join(item, MANIFEST_NAME)) if not item.endswith(SHARD_SUFFIX) else None
        by_path = {e.path: e for e in expected or []}
        refs += [(loc, size, by_path.get(loc)) for loc, size in fs.list_files(item, SHARD_SUFFIX)] or [(item, None, None)]
    for loc, size, expected in refs:
        findings, has_crc = verify_shard(loc, size=size, expected=expected, decode=args.decode)
        unchecked += not has_crc
        for f in findings:
            print(f.message, file=sys.stderr)
            total[f.kind] += 1
    if unchecked:
        print(f"note: {unchecked} shard(s) carry no checksums (written before vlscale recorded them): only their "
              "structure was checked; `vlscale shards index --checksums` records their current bytes")
    print(f"verified {len(refs)} shard(s): " + (f"problems {dict(total)}" if total else "ok"))
    return 1 if total else 0


def _index(args: argparse.Namespace) -> int:
    from vlscale.data.index import finalize

    summary = finalize(args.folder, checksums=args.checksums)
    print(f"{fs.join(args.folder, MANIFEST_NAME)}: {summary['shards']} shard(s), {summary['rows']} rows, "
          f"per source {summary['counts']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"build": _build, "info": _info, "verify": _verify, "index": _index}[args.cmd](args)
    except (ValueError, FileExistsError) as e:
        print(f"vlscale shards {args.cmd}: error: {e}", file=sys.stderr)
        return 1
