"""The loader never touches the global RNGs: creating and iterating it leaves torch's state alone.

A DataLoader iterator draws its workers' base seed from the global torch RNG unless it has its
own generator; that draw would shift dropout / mixup after a resume. ``ShardLoader`` passes a
generator seeded from (seed, epoch, rank), so the global state must come out bit-identical.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vlscale.data import build_loader
from vlscale.data.loader import loader_generator
from vlscale.data.synthetic import write_synthetic_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("rng")
    write_synthetic_shards(out, {"a": 23}, rows_per_batch=5, target_shard_bytes=20_000, image_size=(10, 10))
    return out


def _loader(shard_dir, workers: int, *, seed: int = 3, rank: int = 0):
    return build_loader(shard_dir, image_size=8, batch_size=4, num_workers=workers, seed=seed, train=True,
                        rank=rank, world_size=2, shuffle_buffer=7, drop_last=False)


def _global_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _assert_unchanged(before: tuple) -> None:
    torch_state, py_state, np_state = _global_states()
    assert torch.equal(torch_state, before[0]), "the loader advanced the global torch RNG"
    assert py_state == before[1], "the loader advanced Python's global random"
    assert np.array_equal(np_state, before[2]), "the loader advanced numpy's global RNG"


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_leaves_global_rng_untouched(shard_dir, workers: int) -> None:
    torch.manual_seed(11)
    before = _global_states()
    loader = _loader(shard_dir, workers)
    first = [b.keys for b in loader]  # a full epoch: creates one DataLoader iterator
    partial = iter(loader)  # a fresh iterator over epoch 1, abandoned after one batch
    next(partial)
    del partial
    _assert_unchanged(before)
    assert first and loader.epoch == 1


def test_the_check_can_fail_without_a_generator(shard_dir) -> None:
    """A plain DataLoader over the same dataset does draw from the global RNG (the bug fixed)."""
    loader = _loader(shard_dir, 0)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    next(iter(DataLoader(loader.dataset, batch_size=None)))
    assert not torch.equal(torch.get_rng_state(), before)


def test_resume_does_not_shift_the_training_rng(shard_dir) -> None:
    """Draws made between batches (dropout stand-ins) match across an interrupted run."""

    def run(stop: int | None) -> tuple[list, list[float]]:
        torch.manual_seed(5)
        loader, keys, draws = _loader(shard_dir, 2), [], []
        for b in loader:
            keys.append(b.keys)
            draws.append(torch.rand(()).item())
            if len(keys) == stop:
                state = loader.state_dict()
                loader = _loader(shard_dir, 2)  # a fresh process would rebuild the loader
                loader.load_state_dict(state)
                break
        for b in loader if stop is not None else []:
            keys.append(b.keys)
            draws.append(torch.rand(()).item())
        return keys, draws

    assert run(2) == run(None)


def test_generator_is_a_pure_function_of_seed_epoch_rank() -> None:
    def draw(*key: int) -> int:
        return int(torch.randint(0, 2**62, (), generator=loader_generator(*key)))

    assert draw(3, 0, 0) == draw(3, 0, 0)
    assert len({draw(3, 0, 0), draw(4, 0, 0), draw(3, 1, 0), draw(3, 0, 1)}) == 4
