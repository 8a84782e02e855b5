"""Tests of vlscale.memory: the predictive model, the trackers, the measured inputs and the workload."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlscale.memory import (
    GIB,
    MIB,
    LiveTensorBytes,
    MemoryTracker,
    deepspeed_bucket_bytes,
    max_global_batch,
    model_state_bytes,
    predict_memory,
)
from vlscale.memory.towers import count_params, measure_activation_cost, saved_activation_bytes
from vlscale.memory.workload import ShardedAdam, run_rank_step

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(params=195_476_737, world_size=8, zero_stage=2, precision="fp16", embed_dim=512,
            act_bytes_per_pair=83 * MIB, loss_impl="triton")


# -- the model -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "expected"), [
    ("fp16", {0: 16_000, 1: 4_000 + 3_000, 2: 2_000 + 3_500, 3: 4_000}),
    ("bf16", {0: 16_000, 1: 7_000, 2: 5_500, 3: 4_000}),
    ("fp32", {0: 16_000, 1: 8_000 + 2_000, 2: 4_000 + 3_000, 3: 4_000}),
])
def test_zero_formulas_by_hand(precision: str, expected: dict[int, int]) -> None:
    for stage, value in expected.items():  # Ψ = 1000 on 4 ranks
        assert model_state_bytes(1000, 4, stage, precision) == pytest.approx(value)
        est = predict_memory(**{**BASE, "params": 1000, "world_size": 4, "zero_stage": stage,
                                "precision": precision, "global_batch": 64, "chunk": 8})
        c = est.components
        assert c["parameters"] + c["gradients"] + c["optimizer states"] == pytest.approx(value)
    # Ψ = 1000, W = 4, fp16 ZeRO-2 by part: 16-bit weights whole, 16-bit gradients and fp32 Adam sharded.
    c = predict_memory(**{**BASE, "params": 1000, "world_size": 4, "zero_stage": 2, "precision": "fp16",
                          "global_batch": 64, "chunk": 8}).components
    assert (c["parameters"], c["gradients"], c["optimizer states"]) == (2000, 500, 3000)


def test_breakdown_by_hand_1m() -> None:
    b, w, d, psi = 2**20, 8, 512, BASE["params"]
    est = predict_memory(**BASE, global_batch=b, chunk=256)
    c = est.components
    assert c["activations"] == 256 * 83 * MIB
    assert c["gathered columns"] == b * d * 4 and c["column grad partials"] == b * d * 4
    assert c["local embeddings"] == 2 * (b // w) * d * 4
    assert c["loss statistics"] == (3 * (b // w) + 4 * b) * 4
    # Triton on an H100 (132 SMs): the forward's 11 × 12 rectangles of partial (max, sum) pairs, 11
    # row bands × B columns + 12 column bands × b rows, and the merge's two temporaries of the larger.
    assert c["loss workspace"] == 8 * (11 * b + 12 * (b // w)) + 8 * 11 * b
    expected = psi * (2 + 14 / w) + 256 * 83 * MIB + 2 * (b // w) * d * 4  # reforward keeps only the embedding grads
    assert est.peak_phase == "reforward" and est.total == pytest.approx(expected)
    assert est.total < 30 * GIB
    naive = predict_memory(**{**BASE, "loss_impl": "naive"}, global_batch=b, chunk=256)
    assert naive.components["loss workspace"] == 4 * (b // w) * b * 4 and not naive.fits(32 * GIB)


def test_more_ranks_less_memory_at_stage3() -> None:
    totals = [predict_memory(**{**BASE, "zero_stage": 3, "world_size": w}, global_batch=4096, chunk=64).total
              for w in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in itertools.pairwise(totals)), totals


def test_cached_grows_only_with_embeddings_uncached_with_activations() -> None:
    b, d = 2**16, BASE["embed_dim"]
    for act in (1 * MIB, 100 * MIB):
        kw = {**BASE, "act_bytes_per_pair": act}
        grow = predict_memory(**kw, global_batch=2 * b, chunk=256).total - predict_memory(
            **kw, global_batch=b, chunk=256).total
        # At most the O(B·D) embeddings/gathered columns and O(B) statistics of the extra B pairs.
        assert 0 < grow <= b * d * 4 * 4 + b * 4 * 8, (act, grow)
        grow_uncached = predict_memory(**kw, global_batch=2 * b, chunk=None).total - predict_memory(
            **kw, global_batch=b, chunk=None).total
        assert grow_uncached >= (b // 8) * act


@pytest.mark.parametrize("kw", [dict(chunk=256), dict(chunk=None), dict(chunk=64, loss_impl="naive"),
                                dict(chunk=128, loss_impl="chunked", zero_stage=3)])
def test_max_global_batch_inverts_predict(kw: dict) -> None:
    args = {**BASE, **kw}
    world = args.pop("world_size")
    cap = 30 * GIB
    best = max_global_batch(cap, world_size=world, **args)
    assert best > 0 and best % world == 0
    assert predict_memory(world_size=world, global_batch=best, **args).total <= cap
    assert predict_memory(world_size=world, global_batch=best + world, **args).total > cap
    assert max_global_batch(1.0, world_size=world, **args) == 0


@pytest.mark.parametrize(("bad", "match"), [
    (dict(zero_stage=4), "zero_stage"), (dict(precision="int8"), "precision"),
    (dict(global_batch=1001), "divisible"), (dict(loss_impl="flash"), "loss_impl"),
    (dict(chunk=0), "chunk"), (dict(act_bytes_per_pair=-1.0), "act_bytes_per_pair"),
    (dict(params=0), "params"),
])
def test_bad_input_names_the_problem(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        predict_memory(**{**BASE, "global_batch": 1024, "chunk": 64, **bad})


@pytest.mark.parametrize(("bucket_elems", "act_per_pair"), [(5e5, 1e6), (1e7, 1e7), (1e7, 1e5)])
def test_coalesced_zero2_reforward_holds_whole_gradients(bucket_elems: float, act_per_pair: float) -> None:
    """Gradient cache under coalesced ZeRO-2: the chunk backwards leave each rank's whole gradients on
    the parameters, one reduction then fills the bucket after the activations are freed. With a
    small user bucket the old sum (gradient partition + bucket + backward) was below the whole
    gradients + backward that the rank really holds; with a bucket ≥ the backward, the bucket replaces
    the activations instead of adding to them (the CPU demo's measured peak: whole gradients + bucket)."""
    psi, world, chunk = 10**7, 8, 16
    args = {**BASE, "params": psi, "world_size": world, "zero_stage": 2, "precision": "fp16", "global_batch": 1024,
            "chunk": chunk, "act_bytes_per_pair": act_per_pair, "engine_buffer_bytes": 2 * bucket_elems}
    old, new = predict_memory(**args), predict_memory(**args, grads_unreduced=True)
    base = sum(old.components[k] for k in ("parameters", "optimizer states", "embedding grads"))
    backward = old.components["inputs"] + old.components["activations"]
    assert new.components["gradients"] == old.components["gradients"] == pytest.approx(2 * psi / world)
    assert new.phase_bytes()["reforward"] == pytest.approx(base + 2 * psi + max(backward, 2 * bucket_elems))
    # old − new = min(backward, bucket) − the unreduced gradients beyond the partition: the old sum
    # under-predicted whenever those gradients exceed the smaller of the two (a small user bucket)
    beyond = 2 * psi * (1 - 1 / world)
    assert old.phase_bytes()["reforward"] - new.phase_bytes()["reforward"] == pytest.approx(
        min(backward, 2 * bucket_elems) - beyond)
    assert (new.phase_bytes()["reforward"] > old.phase_bytes()["reforward"]) == (beyond > min(backward, 2 * bucket_elems))
    # the partition made by the reduction is what the step starts with; nothing changes without the cache
    assert new.carried()["step"] >= {"gradients"}
    no_cache = {**args, "chunk": None}
    assert predict_memory(**no_cache, grads_unreduced=True).phase_bytes() == predict_memory(**no_cache).phase_bytes()


def test_report_renders() -> None:
    est = predict_memory(**BASE, global_batch=2**20, chunk=256,
                         engine_buffer_bytes=deepspeed_bucket_bytes(2, "fp16"))
    table = est.table("1M")
    for text in ("**1M**", "| activations | 20.750 |", "reforward", "peak: **"):
        assert text in table
    assert json.loads(json.dumps(est.to_dict()))["peak_phase"] == "reforward"
    assert deepspeed_bucket_bytes(2, "fp16") == 1e9 and deepspeed_bucket_bytes(1, "fp16", overlap_comm=True) == 4e9


# -- trackers --------------------------------------------------------------------------------------
def test_tracker_rss_records_known_tensor() -> None:
    """A 64 MiB tensor on fresh pages shows as 64 MiB of RSS growth. (The tensor lives in its own
    anonymous mapping: a plain torch allocation may reuse heap pages an earlier test left resident,
    which RSS cannot see — that made this test flaky in a full-suite process.)"""
    import mmap

    tracker = MemoryTracker("cpu", interval=0.001)
    assert tracker.backend == "rss"
    with tracker.phase("alloc"):
        buf = mmap.mmap(-1, 64 * 2**20)
        x = torch.frombuffer(buf, dtype=torch.float32).fill_(1.0)  # 64 MiB, pages touched
        time.sleep(0.02)
    del x
    buf.close()
    with tracker.phase("idle"):
        pass
    rec = {r.name: r for r in tracker.records}
    assert 0.85 * 64 * MIB <= rec["alloc"].delta_bytes <= 1.3 * 64 * MIB, rec["alloc"]
    assert rec["idle"].delta_bytes < 8 * MIB
    assert "| alloc | 1 |" in tracker.report() and tracker.to_dict()["phases"][0]["name"] == "alloc"
    with pytest.raises(RuntimeError, match="nest"), tracker.phase("outer"), tracker.phase("inner"):
        pass
    with tracker.phase("idle"):  # usable again; repeats are aggregated in the report
        pass
    assert "| idle | 2 |" in tracker.report() and len(tracker.to_dict()["phases"]) == 4


def test_tracker_tensors_exact_and_sees_freed_peak() -> None:
    tracker = MemoryTracker("cpu", backend="tensors")
    with tracker.tracking():
        with tracker.phase("a"):
            keep = torch.empty(1000, 1000)  # 4,000,000 bytes
            tmp = torch.empty(500, 1000)  # freed before the phase ends
            view = keep[:10]  # a view: no new storage
            del tmp, view
        with tracker.phase("b"):
            pass
    a, b = tracker.records
    assert (a.start_bytes, a.peak_bytes) == (0, 6_000_000)
    assert (b.start_bytes, b.peak_bytes) == (4_000_000, 4_000_000)
    del keep
    with pytest.raises(ValueError, match="backend"):
        MemoryTracker("cpu", backend="cuda")


def test_live_tensor_bytes_counts_backward() -> None:
    lin = nn.Linear(64, 32)
    x = torch.randn(128, 64, requires_grad=True)
    with LiveTensorBytes() as live:
        torch.relu(lin(x)).sum().backward()
    assert live.current == 128 * 64 * 4 + (64 * 32 + 32) * 4  # x.grad + parameter grads survive
    assert live.peak > live.current


# -- measured inputs -------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.qkv, self.heads = nn.Linear(d, 3 * d), heads

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        n, length, d = pixels.shape
        q, k, v = self.qkv(pixels).view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return {"image": F.scaled_dot_product_attention(q, k, v).sum((1, 2))}


def test_saved_bytes_meta_equals_cpu_with_fused_attention() -> None:
    def make(start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"pixels": torch.randn(stop - start, 17, 32, device=device)}

    cpu = saved_activation_bytes(_Attn(), make, n=3)
    with torch.device("meta"):
        meta_model = _Attn()
    assert saved_activation_bytes(meta_model, make, n=3) == cpu > 0


def test_activation_cost_of_an_mlp() -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))

    def make(start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"input": torch.randn(stop - start, 64, device=device)}

    saved = saved_activation_bytes(model, make, n=4)
    assert saved == (64 + 256) * 4  # the input (first linear) and the ReLU output (shared)
    cost = measure_activation_cost(model, make, sizes=(16, 48))
    assert saved <= cost.per_row <= 3 * saved and cost.nograd_per_row > 0
    assert count_params(model) == 64 * 256 + 256 + 256 * 64 + 64


