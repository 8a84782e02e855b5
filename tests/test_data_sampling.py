"""Debiased (ZeroVL) sampling: single-source batches, source frequencies proportional to size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from vlscale.data import build_loader
from vlscale.data.sampling import BatchScheduler
from vlscale.data.synthetic import write_synthetic_shards

SIZES = {"a": 6000, "b": 3000, "c": 1000}


def _schedule(seed: int, batch_size: int = 10) -> list[str]:
    sched = BatchScheduler(SIZES, batch_size=batch_size, drop_last=False, seed_key=(seed, 0, 0))
    pos: dict[str, int] = {}
    out = []
    while (name := sched.choose(len(out), pos)) is not None:
        pos[name] = pos.get(name, 0) + batch_size
        out.append(name)
    return out


def test_schedule_uses_every_batch_once() -> None:
    assert Counter(_schedule(0)) == {n: s // 10 for n, s in SIZES.items()}


def test_source_frequencies_match_sizes_throughout_the_epoch() -> None:
    """Not only over the whole epoch (that is forced) but in any prefix: the first 200 batches
    and the source of the very first batch over many seeds follow p ∝ size."""
    p = np.array(list(SIZES.values()), dtype=float) / sum(SIZES.values())
    prefix = Counter(_schedule(1)[:200])
    observed = [prefix[n] for n in SIZES]
    assert chisquare(observed, p * 200).pvalue > 1e-3, observed
    first = Counter(BatchScheduler(SIZES, batch_size=10, drop_last=False, seed_key=(s, 0, 0)).choose(0, {})
                    for s in range(600))
    observed = [first[n] for n in SIZES]
    assert chisquare(observed, p * 600).pvalue > 1e-3, observed
    # and it is a real test: a uniform choice over sources would fail it
    assert chisquare([200, 200, 200], p * 600).pvalue < 1e-6


def test_schedule_is_seeded() -> None:
    assert _schedule(3, 100) == _schedule(3, 100) and _schedule(3, 100) != _schedule(4, 100)


def test_drop_last_skips_streams_that_cannot_fill_a_batch() -> None:
    sched = BatchScheduler({"a": 25, "b": 4}, batch_size=10, drop_last=True, seed_key=(0,))
    assert sched.remaining({}).tolist() == [25, 0]
    assert sched.choose(0, {"a": 20}) is None


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("debiased")
    write_synthetic_shards(out, {"big": 120, "mid": 60, "small": 20}, rows_per_batch=8, image_size=(8, 8))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_debiased_batches_are_single_source(shard_dir, workers: int) -> None:
    loader = build_loader(shard_dir, image_size=4, batch_size=5, num_workers=workers, debiased=True, train=True)
    batches = list(loader)
    assert all(len(set(b.source)) == 1 for b in batches)
    assert all(k.startswith(b.source[0]) for b in batches for k in b.keys)
    per_source = Counter(b.source[0] for b in batches)
    assert per_source == {"big": 24, "mid": 12, "small": 4}  # drop_last: every full batch, ∝ size


def test_mixed_mode_mixes_sources(shard_dir) -> None:
    loader = build_loader(shard_dir, image_size=4, batch_size=20, debiased=False, train=True)
    assert any(len(set(b.source)) > 1 for b in loader)


def test_debiased_rejects_mixed_record_batches(tmp_path) -> None:
    import pyarrow as pa

    from vlscale.data.schema import schema_with_metadata
    from vlscale.data.synthetic import synthetic_image

    rng = np.random.default_rng(0)
    table = pa.Table.from_pydict({"key": ["1", "2"], "image": [synthetic_image(rng)] * 2, "caption": ["x", "y"],
                                  "source": ["a", "b"], "concepts": [None, None]},
                                 schema=schema_with_metadata({"a": 1, "b": 1}))
    with pa.OSFile(str(tmp_path / "m.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    with pytest.raises(ValueError, match=r"m\.arrow.*mix several sources"):
        build_loader(tmp_path, batch_size=2, debiased=True)
    assert sum(len(b) for b in build_loader(tmp_path, batch_size=2, train=False)) == 2  # mixed mode is fine
