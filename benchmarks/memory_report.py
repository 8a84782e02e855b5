"""Memory profiling report: predicted per-rank memory of the recipes of interest, checked by measurement.

``--mode cpu`` (runs anywhere, writes ``benchmarks/results/memory_model_cpu.{json,jsonl,md}`` through
the shared ``benchmarks/harness.py`` record):
  1. builds ViT-B/16 + BERT-base (:class:`vlscale.model.DualEncoder`) on the meta device and counts
     its parameters; counts the bytes autograd saves per sample (a lower bound of activations);
  2. predicts the per-rank breakdown of ZeroVL's 16k recipe and vlscale's 1M target on
     8 × V100-32GB (with / without gradient cache; naive / chunked / fused loss) and the largest
     global batch under 30 GiB;
  3. validates the model on CPU: a tiny dual encoder runs one rank's exact step
     (:func:`vlscale.memory.workload.run_rank_step`, other ranks simulated) and every phase's
     measured peak of live tensor bytes is compared with the prediction made from measured inputs
     (parameter count, activation cost, optimizer temporaries); then the path of
     ``vlscale memory measure --simulate-world-size`` (16-bit weights, ``ShardedAdam``) in bf16.

``--mode gpu`` (needs CUDA; skipped cleanly otherwise): ``vlscale memory measure --recipe zerovl-v100
train.global_batch_size=1048576 --simulate-world-size 8 --memory-cap 32GiB`` — one rank of 8 at
B = 1,048,576 under a 32 GiB cap — into ``<out>/memory_gpu/report.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # sibling script (benchmarks/ is no package)

harness.ensure_vlscale_importable()
from vlscale.memory import GIB, MIB, MemoryTracker, deepspeed_bucket_bytes, max_global_batch, predict_memory  # noqa: E402
from vlscale.memory.towers import (  # noqa: E402
    chunk_cost,
    count_params,
    measure_activation_cost,
    meta_dual_encoder,
    pair_inputs,
    saved_activation_bytes,
)
from vlscale.memory.workload import run_rank_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BIG = dict(vision_model="vit_base_patch16_224", text_model="bert-base-uncased", embed_dim=512, context_length=32)
# A small vocabulary keeps the dense word-embedding gradient (a row-independent transient that
# BERT-base's activations dwarf) from dominating the tiny model's peaks.
TINY = dict(vision_model="vit_tiny_patch16_224", vision_kwargs={"patch_size": 8, "depth": 2}, image_size=32,
            text_model="bert-tiny", tokenizer_words=tuple(f"w{i}" for i in range(200)), embed_dim=64, context_length=16)
# Trainable parameters of DualEncoder(BIG) as counted on the meta device (the --quick run uses it
# as given instead of building the model).
BIG_PARAMS = 195_476_737
ANCHOR_ACT = 83 * MIB  # ANCHORS.md "Tower costs": ViT-B/16 + BERT-base, bf16 autocast, text length 32
# BERT-base's word embedding (30,522 × 768): its dense fp16 gradient is the backward's largest transient.
BIG_WORD_EMBEDDING = 30_522 * 768
V100 = 32 * GIB
TARGET = 30 * GIB
# A pair's inputs on the device: fp32 pixels as the loader yields them + token ids and mask (int64).
INPUT_BYTES = 3 * 224 * 224 * 4 + 2 * 32 * 8


def _only(keys: tuple[str, ...], make: Any) -> Any:
    return lambda start, stop, device: {k: v for k, v in make(start, stop, device).items() if k in keys}


def recipes(params: int) -> list[dict[str, Any]]:
    """The configurations of interest (8 × V100-32GB, fp16)."""
    common = dict(params=params, world_size=8, precision="fp16", embed_dim=512, act_bytes_per_pair=ANCHOR_ACT,
                  input_bytes_per_pair=INPUT_BYTES, gpu_sms=80, grad_transient_bytes=2 * BIG_WORD_EMBEDDING)
    # DeepSpeed ZeRO-2 copies each gradient into its reduce bucket (the transient at every backward).
    z2 = dict(zero_stage=2, engine_buffer_bytes=deepspeed_bucket_bytes(2, "fp16"), grads_copied=True)
    # ZeroVL: plain data parallel, 16 accumulation chunks of 1,024 pairs over 8 GPUs = 128 per rank.
    zerovl = dict(zero_stage=0, global_batch=16_384)
    out = [
        ("ZeroVL 16k, gradient cache (128/rank), naive loss", {**zerovl, "chunk": 128, "loss_impl": "naive"}),
        ("ZeroVL 16k, no gradient cache, naive loss", {**zerovl, "chunk": None, "loss_impl": "naive"}),
        ("vlscale 1M, ZeRO-2, gradient cache 256, compiled loss (auto on V100)",
         {**z2, "global_batch": 2**20, "chunk": 256, "loss_impl": "compiled"}),
        ("vlscale 1M, ZeRO-2, gradient cache 256, eager chunked loss (compile fallback)",
         {**z2, "global_batch": 2**20, "chunk": 256, "loss_impl": "chunked"}),
        ("vlscale 1M, ZeRO-2, gradient cache 256, naive loss", {**z2, "global_batch": 2**20, "chunk": 256,
                                                              "loss_impl": "naive"}),
        ("vlscale 1M, ZeRO-2, no gradient cache, compiled loss", {**z2, "global_batch": 2**20, "chunk": None,
                                                                "loss_impl": "compiled"}),
    ]
    return [{"name": name, **common, **kw} for name, kw in out]


def predict_recipes(params: int) -> list[dict[str, Any]]:
    rows = []
    for r in recipes(params):
        kw = {k: v for k, v in r.items() if k != "name"}
        est = predict_memory(**kw)
        kw.pop("global_batch")
        world = kw.pop("world_size")
        best = max_global_batch(TARGET, world_size=world, multiple_of=world * (kw["chunk"] or 1), **kw)
        rows.append({"name": r["name"], "estimate": est.to_dict(), "table": est.table(r["name"]),
                     "fits_32GiB": est.fits(V100), "max_global_batch_30GiB": best})
    return rows


def tower_costs(model: torch.nn.Module, make: Any, *, dtype: torch.dtype | None, sizes: tuple[int, int],
                measure: bool) -> dict[str, dict[str, float]]:
    """Per tower: bytes saved for backward per row and (if ``measure``) the fitted fwd+bwd cost."""
    out: dict[str, dict[str, float]] = {}
    for tower, keys in (("image", ("pixels",)), ("text", ("tokens",))):
        entry = {"saved_per_row": saved_activation_bytes(model, _only(keys, make), dtype=dtype)}
        if measure:
            cost = measure_activation_cost(model, _only(keys, make), sizes=sizes)
            entry.update(per_row=cost.per_row, fixed=cost.fixed, nograd_per_row=cost.nograd_per_row)
        out[tower] = entry
    return out


def _chunk_cost(costs: dict[str, dict[str, float]], rows: int | None) -> dict[str, float]:
    """Activation arguments of :func:`predict_memory`: per chunk the costlier tower (towers run one
    at a time); without gradient cache both towers' activations are alive together."""
    if rows is None:
        return {"act_bytes_per_pair": sum(c["per_row"] for c in costs.values()),
                "act_fixed_bytes": max(c["fixed"] for c in costs.values())}
    per_row, fixed = chunk_cost(costs, rows)
    return {"act_bytes_per_pair": per_row, "act_fixed_bytes": fixed,
            "nograd_act_bytes_per_row": max(c["nograd_per_row"] for c in costs.values())}


