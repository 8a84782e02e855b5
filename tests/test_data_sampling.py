"""Debiased (ZeroVL) sampling over the GLOBAL batch: one source per global step on every rank,
source frequencies proportional to size, every sample once; mixed mode unchanged."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from vlscale.data import build_loader
from vlscale.data.sampling import DebiasedSchedule
from vlscale.data.synthetic import write_synthetic_shards
from vlscale.data.transforms import OPENAI_MEAN, OPENAI_STD

SIZES = {"a": 6000, "b": 3000, "c": 1000}


def _schedule(seed: int = 0, epoch: int = 0, *, sizes=SIZES, world: int = 4, batch: int = 10,
              drop_last: bool = True) -> DebiasedSchedule:
    return DebiasedSchedule(sizes, world_size=world, batch_size=batch, drop_last=drop_last, seed=seed, epoch=epoch)


def test_schedule_uses_every_global_batch_once() -> None:
    sched = _schedule()
    assert Counter(sched.source(t) for t in range(len(sched))) == {"a": 150, "b": 75, "c": 25}
    short = _schedule(sizes={"a": 95, "b": 40}, drop_last=False)  # a: 2 full + 15 rows, b: 1 full
    assert Counter(short.source(t) for t in range(len(short))) == {"a": 3, "b": 1}
    last_a = max(t for t in range(len(short)) if short.source(t) == "a")
    assert [short.rows(last_a, r) for r in range(4)] == [3, 4, 4, 4]  # 15 rows over 4 ranks
    assert len(_schedule(sizes={"a": 95, "b": 40})) == 3  # drop_last: b's 40 rows make one global batch


def test_source_frequencies_match_sizes_throughout_the_epoch() -> None:
    """Not only over the whole epoch (that is forced) but in any prefix, and the first step over
    many epochs: P(source) ∝ its size. A uniform choice over sources fails the same test."""
    p = np.array(list(SIZES.values()), dtype=float) / sum(SIZES.values())
    sched = _schedule(seed=1)
    prefix = Counter(sched.source(t) for t in range(100))
    observed = [prefix[n] for n in SIZES]
    assert chisquare(observed, p * 100).pvalue > 1e-3, observed
    first = Counter(_schedule(seed=2, epoch=e).source(0) for e in range(600))
    observed = [first[n] for n in SIZES]
    assert chisquare(observed, p * 600).pvalue > 1e-3, observed
    assert chisquare([200, 200, 200], p * 600).pvalue < 1e-6


def test_draws_are_proportional_to_rows_left() -> None:
    """Conditional on the history, step t draws source s with probability ∝ its global batches
    left: checked at a fixed step over many epochs against the exact hypergeometric law."""
    sizes, t = {"a": 400, "b": 200}, 3  # 10 and 5 global batches of 4 x 10 rows
    seen = Counter()
    for e in range(1000):
        sched = _schedule(seed=3, epoch=e, sizes=sizes)
        if [sched.source(i) for i in range(t)] == ["a"] * t:  # condition on 3 draws of "a"
            seen[sched.source(t)] += 1
    left = _schedule(sizes=sizes).steps_left(0)
    expected = np.array([left["a"] - t, left["b"]], dtype=float)
    n = sum(seen.values())
    assert n > 200  # P(a, a, a) = 10/15 * 9/14 * 8/13 = 0.26
    assert chisquare([seen["a"], seen["b"]], expected / expected.sum() * n).pvalue > 1e-3, seen


def test_schedule_is_seeded_and_changes_every_epoch() -> None:
    def seq(seed: int, epoch: int) -> list[str]:
        sched = _schedule(seed, epoch, batch=100)
        return [sched.source(t) for t in range(len(sched))]

    assert seq(3, 0) == seq(3, 0) and seq(3, 0) != seq(4, 0) and seq(3, 0) != seq(3, 1)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize(("world", "workers", "batch"), [(1, 1, 3), (2, 3, 2), (4, 2, 5), (3, 4, 1)])
def test_worker_rows_partition_each_source(drop_last: bool, world: int, workers: int, batch: int) -> None:
    """Over all (rank, worker): the row ranges of each source are disjoint and cover it; each
    worker's steps fit in its ranges, and only the spares (drop_last) are left over."""
    sizes = {"a": 97, "b": 31, "c": 5}
    sched = _schedule(7, 0, sizes=sizes, world=world, batch=batch, drop_last=drop_last)
    for name, n in sizes.items():
        covered, used = [], 0
        for rank, w in itertools.product(range(world), range(workers)):
            (m_lo, m_hi), (s_lo, s_hi) = sched.worker_rows(rank, w, workers)[name]
            steps = [t for t in range(w, len(sched), workers) if sched.source(t) == name]
            assert m_hi - m_lo == sum(sched.rows(t, rank) for t in steps)
            used += m_hi - m_lo
            covered += [*range(m_lo, m_hi), *range(s_lo, s_hi)]
        assert sorted(covered) == list(range(n))
        full = n // (world * batch)
        assert used == (full * world * batch if drop_last else n)


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("debiased")
    write_synthetic_shards(out, {"big": 150, "mid": 70, "small": 27}, rows_per_batch=8, target_shard_bytes=6000,
                           image_size=(8, 8))
    return out


