"""Config-time checks (vlscale.train.preflight) and honest tokenization (the tiny-cpu recipe, text metrics).

Each error must come before any model is built and name the fix; warnings name the field and the
fix too. The tiny-cpu recipe must not mangle real captions (it used a 28-word vocabulary).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vlscale.config import load_recipe
from vlscale.data import ShardWriter
from vlscale.demo_data import build_demo_dataset
from vlscale.model.tokenizer import audit_texts, build_tokenizer, text_warning, word_tokenizer
from vlscale.train import trainer as trainer_mod
from vlscale.train.preflight import PreflightError, batches_per_rank, preflight

REAL_CAPTIONS = [
    "A brown dog leaps to catch a frisbee in a sunny park.",
    "Two cyclists ride past a bakery on a cobbled street at dusk.",
    "A bowl of ramen with a soft-boiled egg, scallions and sliced pork.",
    "An old lighthouse stands on rocks while waves crash below it.",
    "Children fly colourful kites on a windy beach.",
    "A laptop, a notebook and a cup of coffee on a wooden desk.",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_dataset(tmp_path_factory.mktemp("shards"), n_train=23, n_eval=4, size=32)


@pytest.fixture(scope="module")
def real_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards whose captions are ordinary English sentences."""
    out = tmp_path_factory.mktemp("real")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(buf, format="PNG")
    with ShardWriter(out, source="real") as w:
        for i in range(24):
            w.add(image_bytes=buf.getvalue(), caption=REAL_CAPTIONS[i % len(REAL_CAPTIONS)], key=f"r{i}")
    return out


def cfg_for(shards: Path, *extra: str):
    return load_recipe("tiny-cpu", ["engine.kind=local", "engine.zero_stage=0", f"data.train_shards={shards}",
                                    "data.eval_shards=", "train.global_batch_size=8", "gradcache.chunk_size=2",
                                    "data.num_workers=1", "train.steps=20", "train.warmup_steps=2", *extra])


def test_rows_vs_ranks_workers_batch_is_an_early_error_naming_the_fix(shards: dict[str, Path]) -> None:
    # 23 rows over 2 ranks × 4 workers = 8 streams of 2 rows: no full batch of 4 anywhere.
    cfg = cfg_for(shards["train"], "data.num_workers=4")
    with pytest.raises(PreflightError, match=r"23 rows split over 2 ranks × 4 loader workers = 8 streams") as err:
        preflight(cfg, world_size=2)
    msg = str(err.value)
    assert "data.num_workers=2" in msg and "train.global_batch_size=4" in msg and "at least 32 rows" in msg
    assert batches_per_rank({"all": 23}, micro=4, world=2, workers=2) == 2  # the fix it names works
    assert preflight(cfg_for(shards["train"], "data.num_workers=2"), world_size=2) is not None
    # Too big a batch for the data whatever the workers: the batch and the rows are the fixes.
    with pytest.raises(PreflightError, match=r"fix: train.global_batch_size=23 \(or less\), or at least 24 rows"):
        preflight(cfg_for(shards["train"], "train.global_batch_size=24", "data.num_workers=0"), world_size=1)