def test_chunk_cost_is_one_towers() -> None:
    """A chunk runs one tower: its cost is that tower's fixed + rows · per row, never the image
    tower's per-row cost on top of the text tower's dense word-embedding gradient."""
    from vlscale.memory.towers import chunk_cost

    costs = {"image": {"per_row": 300.0, "fixed": 100.0}, "text": {"per_row": 4.0, "fixed": 7800.0}}
    assert chunk_cost(costs, 16) == (4.0, 7800.0)  # 7,864 > 4,900
    assert chunk_cost(costs, 100) == (300.0, 100.0)  # 30,100 > 8,200


def test_meta_param_count_equals_real_dual_encoder() -> None:
    from vlscale.memory.towers import meta_dual_encoder
    from vlscale.model import DualEncoder, ModelConfig

    cfg = dict(vision_model="vit_tiny_patch16_224", vision_kwargs={"depth": 1}, image_size=32,
               text_model="bert-tiny", embed_dim=32, context_length=8)
    meta = meta_dual_encoder(**cfg)
    assert next(meta.parameters()).device.type == "meta"
    assert count_params(meta) == count_params(DualEncoder(ModelConfig(**cfg))) > 0


# -- one rank's workload ----------------------------------------------------------------------------
class _TinyDual(nn.Module):
    """Two towers with dropout-free MLPs returning the DualEncoder's output keys."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.img = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, d))
        self.txt = nn.Sequential(nn.Embedding(50, 24), nn.Flatten(), nn.Linear(24 * 5, d))
        self.t = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, pixels: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> dict:
        out = {"logit_scale": self.t.exp()}
        if pixels is not None:
            out["image"] = F.normalize(self.img(pixels), dim=-1)
        if tokens is not None:
            out["text"] = F.normalize(self.txt(tokens), dim=-1)
        return out


class _Capture:
    """Optimizer stand-in recording the accumulated gradients at ``step``."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.grads = model, {}

    def step(self) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)


