"""Steps assembled from parts (``data.part_size``): the loader's unit is a part of the local
batch, ``micro / part_size`` consecutive parts make a rank's step, and every worker works on
every step. All ranks' loaders side by side, with real DataLoader workers: mixed mode sees every
sample once per epoch; debiased mode keeps ONE source per global step across all ranks and all
parts. Also the schedule's row split, the host-memory formula and the config-time errors."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from vlscale.data import build_loader
from vlscale.data.sampling import DebiasedSchedule
from vlscale.data.synthetic import write_synthetic_shards
from vlscale.train.assemble import concat_steps, group_parts

WORLD, WORKERS, MICRO, PART = 3, 2, 8, 2  # n = 4 parts per step
N = MICRO // PART


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("parts")
    write_synthetic_shards(out, {"big": 151, "mid": 73, "small": 29}, rows_per_batch=7, target_shard_bytes=5000,
                           image_size=(8, 8))
    return out


def _ranks(shards, *, debiased: bool, drop_last: bool, part_size: int = PART) -> list:
    return [build_loader(shards, image_size=4, batch_size=MICRO, rank=r, world_size=WORLD, num_workers=WORKERS,
                         seed=11, debiased=debiased, train=True, drop_last=drop_last, shuffle_buffer=16,
                         part_size=part_size) for r in range(WORLD)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_mixed_parts_every_sample_once_and_steps_of_n_parts(shards, drop_last: bool) -> None:
    loaders = _ranks(shards, debiased=False, drop_last=drop_last)
    parts = [list(ld) for ld in loaders]
    keys = Counter(k for rank in parts for p in rank for k in p.keys)
    assert max(keys.values()) == 1, "a sample came twice"
    stats = Counter()
    for ld in loaders:
        stats.update(ld.stats)
    assert stats["samples"] == len(keys) and stats["samples"] + stats["dropped_tail"] == 151 + 73 + 29
    if not drop_last:
        assert len(keys) == 151 + 73 + 29  # every sample once per epoch
    for ld, rank in zip(loaders, parts):
        assert ld.parts_per_step == N and len(rank) == len(ld)
        # the DataLoader visits the workers round-robin: both work on every step
        assert [p.worker for p in rank[: 2 * WORKERS]] == [0, 1, 0, 1]
        assert all(0 < len(p) <= PART for p in rank) and (not drop_last or all(len(p) == PART for p in rank))
        steps = list(group_parts(rank, N))
        assert len(steps) == ld.steps_per_epoch() == -(-len(rank) // N)
        assert all(len(s) == N for s in steps[:-1]) and 1 <= len(steps[-1]) <= N
        assert [len(b) for b in concat_steps(rank, N)] == [sum(len(p) for p in s) for s in steps]


@pytest.mark.parametrize("drop_last", [True, False])
def test_debiased_parts_one_source_per_global_step_on_every_rank(shards, drop_last: bool) -> None:
    loaders = _ranks(shards, debiased=True, drop_last=drop_last)
    parts = [list(ld) for ld in loaders]
    sched = loaders[0].dataset.schedule(0)
    sizes = {"big": 151, "mid": 73, "small": 29}
    full = {s: n // (WORLD * MICRO) for s, n in sizes.items()}  # steps per source ∝ its size
    counts = Counter(sched.source(t) for t in range(len(sched)))
    if drop_last:
        assert counts == {s: c for s, c in full.items() if c}
    else:
        assert counts == {s: c + bool(n % (WORLD * MICRO)) for (s, c), n in zip(full.items(), sizes.values())}
    for r, rank in enumerate(parts):
        assert len(rank) == len(sched) * N == len(loaders[r])
        assert [p.worker for p in rank] == [i % WORKERS for i in range(len(rank))]
        for i, part in enumerate(rank):
            t = i // N
            assert set(part.source) <= {sched.source(t)}, f"rank {r} part {i} of step {t} mixes sources"
            assert len(part) == sched.part_rows(i, r)
        steps = [sum(len(p) for p in g) for g in group_parts(rank, N)]
        assert steps == [sched.rows(t, r) for t in range(len(sched))]
    keys = Counter(k for rank in parts for p in rank for k in p.keys)
    assert max(keys.values()) == 1
    stats = Counter()
    for ld in loaders:
        stats.update(ld.stats)
    assert stats["samples"] == len(keys) and stats["samples"] + stats["dropped_tail"] == sum(sizes.values())
    if not drop_last:
        assert len(keys) == sum(sizes.values())


def test_debiased_parts_resume_mid_step_boundary(shards) -> None:
    """Saved after 2 steps (8 parts) on rank 1 and resumed in a fresh loader: the same parts,
    pixels included (the augmentation RNG is keyed by the part's position)."""
    make = lambda: _ranks(shards, debiased=True, drop_last=True)[1]  # noqa: E731
    whole = list(make())
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(2 * N)]
    state = first.state_dict()
    del it
    again = make()
    again.load_state_dict(state)
    rest = list(again)
    assert [p.keys for p in head + rest] == [p.keys for p in whole]
    assert all((a.pixels == b.pixels).all() for a, b in zip(head + rest, whole))
    wrong = make()
    wrong.dataset.part_size = 4
    with pytest.raises(ValueError, match="part_size"):
        wrong.load_state_dict(state)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize(("world", "workers", "batch", "parts"), [(3, 2, 8, 4), (2, 3, 6, 3), (4, 5, 4, 2)])
