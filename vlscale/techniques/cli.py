"""``vlscale concepts``: tag every image of a shard set with its ViCHA visual concepts.

    vlscale concepts data/train --checkpoint runs/zvl --out data/train-concepts
    vlscale concepts data/train --checkpoint runs/zvl/checkpoints/step_020000 --out data/tc \\
        --vocab-size 1000 --top-k 15 --ngrams 2

1. mines a keyword vocabulary from the shard set's own captions (:mod:`vlscale.techniques.mining`);
2. loads a trained vlscale checkpoint the way ``vlscale eval`` does (its ``config.json`` and
   consolidated ``model.pt``; any engine's checkpoint) and embeds the keywords with its text tower
   (prompt templates averaged) and every distinct image once with its vision tower (the eval
   transform, in shard order);
3. writes a NEW shard set: the same rows (key, image, caption, source), each with the ``concepts``
   column set to its image's ``--top-k`` keywords, best first, through ``ShardWriter`` (validated,
   atomic shards, one writer per source) plus ``concepts.json`` (the vocabulary with its caption
   counts, and a summary).

Rows whose image the loader could not decode get no concepts and are rejected (counted) by the
writer, as ``vlscale shards build`` would. Prints a progress bar and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from vlscale.techniques.mining import mine_vocabulary, top_concepts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlscale concepts", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="input shard folder (or one .arrow file)")
    p.add_argument("--checkpoint", required=True, help="a run dir (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="output folder for the new shard set (must differ from the input)")
    p.add_argument("--vocab-size", type=int, default=1000, help="keywords kept (default 1000)")
    p.add_argument("--min-count", type=int, default=2, help="a keyword occurs in at least this many captions")
    p.add_argument("--top-k", type=int, default=15, help="concepts per image (ViCHA: 15)")
    p.add_argument("--ngrams", type=int, default=1, choices=(1, 2), help="1 = words, 2 = words and word pairs")
    p.add_argument("--templates", default=None, help='JSON list of prompt templates with "{}" (default: CLIP-style)')
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: eval.batch_size)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _captions(paths: list[str]) -> Any:
    from vlscale.data.stream import open_shard

    for path in paths:
        reader = open_shard(path)
        for i in range(reader.num_record_batches):
            yield from reader.get_batch(i).column("caption").to_pylist()


def _rows(paths: list[str]) -> Any:
    """(source, key, image bytes, caption) of every row, in shard order."""
    from vlscale.data.stream import open_shard

    for path in paths:
        reader = open_shard(path)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            cols = [batch.column(c).to_pylist() for c in ("source", "key", "image", "caption")]
            yield from zip(*cols)


@torch.no_grad()
def score_images(model: Any, loader: Any, word_emb: torch.Tensor, words: list[str], k: int, device: torch.device,
                 progress: Any = None) -> dict[tuple[str, str], list[str]]:
    """(source, key) → top-k keywords, every distinct image embedded once."""
    model.eval()
    found: dict[tuple[str, str], list[str]] = {}
    for batch in loader:
        ids = list(zip(batch.source, batch.keys))
        rows = [i for i, ident in enumerate(ids) if ident not in found]
        if rows:
            pixels = batch.pixels[rows].to(device)
            emb = model(pixels=pixels)["image"].float().cpu()
            for i, tops in zip(rows, top_concepts(emb, word_emb, words, k)):
                found[ids[i]] = tops
        if progress is not None:
            progress.update(len(ids))
    return found


def mine_concepts(shards: str, *, checkpoint: str, out: str, vocab_size: int = 1000, min_count: int = 2,
                  top_k: int = 15, ngrams: int = 1, templates: list[str] | None = None,
                  batch_size: int | None = None, device: str | None = None, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Run the three steps of the module docstring; returns the summary (also in ``<out>/concepts.json``)."""
    from tqdm.auto import tqdm

    from vlscale.data.stream import list_shards
    from vlscale.eval import DEFAULT_TEMPLATES, build_classifier
    from vlscale.eval.cli import load_model, resolve_checkpoint
    from vlscale.train.evaluate import eval_loader

    paths = list_shards(shards)
    out_dir = Path(out)
    if out_dir.resolve() in {Path(p).resolve().parent for p in paths}:
        raise ValueError(f"--out {out} is the input folder: write the tagged shard set to a new folder")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    start = time.perf_counter()
    vocab = mine_vocabulary(_captions(paths), size=vocab_size, min_count=min_count, ngrams=ngrams)
    if not vocab:
        raise ValueError(f"{shards}: no keyword occurs in {min_count}+ captions; lower --min-count")
    words = [w for w, _ in vocab]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = resolve_checkpoint(checkpoint)
    cfg, model = load_model(ckpt, dev)
    if batch_size is not None:
        cfg.eval.batch_size = batch_size
    word_emb = build_classifier(model, model.tokenizer, words, tuple(templates or DEFAULT_TEMPLATES),
                                context_length=cfg.model.context_length, batch_size=cfg.eval.batch_size).cpu()
    loader = eval_loader(cfg, paths, model.tokenizer, model.data_config())
    total_rows = sum(1 for _ in _captions(paths))
    bar = tqdm(total=total_rows, desc="concepts", unit="row", disable=not progress, file=sys.stderr)
    try:
        tops = score_images(model, loader, word_emb, words, top_k, dev, bar)
    finally:
        bar.close()
    summary = _write(paths, out_dir, tops, overwrite)
    used = Counter(c for cs in tops.values() for c in cs)
    summary.update({"checkpoint": str(ckpt), "input": str(shards), "out": str(out_dir), "images": len(tops),
                    "vocab_size": len(words), "top_k": top_k, "ngrams": ngrams,
                    "most_used": used.most_common(20), "seconds": round(time.perf_counter() - start, 2)})
    _write_json(out_dir / "concepts.json", {"summary": summary, "vocabulary": [[w, c] for w, c in vocab]})
    return summary


