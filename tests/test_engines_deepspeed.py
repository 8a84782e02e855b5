"""Gradient cache beneath DeepSpeed ZeRO 0–3: cached step == plain big-batch step (fp32, 1e-5 rel).

DeepSpeed start-up costs seconds here, so each test spawns one process group and runs several
cases in it (see :mod:`helpers_gradcache_dist`). Cases are ``["zero", stage, coalesce, model_kw(, gas)]``
(coalesce None = ``coalesce_grad_reduction`` where supported, False = accumulation-boundary
flags), ``["fp16"]`` (overflow skip + loss-scale drop vs a plain DeepSpeed step) and
``["bf16", stage]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")

from helpers_gradcache_dist import deepspeed_worker
from helpers_process import one_process

TOL = 1e-5
CKPT_HIER = {"hier": True, "checkpointing": True}


def _run(world: int, port: int, cases: list[list], tmp_path: Path) -> dict:
    out = tmp_path / "ds.json"
    mp.spawn(deepspeed_worker, args=(world, port, cases, str(out)), nprocs=world, join=True)
    results = json.loads(out.read_text())
    assert "error" not in results, results.get("error")
    return results


def _check_zero(results: dict, key: str, *, coalescing: bool) -> None:
    r = results[key]
    assert r["grad"] < TOL, f"{key}: grad rel err {r['grad']:.2e} at {r['grad_at']}"
    assert r["param"] < TOL, f"{key}: param rel err {r['param']:.2e} at {r['param_at']}"
    assert r["master"] < TOL, f"{key}: master_params rel err {r['master']:.2e}"
    assert r["loss_err"] < 1e-6, f"{key}: loss differs by {r['loss_err']:.2e}"
    assert r["applied"] is True
    assert r["coalescing"] is coalescing, f"{key}: expected coalescing={coalescing}"


def test_cpu_run_does_not_build_deepspeeds_shm_op(port: int, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's CPU comm backend JIT-compiles its shm-comm op (only inference_all_reduce uses it)
    into TORCH_EXTENSIONS_DIR: 30–90 s of C++ on a fresh machine, and a compiler killed for memory
    failed a CI run. Each rank it starts also leaves a 66 MB ``deepspeed_allreduce_buffer_*`` file in
    /dev/shm that nothing removes (312 of them, 20 GB of RAM, had piled up on the dev machine). A
    training step must neither build nor load it."""
    ext = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("VLSCALE_DS_SHM_COMM", raising=False)
    res = one_process("helpers_gradcache_dist", "shm_probe_worker", [], tmp_path / "shm.json", port, timeout=300)
    assert res == {"backend": "TorchBackend", "shm_op": False}
    built = sorted(str(p.relative_to(ext)) for p in ext.rglob("*")) if ext.exists() else []
    assert not [p for p in built if "shm" in p], built
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for f in leaked:
        f.unlink()
    assert not leaked, leaked


@pytest.mark.slow
def test_deepspeed_single_process_all_stages(port: int, tmp_path: Path) -> None:
    cases = [
        ["zero", 0, None, {}],
        ["zero", 1, None, {}, 4],  # gradient_accumulation_steps=4 in the config changes nothing
        ["zero", 2, False, {}],
        ["zero", 2, None, CKPT_HIER],
        ["zero", 3, None, CKPT_HIER],
        ["fp16"],
        ["bf16", 0],
        ["bf16", 2],
        ["master", 0, "fp16"],
        ["master", 2, "bf16"],
        ["master", 3, "bf16"],
    ]
    results = _run(1, port, cases, tmp_path)
    _check_zero(results, "zero-0-None-{}", coalescing=False)
    _check_zero(results, "zero-1-None-{}-4", coalescing=True)
    _check_zero(results, "zero-2-False-{}", coalescing=False)
    _check_zero(results, f"zero-2-None-{CKPT_HIER}", coalescing=True)
    _check_zero(results, f"zero-3-None-{CKPT_HIER}", coalescing=True)

    fp16 = results["fp16"]
    # The injected overflow is skipped and halves the scale (hysteresis 1), exactly as in a plain
    # DeepSpeed step and in DeepSpeed's own accumulation; the next normal step is applied by all.
    cached, plain, native = fp16["cached"], fp16["plain"], fp16["native"]
    assert cached == plain, fp16
    assert cached["applied"] == native["applied"] == [False, True], fp16
    assert cached["scales"] == native["scales"], fp16
    s0, s1, s2 = cached["scales"]
    assert s1 == s0 / 2 and s2 == s1
    assert cached["unchanged"] == [True, False], "the overflow step must leave the parameters alone"
    assert fp16["param_err"] < 1e-2, f"fp16 cached vs plain params differ by {fp16['param_err']:.2e}"

    for key in ("bf16-0", "bf16-2"):
        assert results[key]["n"] > 0
        assert results[key]["grad"] < 5e-2, f"{key}: cached vs plain bf16 grads {results[key]['grad']:.2e}"
    for key in ("master-0-fp16", "master-2-bf16", "master-3-bf16"):
        _check_master(results[key], key)


def _check_master(r: dict, key: str) -> None:
    """engine.master_params() is the fp32 master, not the half working copy (see master_case)."""
    for flag in ("names", "fp32", "shapes", "same_on_ranks", "rounds_to_working", "frozen_equal"):
        assert r[flag] is True, f"{key}: master_params fails {flag}: {r}"
    assert r["finer_fraction"] > 0.3, f"{key}: master equals the half copy almost everywhere: {r}"


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_two_processes_zero2_zero3(port: int, tmp_path: Path) -> None:
    cases = [
        ["zero", 2, None, {}],
        ["zero", 2, False, {}],
        ["zero", 3, None, CKPT_HIER],
        ["zero", 3, False, {}],
        ["master", 2, "bf16"],
        ["master", 3, "fp16"],
    ]
    results = _run(2, port, cases, tmp_path)
    _check_zero(results, "zero-2-None-{}", coalescing=True)
    _check_zero(results, "zero-2-False-{}", coalescing=False)
    _check_zero(results, f"zero-3-None-{CKPT_HIER}", coalescing=True)
    _check_zero(results, "zero-3-False-{}", coalescing=False)
    _check_master(results["master-2-bf16"], "master-2-bf16")
    _check_master(results["master-3-fp16"], "master-3-fp16")
