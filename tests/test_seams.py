"""The seams between parts built separately, as a user combining them hits them.

* debiased sampling × a world-size change: the rest of the epoch, re-split, still has one source
  per global step and every sample once — also when skipped samples made an old batch short;
* debiased sampling × corrupt samples × mixup / momentum on 2 ranks: a short step is cut to the
  same rows on every rank (counted), the mixup partners are the right global rows, a rank with no
  rows skips the step everywhere; the run resumes on 1 rank through the re-split;
* launcher × techniques × engines: the vicha recipe (concept tokens, hierarchy, MIM, momentum)
  with mixup and a frozen layer under accelerate's ZeRO-3 + bf16 (construction-time partitioning)
  and ZeRO-2, both from one ``train.init_from`` checkpoint, the EMA starting at its weights; that
  checkpoint exported and loaded with its concept path;
* ViCHA caption concepts × ZeroVL caption masking; every recipe × the memory planner, preflight
  and the CLI's command list; preflight × debiased sampling and ViCHA concepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers_process import one_process
from helpers_seams import (
    corrupt_debiased_shards,
    record_steps,
    two_rank_worker,
    vicha_overrides,
    zerovl_overrides,
)

from vlscale.config import RECIPE_DIR, load_recipe
from vlscale.data import build_loader
from vlscale.train.reshard import ResplitLoader


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corrupt_debiased_shards(tmp_path_factory.mktemp("corrupt"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlscale.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=24, n_eval=4, size=32)


@pytest.mark.parametrize("part", [0, 3], ids=["whole", "parts"])
def test_world_size_change_keeps_one_source_per_step_and_each_sample_once(corrupt: Path, part: int) -> None:
    """2 ranks (old rank 0's step 7 is short) resumed after step 2 on 1, 3 and 4 ranks; with
    data.part_size=3 the old ranks' parts are assembled into their steps first."""
    from vlscale.train.assemble import concat_steps

    def make(rank: int, world: int, micro: int, workers: int, part_size: int = part):
        return build_loader(corrupt, image_size=4, batch_size=micro, rank=rank, world_size=world, num_workers=workers,
                            seed=1, debiased=True, train=True, shuffle_buffer=8, part_size=part_size)

    n = 6 // part if part else 1
    full = [list(concat_steps(make(r, 2, 6, 1), n)) for r in range(2)]
    assert [len(b) for b in full[0]][6] == 3, "the data no longer makes a short step: fix the test"
    old = [make(r, 2, 6, 1) for r in range(2)]
    for ld in old:
        it = iter(ld)
        for _ in range(2 * n):
            next(it)
    states = {r: ld.state_dict() for r, ld in enumerate(old)}
    for world in (1, 3, 4) if not part else (1, 4):  # parts of 3 must divide the new per-rank batch
        new = [ResplitLoader(make, states, old_world=2, rank=r, world=world, micro=12 // world,
                             next_loader=make(r, world, 12 // world, 1)) for r in range(world)]
        assert {ld.parts_per_step for ld in new} == {1}  # the re-split epoch yields whole steps
        per_rank = [list(ld) for ld in new]
        assert {len(b) for b in per_rank} == {len(full[0]) - 2}
        for t, parts in enumerate(zip(*per_rank)):
            assert len({s for b in parts for s in b.source}) == 1, f"{world} ranks, step {t + 3}: mixed sources"
            want = full[0][t + 2].keys + full[1][t + 2].keys  # the old run's global batch, rank order
            assert [k for b in parts for k in b.keys] == want, f"{world} ranks, step {t + 3}"
        assert {ld.parts_per_step for ld in new} == {12 // world // part if part else 1}  # then the new split's


@pytest.mark.dist
@pytest.mark.slow
def test_short_debiased_step_with_mixup_and_momentum_two_ranks_then_one(corrupt: Path, port: int,
                                                                        tmp_path: Path) -> None:
    from vlscale.train.trainer import Trainer

    mp.spawn(two_rank_worker, args=(2, port, str(corrupt), str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert "error" not in r, r["error"]
    steps = [r["steps"] for r in res]
    assert [len(s["keys"]) for s in steps[0]] == [len(s["keys"]) for s in steps[1]] == [6] * 6 + [3]
    for t, (a, b) in enumerate(zip(*steps)):
        assert a["source"] == b["source"] and len(a["source"]) == 1, f"step {t + 1}: one source per global step"
        glob = a["keys"] + b["keys"]
        for mine in (a, b):  # partner i of each rank is its own row n-1-i, as a GLOBAL row
            if mine["partners"] is not None:
                assert [glob[j] for j in mine["partners"]] == mine["keys"][::-1], f"step {t + 1}: mixup partners"
    assert any(s["partners"] is not None for s in steps[0])
    summaries = [r["summary"] for r in res]
    assert summaries[0]["losses"] == summaries[1]["losses"] and len(summaries[0]["losses"]) == 7
    assert summaries[0]["counters"]["trimmed_samples"] == 3 and summaries[0]["counters"]["samples"] == 6 * 12 + 6
    assert res[0]["empty_step"] == res[1]["empty_step"] == [True, 4]

    # One rank resumes the 2-rank checkpoint of step 4: steps 5-7 are the same global batches (the
    # short step whole now: nothing to cut on one rank), the momentum state comes back from rank 0.
    one = Trainer(load_recipe("zerovl", zerovl_overrides(str(corrupt), tmp_path / "one")),
                  resume=str(tmp_path / "run" / "checkpoints" / "step_000004"))
    again: list[dict] = []
    record_steps(one, again)
    try:
        losses = one.fit()["losses"]
    finally:
        one.close()
    assert sorted(losses) == [5, 6, 7] and all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    for t, got in zip(range(4, 7), again):
        two = steps[0][t]["keys"] + steps[1][t]["keys"]
        assert got["keys"] == two or (t == 6 and len(got["keys"]) == 9 and set(two) < set(got["keys"])), t + 1


@pytest.mark.dist
@pytest.mark.slow
def test_vicha_under_accelerate_zero3_bf16_from_init_from_then_export(demo: dict[str, Path], tmp_path: Path,
                                                                      port: int) -> None:
    pytest.importorskip("deepspeed")
    from vlscale.data import Batch
    from vlscale.export import export, load
    from vlscale.model import DualEncoder
    from vlscale.train.checkpoint import load_model_weights, load_weights_into

    res = one_process("helpers_seams", "engine_worker", [str(demo["train"]), str(tmp_path)], tmp_path / "engines.json",
                      port)
    assert res["z2"]["engine"] == [2, True] and res["z3"]["engine"] == [3, True]
    for stage in ("z2", "z3"):
        assert res[stage]["ema_is_init"], f"{stage}: the momentum EMA did not start at train.init_from's weights"
    z2, z3 = ({int(k): v for k, v in res[s]["losses"].items()} for s in ("z2", "z3"))
    assert sorted(z3) == [1, 2]
    for step in (1, 2):  # same weights, data and draws: only bf16 rounding in another order differs
        assert z3[step] == pytest.approx(z2[step], rel=2e-2), (step, z2, z3)

    # The local checkpoint of a concept-token / hierarchical / MIM model with a frozen layer, exported
    # and loaded: the same image embeddings with its concepts (none given: empty lists, a warning).
    manifest = export(tmp_path / "init", tmp_path / "export")
    assert not manifest["open_clip_config"] and any("concept_tokens" in b for b in manifest["open_clip_blockers"])
    loaded = load(tmp_path / "export")
    cfg = load_recipe("vicha", vicha_overrides(str(demo["train"]), tmp_path / "unused", "engine.kind=local",
                                               "engine.zero_stage=0"))
    model = DualEncoder(cfg.model).eval()
    load_weights_into(model, load_model_weights(tmp_path / "init"), source="init")
    batch = next(iter(build_loader(demo["train"], tokenizer=model.tokenizer, image_size=32, train=False,
                                   batch_size=4, rank=0, world_size=1)))
    assert isinstance(batch, Batch) and batch.concepts and any(batch.concepts)
    with torch.no_grad():
        want = model.encode_image(batch.pixels, **model.concept_inputs(batch.concepts))["image"]
        bare = model.encode_image(batch.pixels, **model.concept_inputs([[] for _ in batch.concepts]))["image"]
    assert loaded.takes_concepts
    torch.testing.assert_close(loaded.encode_image(batch.pixels, batch.concepts), want)
    torch.testing.assert_close(loaded.encode_image(batch.pixels), bare)
    assert not torch.allclose(want, bare)


def test_caption_concepts_keep_zerovl_caption_masking(demo: dict[str, Path]) -> None:
    """Concepts appended to the captions (re-tokenised in Objective.prepare) get the caption masking
    the loader gave the bare captions: at its rate, seeded by (seed, step, sample)."""
    from types import SimpleNamespace

    from vlscale.model import DualEncoder
    from vlscale.train.losses import Objective

    def objective(prob: float) -> Objective:
        cfg = load_recipe("vicha", ["techniques.concept_mode=caption", "model.concept_tokens=0", "model.hier_levels=0",
                                    "techniques.hier_weight=0", "model.mim_decoder_depth=0", "techniques.mim_weight=0",
                                    "techniques.momentum_queue=0", "techniques.contrastive_weight=1",
                                    "techniques.concept_prob=1.0", f"data.text_mask_prob={prob}"])
        model = DualEncoder(cfg.model)
        return Objective(cfg, process_group=None, module=model, tokenizer=model.tokenizer, micro_batch=64)

    n = 64
    words = ["red circle", "blue square", "green triangle", "white circle"]
    batch = SimpleNamespace(captions=[f"a {words[i % 4]} above a {words[(i + 1) % 4]}" for i in range(n)],
                            concepts=[["red", "circle", "square"]] * n, keys=[f"k{i}" for i in range(n)],
                            source=["demo"] * n)

    def tokens(obj: Objective, step: int) -> torch.Tensor:
        inputs = {"pixels": torch.zeros(n, 3, 32, 32), "tokens": torch.zeros(n, 16, dtype=torch.long),
                  "attention_mask": torch.zeros(n, 16, dtype=torch.long)}
        return obj.prepare(step, batch, inputs)["tokens"]

    plain, masked = objective(0.0), objective(0.3)
    ref = tokens(plain, 3)
    got = tokens(masked, 3)
    assert torch.equal(got, tokens(masked, 3)) and not torch.equal(got, tokens(masked, 4))
    mask_id = masked.tokenizer.mask_token_id
    special = set(masked.tokenizer.all_special_ids)
    content = sum(int(t) not in special for row in ref for t in row)
    masked_ids = int((got == mask_id).sum())
    # 30 % of the content tokens picked, half of those turned into [MASK] (ZeroVL's split).
    assert 0.08 * content < masked_ids < 0.25 * content, (masked_ids, content)
    assert (ref == mask_id).sum() == 0


def test_every_recipe_plans_passes_preflight_and_the_cli_lists_every_command(
        demo: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The planner runs on each shipped recipe (the others' plans are in test_memory_cli.py); each
    passes preflight on demo shards (captions and concepts of the right kind; the row counts scaled
    to the recipe's batch, since the v100 recipes need 10⁵ rows); ``vlscale --help`` lists every
    subcommand, each of which answers ``--help``."""
    from vlscale.cli import SUBCOMMANDS
    from vlscale.cli import main as vlscale_main
    from vlscale.memory import plan as planner
    from vlscale.train import preflight as pf

    recipes = sorted(p.stem for p in RECIPE_DIR.glob("*.json"))
    assert {"zerovl", "brivl", "vicha", "zerovl-v100", "brivl-v100", "vicha-v100"} <= set(recipes)
    for name in ("zerovl", "brivl", "vicha", "brivl-v100", "vicha-v100"):
        world = 8 if name.endswith("-v100") else 2
        result = planner.plan(planner.plan_inputs(load_recipe(name), world_size=world, gpu_memory=32 << 30))
        assert result["verdict"].startswith("FITS"), (name, result["verdict"])
    from vlscale.memory import hostmem

    # the recipes' target machine (8 × V100 with 512 GB of host memory), not this one
    monkeypatch.setattr(hostmem, "machine_memory", lambda: (512 * 10**9, 480 * 10**9))
    real = pf.stream_rows
    monkeypatch.setattr(pf, "stream_rows", lambda index, debiased: {k: v * 10**5 for k, v in real(
        index, debiased=debiased).items()})
    for name in recipes:
        cfg = load_recipe(name, [f"data.train_shards={demo['train']}", f"data.eval_shards={demo['eval']}"])
        world = 2 if cfg.model.image_size <= 64 else 8
        warnings = pf.preflight(cfg, world)
        assert all("per-rank batch" in w for w in warnings), (name, warnings)  # vicha-v100: one chunk per rank

    assert vlscale_main(["--help"]) == 0
    listed = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert f"  {command} " in listed
        with pytest.raises(SystemExit) as exit_:
            vlscale_main([command, "--help"])
        assert exit_.value.code == 0, command
        assert "usage:" in capsys.readouterr().out, command


def test_preflight_debiased_rows_vicha_concepts_and_caption_masking(corrupt: Path, demo: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from vlscale.model.tokenizer import word_tokenizer
    from vlscale.train.preflight import PreflightError, preflight

    # Debiased: a step is one global batch of one source, whatever the workers: with 6 workers per
    # rank, 61 + 51 rows still make 9 steps of 12 (mixed sampling's per-worker split would make none).
    cfg = load_recipe("zerovl", [f"data.train_shards={corrupt}", "data.num_workers=6", "train.global_batch_size=12"])
    preflight(cfg, 2)
    with pytest.raises(PreflightError, match=r"no source has that many rows .* train.global_batch_size=60"):
        preflight(load_recipe("zerovl", [f"data.train_shards={corrupt}", "train.global_batch_size=64"]), 2)
    # ViCHA concepts: training shards without them, or evaluation shards of a concept-token model.
    with pytest.raises(PreflightError, match=r"have none; fix: mine them with `vlscale concepts"):
        preflight(load_recipe("vicha", [f"data.train_shards={corrupt}", "train.global_batch_size=12"]), 2)
    vicha = ["train.global_batch_size=8", f"data.train_shards={demo['train']}", f"data.eval_shards={corrupt}"]
    with pytest.raises(PreflightError, match=r"data.eval_shards=.* is evaluated with them"):
        preflight(load_recipe("vicha", [*vicha, "train.eval_every=5"]), 1)
    preflight(load_recipe("vicha", [*vicha, "train.eval_every=0"]), 1)  # never evaluated during training
    # ZeroVL caption masking with a tokenizer that has no mask token: refused before the model is built.
    words = word_tokenizer(["a", "photo", "of"], context_length=16)
    PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                            cls_token="[CLS]", sep_token="[SEP]").save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(PreflightError, match=r"data.text_mask_prob=0.2 .* needs a tokenizer with a mask token"):
        preflight(load_recipe("zerovl", [f"data.train_shards={corrupt}", "train.global_batch_size=12",
                                         "model.tokenizer_words=[]", f"model.tokenizer={tmp_path / 'tok'}"]), 2)