def test_gradient_cached_workload_equals_full_batch_step() -> None:
    torch.manual_seed(0)
    model = _TinyDual().double()
    pixels, tokens = torch.randn(22, 12, dtype=torch.float64), torch.randint(0, 50, (22, 5))

    def make(start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"pixels": pixels[start:stop], "tokens": tokens[start:stop]}

    grads, losses = {}, {}
    for chunk in (None, 5):
        opt = _Capture(model)
        tracker = MemoryTracker("cpu", backend="tensors")
        with tracker.tracking():
            losses[chunk] = run_rank_step(model, make, opt, world_size=1, global_batch=22, chunk=chunk,
                                          loss_impl="chunked", tracker=tracker)
        grads[chunk] = opt.grads
        assert [r.name for r in tracker.records] == (["fwd_bwd", "step"] if chunk is None else
                                                     ["embed", "loss", "reforward", "step"])
    assert losses[None] == pytest.approx(losses[5], rel=1e-12)
    for name, g in grads[None].items():
        torch.testing.assert_close(grads[5][name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_workload_simulates_other_ranks_and_sharded_adam() -> None:
    torch.manual_seed(0)
    model = _TinyDual()
    params = list(model.parameters())
    opt = ShardedAdam(params, world_size=4)
    assert opt.master.numel() == -(-count_params(model) // 4)
    before = [p.detach().clone() for p in params]

    def make(start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"pixels": torch.randn(stop - start, 12), "tokens": torch.randint(0, 50, (stop - start, 5))}

    tracker = MemoryTracker("cpu", backend="tensors")
    with tracker.tracking():
        loss = run_rank_step(model, make, opt, world_size=4, global_batch=64, chunk=8, loss_impl="naive",
                             tracker=tracker)
        peak_loss = tracker.peaks()["loss"]
    assert loss > 0
    # Rank 0 of 4 holds 16 rows × 64 columns of logits (naive): at least 4 copies of 16×64 fp32.
    assert peak_loss >= 4 * 16 * 64 * 4
    changed = [not torch.equal(a, p) for a, p in zip(before, params)]
    assert changed[0] and not changed[-1]  # only this rank's first 1/4 of the flat parameters moves
    with pytest.raises(ValueError, match="divisible"):
        run_rank_step(model, make, opt, world_size=3, global_batch=64, chunk=8, loss_impl="naive",
                      tracker=tracker)


# -- the benchmark script ---------------------------------------------------------------------------
def test_memory_report_cpu_mode_runs(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory_report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert memory_report.main(["--mode", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "memory_model_cpu.json").read_text())
    assert record["schema"] == "vlscale.bench/1" and record["rows"] and record["load_avg_start"] is not None
    data = record["summary"]
    target = next(r for r in data["recipes"] if r["name"].startswith("vlscale 1M, ZeRO-2, gradient cache 256, compiled"))
    assert target["fits_32GiB"] and target["estimate"]["total"] <= 30 * GIB
    assert data["params_vit_b16_bert_base"] == memory_report.BIG_PARAMS
    assert all(0.8 < p["ratio"] < 1.25 for c in data["validation"]["cases"] for p in c["phases"].values())
    assert "## Predicted per-rank memory" in (tmp_path / "memory_model_cpu.md").read_text()
    if not torch.cuda.is_available():
        assert memory_report.main(["--mode", "gpu", "--out", str(tmp_path)]) == 0
        assert not (tmp_path / "memory_gpu").exists()
