"""Gradient cache on the local engine: cached step == one plain big-batch step (fp32, 1e-5 rel).

The reference forwards the same chunks *with* a graph, in the same order from the same seed, so
dropout / drop-path draw the same masks; then one loss and one backward. The cached step must
match its gradients, its parameters after an AdamW step, its loss, its BatchNorm statistics and
the RNG state it leaves behind.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from helpers_gradcache import TinyDualEncoder, clip_loss, make_batch, max_rel_err, reference_step

from vlscale.engines import build_engine
from vlscale.gradcache import GradCache

TOL = 1e-5
SIZES = {"image": 4, "text": 3}  # batch 11: image chunks 4,4,3; text chunks 3,3,3,2


def _run_pair(model_kw: dict, *, sizes: dict[str, int] = SIZES, batch: int = 11, replay: bool = True,
              chunk_size: int | None = None):
    torch.manual_seed(0)
    model = TinyDualEncoder(**model_kw)
    ref = copy.deepcopy(model)
    inputs = make_batch(batch, seed=1)
    engine = build_engine("local", model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)

    torch.manual_seed(123)
    gc = GradCache(engine, chunk_size=chunk_size, chunk_sizes=sizes, replay_rng=replay)
    res = gc.step(inputs, clip_loss)
    after_cached = torch.rand(3)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(123)
    ref_sizes = sizes or {"image": chunk_size or batch, "text": chunk_size or batch}
    ref_loss = reference_step(ref, inputs, ref_sizes)
    after_ref = torch.rand(3)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    return model, ref, engine, ref_opt, res, ref_loss, grads, ref_grads, (after_cached, after_ref)


@pytest.mark.parametrize(
    "model_kw",
    [{}, {"checkpointing": True, "hier": True}, {"batchnorm": True, "hier": True}],
    ids=["plain", "checkpointing+hier", "batchnorm+hier"],  # BN + checkpointing: torch double-updates BN stats in the reference
)
def test_local_cached_step_equals_big_batch_step(model_kw: dict) -> None:
    model, ref, engine, ref_opt, res, ref_loss, grads, ref_grads, rngs = _run_pair(model_kw)
    assert res.num_chunks == {"image": 3, "text": 4}
    assert torch.allclose(res.loss, ref_loss, rtol=1e-6), (float(res.loss), float(ref_loss))
    assert set(grads) == set(ref_grads)
    err, name = max_rel_err(grads, ref_grads)
    assert err < TOL, f"grad rel err {err:.2e} at {name}"
    assert ref_grads["logit_t"].abs().item() > 0
    assert torch.equal(rngs[0], rngs[1]), "the cached step must leave the RNG where the plain step does"

    assert engine.optimizer_step() is True
    ref_opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    err, name = max_rel_err(params, {n: p.detach() for n, p in ref.named_parameters()})
    assert err < TOL, f"param rel err {err:.2e} at {name}"
    assert all(p.grad is None for p in model.parameters()), "optimizer_step must clear gradients"


def test_rng_replay_is_what_makes_dropout_exact() -> None:
    """Without the replay the re-forward draws new masks: the gradient must then be wrong."""
    *_, grads, ref_grads, _ = _run_pair({}, replay=False)
    err, _ = max_rel_err(grads, ref_grads)
    assert err > 1e-2, f"disabling the RNG replay changed nothing (err {err:.2e}): the test cannot fail"


def test_single_chunk_size_and_plain_reference_path() -> None:
    """chunk_size for both towers; chunk_size=None is one plain step equal to the reference."""
    *_, res, ref_loss, grads, ref_grads, _ = _run_pair({"hier": True}, sizes={}, chunk_size=5, batch=12)
    assert res.num_chunks == {"image": 3, "text": 3}
    err, name = max_rel_err(grads, ref_grads)
    assert err < TOL, f"{err:.2e} at {name}"

    torch.manual_seed(0)
    model = TinyDualEncoder(drop=0.0, drop_path=0.0)  # one call with both towers: RNG order differs
    ref = copy.deepcopy(model)
    inputs = make_batch(9, seed=2)
    engine = build_engine("local", model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    res = GradCache(engine, chunk_size=None).step(inputs, clip_loss)
    ref_loss = reference_step(ref, inputs, {"image": 9, "text": 9})
    assert res.num_chunks == {"image": 1, "text": 1}
    assert torch.allclose(res.loss, ref_loss, rtol=1e-6)
    err, name = max_rel_err({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                            {n: p.grad for n, p in ref.named_parameters() if p.grad is not None})
    assert err < TOL, f"{err:.2e} at {name}"


def test_batchnorm_running_stats_move_once_per_step(caplog: pytest.LogCaptureFixture) -> None:
    """Running stats = one momentum update towards the mean of the chunks' statistics; the
    re-forward leaves them alone; the ghost-batch-norm warning comes once."""
    torch.manual_seed(0)
    model = TinyDualEncoder(batchnorm=True)
    with torch.no_grad():  # non-trivial starting statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    start = copy.deepcopy(model)
    chunk_stats = copy.deepcopy(model)  # momentum=None from zero: the mean of the chunks' stats
    for m in chunk_stats.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    inputs = make_batch(11, seed=3)
    engine = build_engine("local", model, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    gc = GradCache(engine, chunk_sizes=SIZES)
    with caplog.at_level(logging.WARNING, logger="vlscale.gradcache.cache"):
        for _ in range(2):
            torch.manual_seed(5)
            gc.step(inputs, clip_loss)
    assert sum("ghost batch norm" in r.getMessage() for r in caplog.records) == 1
    torch.manual_seed(5)
    with torch.no_grad():  # the image chunks come first, so they draw the same dropout masks
        for lo in range(0, 11, SIZES["image"]):
            chunk_stats(pixels=inputs["pixels"][lo : lo + SIZES["image"]])
    named = dict(model.named_modules())
    checked = 0
    for name, m0 in start.named_modules():
        if not isinstance(m0, torch.nn.BatchNorm1d):
            continue
        got, avg = named[name], dict(chunk_stats.named_modules())[name]
        momentum = m0.momentum
        # two identical-input steps (same seed) ⇒ two single updates towards the same target
        for buf in ("running_mean", "running_var"):
            r0, target = getattr(m0, buf), getattr(avg, buf)
            expected = torch.lerp(torch.lerp(r0, target, momentum), target, momentum)
            assert torch.allclose(getattr(got, buf), expected, rtol=1e-5, atol=1e-6), f"{name}.{buf}"
        assert int(got.num_batches_tracked) == int(m0.num_batches_tracked) + 2
        checked += 1
    assert checked == 2


def test_bad_inputs_raise_clear_errors() -> None:
    model = TinyDualEncoder()
    engine = build_engine("local", model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    gc = GradCache(engine, chunk_size=4)
    batch = make_batch(6, seed=0)
    with pytest.raises(ValueError, match="unknown inputs"):
        gc.step({**batch, "caption": batch["tokens"]}, clip_loss)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        gc.step({**batch, "attention_mask": batch["attention_mask"][:5]}, clip_loss)
    with pytest.raises(ValueError, match="without 'tokens'"):
        gc.step({"pixels": batch["pixels"], "attention_mask": batch["attention_mask"]}, clip_loss)
    with pytest.raises(ValueError, match="scalar"):
        gc.step(batch, lambda e: (e["image"].sum(1), {}))
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(engine, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_sizes keys"):
        GradCache(engine, chunk_sizes={"audio": 4})
    with pytest.raises(ValueError, match="unknown engine kind"):
        build_engine("megatron", model)
    with pytest.raises(ValueError, match="optimizer"):
        build_engine("local", model)


def test_nonfinite_loss_is_flagged_and_still_backpropagated() -> None:
    torch.manual_seed(0)
    model = TinyDualEncoder()
    engine = build_engine("local", model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    res = GradCache(engine, chunk_size=4).step(make_batch(8, seed=0), lambda e: clip_loss(e, float("inf")))
    assert not res.finite
    assert not torch.isfinite(model.logit_t.grad).all()


def test_bench_smoke_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's CPU smoke config runs end to end and writes a well-formed record."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gradcache.py"
    spec = importlib.util.spec_from_file_location("bench_gradcache", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gradcache", bench)  # dataclasses look the module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["smoke"] is True and record["device"] == "cpu"
    assert {(r["mode"], r["batch"]) for r in record["rows"]} == {(m, b) for m in ("plain", "cached") for b in (8, 12)}
    assert all(r["ms"] > 0 for r in record["rows"])
    assert record["summary"]["largest_plain_batch"] == 12