def _side_by_side(shards, *, world: int, workers: int, batch: int, drop_last: bool = True, **kw) -> list[list]:
    """All ranks' loaders of one epoch, each with real DataLoader worker processes."""
    return [list(build_loader(shards, image_size=4, batch_size=batch, rank=r, world_size=world, num_workers=workers,
                              seed=5, debiased=True, train=True, drop_last=drop_last, shuffle_buffer=16, **kw))
            for r in range(world)]


def test_one_source_per_global_step_across_ranks_and_workers(three_sources) -> None:
    """4 ranks x 2 workers: batch k of every rank is global step k, from the scheduled source;
    every sample is seen at most once and the rest is counted as dropped_tail."""
    world, workers, batch = 4, 2, 3
    loaders = [build_loader(three_sources, image_size=4, batch_size=batch, rank=r, world_size=world,
                            num_workers=workers, seed=5, debiased=True, train=True, shuffle_buffer=16)
               for r in range(world)]
    per_rank = [list(ld) for ld in loaders]
    sched = loaders[0].dataset.schedule(0)
    assert len(sched) == 12 + 5 + 2 and all(len(b) == len(sched) == len(ld) for b, ld in zip(per_rank, loaders))
    for t in range(len(sched)):
        sources = {s for rank in per_rank for s in rank[t].source}
        assert sources == {sched.source(t)}, f"step {t}: ranks drew {sources}"
        assert all(len(rank[t]) == batch for rank in per_rank)
    keys = [k for rank in per_rank for b in rank for k in b.keys]
    assert len(keys) == len(set(keys))
    assert all(k.startswith(b.source[0]) for rank in per_rank for b in rank for k in b.keys)
    dropped = sum(ld.stats.get("dropped_tail", 0) for ld in loaders)
    assert len(keys) + dropped == 150 + 70 + 27 and dropped == (150 % 12) + (70 % 12) + (27 % 12)


def test_every_sample_once_without_drop_last(three_sources) -> None:
    per_rank = _side_by_side(three_sources, world=4, workers=2, batch=5, drop_last=False)
    assert len({len(r) for r in per_rank}) == 1
    for t in range(len(per_rank[0])):
        assert len({s for rank in per_rank for s in rank[t].source}) == 1
    keys = [k for rank in per_rank for b in rank for k in b.keys]
    assert sorted(keys) == sorted(f"{s}-{i}" for s, n in {"big": 150, "mid": 70, "small": 27}.items()
                                  for i in range(n))


def test_short_last_global_batch_can_leave_a_rank_an_empty_batch(tmp_path) -> None:
    """drop_last=False: a source's last global batch with fewer rows than ranks gives some ranks
    a 0-row batch (right shapes), so batch k is still step k everywhere and nothing is lost."""
    write_synthetic_shards(tmp_path, {"x": 9, "y": 2}, rows_per_batch=4, image_size=(8, 8))
    per_rank = _side_by_side(tmp_path, world=4, workers=2, batch=2, drop_last=False)
    assert {len(r) for r in per_rank} == {3}
    empty = [b for rank in per_rank for b in rank if len(b) == 0]
    assert len(empty) == 3 + 2 and all(b.pixels.shape == (0, 3, 4, 4) and b.tokens is None for b in empty)
    for t in range(3):
        assert len({s for rank in per_rank for s in rank[t].source}) == 1
    assert sorted(k for rank in per_rank for b in rank for k in b.keys) == sorted(
        [f"x-{i}" for i in range(9)] + ["y-0", "y-1"])