def validate_cpu(quick: bool) -> dict[str, Any]:
    """Measured (live tensor bytes) vs predicted peaks of a tiny dual encoder's rank-0 step.

    ``quick`` (tests): only the loss phase at one batch size of the eager losses, no towers.
    """
    if quick:
        return {"cases": validate_loss_phase(quick)}
    from vlscale.model import DualEncoder, ModelConfig

    torch.manual_seed(0)
    make = pair_inputs(image_size=TINY["image_size"], context_length=TINY["context_length"], vocab=200)
    tracker = MemoryTracker("cpu", backend="tensors")
    with tracker.tracking():  # count the parameters too
        model = DualEncoder(ModelConfig(**TINY))
    params = count_params(model)
    costs = tower_costs(model, make, dtype=None, sizes=(8, 24), measure=True)
    # torch's single-tensor Adam makes two temporaries the size of the parameter it updates.
    largest = max(p.numel() for p in model.parameters()) * 4
    table = max(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)) * 4
    world, chunk, batch = 4, 32, 256
    cases = [("chunked", chunk), ("naive", chunk), ("chunked", None), ("naive", None)]
    rows = []
    for impl, ch in cases:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)
        tracker.records.clear()
        with tracker.tracking():
            # Warm-up step (creates gradients and Adam states), then the measured step.
            run_rank_step(model, make, opt, world_size=world, global_batch=world * (ch or 4), chunk=ch,
                          loss_impl=impl, tracker=tracker)
            start = len(tracker.records)
            run_rank_step(model, make, opt, world_size=world, global_batch=batch, chunk=ch,
                          loss_impl=impl, tracker=tracker)
        measured = {r.name: r.peak_bytes for r in tracker.records[start:]}
        est = predict_memory(params=params, world_size=world, zero_stage=0, precision="fp32", global_batch=batch,
                             chunk=ch, embed_dim=TINY["embed_dim"], loss_impl=impl,
                             input_bytes_per_pair=3 * 32 * 32 * 4 + 16 * 8, step_transient_bytes=2 * largest,
                             grad_transient_bytes=table, grads_persistent=True,  # run_rank_step keeps them
                             **_chunk_cost(costs, ch))
        pred = est.phase_bytes()
        rows.append({"what": "step", "loss_impl": impl, "chunk": ch, "global_batch": batch, "world_size": world,
                     "phases": {p: {"measured": measured[p], "predicted": pred[p], "ratio": measured[p] / pred[p]}
                                for p in measured}})
        del opt
    rows += validate_loss_phase(quick)
    rows.append(validate_simulated_rank())
    return {"params": params, "tower_costs": costs, "optimizer_temporaries": 2 * largest, "cases": rows}


