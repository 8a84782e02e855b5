"""Gradient-cached step vs plain step: step time and peak memory vs global batch.

GPU (default): ViT-B/16 (timm) + BERT-base (transformers), random init from config, bf16
autocast, local engine on one device. It finds the largest batch the plain step fits, times both
steps there (target: cached ≤ 1.4× plain), then records peak memory for both over a batch sweep
(the cached step's should grow only with O(B·D)). Timing and the record go through the shared
``benchmarks/harness.py``: one JSON record appended to ``benchmarks/results/bench_gradcache.jsonl``
(plus ``.json`` / ``.md`` / plots). ``--sizes`` are the batches, ``--providers`` plain,cached.

``--smoke``: tiny towers on CPU, two batches, a few seconds — checks that the benchmark runs
(memory is not measured on CPU). Without CUDA and without ``--smoke`` it exits cleanly saying so.

    python benchmarks/bench_gradcache.py              # GPU
    python benchmarks/bench_gradcache.py --smoke      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # sibling script (benchmarks/ is no package)

harness.ensure_vlscale_importable()  # a plain checkout (the GPU machine) has no installed vlscale
from vlscale.engines import build_engine  # noqa: E402
from vlscale.gradcache import GradCache  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class TowerConfig:
    image_size: int
    patch: int
    vit_dim: int
    vit_depth: int
    vit_heads: int
    bert_dim: int
    bert_layers: int
    bert_heads: int
    vocab: int
    seq: int
    embed_dim: int


GPU_CFG = TowerConfig(224, 16, 768, 12, 12, 768, 12, 12, 30522, 32, 512)  # ViT-B/16 + BERT-base
SMOKE_CFG = TowerConfig(32, 8, 32, 2, 2, 32, 2, 2, 100, 8, 16)


class BenchDualEncoder(nn.Module):
    """timm ViT + HF BERT with linear projections; the vlscale model contract."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from transformers import BertConfig, BertModel

        self.visual = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch, embed_dim=cfg.vit_dim,
                                        depth=cfg.vit_depth, num_heads=cfg.vit_heads, num_classes=0)
        bert_cfg = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.bert_dim, num_hidden_layers=cfg.bert_layers,
                              num_attention_heads=cfg.bert_heads, intermediate_size=4 * cfg.bert_dim,
                              max_position_embeddings=max(64, cfg.seq))
        self.textual = BertModel(bert_cfg, add_pooling_layer=False)
        self.image_proj = nn.Linear(cfg.vit_dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.bert_dim, cfg.embed_dim, bias=False)
        self.logit_t = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def forward(self, pixels: Tensor | None = None, tokens: Tensor | None = None,
                attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if pixels is not None:
            out["image"] = F.normalize(self.image_proj(self.visual(pixels)), dim=-1)
        if tokens is not None:
            hidden = self.textual(input_ids=tokens, attention_mask=attention_mask).last_hidden_state
            out["text"] = F.normalize(self.text_proj(hidden[:, 0]), dim=-1)
        out["logit_scale"] = self.logit_t.clamp(max=math.log(100.0)).exp()
        return out


def clip_loss(embs: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """The vlscale loss when available (fused on GPU), else the naive symmetric CLIP loss."""
    img, txt, scale = embs["image"], embs["text"], embs["logit_scale"]
    try:
        from vlscale.loss import contrastive_loss

        return contrastive_loss(img, txt, scale), {}
    except ImportError:
        logits = scale.reshape(()) * img @ txt.t()
        labels = torch.arange(img.shape[0], device=img.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)), {}


def make_inputs(cfg: TowerConfig, batch: int, device: torch.device) -> dict[str, Tensor]:
    return {
        "pixels": torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device),
        "tokens": torch.randint(1, cfg.vocab, (batch, cfg.seq), device=device),
        "attention_mask": torch.ones(batch, cfg.seq, dtype=torch.long, device=device),
    }


def run_steps(engine, cfg: TowerConfig, batch: int, chunk: int | None, steps: int) -> dict:
    """Step time (GradCache.step + optimizer step: median and quantiles) and peak memory of one setting."""
    device = engine.device
    gc = GradCache(engine, chunk_size=chunk)
    inputs = make_inputs(cfg, batch, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        gc.step(inputs, clip_loss)
        engine.optimizer_step()

    timing = harness.time_fn(step, device, reps=steps)  # one warm-up step first (allocator, cuBLAS)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"mode": "plain" if chunk is None else "cached", "batch": batch, "chunk": chunk,
            "ms": timing["median_ms"], "q20_ms": timing["q20_ms"], "q80_ms": timing["q80_ms"],
            "reps": timing["reps"], "peak_mib": peak}