def test_the_trainer_checks_before_building_anything(shards: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(trainer_mod, "build_model", no_model)
    cfg = cfg_for(shards["train"], "data.num_workers=4", "train.global_batch_size=64", f"train.run_dir={tmp_path}")
    with pytest.raises(PreflightError, match="fewer than one full batch of 64 pairs"):
        trainer_mod.Trainer(cfg)
    with pytest.raises(PreflightError, match=r"data\.train_shards is empty"):
        trainer_mod.Trainer(cfg_for("", f"train.run_dir={tmp_path}"))
    with pytest.raises(PreflightError, match=r"data\.train_shards=.*nowhere"):
        trainer_mod.Trainer(cfg_for(str(tmp_path / "nowhere"), f"train.run_dir={tmp_path}"))


def test_batch_split_error_and_warnings(shards: dict[str, Path]) -> None:
    with pytest.raises(PreflightError, match=r"global_batch_size=9 does not split over 2 ranks.*8 or 10"):
        preflight(cfg_for(shards["train"], "train.global_batch_size=9"), world_size=2)
    warnings = preflight(cfg_for(shards["train"], "gradcache.chunk_size=4", "gradcache.text_chunk_size=16",
                                 "train.steps=5", "train.warmup_steps=10"), world_size=2)
    text = "\n".join(warnings)
    assert "gradcache.chunk_size=4 >= the per-rank batch of 4 pairs" in text and "gradcache.chunk_size=2" in text
    assert "gradcache.text_chunk_size=16" in text
    assert "train.warmup_steps=10 >= train.steps=5" in text and "train.warmup_steps=1" in text
    assert "each epoch uses 16 of 23 rows" in text  # 7 rows in partial batches: 30 %
    assert not any("gradcache" in w or "warmup" in w for w in preflight(cfg_for(shards["train"]), world_size=2))


def test_tiny_cpu_uses_a_real_wordpiece_vocabulary() -> None:
    cfg = load_recipe("tiny-cpu")
    assert not cfg.model.tokenizer_words
    tok = build_tokenizer(cfg.model)
    assert len(tok) == 30522  # the uncased BERT vocabulary
    stats = audit_texts(tok, REAL_CAPTIONS, max_length=32)
    assert stats["unk_rate"] == 0.0 and stats["char_split_rate"] < 0.02
    assert text_warning(stats, context_length=32, word_list=False) is None
    # What the recipe used to do: a 28-word list spells every other word out letter by letter.
    old = word_tokenizer(["a", "above", "blue", "circle", "of", "on", "red", "the"], context_length=16)
    bad = audit_texts(old, REAL_CAPTIONS, max_length=16)
    assert bad["char_split_rate"] > 0.5 and bad["truncated_rate"] > 0.5
    warning = text_warning(bad, context_length=16, word_list=True)
    assert "split into single characters" in warning and "model.tokenizer_words=[]" in warning
    assert "model.context_length" in warning


def test_mangled_text_warns_before_training(real_text: Path) -> None:
    words = ["model.tokenizer_words=[\"a\",\"dog\",\"on\",\"the\"]", "model.context_length=8"]
    warnings = preflight(cfg_for(real_text, *words, "data.num_workers=0"), world_size=1)
    assert any("sampled captions" in w and "model.tokenizer_words=[]" in w for w in warnings), warnings
    clean = preflight(cfg_for(real_text, "data.num_workers=0", "model.context_length=32"), world_size=1)
    assert not any("captions" in w for w in clean), clean


def _preflight_rank(rank: int, world: int, port: int, fail: str, out: str) -> None:
    """One rank of a gloo group running preflight_all_ranks with a stand-in check that fails on
    rank 0 (``fail``) and would raise a rank-1-only "transient" error if rank 1 ran it."""
    import json
    import os

    import torch.distributed as dist

    from vlscale.memory import hostmem
    from vlscale.train import preflight as pf

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls, seen = [], []
    # each rank on its own "machine": the check must see both, each with its memory and rank count
    hostmem.host_identity = lambda: {"host": f"node{rank}", "memory": ((rank + 1) * 10**9, rank + 1)}

    def check(cfg: object, world_size: int, hosts: object = None) -> list[str]:
        calls.append(rank)
        seen.append(hosts)
        if rank == 1:
            raise OSError("transient read error seen by rank 1 only")
        if fail == "config":
            raise pf.PreflightError("config check failed before building the model:\n  - boom")
        if fail == "crash":
            raise OSError("s3://bucket/shards: connection reset")
        return [f"a warning for {world_size} ranks"]

    pf.preflight = check
    try:
        result = ["ok", pf.preflight_all_ranks(None, world, rank=rank)]
    except Exception as exc:
        result = [type(exc).__name__, str(exc)]
    Path(out, f"{rank}.json").write_text(json.dumps({"result": result, "calls": calls, "hosts": seen}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("fail", ["none", "config", "crash"])
def test_preflight_outcome_is_rank_zeros_on_every_rank(fail: str, tmp_path: Path) -> None:
    """Rank 0 checks and broadcasts: every rank returns the same warnings or raises the same error,
    so a failure one rank alone sees cannot leave the others waiting in the next collective."""
    import json

    import torch.multiprocessing as mp
    from conftest import free_port

    mp.spawn(_preflight_rank, args=(2, free_port(), fail, str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["calls"] for r in res] == [[0], []]  # only rank 0 ran the checks
    assert res[0]["hosts"] == [[["node0", [10**9, 1], 1], ["node1", [2 * 10**9, 2], 1]]]  # ...for every machine
    if fail == "none":
        assert [r["result"] for r in res] == [["ok", ["a warning for 2 ranks"]]] * 2
    elif fail == "config":
        assert [r["result"][0] for r in res] == ["PreflightError"] * 2 and "boom" in res[1]["result"][1]
    else:
        assert res[0]["result"] == ["OSError", "s3://bucket/shards: connection reset"]
        assert res[1]["result"] == ["RuntimeError", "the config check failed on rank 0: OSError: "
                                    "s3://bucket/shards: connection reset"]