def validate_simulated_rank() -> dict[str, Any]:
    """``vlscale memory measure --simulate-world-size 4`` on a tiny recipe in bf16 (16-bit weights,
    ShardedAdam), measured with exact tensor bytes, against its prediction (phase totals)."""
    from vlscale.config import load_recipe
    from vlscale.memory import measure, plan

    cfg = load_recipe("tiny-cpu", ["train.precision=bf16", "train.global_batch_size=128", "gradcache.chunk_size=16",
                                   "loss.impl=chunked"])
    world = 4
    result = measure.measure_simulated(cfg, world_size=world, device=torch.device("cpu"), backend="tensors",
                                       cost_sizes=(8, 24))
    inputs = plan.plan_inputs(cfg, world_size=world, gpu_memory=32 * GIB)
    est = plan.predict(measure.simulated_plan_inputs(inputs, result), "fused_gradcache", 128)
    pred = est.phase_bytes()
    slack = est.components["allocator slack"]  # a GPU allocator's; exact tensor bytes have none
    return {"what": "simulated rank, bf16", "loss_impl": "chunked", "chunk": 16, "global_batch": 128,
            "world_size": world, "phases": {p: {"measured": m["peak_bytes"], "predicted": pred[p] - slack,
                                                "ratio": m["peak_bytes"] / (pred[p] - slack)}
                                            for p, m in result["measured"]["phases"].items()}}


