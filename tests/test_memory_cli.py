"""``vlscale memory plan | measure | report``: the planner against hand-computed cases, the report files
(JSON schema, markdown, PNGs opened), impossible configs, the simulated-ranks workload on CPU, and the
per-phase record a real training run writes into memory.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlscale.cli import SUBCOMMANDS
from vlscale.config import load_recipe
from vlscale.memory import GIB, MIB, model_state_bytes
from vlscale.memory import plan as planner
from vlscale.memory.cli import main as memory_main

TINY_MODEL = [
    'model.vision_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}',
    'model.text_config={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}',
    "model.embed_dim=16",
]


def assert_png(path: Path) -> None:
    """A real, non-blank plot: it opens, has a plot's size and many distinct colours."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 300 and img.height >= 200, (path, img.size)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50, (path, "looks blank")


def read_report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "vlscale.memory.report/1"
    for key in ("kind", "inputs", "verdict", "strategies", "components", "phases", "peak_bytes", "plots", "versions"):
        assert key in report, key
    assert set(report["strategies"]) == {"naive", "fused", "fused_gradcache"}
    for s in report["strategies"].values():
        assert isinstance(s["largest_global_batch"], int) and s["largest_global_batch"] >= 0
    assert all({"name", "bytes", "phases"} <= set(c) for c in report["components"])
    assert sorted(report["plots"]) == ["breakdown.png", "peak_vs_batch.png"]
    for plot in report["plots"]:
        assert_png(out / plot)
    md = (out / "report.md").read_text()
    assert report["verdict"] in md and "| strategy |" in md and "| component |" in md
    return report