def try_steps(engine, cfg: TowerConfig, batch: int, chunk: int | None, steps: int) -> dict | None:
    try:
        return run_steps(engine, cfg, batch, chunk, steps)
    except torch.OutOfMemoryError:
        engine.zero_grad()
        torch.cuda.empty_cache()
        return None


def bench(cfg: TowerConfig, device: torch.device, *, batches: list[int], chunk: int, steps: int,
          dtype: torch.dtype | None) -> dict:
    torch.manual_seed(0)
    model = BenchDualEncoder(cfg).to(device)
    fused = device.type == "cuda"
    engine = build_engine("local", model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused),
                          autocast_dtype=dtype)
    rows: list[dict] = []
    plain_max = None
    plain_fits = True
    for b in batches:  # plain until it first runs out of memory, cached over the whole sweep
        plain = try_steps(engine, cfg, b, None, steps) if plain_fits else None
        plain_fits = plain is not None
        if plain is not None:
            rows.append(plain)
            plain_max = b
        else:
            rows.append({"mode": "plain", "batch": b, "chunk": None, "ms": None, "peak_mib": None, "oom": True})
        cached = try_steps(engine, cfg, b, min(chunk, b), steps)
        rows.append(cached or {"mode": "cached", "batch": b, "chunk": chunk, "ms": None, "oom": True})
    summary = {}
    if plain_max is not None:
        p = next(r for r in rows if r["mode"] == "plain" and r["batch"] == plain_max)
        c = next(r for r in rows if r["mode"] == "cached" and r["batch"] == plain_max)
        if c.get("ms"):
            summary = {"largest_plain_batch": plain_max, "plain_ms": p["ms"], "cached_ms": c["ms"],
                       "cached_over_plain": c["ms"] / p["ms"], "target": 1.4}
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_arguments(ap, sizes="64,128,256,512,1024,2048,4096", providers="plain,cached", reps=5,
                          out=RESULTS)
    ap.add_argument("--chunk", type=int, default=128, help="cached-step chunk size (GPU)")
    ap.add_argument("--batches", default=None, help=argparse.SUPPRESS)  # old name of --sizes
    args = ap.parse_args(argv)
    if harness.parse_modes(args.modes) != ["full"]:
        ap.error("a training step is forward + backward: --modes full only")
    if args.smoke:
        cfg, device, dtype = SMOKE_CFG, torch.device("cpu"), None
        batches, chunk, steps = [8, 12], 5, 1
    elif torch.cuda.is_available():
        cfg, device, dtype = GPU_CFG, torch.device("cuda"), torch.bfloat16
        batches, chunk, steps = harness.parse_list(args.batches or args.sizes, int), args.chunk, args.reps
    else:
        print("bench_gradcache: no CUDA device; the GPU benchmark is skipped (use --smoke on CPU)")
        return 0

    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: extra threads only spin on a shared CPU
    try:
        result = bench(cfg, device, batches=batches, chunk=chunk, steps=steps, dtype=dtype)
    finally:
        torch.set_num_threads(threads)
    wanted = set(harness.parse_list(args.providers))
    if args.smoke and "--out" not in (argv if argv is not None else sys.argv[1:]):
        for row in result["rows"]:
            print(json.dumps(row))
        print(json.dumps({"summary": result["summary"]}))
        return 0
    rec = harness.Recorder("gradcache", args, device, stem="bench_gradcache")
    rec.summary = result["summary"]
    rec.notes.append(f"towers: {json.dumps(asdict(cfg))}, dtype {dtype or torch.float32}, chunk {chunk}")
    for row in result["rows"]:
        if row["mode"] in wanted:
            rec.add(row)
    rec.write(plots=[dict(name="time", x="batch", y="ms", series=("mode",), ylabel="ms per step",
                          title="step time vs batch"),
                     dict(name="memory", x="batch", y="peak_mib", series=("mode",), ylabel="peak MiB",
                          title="peak memory vs batch")])
    print(json.dumps({"summary": result["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
