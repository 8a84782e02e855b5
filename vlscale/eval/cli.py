"""``vlscale eval``: zero-shot retrieval of a trained checkpoint on held-out Arrow shards.

    vlscale eval runs/demo                       # the run's latest checkpoint, its data.eval_shards
    vlscale eval runs/demo/checkpoints/step_000300 --shards data/coco-val --out metrics.json

Loads the checkpoint's resolved config and its consolidated weights (``model.pt``: no DeepSpeed
or process group needed, any engine's checkpoint works), embeds every image once and every
caption, and prints Recall@K both ways (several captions per image; computed in chunks, never the
full N×N matrix) with the peak memory of the run. ``--out`` also writes them as JSON.

Zero-shot classification of the same held-out images, from the same embeddings:

    vlscale eval runs/demo --classes objects.txt --labels-from column:concepts

``--classes`` is a text file (one class name a line; blank lines and ``#`` comments skipped) or
JSON ``{"classes": [...], "templates": [...]}`` (templates hold ``{}``; default: CLIP-style
"a photo of a {}." …). ``--labels-from`` says where each image's true class comes from:

* ``caption`` — the class its captions name (whole words, case-insensitive; where names nest,
  "red circle" beats "circle"); images whose captions name no class or several are skipped and
  counted (``unlabelled`` / ``ambiguous``);
* ``key`` — the key's first path component (``"tabby cat/000123"``; ``_`` reads as a space);
* ``column:NAME`` — a shard column: a class name, a class index, or a list (its first entry that
  is a class name).

For the demo's shards (two objects a scene, captions naming both): list the 18 objects ("red
circle" … "white triangle") and use ``--labels-from column:concepts``: the label is the scene's
first object (the upper / left one), so top-1 is capped near 50 % even for a perfect model —
top-5 says more. The metrics (top-1 / top-5 accuracy, mean per-class recall, chance level, skips)
are printed after retrieval and saved under ``"zeroshot_classification"`` in ``--out``.

Output conventions: the table printed for people gives recalls and accuracies in percent; the
``--out`` JSON follows CLIP_benchmark — fractions named ``image_retrieval_recall@K`` (caption →
image), ``text_retrieval_recall@K`` (image → caption), ``acc1``, ``acc5``,
``mean_per_class_recall`` — with ``task``, ``dataset``, ``model`` and ``pretrained`` (the
checkpoint) beside ``metrics``, plus the checkpoint's step and recipe.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlscale eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run dir (its latest checkpoint) or a checkpoint folder (step_XXXXXX)")
    p.add_argument("--shards", default=None, help="held-out shard folder (default: the run's data.eval_shards)")
    p.add_argument("--out", default=None, help="also write the metrics as JSON here")
    p.add_argument("--batch-size", type=int, default=None, help="rows per embedding batch (default: eval.batch_size)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (default: all)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--classes", default=None,
                   help="also zero-shot classification: a text file (one class a line) or JSON "
                        '{"classes": [...], "templates": [...]}')
    p.add_argument("--labels-from", default="caption",
                   help="each image's true class: caption | key | column:NAME (default caption; "
                        "demo shards: column:concepts)")
    return p


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder holding model.pt + config.json, from itself or a run / checkpoints dir."""
    from vlscale.train.checkpoint import resolve_resume

    path = Path(path)
    if (path / "model.pt").is_file() and (path / "config.json").is_file():
        return path
    found = resolve_resume(str(path), path / "checkpoints") if path.exists() else None
    if found is None:
        raise ValueError(f"{path}: no checkpoint (expected model.pt + config.json, or a run dir with checkpoints/latest)")
    return found


