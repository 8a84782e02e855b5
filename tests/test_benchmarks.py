"""The shared benchmark harness, the loss benchmark's providers (the backend registry, a stand-in
Inf-CL with its real per-row return convention), thresholds that fail a run, and gpu_check.sh's dry run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def load(name: str) -> types.ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = load("harness")


def stand_in_inf_cl(scale_error: float = 1.0) -> types.ModuleType:
    """``inf_cl.cal_flash_loss(q, k, labels, scale)`` as Inf-CL returns it: a per-row loss VECTOR
    (lse over the keys minus the positive's logit), here in plain torch; ``scale_error`` ≠ 1 makes
    a deliberately wrong provider."""
    module = types.ModuleType("inf_cl")
    module.__version__ = "stand-in"

    def cal_flash_loss(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits = (scale * scale_error) * q.float() @ k.float().T
        return torch.logsumexp(logits, dim=1) - logits[torch.arange(q.shape[0]), labels]

    module.cal_flash_loss = cal_flash_loss
    return module


def test_time_fn_quantiles_and_reps() -> None:
    timing = harness.time_fn(lambda: time.sleep(0.004), "cpu", reps=4, min_time_s=0.03)
    assert timing["reps"] >= 4 and timing["timer"] == "wall clock"
    assert timing["min_ms"] <= timing["q20_ms"] <= timing["median_ms"] <= timing["q80_ms"] <= timing["max_ms"]
    assert timing["median_ms"] >= 4.0


def test_time_interleaved_rounds_and_a_crashing_callable() -> None:
    calls = {"ok": 0, "bad": 0}

    def ok() -> None:
        calls["ok"] += 1
        time.sleep(0.002)

    def bad() -> None:
        calls["bad"] += 1
        if calls["bad"] > 2:
            raise RuntimeError("broke in round 2")

    got = harness.time_interleaved({"ok": ok, "bad": bad}, reps=4)
    assert got["ok"]["reps"] == 4 and calls["ok"] == 5  # one warm-up call + one per round
    assert isinstance(got["bad"], RuntimeError) and calls["bad"] == 3


def test_recorder_appends_one_schema_and_plots(tmp_path: Path) -> None:
    args = argparse.Namespace(out=tmp_path, smoke=False, sizes="1,2")
    for run in range(2):
        rec = harness.Recorder("toy", args, torch.device("cpu"))
        for b in (64, 128, 256):
            rec.add({"provider": "p", "B": b, "ms": b / 10 + run, "peak_extra_mib": b / 100})
        rec.check("p", {"loss": 1e-3}, {"loss": 1e-2})
        path = rec.write(plots=[dict(name="time", x="B", y="ms")])
    lines = (tmp_path / "toy.jsonl").read_text().splitlines()
    assert len(lines) == 2  # appended, never overwritten
    for line in lines:
        record = json.loads(line)
        for key in ("schema", "bench", "device", "device_name", "versions", "date", "command", "config", "host",
                    "load_avg_start", "load_avg_end", "rows", "summary", "failures"):
            assert key in record, key
        assert record["schema"] == harness.SCHEMA and record["versions"]["torch"] == torch.__version__
    assert json.loads(path.read_text())["complete"] is True and rec.exit_code == 0
    with Image.open(tmp_path / "toy_time.png") as img:
        assert img.width > 200 and len(img.convert("RGB").getcolors(1 << 20)) > 20
    assert "Load average" in (tmp_path / "toy.md").read_text()


def test_fresh_process_memory_sees_the_naive_logits() -> None:
    """RSS growth of one naive fwd+bwd in a new interpreter: at least the B×B fp32 logits twice."""
    bench = str(BENCH / "bench_contrastive_loss.py")
    b = 2048
    got = harness.peak_extra_fresh_process(bench, {"provider": "naive", "B": b, "D": 16, "dtype": "fp32",
                                                   "mode": "full", "device": "cpu"})
    assert got.get("peak_extra_bytes", 0) >= 2 * b * b * 4, got


def test_loss_providers_enumerate_the_backend_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlscale.loss import backends

    bench = load("bench_contrastive_loss")
    assert set(bench.registered_backends()) == set(backends.IMPLS) - {"auto"}
    providers = bench.all_providers()
    assert providers[0] == "naive" and providers[-1] == "infcl" and {"chunked", "triton", "reference"} <= set(providers)
    monkeypatch.setattr(backends, "registered_backends", lambda: ["auto", "chunked", "chunked-compiled"], raising=False)
    assert bench.registered_backends() == ["chunked", "chunked-compiled"]  # a registry function wins


def test_infcl_per_row_vectors_are_averaged_per_direction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "inf_cl", stand_in_inf_cl())
    bench = load("bench_contrastive_loss")
    path = bench.main(["--device", "cpu", "--dtype", "fp32", "--sizes", "24", "--dims", "256", "--reps", "1",
                       "--memory", "off", "--providers", "naive,chunked,infcl", "--modes", "fwd,full",
                       "--out", str(tmp_path)])
    record = json.loads(path.read_text())
    rows = {(r["provider"], r["mode"]): r for r in record["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), record["rows"]
    assert rows[("infcl", "full")]["check"] == "pass" and not record["failures"]
    assert record["versions"]["inf_cl"] == "stand-in"


def test_a_wrong_provider_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "inf_cl", stand_in_inf_cl(scale_error=1.01))
    bench = load("bench_contrastive_loss")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--dtype", "fp32", "--sizes", "24", "--dims", "256", "--reps", "1",
                    "--memory", "off", "--providers", "naive,infcl", "--out", str(tmp_path)])
    assert exc.value.code == 1
    record = json.loads((tmp_path / "contrastive_loss_cpu.json").read_text())
    assert record["failures"] and all("infcl" in f for f in record["failures"])
    row = next(r for r in record["rows"] if r["provider"] == "infcl")
    assert row["check"] == "FAIL" and "FAILED thresholds" in (tmp_path / "contrastive_loss_cpu.md").read_text()


def test_loss_bench_excludes_providers_and_warms_the_compiled_one() -> None:
    bench = load("bench_contrastive_loss")
    args = bench.parse_args(["--providers", "all", "--exclude", "compiled,reference", "--warm-compile", "bf16,fp32"])
    assert harness.parse_list(args.exclude) == ["compiled", "reference"]
    assert harness.parse_list(args.warm_compile) == ["bf16", "fp32"]


def test_data_io_runs_on_the_harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data-at-scale benchmark on the shared harness: one schema, a row per measurement, a missing
    peer skipped with a note, and a reader that loses samples FAILS the run."""
    bench = load("bench_data_io")
    for key in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.setenv(key, "restored-after-the-test")  # start_s3 points them at its endpoint
    monkeypatch.setitem(sys.modules, "streaming", None)  # mosaicml-streaming "not installed"
    real = bench.read_vlscale
    monkeypatch.setattr(bench, "read_vlscale", lambda loc: real(loc) - loc.startswith("s3://"))  # loses one
    threads = torch.get_num_threads()
    try:
        code = bench.main(["--smoke", "--out", str(tmp_path), "--providers",
                           "build_w1,build_w2,vlscale_disk,vlscale_s3,mds_s3,pipeline_s3,startup_s3,startup_s3_manifest"])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "data_io_smoke.json").read_text())
    assert code == 1 and record["schema"] == harness.SCHEMA and record["load_avg_start"] is not None
    assert record["failures"] == ["vlscale_s3 (24 images): 23 samples, expected 24"]
    rows = {r["provider"]: r for r in record["rows"]}
    assert rows["mds_s3"]["status"] == "skipped" and "streaming" in rows["mds_s3"]["note"]
    for name in ("build_w1", "build_w2", "vlscale_disk", "pipeline_s3"):
        assert rows[name]["status"] == "ok" and rows[name]["samples"] == 24 and rows[name]["samples_per_cpu_s"] > 0
    assert rows["startup_s3_manifest"]["shards"] == 12 and rows["startup_s3_manifest"]["seconds"] > 0
    assert record["summary"]["build_w1_w2_identical"] == {"24": True}
    md = (tmp_path / "data_io_smoke.md").read_text()
    assert f"shared {os.cpu_count()}-core CPU" in md and "| S3, manifest |" in md and "FAILED" in md
    assert (tmp_path / "data_io_smoke_cpu.png").stat().st_size > 1000


@pytest.mark.slow  # six Python processes, torch.compile, the Triton interpreter, a simulated rank: ~40-80 s
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--archive", str(tmp_path / "gc.tar.gz"),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    assert [s["step"] for s in summary["steps"]] == ["env", "compile", "kernels", "loss", "gradcache", "memory"]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    # The compiled loss backend is compiled once, in its own step, and timed.
    assert summary["compile"]["fp32"]["status"] == "ok" and summary["compile"]["fp32"]["compile_s"] >= 0
    assert summary["kernels"]["fp32"]["cases"] >= 6 and not summary["kernels"]["fp32"]["failed"]
    infcl = [r for r in summary["loss"]["rows"] if r["provider"] == "infcl"]
    assert infcl and all(r["status"] == "skipped" for r in infcl)  # not installed here: skipped with a note
    assert summary["memory"]["fits_cap"] and "DRY RUN" in (out / "gpu_check.md").read_text()
    assert (tmp_path / "gc.tar.gz").stat().st_size > 1000