def _write(paths: list[str], out_dir: Path, tops: dict[tuple[str, str], list[str]], overwrite: bool) -> dict[str, Any]:
    from vlscale.data.writer import ShardWriter

    writers: dict[str, ShardWriter] = {}
    try:
        for source, key, image, caption in _rows(paths):
            if source not in writers:
                writers[source] = ShardWriter(out_dir, source, overwrite=overwrite)
            writers[source].add(image_bytes=image or b"", caption=caption, key=key, concepts=tops.get((source, key)))
    except BaseException:
        for w in writers.values():  # publish nothing more from a failed run
            w.__exit__(RuntimeError, None, None)
        raise
    sums = [w.close() for w in writers.values()]
    rejected: Counter = Counter()
    for s in sums:
        rejected.update(s.rejected)
    return {"rows_written": sum(s.written for s in sums), "rejected": dict(rejected),
            "shards": [p for s in sums for p in s.shards]}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from vlscale.data.fs import write_bytes  # atomic: temp file + rename

    write_bytes(str(path), (json.dumps(data, indent=2) + "\n").encode())


def format_summary(s: dict[str, Any]) -> str:
    top = ", ".join(f"{w} ({n})" for w, n in s["most_used"][:10])
    return "\n".join([
        f"checkpoint {s['checkpoint']}",
        f"vocabulary {s['vocab_size']} keywords ({'words' if s['ngrams'] == 1 else 'words + pairs'}) "
        f"from the captions of {s['input']}",
        f"tagged     {s['images']} images with their top {s['top_k']} concepts; {s['rows_written']} rows in "
        f"{len(s['shards'])} shards under {s['out']}" + (f"; rejected {s['rejected']}" if s["rejected"] else ""),
        f"most used  {top}",
        f"({s['seconds']:.1f} s; vocabulary and summary in {Path(s['out']) / 'concepts.json'})",
    ])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        templates = json.loads(args.templates) if args.templates else None
        if templates is not None and (not isinstance(templates, list) or not all("{}" in t for t in templates)):
            raise ValueError('--templates must be a JSON list of strings containing "{}"')
        summary = mine_concepts(args.shards, checkpoint=args.checkpoint, out=args.out, vocab_size=args.vocab_size,
                                min_count=args.min_count, top_k=args.top_k, ngrams=args.ngrams,
                                templates=templates, batch_size=args.batch_size, device=args.device,
                                overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileExistsError, json.JSONDecodeError) as exc:
        print(f"vlscale concepts: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