def load_model(ckpt: Path, device: torch.device) -> tuple[Any, Any]:
    """(config, DualEncoder with the checkpoint's weights, in eval mode on ``device``)."""
    from vlscale.config import load_config
    from vlscale.model import DualEncoder
    from vlscale.train.checkpoint import load_model_weights

    cfg = load_config(ckpt / "config.json")
    model = DualEncoder(cfg.model)
    try:
        missing, unexpected = model.load_state_dict(load_model_weights(ckpt), strict=False)
    except RuntimeError as exc:  # shape mismatches: the weights are not this config's model
        raise ValueError(f"{ckpt}/model.pt does not fit the model its config.json describes: {exc}") from exc
    if missing or unexpected:
        raise ValueError(f"{ckpt}/model.pt does not match the config's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return cfg, model.to(device).eval()


def load_classes(path: str | Path) -> tuple[list[str], tuple[str, ...]]:
    """(class names, prompt templates) from a text file or a JSON file (see the module docstring)."""
    from vlscale.eval import DEFAULT_TEMPLATES

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--classes {str(p)!r}: no such file")
    text = p.read_text(encoding="utf-8")
    templates: Sequence[str] = DEFAULT_TEMPLATES
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--classes {p}: not valid JSON: {exc}") from exc
        if isinstance(data, dict):
            unknown = set(data) - {"classes", "templates"}
            if unknown or "classes" not in data:
                raise ValueError(f"--classes {p}: expected keys 'classes' (and 'templates'), got {sorted(data)}")
            templates = data.get("templates") or DEFAULT_TEMPLATES
            data = data["classes"]
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise ValueError(f"--classes {p}: 'classes' must be a list of strings")
        if not isinstance(templates, (list, tuple)) or not all(isinstance(t, str) for t in templates):
            raise ValueError(f"--classes {p}: 'templates' must be a list of strings")
        names = [c.strip() for c in data]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names or any(not n for n in names):
        raise ValueError(f"--classes {p}: no class names (or an empty one)")
    seen = Counter(_norm(n) for n in names)
    dupes = sorted(n for n, c in seen.items() if c > 1)
    if dupes:
        raise ValueError(f"--classes {p}: duplicate class names {dupes}")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"--classes {p}: every template must contain '{{}}', got {bad}")
    return names, tuple(templates)


def parse_labels_from(spec: str) -> tuple[str, str | None]:
    """``caption`` / ``key`` / ``column:NAME`` → (kind, column name)."""
    if spec in ("caption", "key"):
        return spec, None
    if spec.startswith("column:") and spec[len("column:"):].strip():
        return "column", spec[len("column:"):].strip()
    raise ValueError(f"--labels-from must be caption, key or column:NAME, got {spec!r}")


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


class RecordingLoader:
    """Passes batches through and keeps each row's (key, caption), in order: image ``i`` of
    ``embed_dataset(group_by="key")`` is the ``i``-th distinct key seen."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.rows: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.rows.extend(zip(batch.keys, batch.captions))
            yield batch

    def images(self, n_images: int) -> list[tuple[str, list[str]]]:
        """(key, its captions) of the first ``n_images`` distinct keys."""
        by_key: dict[str, list[str]] = {}
        for key, caption in self.rows:
            if key in by_key or len(by_key) < n_images:
                by_key.setdefault(key, []).append(caption)
        return list(by_key.items())


def _caption_classes(caption: str, patterns: list[re.Pattern[str]]) -> set[int]:
    """Classes a caption names; a match inside a longer one ("circle" in "red circle") does not count."""
    spans = [(m.start(), m.end(), c) for c, pat in enumerate(patterns) for m in pat.finditer(caption)]
    return {c for a, b, c in spans
            if not any(a2 <= a and b <= b2 and (b2 - a2) > (b - a) for a2, b2, _ in spans)}


def _column_values(shards: str, column: str, keys: set[str]) -> dict[str, Any]:
    """The first value of ``column`` for each of ``keys``, read straight from the Arrow shards."""
    from vlscale.data.stream import list_shards, open_shard

    out: dict[str, Any] = {}
    for path in list_shards(shards):
        reader = open_shard(path)
        if column not in reader.schema.names:
            raise ValueError(f"--labels-from column:{column}: {path} has no such column "
                             f"(columns: {reader.schema.names})")
        table = reader.read_all().select(["key", column])
        for key, value in zip(table.column("key").to_pylist(), table.column(column).to_pylist()):
            if key in keys:
                out.setdefault(key, value)
    return out


def _value_class(value: Any, index: dict[str, int], n_classes: int) -> int | None:
    if isinstance(value, str):
        return index.get(_norm(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < n_classes else None
    if isinstance(value, (list, tuple)):
        return next((index[_norm(v)] for v in value if isinstance(v, str) and _norm(v) in index), None)
    return None


def read_labels(images: list[tuple[str, list[str]]], classes: Sequence[str], labels_from: str,
                shards: str | None = None) -> tuple[list[int | None], Counter]:
    """Each image's class index (None = skipped) and the skip counts by reason."""
    kind, column = parse_labels_from(labels_from)
    index = {_norm(c): i for i, c in enumerate(classes)}
    skipped: Counter = Counter()
    labels: list[int | None] = []
    if kind == "column":
        values = _column_values(shards or "", column or "", {k for k, _ in images})
    patterns = [re.compile(r"(?<!\w)" + r"[\s_]+".join(map(re.escape, _norm(c).split())) + r"(?!\w)",
                           re.IGNORECASE) for c in classes]
    for key, captions in images:
        if kind == "caption":
            found = set().union(*(_caption_classes(c, patterns) for c in captions))
            label = next(iter(found)) if len(found) == 1 else None
            if len(found) > 1:
                skipped["ambiguous"] += 1
                labels.append(None)
                continue
        elif kind == "key":
            label = index.get(_norm(key.split("/", 1)[0]))
        else:
            label = _value_class(values.get(key), index, len(classes))
        if label is None:
            skipped["unlabelled"] += 1
        labels.append(label)
    return labels, skipped


