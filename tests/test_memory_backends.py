"""The memory model's loss backends and techniques: which backend a plan assumes on a device kind (the
same choice as ``impl="auto"`` at run time), each backend's working buffers by hand and against what
the kernels allocate (Triton in its CPU interpreter), and the techniques' components (momentum
contrast, hierarchical levels, masked image modeling) by hand and from the recipes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlscale.config import load_recipe
from vlscale.memory import GIB, MemoryTracker, predict_memory
from vlscale.memory import lossmem as L
from vlscale.memory import plan as planner
from vlscale.memory.cli import main as memory_main
from vlscale.memory.techmem import TechniqueMemory

MIB = 2**20


# -- which backend ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "impl", "want"), [
    ("v100", "auto", "compiled"), ("t4", "auto", "compiled"), ("sm_75", "auto", "compiled"),
    ("a100", "auto", "triton"), ("h200", "auto", "triton"), ("sm_86:84", "auto", "triton"),
    ("cpu", "auto", "chunked"), ("v100", "chunked", "chunked"), ("h100", "triton-banded", "triton-banded"),
])
def test_resolve_impl_by_device_kind(kind: str, impl: str, want: str) -> None:
    assert L.resolve_impl(impl, L.device_kind(kind))[0] == want


@pytest.mark.parametrize(("kind", "impl", "match"), [
    ("v100", "triton", "compute capability"), ("cpu", "triton-fused", "compute capability"),
    ("h100", "reference", "naive"), ("h100", "flash", "fused loss"),
])
def test_resolve_impl_refuses_what_cannot_run(kind: str, impl: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        L.resolve_impl(impl, L.device_kind(kind))


def test_unknown_device_kind_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"v100.*sm_XY"):
        L.device_kind("k80")
    assert L.device_kind("sm_90:114") == L.DeviceKind("sm_90:114", (9, 0), 114)


@pytest.mark.parametrize(("capability", "compiles", "kind"), [((7, 0), True, "v100"), ((9, 0), True, "h100"),
                                                               ((7, 0), False, "v100")])
def test_plan_follows_the_run_time_choice(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                          compiles: bool, kind: str) -> None:
    """The planner's mirror of ``explain_auto`` picks what the loss registry picks on such a GPU."""
    import vlscale.kernels.contrastive  # noqa: F401 — triton's interpreter switch is read at first import

    from vlscale.loss import backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # explain_auto reads it at call time
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(backends, "_compiled_unavailable", lambda device: None if compiles else "no compiler")
    at_run_time, _ = backends.explain_auto(torch.device("cuda", 0))
    planned, why = L.resolve_impl("auto", L.device_kind(kind))
    # A compiler failure is the one thing a plan cannot foresee: it says so and plans the compiled tile.
    assert planned == (at_run_time if compiles else "compiled") and ("eager chunked" in why or compiles)


# -- working buffers ---------------------------------------------------------------------------------
def test_workspace_by_hand() -> None:
    # Eager chunked: 5 fp32 tiles of one 512 × 2,048 tile; a loop of 1,024 × 4,096 tiles holds a 6th.
    assert L.workspace("chunked", 512, 2048) == 5 * 4 * 512 * 2048
    assert L.workspace("chunked", 2048, 8192) == 6 * 4 * 1024 * 4096
    # Compiled: the GEMM's fp32 tile + P (+ the previous P in a loop); P in the embeddings' dtype.
    assert L.workspace("compiled", 512, 2048) == (4 + 4) * 512 * 2048
    assert L.workspace("compiled", 2048, 8192) == (4 + 4) * 2048 * 8192
    assert L.workspace("compiled", 4096, 8192, q_bytes=2) == (4 + 2 + 2) * 2048 * 8192
    # Triton, 8,192², 132 SMs: 11 × 12 rectangles of 768 rows × 704 columns; the forward's partial
    # (max, sum) pairs and the merge's two temporaries are 2.2 MiB, below the backward's buffers.
    fwd = 8 * (11 * 8192 + 12 * 8192) + 8 * 12 * 8192
    assert L.workspace("triton-fused", 8192, 8192, sms=132) == fwd == 2_293_760
    assert L.workspace("triton", 8192, 8192, sms=132) == 4096 * 4096 * 4  # one shared P block
    assert L.workspace("triton", 8192, 8192, q_bytes=2) == 4096 * 4096 * 2
    assert L.workspace("triton-banded", 8192, 8192) == 8192 * 8192 * 4  # 2²⁷ elements: every row at once
    assert L.workspace("triton", 1000, 300) == 1024 * 384 * 4  # a block rounded up to 128