def allocated_peak(fn: Any) -> int:
    """Peak bytes allocated by ``fn()`` above what was live before, from torch's profiler memory events
    (the ``tensors`` backend's dispatch mode cannot run inside torch.compile'd code)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def validate_loss_phase(quick: bool) -> list[dict[str, Any]]:
    """The loss phase alone at batches where its O(B·D) and O(B_local·B) terms dominate: exact
    tensor bytes for the eager backends, the profiler's allocation events for the compiled one."""
    from vlscale.memory.workload import contrastive_step_loss

    world, dim = 4, 64
    sizes = [(impl, b) for impl in ("chunked", "compiled", "naive") for b in (2048, 8192)]

    def step(impl: str, batch: int) -> None:
        img, txt = (torch.nn.functional.normalize(torch.randn(batch // world, dim), dim=-1).requires_grad_()
                    for _ in range(2))
        scale = torch.full((1,), 20.0, requires_grad=True)
        contrastive_step_loss(img, txt, scale, global_batch=batch, impl=impl).backward()

    out = []
    for impl, batch in [("chunked", 2048), ("naive", 2048)] if quick else sizes:
        if impl == "compiled":
            step(impl, 2 * world)  # compile outside the measurement (dynamic shapes: no recompilation)
            meas, method = allocated_peak(lambda: step(impl, batch)), "profiler"  # noqa: B023
        else:
            tracker = MemoryTracker("cpu", backend="tensors")
            with tracker.tracking(), tracker.phase("loss"):
                step(impl, batch)
            meas, method = tracker.records[0].peak_bytes, "tensors"
        est = predict_memory(params=1, world_size=world, zero_stage=0, precision="fp32", global_batch=batch,
                             chunk=batch // world, embed_dim=dim, act_bytes_per_pair=0.0, loss_impl=impl)
        pred = est.phase_bytes()["loss"] - est.components["parameters"] - est.components["optimizer states"]
        out.append({"what": f"loss phase ({method})", "loss_impl": impl, "chunk": "-", "global_batch": batch,
                    "world_size": world, "phases": {"loss": {"measured": meas, "predicted": pred,
                                                             "ratio": meas / pred}}})
    return out


def _md_validation(v: dict[str, Any]) -> list[str]:
    if "params" not in v:
        return ["Quick run: loss phase only.", *_md_cases(v["cases"])]
    lines = [f"Tiny dual encoder ({v['params']:,} params: ViT-tiny/8 depth 2 at 32 px + BERT-tiny, "
             "fp32, torch Adam, stage 0; chunk 32). Backend `tensors` (exact live tensor bytes). "
             "Tower costs (fitted fwd+bwd peak = fixed + rows · per row):", ""]
    for t, c in v["tower_costs"].items():
        lines.append(f"- {t}: fitted {c['per_row'] / 1024:.1f} KiB per row + {c['fixed'] / MIB:.2f} MiB fixed; "
                     f"no-grad forward peak {c['nograd_per_row'] / 1024:.1f} KiB per row; "
                     f"saved for backward {c['saved_per_row'] / 1024:.1f} KiB per row")
    return lines + _md_cases(v["cases"])


def _md_cases(cases: list[dict[str, Any]]) -> list[str]:
    lines = ["", "| run | loss | chunk | B (W=4) | phase | measured MiB | predicted MiB | measured / predicted |",
              "|---|---|---|---:|---|---:|---:|---:|"]
    for c in cases:
        for p, x in c["phases"].items():
            lines.append(f"| {c['what']} | {c['loss_impl']} | {c['chunk'] or 'none'} | {c['global_batch']} | {p} | "
                         f"{x['measured'] / MIB:.2f} | {x['predicted'] / MIB:.2f} | {x['ratio']:.3f} |")
    return lines


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """Predictions + CPU validation, as one harness record (rows: every validated phase)."""
    quick = args.quick
    if quick:  # parameters given, no meta model: the quick run only exercises the report
        params, saved = BIG_PARAMS, {t: {"saved_per_row": float("nan")} for t in ("image", "text")}
    else:
        model = meta_dual_encoder(**BIG)
        params = count_params(model)
        make = pair_inputs(context_length=BIG["context_length"])
        saved = tower_costs(model, make, dtype=torch.float16, sizes=(0, 0), measure=False)
    rec = harness.Recorder("memory_model", args, torch.device("cpu"), stem="memory_model_cpu")
    validation = validate_cpu(quick)
    for case in validation["cases"]:
        for phase, x in case["phases"].items():
            rec.add({k: case[k] for k in ("what", "loss_impl", "chunk", "global_batch", "world_size")}
                    | {"phase": phase, **x})
    rec.summary.update(params_vit_b16_bert_base=params, saved_per_row_fp16_meta=saved,
                       anchor_act_bytes_per_pair=ANCHOR_ACT, recipes=predict_recipes(params), validation=validation)
    rec.write(_markdown)
    return rec.summary


def _markdown(rec: dict[str, Any]) -> str:
    s = rec["summary"]
    params, saved = s["params_vit_b16_bert_base"], s["saved_per_row_fp16_meta"]
    md = harness.md_header(rec, "Memory model (CPU run)")
    md += [f"ViT-B/16 + BERT-base dual encoder (meta device): **{params:,} parameters**. Activations: "
           f"{ANCHOR_ACT / MIB:.0f} MiB/pair (measured, ANCHORS.md); autograd saves "
           f"{saved['image']['saved_per_row'] / MIB:.1f} MiB/image + {saved['text']['saved_per_row'] / MIB:.1f} "
           "MiB/text in fp16 (meta count, fused attention; a lower bound without backward transients).", "",
           "## Predicted per-rank memory, 8 × V100-32GB, fp16", ""]
    for r in s["recipes"]:
        md += [r["table"], "", f"fits 32 GiB: **{r['fits_32GiB']}**; largest global batch under 30 GiB: "
               f"**{r['max_global_batch_30GiB']:,}**", ""]
    md += ["## Validation on CPU (measured vs predicted peak per phase)", "", *_md_validation(s["validation"])]
    return "\n".join(md) + "\n"


def run_gpu(out: Path, global_batch: int) -> int:
    """One rank of 8 under a 32 GiB cap through ``vlscale memory measure``; skipped without CUDA."""
    if not torch.cuda.is_available():
        print("gpu mode: skipped (no CUDA device)")
        return 0
    from vlscale.memory.cli import main as memory_cli

    return memory_cli(["measure", "--recipe", "zerovl-v100", f"train.global_batch_size={global_batch}",
                       "--simulate-world-size", "8", "--memory-cap", "32GiB", "--out", str(out / "memory_gpu")])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("cpu", "gpu", "all"), default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="fewer CPU validation cases (for tests)")
    ap.add_argument("--global-batch", type=int, default=2**20, help="gpu mode: global batch")
    args = ap.parse_args(argv)
    code = 0
    if args.mode in ("cpu", "all"):
        run_cpu(args)
    if args.mode in ("gpu", "all"):
        code = run_gpu(args.out, args.global_batch)
    return code


if __name__ == "__main__":
    sys.exit(main())
