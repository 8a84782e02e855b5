"""Partition of record batches over (rank, worker): disjoint and complete for many layouts."""

from __future__ import annotations

import itertools

import pytest

from vlscale.data import Batch, ShardIndex, build_loader
from vlscale.data.dataset import ShardDataset
from vlscale.data.stream import Unit, epoch_order, worker_range, worker_spans
from vlscale.data.synthetic import write_synthetic_shards
from vlscale.data.transforms import build_transform


@pytest.mark.parametrize("rows", [[1], [5, 3, 7], [128] * 3 + [2], [1] * 13, [50, 1, 1, 40]])
@pytest.mark.parametrize("num_global", [1, 2, 3, 8, 17])
def test_spans_cover_every_row_once(rows: list[int], num_global: int) -> None:
    units = [Unit(0, i, n, "s") for i, n in enumerate(rows)]
    order = epoch_order(list(range(len(units))), seed=3, epoch=1, shuffle=True)
    seen: list[tuple[int, int]] = []
    sizes = []
    for g in range(num_global):
        lo, hi = worker_range(sum(rows), g, num_global)
        spans = worker_spans(units, order, lo, hi)
        sizes.append(sum(s.stop - s.start for s in spans))
        seen += [(s.unit, r) for s in spans for r in range(s.start, s.stop)]
    assert sorted(seen) == [(u, r) for u, n in enumerate(rows) for r in range(n)]  # complete and disjoint
    assert max(sizes) - min(sizes) <= 1  # balanced to one row, whatever the record-batch sizes


def test_drop_last_quota_is_equal() -> None:
    total, num_global = 103, 4
    sizes = {hi - lo for lo, hi in (worker_range(total, g, num_global, total // num_global) for g in range(num_global))}
    assert sizes == {total // num_global}


def test_epoch_order_changes_with_epoch_and_is_seeded() -> None:
    ids = list(range(50))
    assert epoch_order(ids, seed=0, epoch=0, shuffle=True) == epoch_order(ids, seed=0, epoch=0, shuffle=True)
    assert epoch_order(ids, seed=0, epoch=0, shuffle=True) != epoch_order(ids, seed=0, epoch=1, shuffle=True)
    assert epoch_order(ids, seed=0, epoch=0, shuffle=False) == ids


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("shards")
    # 3 shards of uneven size, record batches of 7 rows (last ones partial)
    write_synthetic_shards(out, {"a": 40, "b": 9, "c": 23}, rows_per_batch=7, target_shard_bytes=1 << 30,
                           image_size=(8, 8))
    return out


def _keys(index: ShardIndex, *, world: int, workers: int, debiased: bool, drop_last: bool = False,
          epoch: int = 0) -> list[list[str]]:
    """Keys per (rank, worker), iterating each logical worker in-process."""
    out = []
    for rank, w in itertools.product(range(world), range(workers)):
        ds = ShardDataset(index, batch_size=4, transform=build_transform(train=True, image_size=4), rank=rank,
                          world_size=world, seed=1, shuffle_buffer=5, debiased=debiased, drop_last=drop_last)
        ds.configure(epoch=epoch, num_workers=workers)
        out.append([k for b in ds.iter_worker(w) if isinstance(b, Batch) for k in b.keys])
    return out


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("many")
    # ~1 KiB shards: one or two record batches of 3 rows per shard, a dozen shards
    write_synthetic_shards(out, {"a": 25, "b": 11}, rows_per_batch=3, target_shard_bytes=1000, image_size=(8, 8))
    return out


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (1, 3), (2, 2), (3, 1), (4, 5)])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("layout", ["few_shards", "many_shards"])
def test_dataset_partition_exactly_once(shard_dir, many_shards, world: int, workers: int, debiased: bool,
                                        layout: str) -> None:
    index = ShardIndex(shard_dir if layout == "few_shards" else many_shards)
    sizes = {"a": 40, "b": 9, "c": 23} if layout == "few_shards" else {"a": 25, "b": 11}
    assert (len(index.paths) == 3) if layout == "few_shards" else (len(index.paths) > 10)  # 1 unit per shard
    per_worker = _keys(index, world=world, workers=workers, debiased=debiased)
    flat = [k for ks in per_worker for k in ks]
    expected = {f"{s}-{i}" for s, n in sizes.items() for i in range(n)}
    assert len(flat) == len(set(flat)), "a sample was read twice"
    assert set(flat) == expected, f"missing {sorted(expected - set(flat))[:5]}"


def test_drop_last_gives_every_rank_the_same_batch_count(shard_dir) -> None:
    index = ShardIndex(shard_dir)
    for debiased in (False, True):
        per_worker = _keys(index, world=3, workers=2, debiased=debiased, drop_last=True)
        counts = {len(ks) for ks in per_worker}
        assert len(counts) == 1 and counts.pop() % 4 == 0


def test_shuffle_differs_across_epochs(shard_dir) -> None:
    index = ShardIndex(shard_dir)
    e0 = _keys(index, world=1, workers=1, debiased=False, epoch=0)[0]
    e1 = _keys(index, world=1, workers=1, debiased=False, epoch=1)[0]
    assert sorted(e0) == sorted(e1) and e0 != e1


def test_dataloader_workers_and_ranks_exactly_once(shard_dir) -> None:
    """Real DataLoader worker processes, two simulated ranks."""
    keys = []
    for rank in range(2):
        loader = build_loader(shard_dir, image_size=4, batch_size=3, rank=rank, world_size=2, num_workers=2,
                              train=True, drop_last=False, shuffle_buffer=8)
        batches = list(loader)
        assert len(batches) == len(loader)
        keys += [k for b in batches for k in b.keys]
        assert loader.epoch == 1 and loader.stats["samples"] == sum(len(b) for b in batches)
    assert len(keys) == len(set(keys)) == 72
