"""In-process training on tiny shards: the loop runs, logs, checkpoints, evaluates, and guards NaNs.

One process, local engine, the tiny-cpu model shrunk further; a handful of steps each (seconds).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from vlscale.config import load_recipe
from vlscale.demo_data import build_demo_dataset
from vlscale.train.trainer import NonFiniteLossError, Trainer, train


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two threads per op thrash (10× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_dataset(tmp_path_factory.mktemp("shards"), n_train=48, n_eval=6, size=32)


def tiny_overrides(shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [
        "engine.kind=local", "engine.zero_stage=0", f"train.run_dir={run_dir}",
        f"data.train_shards={shards['train']}", f"data.eval_shards={shards['eval']}", "data.num_workers=0",
        "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
        "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 64}",
        "model.embed_dim=16", "train.global_batch_size=16", "gradcache.chunk_size=6", "train.warmup_steps=2",
        "train.lr=3e-3", "train.log_every=1", "train.progress=false", "eval.batch_size=10", *extra,
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_training_logs_checkpoints_and_evaluates(shards: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_recipe("tiny-cpu", tiny_overrides(shards, run, "train.steps=6", "train.eval_every=3",
                                                 "train.ckpt_every=3"))
    summary = train(cfg)
    losses = [summary["losses"][s] for s in range(1, 7)]
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[3:]) < losses[0], f"loss did not go down: {losses}"
    records = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("lr", "logit_scale", "samples_per_s", "data/skipped", "mem/peak_rss_mib", "train/samples"):
        assert key in steps[-1], key
    # How well the captions tokenize reaches the metrics (the demo's captions: every word in the vocabulary).
    assert steps[-1]["text/unk_rate"] == 0.0 and steps[-1]["text/char_split_rate"] == 0.0
    assert steps[0]["lr"] < steps[1]["lr"]  # linear warmup
    evals = [r for r in records if "eval/image_to_text_R@1" in r]  # open_clip's names, fractions
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["eval/n_images"] == 6
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000006"]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
    assert any((run / "tensorboard").iterdir())
    assert json.loads((run / "memory.json").read_text())["ranks"][0]["mem/peak_rss_mib"] > 0


def test_plain_step_path_and_weight_decay_groups(shards: dict[str, Path], tmp_path: Path) -> None:
    """gradcache.enabled=false runs the one-big-batch reference path; no decay on 1-D params."""
    cfg = load_recipe("tiny-cpu", tiny_overrides(shards, tmp_path / "run", "train.steps=2", "gradcache.enabled=false",
                                                 "train.tensorboard=false"))
    trainer = Trainer(cfg)
    try:
        assert trainer.gradcache.plain
        groups = trainer.optimizer.param_groups
        no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        assert id(trainer.model.logit_scale) in no_decay
        assert all(id(p) in no_decay for p in trainer.model.parameters() if p.ndim < 2)
        assert any(g["weight_decay"] > 0 for g in groups)
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["step"] == 2 and all(math.isfinite(v) for v in summary["losses"].values())


def _nan_on_step(trainer: Trainer, bad_steps: set[int]) -> None:
    inner = trainer.loss_fn

    def loss_fn(embs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = inner(embs)
        if trainer.step + 1 in bad_steps:
            loss = loss * float("nan")
        return loss, metrics

    trainer.loss_fn = loss_fn


def test_nonfinite_loss_stops_with_a_clear_message(shards: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_recipe("tiny-cpu", tiny_overrides(shards, tmp_path / "run", "train.steps=3", "train.tensorboard=false"))
    trainer = Trainer(cfg)
    _nan_on_step(trainer, {2})
    try:
        with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 2.*on_nonfinite=skip"):
            trainer.fit()
    finally:
        trainer.close()
    assert trainer.step == 1


def test_nonfinite_loss_skip_counts_and_leaves_weights(shards: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_recipe("tiny-cpu", tiny_overrides(shards, tmp_path / "run", "train.steps=2", "train.tensorboard=false",
                                                 "train.on_nonfinite=skip", "train.max_nonfinite_skips=1"))
    trainer = Trainer(cfg)
    _nan_on_step(trainer, {2})
    before = None
    try:
        batches = trainer._batches()
        trainer._train_step(next(batches))
        before = [p.detach().clone() for p in trainer.model.parameters()]
        skipped = trainer._train_step(next(batches))  # NaN: skipped, weights untouched
        assert skipped["skipped"] == 1.0 and trainer.counters["nonfinite_skips"] == 1 and trainer.step == 1
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        assert all(p.grad is None or not p.grad.abs().sum() for p in trainer.model.parameters())
        with pytest.raises(NonFiniteLossError, match=r"more than train\.max_nonfinite_skips=1"):
            trainer._train_step(next(batches))
    finally:
        trainer.close()


def test_warmup_cosine_schedule() -> None:
    from vlscale.train.optim import lr_lambda

    sched = [lr_lambda(s, warmup=4, total=14, min_ratio=0.1) for s in range(15)]
    assert sched[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup, the peak at step 4
    assert sched[4] == pytest.approx(1.0) and sched[9] == pytest.approx(0.55) and sched[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(sched[4:]))  # then monotone cosine decay to the floor


def test_data_skipped_counts_only_samples_skipped_for_bad_data() -> None:
    """``data/skipped`` sums the skip reasons; epoch-end rows, short-batch counts and remote-read
    counters are reported under their own names, not added to it."""
    from types import SimpleNamespace

    from vlscale.train.trainer import Trainer

    stats = {"samples": 96, "unreadable_image": 2, "empty_caption": 1, "dropped_tail": 5, "short_batch": 1,
             "io_requests": 7, "io_bytes": 4096}
    fake = SimpleNamespace(loader=SimpleNamespace(stats=stats), counters={}, text_stats=None,
                           rt=SimpleNamespace(device=torch.device("cpu")))
    out = Trainer._slow_metrics(fake)
    assert out["data/skipped"] == 3.0
    assert (out["data/dropped_tail"], out["data/short_batch"], out["data/io_requests"]) == (5.0, 1.0, 7.0)


@pytest.mark.parametrize("gradcache", [True, False])
def test_step_inputs_stay_on_the_host_under_the_gradient_cache(gradcache: bool) -> None:
    """On an accelerator the gradient cache copies one chunk at a time (vlscale.gradcache.transfer),
    so the trainer must not move the whole local batch first (1M pairs / 8 ranks: ~79 GB of pixels);
    without the gradient cache one plain forward needs the whole batch on the device."""
    from types import SimpleNamespace

    from vlscale.data.collate import Batch
    from vlscale.train.trainer import Trainer

    batch = Batch(pixels=torch.randn(5, 3, 8, 8), tokens=torch.ones(5, 4, dtype=torch.long),
                  attention_mask=torch.ones(5, 4, dtype=torch.long), source=["a"] * 5,
                  keys=[str(i) for i in range(5)], concepts=None, captions=["x"] * 5)
    fake = SimpleNamespace(cfg=SimpleNamespace(gradcache=SimpleNamespace(enabled=gradcache)),
                           rt=SimpleNamespace(device=torch.device("meta")))
    inputs = Trainer._step_inputs(fake, batch)
    assert {v.device.type for v in inputs.values()} == ({"cpu"} if gradcache else {"meta"})
    assert inputs["pixels"].shape == (5, 3, 8, 8)
    cpu = SimpleNamespace(cfg=fake.cfg, rt=SimpleNamespace(device=torch.device("cpu")))
    assert all(v.device.type == "cpu" for v in Trainer._step_inputs(cpu, batch).values())
