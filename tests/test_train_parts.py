"""The trainer with ``data.part_size``: steps assembled from parts of 2 loader workers, and a
resume mid-epoch and at an epoch's end (after its short last step) continues with exactly the
losses of the uninterrupted run; mixed and debiased sampling. The loader's unit is the part, so
a checkpoint must sit at a step boundary and the parts' augmentation must depend on their
position only."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_resume import (
    LOCAL,
    _one_thread,  # noqa: F401 - autouse: one intra-op thread on the shared CPU
    overrides,
)

from vlscale.config import load_recipe
from vlscale.data.synthetic import write_synthetic_shards
from vlscale.train.trainer import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """46 rows: 2 workers × 23 rows, parts of 3 -> 7 parts each, 14 per epoch -> 3 steps of 4 parts
    (12 rows) and a short step of 2 parts (6 rows)."""
    out = tmp_path_factory.mktemp("parts")
    write_synthetic_shards(out, {"a": 29, "b": 17}, rows_per_batch=5, image_size=(32, 32))
    return {"train": out}


def _cfg(shards: dict[str, Path], run: Path, *extra: str):
    return load_recipe("tiny-cpu", overrides(shards, run, LOCAL, "data.num_workers=2", "data.part_size=3",
                                             "train.steps=6", *extra))


def test_part_steps_resume_mid_epoch_and_at_epoch_end(shards: dict[str, Path], tmp_path: Path) -> None:
    full = train(_cfg(shards, tmp_path / "full", "train.ckpt_every=2"))
    assert sorted(full["losses"]) == [1, 2, 3, 4, 5, 6]
    # epoch 0: 12 + 12 + 12 + 6 rows (its last group of parts is a short step), epoch 1 starts again
    assert full["counters"]["samples"] == 3 * 12 + 6 + 2 * 12
    for at in (2, 4):  # mid-epoch, and right after the epoch's short last step
        ckpt = tmp_path / "full" / "checkpoints" / f"step_{at:06d}"
        resumed = train(_cfg(shards, tmp_path / f"resumed{at}"), resume=str(ckpt))
        assert sorted(resumed["losses"]) == list(range(at + 1, 7))
        for step, loss in resumed["losses"].items():
            assert loss == full["losses"][step], f"resumed at {at}, step {step}: {loss!r} vs {full['losses'][step]!r}"
        assert resumed["counters"]["samples"] == full["counters"]["samples"]
    whole = train(_cfg(shards, tmp_path / "whole", "data.part_size=0", "train.steps=2"))
    assert whole["losses"][1] != full["losses"][1]  # other samples share the step (allowed, deterministic)
    again = train(_cfg(shards, tmp_path / "again", "train.steps=2"))
    assert again["losses"] == {1: full["losses"][1], 2: full["losses"][2]}


def test_part_steps_debiased_and_a_part_size_change_on_resume(shards: dict[str, Path], tmp_path: Path) -> None:
    """Debiased: sources a (29 rows: 2 steps of 12) and b (17: 1 step) per epoch, every step one
    source. Resuming with another data.part_size finishes the epoch in the saved parts (the
    steps and their losses do not change), then uses the new size."""
    full = train(_cfg(shards, tmp_path / "full", "data.debiased=true", "train.steps=4", "train.ckpt_every=1",
                       "train.keep_checkpoints=4"))
    ckpt = tmp_path / "full" / "checkpoints" / "step_000001"
    resumed = train(_cfg(shards, tmp_path / "resumed", "data.debiased=true", "train.steps=4"), resume=str(ckpt))
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if k > 1}
    changed = train(_cfg(shards, tmp_path / "changed", "data.debiased=true", "train.steps=3", "data.part_size=6"),
                    resume=str(ckpt))
    assert changed["losses"] == {2: full["losses"][2], 3: full["losses"][3]}
