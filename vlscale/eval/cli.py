"""``vlscale eval``: zero-shot retrieval of a trained checkpoint on held-out Arrow shards.

    vlscale eval runs/demo                       # the run's latest checkpoint, its data.eval_shards
    vlscale eval runs/demo/checkpoints/step_000300 --shards data/coco-val --out metrics.json

Loads the checkpoint's resolved config and its consolidated weights (``model.pt``: no DeepSpeed
or process group needed, any engine's checkpoint works), embeds every image once and every
caption, and prints Recall@K both ways (several captions per image; computed in chunks, never the
full N×N matrix) with the peak memory of the run. ``--out`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def evaluate_checkpoint(checkpoint: str | Path, *, shards: str | None = None, batch_size: int | None = None,
                        max_batches: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Retrieval metrics of a checkpoint (see the module docstring) plus timing and peak memory."""
    from vlscale.train.evaluate import evaluate_retrieval
    from vlscale.train.metrics import memory_stats

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
    metrics = evaluate_retrieval(model, cfg, model.tokenizer, model.data_config(), shards)
    return {"checkpoint": str(ckpt), "shards": str(shards), "metrics": metrics,
            "seconds": time.perf_counter() - start, "memory": memory_stats(dev)}


def format_metrics(result: dict[str, Any]) -> str:
    m = result["metrics"]
    ks = sorted({int(k.split("@")[1]) for k in m if k.startswith("i2t_R@")})
    lines = [f"checkpoint {result['checkpoint']}", f"held-out   {result['shards']}: "
             f"{int(m['n_images'])} images, {int(m['n_texts'])} captions "
             f"(chance R@1 ≈ {100 / max(m['n_images'], 1):.2f}%)"]
    for name, label in (("i2t", "image→text"), ("t2i", "text→image")):
        recalls = "  ".join(f"R@{k} {m[f'{name}_R@{k}']:6.2f}" for k in ks)
        lines.append(f"{label:<11} {recalls}  median rank {m[f'{name}_median_rank']:.0f}")
    lines.append(f"rsum {m['rsum']:.1f}   ({result['seconds']:.1f} s, peak RSS "
                 f"{result['memory']['mem/peak_rss_mib']:.0f} MiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, shards=args.shards, batch_size=args.batch_size,
                                     max_batches=args.max_batches, device=args.device)
    except ValueError as exc:
        print(f"vlscale eval: {exc}", file=sys.stderr)
        return 2
    print(format_metrics(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