# -- the planner -----------------------------------------------------------------------------------
def test_parse_bytes_units_and_errors() -> None:
    assert planner.parse_bytes("32GiB") == 32 * 2**30 == planner.parse_bytes("32G")
    assert planner.parse_bytes("80GB") == 80e9 and planner.parse_bytes("40960MiB") == 40 * 2**30
    for bad in ("32 parsecs", "", "-1GiB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            planner.parse_bytes(bad)


def test_plan_inputs_by_hand_zerovl() -> None:
    """ZeRO-2 fp16 on 8 V100s with a given activation cost: every input and the peak, by hand."""
    cfg = load_recipe("zerovl-v100", ["train.global_batch_size=1048576"])
    inp = planner.plan_inputs(cfg, world_size=8, gpu_memory=32 * GIB, act_mib_per_pair=83.0, allocator_slack=0.0,
                              device_kind="v100")
    psi = inp.params
    assert inp.zero_stage == 2 and inp.states_precision == "fp16" and inp.chunk == 256 and inp.gradient_cache
    assert inp.act_bytes_per_pair == 83 * MIB and inp.chunk_act_bytes_per_row < inp.act_bytes_per_pair
    # DeepSpeed's reduce bucket, fp16, no overlap: the trainer caps the 5e8-element default at Ψ
    assert inp.engine_buffer_bytes == min(5e8, psi) * 2 == psi * 2
    # fp32 pixels + int64 tokens and attention mask at the recipe's context length (ZeroVL: 25)
    assert cfg.model.context_length == 25
    assert inp.input_bytes_per_pair == 3 * 224 * 224 * 4 + 2 * 25 * 8
    # loss.impl=auto on a V100 (sm_70, no Triton tensor cores): the compiled chunked tile.
    assert cfg.loss.impl == "auto" and inp.fused_impl == "compiled" and inp.device_kind == "v100"
    # BERT-base's word embedding, 30,522 × 768, gets a dense fp16 gradient copied into the bucket.
    assert inp.grad_transient_bytes == 2 * 30522 * 768 and inp.grads_copied and not inp.grads_persistent
    est = planner.predict(inp, "fused_gradcache", 2**20)
    b_local, d = 2**20 // 8, 512
    c = est.components
    assert (c["parameters"], c["gradients"], c["optimizer states"]) == pytest.approx((2 * psi, 2 * psi / 8,
                                                                                       12 * psi / 8))
    assert c["gathered columns"] == 2**20 * d * 4
    # One 2,048 × 8,192 tile in a loop of many: its fp32 S, its fp32 P and the previous P.
    assert c["loss workspace"] == (4 + 4 + 4) * 2048 * 8192
    assert c["embedding-gradient transient"] == 0  # the chunk's 20 GiB of activations are freed first
    # Coalesced ZeRO-2 reduction: every rank holds its whole fp16 gradients (2Ψ) through the chunk
    # backwards; the bucket (2Ψ) is filled after the chunk's activations are freed, so the phase holds
    # the larger of the two.
    assert inp.grads_unreduced
    assert c["unreduced gradients beyond the partition"] == pytest.approx(2 * psi * (1 - 1 / 8))
    backward = 256 * inp.input_bytes_per_pair + 256 * inp.chunk_act_bytes_per_row
    assert backward > 2 * psi and c["reduce bucket beyond the backward"] == 0
    reforward = psi * (2 + 12 / 8) + psi * 2 + max(backward, 2 * psi) + 2 * b_local * d * 4
    assert est.peak_phase == "reforward" and est.total == pytest.approx(reforward)
    # The gradients exist from the backward to the step only: not in pass 1 nor the loss.
    assert "gradients" not in est.phases["embed"] + est.phases["loss"]
    h100 = planner.plan_inputs(cfg, world_size=8, gpu_memory=32 * GIB, act_mib_per_pair=83.0, device_kind="h100")
    assert h100.fused_impl == "triton" and h100.gpu_sms == 132
    with pytest.raises(ValueError, match="compute capability"):
        planner.plan_inputs(cfg, world_size=8, gpu_memory=32 * GIB, fused_impl="triton", device_kind="v100")


def test_plan_fsdp_and_local_engines() -> None:
    fsdp = planner.plan_inputs(load_recipe("fsdp2"), world_size=8, gpu_memory=80 * GIB)
    assert fsdp.zero_stage == 3 and fsdp.states_precision == "fp32" and fsdp.zero3_live_params > 0
    est = planner.predict(fsdp, "fused_gradcache", 32768)
    c = est.components
    assert c["parameters"] + c["gradients"] + c["optimizer states"] == pytest.approx(
        model_state_bytes(fsdp.params, 8, 3, "fp32"))
    # torch's single-tensor AdamW on the shards: sqrt(v) and its quotient of the largest shard
    # (BERT-base's word embedding, 30,522 × 768, over 8 ranks).
    assert fsdp.step_transient_bytes == 2 * 4 * -(-30522 * 768 // 8)
    local = planner.plan_inputs(load_recipe("tiny-cpu", ["engine.kind=local", "engine.zero_stage=0"]),
                                world_size=2, gpu_memory=8 * GIB)
    assert local.zero_stage == 0 and local.engine_buffer_bytes == 0
    # The same on whole fp32 parameters: the largest is tiny-cpu's word embedding (30,522 × 128).
    assert local.step_transient_bytes == 2 * 4 * 30522 * 128 and local.grad_transient_bytes == 4 * 30522 * 128
    assert not local.grads_copied and not local.grads_persistent
    # DeepSpeed (tiny-cpu: ZeRO-2, fp32, 2 ranks) steps each AdamW group as one flat fp32 partition:
    # sqrt(v) and its quotient of the larger group's half — the no-decay group holding the 30,522 × 128
    # word embedding, position and type embeddings, norms and biases: 3,985,025 elements.
    ds = planner.plan_inputs(load_recipe("tiny-cpu"), world_size=2, gpu_memory=8 * GIB)
    assert ds.step_transient_bytes == 8 * -(-3_985_025 // 2) and ds.grads_copied


def test_plan_reads_deepspeed_offload(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                                    "reduce_bucket_size": 1e7}}))
    inp = planner.plan_inputs(load_recipe("zerovl-v100", [f"engine.ds_config={ds}"]), world_size=8,
                              gpu_memory=32 * GIB)
    assert inp.offload == "optimizer" and inp.engine_buffer_bytes == 1e7 * 2
    est = planner.predict(inp, "fused_gradcache", 16384)
    # ZeRO-2 fp16 with the fp32 master and Adam moments on the host: 2Ψ + 2Ψ/W on the device.
    c = est.components
    assert (c["parameters"], c["gradients"], c["optimizer states"]) == pytest.approx((2 * inp.params,
                                                                                       2 * inp.params / 8, 0))
    assert c["optimizer step transient"] == 0


@pytest.mark.parametrize(("recipe", "world", "gpu"), [("zerovl-v100", 8, 32), ("fsdp2", 8, 80), ("tiny-cpu", 2, 8)])
def test_strategies_are_monotone(recipe: str, world: int, gpu: int) -> None:
    result = planner.plan(planner.plan_inputs(load_recipe(recipe), world_size=world, gpu_memory=gpu * GIB))
    s = result["strategies"]
    largest = [s[n]["largest_global_batch"] for n in ("naive", "fused", "fused_gradcache")]
    assert largest == sorted(largest) and largest[-1] > largest[0], largest
    for name, peaks in result["sweep"]["peak_bytes"].items():
        assert peaks == sorted(peaks), name  # memory grows with the batch
    usable = result["inputs"]["usable"]
    for name, st in s.items():  # the largest batch fits, the next multiple of W does not
        b = st["largest_global_batch"]
        if b:
            assert planner.predict(planner.PlanInputs(**{k: v for k, v in result["inputs"].items() if k != "usable"}),
                                   name, b).total <= usable
            assert planner.predict(planner.PlanInputs(**{k: v for k, v in result["inputs"].items() if k != "usable"}),
                                   name, b + world).total > usable