def zero_shot_metrics(model: Any, cfg: Any, image_emb: torch.Tensor, images: list[tuple[str, list[str]]],
                      classes: Sequence[str], templates: Sequence[str], labels_from: str,
                      shards: str) -> dict[str, Any]:
    """CLIP_benchmark's ``acc1`` / ``acc5`` / ``mean_per_class_recall`` (fractions) of the labelled
    images, with the skip counts and the chance level."""
    from vlscale.eval import build_classifier, zero_shot_classify

    labels, skipped = read_labels(images, classes, labels_from, shards)
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    if not keep:
        raise ValueError(f"zero-shot: none of the {len(images)} held-out images got a class from "
                         f"--labels-from {labels_from} ({dict(skipped)}); check it and the class names")
    classifier = build_classifier(model, model.tokenizer, list(classes), templates,
                                  context_length=cfg.model.context_length, batch_size=cfg.eval.batch_size)
    res = zero_shot_classify(image_emb[keep], classifier, torch.tensor([labels[i] for i in keep]), ks=(1, 5),
                             chunk=cfg.eval.chunk)
    metrics = {k: v for k, v in res.items() if k.startswith("acc") or k == "mean_per_class_recall"}
    return {"task": "zeroshot_classification", "metrics": metrics, "n_images": len(keep),
            "n_classes": len(classes), "chance_acc1": 1.0 / len(classes), "labels_from": labels_from,
            "skipped": dict(skipped), "templates": list(templates)}


def _checkpoint_info(ckpt: Path, cfg: Any) -> dict[str, Any]:
    step = None
    if ckpt.name.startswith("step_") and ckpt.name[5:].isdigit():
        step = int(ckpt.name[5:])
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return {"path": str(ckpt), "step": step, "recipe": cfg.recipe, "run_dir": str(run_dir) if run_dir else None}


def _model_info(model: Any, cfg: Any) -> dict[str, Any]:
    m = cfg.model
    return {"name": f"{m.vision_model} + {m.text_model}", "vision_model": m.vision_model,
            "text_model": m.text_model, "embed_dim": m.embed_dim, "context_length": m.context_length,
            "image_size": list(model.data_config()["input_size"][1:]),
            "params": sum(p.numel() for p in model.parameters())}