def test_triton_workspace_matches_the_interpreter() -> None:
    """Exact tensor bytes of the Triton host code (interpreter settings: 32² tiles, 2 × 2 bands)
    against the model: the workspace, plus the returned dQ / dK and O(m + n) statistics. ("banded"
    frees its first band before the second on a GPU; the interpreter's reference cycles can keep it
    alive, so its band sizes are checked by hand above.)"""
    import gc

    from vlscale.kernels import contrastive as kern

    m, n, d = 136, 200, 24
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(m, d, generator=g), dim=-1)
    k = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    s, rc, cc = torch.tensor(10.0), torch.full((m,), 0.5), torch.full((n,), 0.5)
    shape = L.TritonShape(block_m=32, block_n=32, grad_block=32, bands=(2, 2))
    stats, grads = (L.ROW_STATS * m + L.COL_STATS * n) * 4, (m + n) * d * 4
    tracker = MemoryTracker("cpu", backend="tensors")
    with tracker.tracking():
        with tracker.phase("lse"):
            row, col = kern.lse(q, k, s)
        for impl in ("triton", "triton-fused"):
            cfg = dataclasses.replace(kern.kernel_settings(m, n, d, q.dtype, q.device),
                                      backward="fused" if impl == "triton-fused" else "shared")
            gc.collect()
            with tracker.phase(impl):
                out = kern.grad(q, k, s, row, col, rc, cc, settings=cfg)
                del out
    peaks = {r.name: r.peak_bytes - r.start_bytes for r in tracker.records}
    forward = L.workspace("triton-fused", m, n, triton=shape)  # the fused variant's is its forward's
    assert forward == 8 * (2 * n + 2 * m) + 8 * 2 * n  # 2 × 2 bands; the merge's temporaries
    assert forward <= peaks["lse"] <= forward + stats, (peaks["lse"], forward)
    shared = L.workspace("triton", m, n, triton=shape)
    assert shared == 160 * 224 * 4  # one P block: 136 × 200 rounded up to 32
    assert shared + grads <= peaks["triton"] <= shared + grads + stats, (peaks["triton"], shared)
    assert grads <= peaks["triton-fused"] <= grads + stats, peaks["triton-fused"]


# -- techniques ---------------------------------------------------------------------------------------
def test_technique_components_by_hand() -> None:
    b_glob, w, d, chunk, k = 1024, 4, 64, 32, 5000
    b = b_glob // w
    tech = TechniqueMemory(hier_levels=2, momentum_params=1000, queue_size=k, ema_transient_bytes=4000.0,
                           mim_act_bytes_per_row=100.0)
    est = predict_memory(params=1000, world_size=w, zero_stage=0, precision="fp32", global_batch=b_glob,
                         chunk=chunk, embed_dim=d, act_bytes_per_pair=0.0, loss_impl="triton-fused",
                         nograd_act_bytes_per_row=10.0, techniques=tech)
    c, p = est.components, est.phases
    assert list(p) == ["keys", "embed", "loss", "reforward", "step"]
    assert c["momentum copy"] == 4 * 1000 and c["momentum queues"] == 2 * k * d * 4
    assert c["momentum keys"] == 2 * b * d * 4 and all("momentum keys" in p[x] for x in p)
    assert c["momentum key pass"] == max(4000, b * d * 4 + chunk * 10) and p["keys"][-1] == "momentum key pass"
    assert c["MIM forward"] == chunk * 100 and "MIM forward" in p["reforward"]
    # Each tower's final embedding and 2 levels: 3 embeddings per tower.
    assert c["local embeddings"] == c["embedding grads"] == 2 * 3 * b * d * 4
    # Gathered: the symmetric term's and both levels' text columns, the two directions' momentum keys.
    assert c["gathered columns"] == (1 + 2 + 2) * b_glob * d * 4
    assert c["column grad partials"] == b_glob * d * 4  # one term's backward at a time
    assert c["loss statistics"] == 3 * (3 * b + 4 * b_glob) * 4 + 2 * 3 * b * 4
    # The keys phase grows by what the key pass makes; the momentum state was there before the step.
    carried = est.carried()
    assert {"momentum copy", "momentum queues"} <= carried["keys"] and "momentum keys" not in carried["keys"]
    assert "momentum keys" in carried["embed"] and "gradients" not in carried["reforward"]
    assert "gradients" in carried["step"]