# -- the commands ----------------------------------------------------------------------------------
def test_memory_is_a_vlscale_command() -> None:
    assert SUBCOMMANDS["memory"][0] == "vlscale.memory.cli"


def test_plan_cli_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plan"
    assert memory_main(["plan", "--recipe", "zerovl-v100", "train.global_batch_size=1048576", "--world-size", "8",
                        "--gpu-memory", "32GiB", "--act-mib-per-pair", "83", "--out", str(out)]) == 0
    report = read_report(out)
    assert report["kind"] == "plan" and report["verdict"].startswith("FITS")
    assert report["inputs"]["world_size"] == 8 and report["inputs"]["gpu_memory"] == 32 * GIB
    assert report["strategies"]["naive"]["largest_global_batch"] < 2**20 <= \
        report["strategies"]["fused_gradcache"]["largest_global_batch"]
    assert "FITS" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "match"), [
    (["--world-size", "3"], "global_batch_size=128 must equal"),
    (["--world-size", "2", "--gpu-memory", "512MiB", "--context-reserve", "1GiB"], "leaves nothing"),
    (["--world-size", "0"], "positive integer"),
    (["--world-size", "2", "train.lr=-1"], "train.lr"),
])
def test_impossible_configs_get_one_error(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                          match: str) -> None:
    argv = ["plan", "--recipe", "tiny-cpu", "--out", str(tmp_path), *args]
    if "--gpu-memory" not in args:
        argv += ["--gpu-memory", "8GiB"]
    assert memory_main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert not (tmp_path / "report.json").exists()


def test_measure_simulated_ranks_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One rank of 4 with the other ranks' embeddings simulated: columns are the GLOBAL batch, the
    local rows B/W, and every phase's measured growth (exact tensor bytes) matches the prediction."""
    from vlscale.memory import workload

    shapes = []
    real = workload._simulated_columns

    def spy(local: torch.Tensor, total: int) -> torch.Tensor:
        out = real(local, total)
        shapes.append((tuple(local.shape), tuple(out.shape)))
        return out

    monkeypatch.setattr(workload, "_simulated_columns", spy)
    out = tmp_path / "sim"
    assert memory_main(["measure", "--recipe", "tiny-cpu", *TINY_MODEL, "train.global_batch_size=256",
                        "gradcache.chunk_size=16", "--simulate-world-size", "4", "--memory-cap", "2GiB",
                        "--backend", "tensors", "--out", str(out)]) == 0
    assert (64, 16) in [s[0] for s in shapes] and (256, 16) in [s[1] for s in shapes]  # the measured step
    report = read_report(out)
    sim = report["simulation"]
    assert sim["local_rows"] == 64 and sim["world_size"] == 4 and sim["cap_enforced"] is False and sim["fits_cap"]
    for phase in ("embed", "loss", "reforward"):
        ratio = report["comparison"][phase]["growth_ratio"]
        assert 0.8 < ratio < 1.25, (phase, report["comparison"][phase])
    assert "not enforced (CUDA only)" in (out / "report.md").read_text()
    assert "recipe_plan" in report and "strategies" in report["recipe_plan"]


def test_measure_real_steps_and_report_of_a_run(tmp_path: Path) -> None:
    """A few real trainer steps: the trainer records each phase into memory.json, measure reads it
    back; ``vlscale memory report`` does the same for the finished run."""
    out = tmp_path / "measured"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert memory_main(["measure", "--recipe", "tiny-cpu", *TINY_MODEL, "engine.kind=local", "engine.zero_stage=0",
                            "train.global_batch_size=32", "gradcache.chunk_size=8", "data.num_workers=0",
                            "--steps", "3", "--backend", "tensors", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    memory = json.loads((out / "run" / "memory.json").read_text())
    phases = memory["ranks"][0]["phases"]
    assert phases["steps"] == [2, 3] and phases["backend"] == "tensors"
    assert set(phases["phases"]) == {"embed", "loss", "reforward", "step"}
    assert not (out / "run" / "checkpoints").exists()
    report = read_report(out)
    assert report["kind"] == "measure" and report["measured"]["backend"] == "tensors"
    reforward = report["comparison"]["reforward"]
    assert reforward["measured_growth_bytes"] > 0 and 0.3 < reforward["growth_ratio"] < 3, reforward
    # pass 3 begins where its first chunk's inputs are made (the feed): they are not the loss's
    # (measured 3.3× the prediction when the phase switched at the first forward instead)
    loss = report["comparison"]["loss"]
    assert 0.5 < loss["growth_ratio"] < 1.5, loss
    assert memory_main(["report", str(out / "run")]) == 0
    again = read_report(out / "run" / "memory")
    assert again["kind"] == "run" and again["comparison"]["reforward"] == reforward