def evaluate_checkpoint(checkpoint: str | Path, *, shards: str | None = None, batch_size: int | None = None,
                        max_batches: int | None = None, device: str | None = None,
                        classes: str | None = None, labels_from: str = "caption") -> dict[str, Any]:
    """Retrieval metrics of a checkpoint (see the module docstring for the conventions) with the
    dataset / checkpoint / model metadata, timing and peak memory; with ``classes``, also zero-shot
    classification under ``"zeroshot_classification"``."""
    import vlscale
    from vlscale.eval import embed_dataset, retrieval_metrics
    from vlscale.train.evaluate import eval_loader
    from vlscale.train.metrics import memory_stats

    class_names, templates = load_classes(classes) if classes else ([], ())
    parse_labels_from(labels_from)  # fail before loading anything
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = resolve_checkpoint(checkpoint)
    cfg, model = load_model(ckpt, dev)
    shards = shards or cfg.data.eval_shards
    if not shards:
        raise ValueError("no held-out shards: pass --shards (the run's data.eval_shards is empty)")
    if batch_size is not None:
        cfg.eval.batch_size = batch_size
    if max_batches is not None:
        cfg.eval.max_batches = max_batches
    start = time.perf_counter()
    # One embedding pass serves both retrieval and zero-shot (as evaluate_retrieval, one process).
    loader = RecordingLoader(eval_loader(cfg, str(shards), model.tokenizer, model.data_config()))
    img, txt, t2i = embed_dataset(model, loader, group_by="key", max_batches=cfg.eval.max_batches or None)
    metrics = retrieval_metrics(img, txt, t2i, ks=tuple(cfg.eval.ks), chunk=cfg.eval.chunk, names="clip_benchmark")
    dataset = {"name": Path(str(shards)).name, "shards": str(shards), "n_images": int(metrics["n_images"]),
               "n_texts": int(metrics["n_texts"]), "images_without_text": int(metrics["images_without_text"]),
               "max_batches": cfg.eval.max_batches or None}
    result: dict[str, Any] = {"task": "zeroshot_retrieval", "dataset": dataset, "model": _model_info(model, cfg),
                              "pretrained": str(ckpt), "checkpoint": _checkpoint_info(ckpt, cfg),
                              "metrics": metrics, "vlscale_version": vlscale.__version__}
    if class_names:
        zs = zero_shot_metrics(model, cfg, img, loader.images(img.shape[0]), class_names, templates,
                               labels_from, str(shards))
        result["zeroshot_classification"] = {**zs, "classes_file": str(classes)}
    return {**result, "seconds": time.perf_counter() - start, "memory": memory_stats(dev)}


def format_metrics(result: dict[str, Any]) -> str:
    """The table for people: recalls and accuracies in percent."""
    from vlscale.eval.retrieval import percent_table

    m, ds = result["metrics"], result["dataset"]
    lines = [f"checkpoint {result['pretrained']}", f"held-out   {ds['shards']}: "
             f"{ds['n_images']} images, {ds['n_texts']} captions "
             f"(chance R@1 ≈ {100 / max(ds['n_images'], 1):.2f}%)"]
    for (label, recalls), prefix in zip(percent_table(m).items(), ("text_retrieval", "image_retrieval")):
        row = "  ".join(f"{k} {v:6.2f}" for k, v in recalls.items())
        lines.append(f"{label:<11} {row}  median rank {m[f'{prefix}_median_rank']:.0f}")
    zs = result.get("zeroshot_classification")
    if zs:
        skipped = sum(zs["skipped"].values())
        zm = zs["metrics"]
        accs = "  ".join(f"top-{k[3:]} {100 * v:6.2f}" for k, v in sorted(zm.items()) if k.startswith("acc"))
        lines.append(f"zero-shot   {accs}  mean per-class recall {100 * zm['mean_per_class_recall']:.2f}  "
                     f"({zs['n_classes']} classes, chance top-1 {100 * zs['chance_acc1']:.2f}; "
                     f"{zs['n_images']} images labelled from {zs['labels_from']}"
                     + (f", {skipped} skipped {zs['skipped']}" if skipped else "") + ")")
    lines.append(f"rsum {m['rsum']:.1f}   ({result['seconds']:.1f} s, peak RSS "
                 f"{result['memory']['mem/peak_rss_mib']:.0f} MiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, shards=args.shards, batch_size=args.batch_size,
                                     max_batches=args.max_batches, device=args.device,
                                     classes=args.classes, labels_from=args.labels_from)
    except ValueError as exc:
        print(f"vlscale eval: {exc}", file=sys.stderr)
        return 2
    print(format_metrics(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