def test_positive_queue_gathers_nothing() -> None:
    tech = TechniqueMemory(contrastive=False, momentum_params=10, queue_size=96, candidates="positive_queue")
    est = predict_memory(params=10, world_size=2, zero_stage=0, precision="fp32", global_batch=64, chunk=8,
                         embed_dim=16, act_bytes_per_pair=0.0, loss_impl="chunked", techniques=tech)
    c = est.components
    assert c["gathered columns"] == 0 and c["column grad partials"] == 0
    # One pass over the 96 queue rows with the 32 local rows, and that pass's own fp32 dQ.
    assert c["loss workspace"] == 32 * 16 * 4 + 5 * 4 * 32 * 96
    with pytest.raises(ValueError, match="no loss term"):
        TechniqueMemory(contrastive=False)


def test_plan_reads_the_techniques_of_the_recipes(tmp_path: Path) -> None:
    from vlscale.memory.towers import count_params, meta_dual_encoder
    from vlscale.techniques import momentum_copy

    vicha = load_recipe("vicha-v100")
    inp = planner.plan_inputs(vicha, world_size=8, gpu_memory=32 * GIB, device_kind="v100")
    t = inp.techniques
    assert (t["contrastive"], t["hier_levels"], t["queue_size"], t["candidates"]) == (False, 5, 65536, "batch_queue")
    model = meta_dual_encoder(**dataclasses.asdict(vicha.model))
    with torch.device("meta"):
        copy = momentum_copy(model)  # what the trainer builds: no MIM decoder, nothing frozen
    assert t["momentum_params"] == count_params(copy, trainable_only=False) < count_params(model)
    largest = max(p.numel() for p in model.parameters() if p.requires_grad)
    assert t["ema_transient_bytes"] == 4 * largest  # DeepSpeed ZeRO-2 builds each fp32 master whole
    assert t["mim_act_bytes_per_row"] > 0
    est = planner.predict(inp, "fused_gradcache", inp.global_batch)
    assert est.components["MIM forward"] == 32 * t["mim_act_bytes_per_row"]
    assert est.components["momentum queues"] == 2 * 65536 * 256 * 4 and "keys" in est.phases
    # The report of such a plan: every component in the stacked plot, the techniques among the inputs.
    assert memory_main(["plan", "--recipe", "vicha-v100", "--world-size", "8", "--gpu-memory", "32GiB", "--gpu",
                        "v100", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"momentum copy", "MIM forward"} <= {c["name"] for c in report["components"]}
    assert (tmp_path / "breakdown.png").stat().st_size > 1000
    assert "momentum contrast (batch_queue, K = 65,536" in (tmp_path / "report.md").read_text()
    plain = planner.plan_inputs(load_recipe("zerovl-v100"), world_size=8, gpu_memory=32 * GIB)
    assert plain.techniques == TechniqueMemory().to_dict()
    assert not {"momentum copy", "MIM forward"} & set(planner.predict(plain, "fused_gradcache", 16384).components)


def test_mim_count_on_meta_equals_cpu() -> None:
    """The MIM forward + loss per image, counted on the meta device, equals the count on a real model."""
    from vlscale.memory.towers import _MimStep, meta_counts, saved_activation_bytes
    from vlscale.model import DualEncoder, ModelConfig

    cfg = ModelConfig(vision_model="vit_tiny_patch16_224", vision_kwargs={"depth": 2, "patch_size": 8},
                      image_size=32, text_model="bert-tiny", embed_dim=16, context_length=8,
                      mim_decoder_depth=1, mim_decoder_width=32, mim_decoder_heads=2)
    counted = meta_counts(cfg, torch.float32, mim_mask_ratio=0.75).mim_per_row
    keep = int(16 * 0.25)  # 16 patches of 8 px, 25% kept

    def make(a: int, b: int, dev: torch.device) -> dict[str, torch.Tensor]:
        return {"mim_pixels": torch.randn(b - a, 3, 32, 32, device=dev),
                "mim_keep": torch.stack([torch.randperm(16)[:keep] for _ in range(b - a)]).to(dev)}

    real = saved_activation_bytes(_MimStep(DualEncoder(cfg), norm_pix=True), make)
    assert counted == pytest.approx(real, rel=0.02) and counted > 0