def test_corrupt_samples_keep_the_steps_aligned(tmp_path) -> None:
    """Skipped samples are refilled from the worker's spare rows (a batch is short only when they
    run out, and counted): still one source per step on every rank, every sample at most once,
    and samples + skips + dropped add up to the dataset."""
    import pyarrow as pa

    from vlscale.data.schema import schema_with_metadata
    from vlscale.data.synthetic import synthetic_image

    write_synthetic_shards(tmp_path, {"a": 61, "b": 45}, rows_per_batch=6, image_size=(8, 8))
    rng = np.random.default_rng(0)
    rows = {"key": [f"b-x{i}" for i in range(6)], "image": [synthetic_image(rng, (8, 8)) for _ in range(6)],
            "caption": ["cap"] * 6, "source": ["b"] * 6, "concepts": [None] * 6}
    rows["image"][1] = rows["image"][1][:30]
    rows["caption"][4] = " "
    table = pa.Table.from_pydict(rows, schema=schema_with_metadata({"b": 6}))
    with pa.OSFile(str(tmp_path / "b-extra.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    loaders = [build_loader(tmp_path, image_size=4, batch_size=4, rank=r, world_size=2, num_workers=2, seed=1,
                            debiased=True, train=True, shuffle_buffer=8) for r in range(2)]
    per_rank = [list(ld) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == 7 + 6
    assert all(len({*x.source, *y.source}) == 1 for x, y in zip(*per_rank))
    keys = [k for rank in per_rank for b in rank for k in b.keys]
    assert len(keys) == len(set(keys)) and not {"b-x1", "b-x4"} & set(keys)
    stats = Counter()
    for ld in loaders:
        stats.update(ld.stats)
    assert stats["unreadable_image"] == 1 and stats["empty_caption"] == 1
    assert stats["short_batch"] == sum(len(b) < 4 for rank in per_rank for b in rank)
    assert stats["samples"] == len(keys)
    assert stats["samples"] + stats["unreadable_image"] + stats["empty_caption"] + stats["dropped_tail"] == 61 + 51


def _digest(batches) -> str:
    h = hashlib.sha256()
    mean, std = np.array(OPENAI_MEAN)[None, :, None, None], np.array(OPENAI_STD)[None, :, None, None]
    for b in batches:
        h.update("|".join(b.keys).encode())
        h.update(np.rint((b.pixels.double().numpy() * std + mean) * 255).astype(np.uint8).tobytes())
    return h.hexdigest()[:16]


# Mixed-mode batches (keys, order and crops of two epochs) as the loader produced them before the
# global debiased schedule existed (commit 4186451): the rewrite must not change them.
MIXED_GOLDEN = {True: ["32a539506dcdd1d1", "e318979c78631d37"], False: ["ffc347007bc72899", "8a3f233814acb66e"]}


@pytest.mark.parametrize("drop_last", [True, False])
def test_mixed_mode_batches_are_unchanged(tmp_path, drop_last: bool) -> None:
    write_synthetic_shards(tmp_path, {"a": 37, "b": 23, "c": 11}, rows_per_batch=6, target_shard_bytes=8000,
                           image_size=(12, 12))
    got = []
    for rank in range(2):
        loader = build_loader(tmp_path, image_size=8, batch_size=4, rank=rank, world_size=2, num_workers=2, seed=3,
                              train=True, drop_last=drop_last, shuffle_buffer=9)
        got.append(_digest(list(loader) + list(loader)))
    assert got == MIXED_GOLDEN[drop_last]


def test_mixed_mode_mixes_sources_and_counts_its_tail(three_sources) -> None:
    loader = build_loader(three_sources, image_size=4, batch_size=20, debiased=False, train=True)
    batches = list(loader)
    assert any(len(set(b.source)) > 1 for b in batches)
    assert loader.stats["samples"] + loader.stats["dropped_tail"] == 247 and loader.stats["dropped_tail"] == 7


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
