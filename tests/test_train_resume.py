"""Resume equality: train N steps with a checkpoint at k; resuming from k gives the same losses.

The checkpoint carries the engine state (weights, AdamW moments, scheduler), the data-stream
position and the RNG states, so step k+1 after a resume sees the same batch, the same dropout
and the same learning rate as the uninterrupted run: on CPU in fp32 the losses are bit-identical.
Dropout is switched on (drop_path in the vision tower, BERT's dropout) and the loader has a worker
process (prefetching) so that a forgotten RNG state or data position would show. DeepSpeed's
own checkpoint path (ZeRO-2 partitions over two ranks) is checked the same way, under the
launcher, in ``test_train_launcher.py`` (DeepSpeed cannot be re-initialised in one process).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from vlscale.config import load_recipe
from vlscale.demo_data import build_demo_dataset
from vlscale.train.checkpoint import latest_checkpoint
from vlscale.train.trainer import train


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads per op thrash on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_dataset(tmp_path_factory.mktemp("shards"), n_train=40, n_eval=4, size=32)


def overrides(shards: dict[str, Path], run_dir: Path, engine: list[str], *extra: str) -> list[str]:
    return [
        *engine, f"train.run_dir={run_dir}", f"data.train_shards={shards['train']}", "data.eval_shards=",
        "data.num_workers=1", "data.augment=true",
        "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
        "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 64, \"hidden_dropout_prob\": 0.2}",
        "model.drop_path_rate=0.2", "model.embed_dim=16", "train.global_batch_size=12", "gradcache.chunk_size=5",
        "train.warmup_steps=2", "train.lr=3e-3", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "train.steps=4", "train.keep_checkpoints=3", *extra,
    ]


LOCAL = ["engine.kind=local", "engine.zero_stage=0"]


def _resume_equal(shards: dict[str, Path], tmp_path: Path, engine: list[str]) -> None:
    full = train(load_recipe("tiny-cpu", overrides(shards, tmp_path / "full", engine, "train.ckpt_every=2")))
    ckpt = tmp_path / "full" / "checkpoints" / "step_000002"
    assert ckpt.is_dir() and latest_checkpoint(tmp_path / "full" / "checkpoints").name == "step_000004"
    resumed = train(load_recipe("tiny-cpu", overrides(shards, tmp_path / "resumed", engine)), resume=str(ckpt))
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        a, b = full["losses"][step], resumed["losses"][step]
        assert a == b, f"step {step}: uninterrupted {a!r} vs resumed {b!r} (diff {abs(a - b):.3g})"
    assert resumed["counters"]["samples"] == full["counters"]["samples"]


TECHNIQUES = ["techniques.mixup=true", "techniques.momentum_queue=20", "techniques.concept_prob=0.5",
              "techniques.hier_weight=0.1", "model.hier_image_layers=[0]", "model.hier_text_layers=[0]"]


@pytest.mark.parametrize("techniques", [False, True], ids=["plain", "techniques"])
def test_resume_equality_local(shards: dict[str, Path], tmp_path: Path, techniques: bool) -> None:
    """With the techniques on, the momentum towers and queues must come back too (and mixup /
    concept draws must depend on the step only)."""
    _resume_equal(shards, tmp_path, LOCAL + (TECHNIQUES if techniques else []))
    last = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert techniques == all(k in last for k in ("loss/momentum", "loss/loss_hier0", "mixup/lam"))


def test_resume_auto_without_checkpoint_starts_fresh_and_then_continues(shards: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(load_recipe("tiny-cpu", overrides(shards, run, LOCAL, "train.steps=2")), resume="auto")
    assert sorted(first["losses"]) == [1, 2]
    second = train(load_recipe("tiny-cpu", overrides(shards, run, LOCAL, "train.steps=3")), resume="auto")
    assert sorted(second["losses"]) == [3]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # the resumed run appends to the same metrics file


def test_interrupted_save_leaves_the_previous_checkpoint(shards: dict[str, Path], tmp_path: Path) -> None:
    """A crash mid-save leaves a .tmp- folder that `latest` never points at; the next save cleans it."""
    run = tmp_path / "run"
    train(load_recipe("tiny-cpu", overrides(shards, run, LOCAL, "train.steps=2")))
    ckpts = run / "checkpoints"
    (ckpts / ".tmp-step_000003" / "engine").mkdir(parents=True)  # what a crash mid-save leaves
    assert latest_checkpoint(ckpts).name == "step_000002"
    train(load_recipe("tiny-cpu", overrides(shards, run, LOCAL, "train.steps=3")), resume="auto")
    assert latest_checkpoint(ckpts).name == "step_000003"
    assert not (ckpts / ".tmp-step_000003").exists()
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        train(load_recipe("tiny-cpu", overrides(shards, run, LOCAL)), resume=str(tmp_path))


# -- epoch boundaries (issue: `--resume` crashed when the latest checkpoint ended an epoch) -------------


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """23 rows with a global batch of 8: one epoch is 2 steps (7 rows dropped), so the checkpoint
    of step 2 sits exactly at an epoch's end (the issue's reproduction)."""
    return build_demo_dataset(tmp_path_factory.mktemp("small"), n_train=23, n_eval=4, size=32)


def _small(shards: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return overrides(shards, run, LOCAL, "train.global_batch_size=8", "gradcache.chunk_size=3",
                     "train.tensorboard=true", *extra)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tb_steps(run: Path, tag: str = "loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_at_epoch_end_and_extending_a_finished_run(small_shards: dict[str, Path], tmp_path: Path) -> None:
    full = train(load_recipe("tiny-cpu", _small(small_shards, tmp_path / "full", "train.ckpt_every=2")))
    assert sorted(full["losses"]) == [1, 2, 3, 4]

    # A crash after step 4 was logged but before its checkpoint: the run dir holds metrics and
    # TensorBoard events of steps 1-4 and a checkpoint of step 2 (an epoch's end).
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    ckpts = crashed / "checkpoints"
    shutil.rmtree(ckpts / "step_000004")
    (ckpts / "latest").write_text("step_000002\n")
    with (crashed / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "loss": 1.')  # a torn last line
    resumed = train(load_recipe("tiny-cpu", _small(small_shards, crashed, "train.ckpt_every=2")), resume="auto")
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == full["losses"][step], f"step {step} after an epoch-end resume"
    assert [r["step"] for r in _records(crashed) if "loss" in r] == [1, 2, 3, 4]  # each step once
    assert _tb_steps(crashed) == [1, 2, 3, 4]

    # The reproduction: a finished 2-step run extended to 4 steps with --resume auto.
    run = tmp_path / "extended"
    train(load_recipe("tiny-cpu", _small(small_shards, run, "train.steps=2", "train.ckpt_every=2")))
    more = train(load_recipe("tiny-cpu", _small(small_shards, run, "train.steps=4", "train.ckpt_every=2")),
                 resume="auto")
    assert sorted(more["losses"]) == [3, 4] and all(math.isfinite(v) for v in more["losses"].values())
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3, 4]
    assert more["counters"]["samples"] == 4 * 8

    # Resuming from the final step has nothing left to do.
    done = train(load_recipe("tiny-cpu", _small(small_shards, run, "train.steps=4")), resume="auto")
    assert done["step"] == 4 and done["losses"] == {}
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3, 4]