def test_schedule_parts_split_each_source(drop_last: bool, world: int, workers: int, batch: int, parts: int) -> None:
    """With parts: the same steps (sources and order) as whole batches; over all (rank, worker)
    the row ranges of each source are disjoint and cover it, each worker's ranges hold exactly the
    rows of its parts (item i: worker i % workers), a step's parts add up to its rows."""
    sizes = {"a": 97, "b": 31, "c": 5}
    whole = DebiasedSchedule(sizes, world_size=world, batch_size=batch, drop_last=drop_last, seed=3, epoch=1)
    sched = DebiasedSchedule(sizes, world_size=world, batch_size=batch, drop_last=drop_last, seed=3, epoch=1,
                             parts=parts)
    assert list(sched.sources) == list(whole.sources)
    for rank, t in itertools.product(range(world), range(len(sched))):
        assert sum(sched.part_rows(t * parts + j, rank) for j in range(parts)) == sched.rows(t, rank)
    for name, n in sizes.items():
        covered = []
        for rank, w in itertools.product(range(world), range(workers)):
            (m_lo, m_hi), (s_lo, s_hi) = sched.worker_rows(rank, w, workers)[name]
            items = [i for i in range(w, len(sched) * parts, workers) if sched.source(i // parts) == name]
            assert m_hi - m_lo == sum(sched.part_rows(i, rank) for i in items)
            covered += [*range(m_lo, m_hi), *range(s_lo, s_hi)]
        assert sorted(covered) == list(range(n))
    with pytest.raises(ValueError, match="do not divide"):
        DebiasedSchedule(sizes, world_size=2, batch_size=6, drop_last=True, seed=0, epoch=0, parts=4)


def test_part_size_must_divide_the_local_batch(shards) -> None:
    with pytest.raises(ValueError, match=r"part_size \(3\) must divide the per-rank batch of 8 rows.*e\.g\. 2"):
        build_loader(shards, image_size=4, batch_size=8, part_size=3)
    assert build_loader(shards, image_size=4, batch_size=8, part_size=8).parts_per_step == 1


# -- host memory and the config-time checks ---------------------------------------------------
def _cfg(*overrides: str):
    from vlscale.config import load_recipe

    return load_recipe("zerovl-v100", list(overrides))


def test_host_memory_with_parts_by_hand() -> None:
    """1,048,576 pairs over 8 ranks, parts of 256: one step buffer of 131,072 rows + (8 workers ×
    prefetch 2 + 1) parts of 256 rows, instead of 18 local batches."""
    from vlscale.memory.hostmem import check_host_memory, host_batch_memory

    row = 3 * 224 * 224 + _cfg().model.context_length * 16
    est = host_batch_memory(_cfg("train.global_batch_size=1048576", "data.part_size=256"), 8)
    assert (est["part_size"], est["batches_held"], est["parts_held"]) == (256, 1, 17)
    assert est["bytes_per_rank"] == 131072 * row + 17 * 256 * row
    assert "parts of 256 (data.part_size)" in est["formula"]
    f32 = host_batch_memory(_cfg("train.global_batch_size=1048576", "data.part_size=256",
                                 "data.pixel_dtype=float32", "data.num_workers=3"), 8)
    row32 = 4 * 3 * 224 * 224 + _cfg().model.context_length * 16
    assert f32["bytes_per_rank"] == 2 * 131072 * row32 + (3 * 2 + 1) * 256 * row32  # + the mixed copy
    whole = host_batch_memory(_cfg("train.global_batch_size=1048576", "data.part_size=0"), 8)
    assert whole["bytes_per_rank"] == 18 * 131072 * row and whole["parts_held"] == 0
    same = host_batch_memory(_cfg("train.global_batch_size=1048576", "data.part_size=131072"), 8)
    assert same["bytes_per_rank"] == whole["bytes_per_rank"]  # one part per step: whole batches
    gb = 10**9
    _, warn = check_host_memory(_cfg("train.global_batch_size=1048576", "data.part_size=0"), 8,
                                memory=(512 * gb, 500 * gb), local_ranks=8)
    assert "data.part_size=256" in warn
    assert check_host_memory(_cfg("train.global_batch_size=1048576"), 8, memory=(512 * gb, 500 * gb),
                             local_ranks=8) == (None, None)  # the recipe's parts fit


def test_part_size_error_before_the_model(shards, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlscale.config import load_recipe
    from vlscale.train import trainer as trainer_mod
    from vlscale.train.preflight import PreflightError, batches_per_rank, preflight

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(trainer_mod, "build_model", no_model)
    base = ["engine.kind=local", "engine.zero_stage=0", f"data.train_shards={shards}", "data.eval_shards=",
            "train.global_batch_size=24", "data.num_workers=2", f"train.run_dir={tmp_path}"]
    cfg = load_recipe("tiny-cpu", [*base, "data.part_size=5"])
    with pytest.raises(PreflightError, match=r"data\.part_size=5 does not divide the per-rank batch of 12 pairs "
                                             r"\(train\.global_batch_size=24 / 2 ranks\); fix: data\.part_size=4 or 6"):
        preflight(cfg, world_size=2)
    with pytest.raises(PreflightError, match=r"data\.part_size=5"):
        trainer_mod.Trainer(cfg)
    with pytest.raises(ValueError, match=r"data\.part_size"):
        load_recipe("tiny-cpu", [*base, "data.part_size=-1"])
    # steps per rank with parts: 253 rows / (2 ranks x 2 workers) = 63 rows per worker, 15 parts of 4,
    # 30 parts per rank -> 10 steps of 3 parts; whole batches of 12: 5 per worker, 10 per rank
    assert batches_per_rank({"all": 253}, micro=12, world=2, workers=2, part_size=4) == 10
    assert batches_per_rank({"all": 253}, micro=12, world=2, workers=2, part_size=6) == 10  # 5 parts/worker: 10/2
    assert batches_per_rank({"all": 100}, micro=12, world=2, workers=2, part_size=4) == 4  # 12 parts: 4 steps
    assert batches_per_rank({"all": 100}, micro=12, world=2, workers=2) == 4
    assert batches_per_rank({"all": 90}, micro=12, world=2, workers=2) == 2  # 22 rows per worker: 1 batch each
    assert batches_per_rank({"all": 90}, micro=12, world=2, workers=2, part_size=4) == 4  # 5 parts each: 10 -> 4


# -- assembling a step from parts ---------------------------------------------------------------
def _part(rows: int, start: int, *, tokens: bool = True):
    from vlscale.data.collate import Batch

    pixels = torch.arange(start, start + rows, dtype=torch.uint8)[:, None, None, None].expand(rows, 3, 2, 2)
    ids = torch.arange(start, start + rows)[:, None].expand(rows, 5).contiguous() if tokens else None
    return Batch(pixels=pixels.contiguous(), tokens=ids, attention_mask=None if ids is None else ids.clone(),
                 source=["s"] * rows, keys=[f"k{start + i}" for i in range(rows)], captions=["c"] * rows,
                 concepts=None, worker=start % 2)


def _assemble_and_check(assembler) -> None:
    """Two epochs' steps of parts 3+3+2 | 3+0, with and without tokens, against plain concatenation."""
    for tokens in (True, False):
        parts = [_part(3, 0, tokens=tokens), _part(3, 3, tokens=tokens), _part(2, 6, tokens=tokens),
                 _part(3, 8, tokens=tokens), _part(0, 11, tokens=tokens)]
        want = [concat_steps(parts[:3], 3), concat_steps(parts[3:], 3)]
        want = [next(w) for w in want]
        got = []
        for step in assembler.steps(iter(parts), 3):
            got.append((step.pixels.clone(), None if step.tokens is None else step.tokens.clone(), list(step.keys)))
        assert [g[2] for g in got] == [w.keys for w in want] == [[f"k{i}" for i in range(8)], ["k8", "k9", "k10"]]
        for (pix, tok, _), w in zip(got, want):
            assert torch.equal(pix.cpu(), w.pixels) and (tok is None) == (w.tokens is None)
            assert tok is None or torch.equal(tok.cpu(), w.tokens)
    with pytest.raises(ValueError, match="more than the local batch of 8 rows"):
        list(assembler.steps(iter([_part(3, 0)] * 3), 3))


def test_step_buffer_assembly_matches_concatenation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned step buffer's copy-in logic on CPU (page-locking and the device sync stubbed):
    the step is the parts' concatenation, a short last group is a short step, the buffer is reused."""
    from vlscale.train import assemble

    made = []

    def plain(self, shape, dtype):
        made.append(shape)
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(assemble.PinnedStep, "_page_locked", plain)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assembler = assemble.StepAssembler(8, torch.device("cpu"))
    assembler.pinned = assemble.PinnedStep(8, torch.device("cpu"))
    _assemble_and_check(assembler)
    assert made.count((8, 3, 2, 2)) == 1  # one pixel buffer for every step
    whole = assemble.StepAssembler(8, torch.device("cpu")).steps(iter([_part(3, 0)]), 1)
    assert next(whole).keys == ["k0", "k1", "k2"]  # one part per step: the parts as they are


@pytest.mark.gpu
def test_step_buffer_is_page_locked_on_cuda() -> None:
    from vlscale.train.assemble import StepAssembler

    assembler = StepAssembler(8, torch.device("cuda"))
    _assemble_and_check(assembler)
    step = next(assembler.steps(iter([_part(3, 0), _part(3, 3)]), 3))
    assert step.pixels.is_pinned() and step.pixels.device.type == "cpu"
    on_gpu = step.pixels.to("cuda", non_blocking=True)
    step = next(assembler.steps(iter([_part(2, 20)]), 3))  # overwrites the buffer after a sync
    assert on_gpu[:, 0, 0, 0].tolist() == list(range(6)) and step.pixels[:, 0, 0, 0].tolist() == [20, 21]
    assembler.close()
