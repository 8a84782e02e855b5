"""ViCHA and BriVL model parts: the default hierarchical pairing and per-level weights, visual concepts
as image-side tokens (padding masked, fed at evaluation), layer freezing (no gradient, no optimizer
state), masked image modeling through the gradient cache's per-chunk hook (cached step == plain
big-batch step with the same extra loss; RNG replay), and ``vlscale concepts`` (a known-answer
vocabulary and top-k, and an end-to-end run on a real checkpoint folder)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_techniques import max_rel, tiny_model_cfg

from vlscale.engines import build_engine
from vlscale.gradcache import ChunkContext, GradCache
from vlscale.loss import contrastive_loss
from vlscale.model import DualEncoder, param_groups
from vlscale.techniques import MaskedImageModeling, mim_loss
from vlscale.techniques.mining import caption_terms, mine_vocabulary, top_concepts


def _batch(model: DualEncoder, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = ["a red circle", "blue square left", "green sky", "a dog on grass", "red ball right"]
    enc = model.tokenizer([words[i % 5] for i in range(n)], padding="max_length", max_length=8, return_tensors="pt")
    return {"pixels": torch.randn(n, 3, 32, 32, generator=g), "tokens": enc["input_ids"],
            "attention_mask": enc["attention_mask"]}


def _clip(embs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    return contrastive_loss(embs["image"], embs["text"], embs["logit_scale"], impl="reference"), {}


# ---------------------------------------------------------------- hierarchical pairing and weights


def test_default_hier_pairing_is_the_layers_below_the_last() -> None:
    from vlscale.config import Config, TechniquesConfig, load_recipe
    from vlscale.model import ModelConfig

    cfg = tiny_model_cfg(hier_levels=2, vision_kwargs={"depth": 4}, text_config={"num_hidden_layers": 3})
    assert cfg.hier_image_layers == cfg.hier_text_layers == (-3, -2)
    torch.manual_seed(0)
    auto = DualEncoder(cfg).eval()
    assert auto.visual.hier_idx == [1, 2] and auto.textual.hier_idx == [0, 1]
    explicit = DualEncoder(tiny_model_cfg(hier_image_layers=(1, 2), hier_text_layers=(0, 1),
                                          vision_kwargs={"depth": 4}, text_config={"num_hidden_layers": 3})).eval()
    explicit.load_state_dict(auto.state_dict())
    inputs = _batch(auto, 3)
    a, b = auto(**inputs), explicit(**inputs)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="hier_levels"):
        ModelConfig(hier_levels=2, hier_image_layers=(0,), hier_text_layers=(0,))
    # Per-level weights: one per level, checked before anything is built.
    ok = Config(model=cfg, techniques=TechniquesConfig(hier_weight=[0.1, 0.2]))
    assert ok.techniques.hier_on
    with pytest.raises(ValueError, match="2 hierarchical levels"):
        Config(model=cfg, techniques=TechniquesConfig(hier_weight=[0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="hier_levels"):
        Config(model=tiny_model_cfg(), techniques=TechniquesConfig(hier_weight=0.1))
    recipe = load_recipe("tiny-cpu", ["model.hier_levels=1", "techniques.hier_weight=[0.25]"])
    assert recipe.techniques.hier_weight == [0.25] and recipe.model.hier_text_layers == (-2,)


# ---------------------------------------------------------------- visual concepts as image tokens


def test_concept_tokens_join_the_image_side_with_padding_masked() -> None:
    torch.manual_seed(0)
    model = DualEncoder(tiny_model_cfg(concept_tokens=6, concept_layers=1, hier_levels=1)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    concepts = [["red", "circle"], ["sky"], []]
    inputs = model.concept_inputs(concepts)
    assert inputs["concept_tokens"].shape == (3, 6) and inputs["concept_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    with_c = model(pixels=pixels, **inputs)
    # More padding changes nothing: padded tokens are masked out of every attention.
    enc = model.tokenizer([" ".join(c) for c in concepts], padding="max_length", max_length=11, return_tensors="pt")
    padded = model(pixels=pixels, concept_tokens=enc["input_ids"], concept_mask=enc["attention_mask"])
    for key in ("image", "image_hier"):
        torch.testing.assert_close(padded[key], with_c[key], atol=1e-6, rtol=1e-5)
    plain = model(pixels=pixels)
    assert (with_c["image"] - plain["image"]).abs().max() > 1e-3  # the concepts do reach the image side
    with_c["image"].sum().backward()
    assert model.concept_proj.weight.grad.abs().sum() > 0
    assert model.textual.trunk.embeddings.word_embeddings.weight.grad is not None
    with pytest.raises(ValueError, match="vlscale concepts"):
        model.concept_inputs(None)
    assert DualEncoder(tiny_model_cfg()).concept_inputs(concepts) == {}


def test_evaluation_feeds_every_concept_to_the_image_side() -> None:
    from vlscale.eval import embed_dataset

    torch.manual_seed(0)
    model = DualEncoder(tiny_model_cfg(concept_tokens=6)).eval()
    batches = []
    for b in range(2):
        inputs = _batch(model, 3, seed=b)
        batches.append({**inputs, "keys": [f"k{b}{i}" for i in range(3)],
                        "concepts": [["red"], ["sky", "dog"], []]})
    img, txt, t2i = embed_dataset(model, batches, group_by="key")
    with torch.no_grad():
        ref = torch.cat([model(pixels=b["pixels"], **model.concept_inputs(b["concepts"]))["image"] for b in batches])
    torch.testing.assert_close(img, ref)
    assert t2i.tolist() == list(range(6)) and txt.shape == (6, 16)


# ---------------------------------------------------------------- BriVL partial backbones


def test_frozen_layers_get_no_gradient_and_no_optimizer_state() -> None:
    torch.manual_seed(0)
    model = DualEncoder(tiny_model_cfg(freeze_image_layers=1, freeze_text_layers=1))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("visual.trunk.cls_token", "visual.trunk.pos_embed", "visual.trunk.patch_embed",
                                 "visual.trunk.blocks.0.", "textual.trunk.embeddings.",
                                 "textual.trunk.encoder.layer.0."))}
    assert frozen == expected and len(frozen) > 10
    assert not {id(p) for g in param_groups(model, 0.1) for p in g["params"]} & {
        id(p) for n, p in model.named_parameters() if n in frozen}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    engine = build_engine("local", model, optimizer=opt)
    GradCache(engine, chunk_size=2).step(_batch(model, 5), _clip)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert not grads & frozen and grads
    engine.optimizer_step()
    state_ids = set(map(id, opt.state))
    for n, p in model.named_parameters():
        assert (id(p) in state_ids) == (n not in frozen), n
        assert torch.equal(p, before[n]) == (n in frozen), n
    with pytest.raises(ValueError, match="block groups"):
        DualEncoder(tiny_model_cfg(freeze_image_layers=3))
    with pytest.raises(ValueError, match="freeze_text_layers"):
        DualEncoder(tiny_model_cfg(freeze_text_layers=3))


# ---------------------------------------------------------------- masked image modeling


def test_mim_loss_matches_a_dense_reference() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 16, 12, generator=g), torch.randn(3, 16, 12, generator=g)
    keep = torch.rand(3, 16, generator=g).argsort(1)[:, :4]
    got = mim_loss(pred, target, keep)
    for i in range(3):
        removed = sorted(set(range(16)) - set(keep[i].tolist()))
        t = target[i, removed]
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(got[i], ((pred[i, removed] - t) ** 2).mean())


def _mim_model(**kw: object) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(tiny_model_cfg(mim_decoder_depth=1, mim_decoder_width=32, mim_decoder_heads=2, **kw))


def _grads(model: DualEncoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_hooked_cached_step_equals_the_plain_step_with_the_same_extra_loss() -> None:
    model = _mim_model()
    ref = copy.deepcopy(model)
    inputs = _batch(model, 7)
    calls: list[tuple[str, int, int]] = []

    def hooked(mim: MaskedImageModeling):
        def hook(ctx: ChunkContext):
            calls.append((ctx.tower, ctx.start, ctx.stop))
            return mim(ctx)
        return hook

    mim = MaskedImageModeling(weight=0.5, num_patches=16, seed=3)
    mim.start_step(0, 7)
    engine = build_engine("local", model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    res = GradCache(engine, chunk_sizes={"image": 3, "text": 4}).step(inputs, _clip, chunk_loss=hooked(mim))
    # Once per chunk, in the graph pass only; text chunks return no term.
    assert calls == [("image", 0, 3), ("image", 3, 6), ("image", 6, 7), ("text", 0, 4), ("text", 4, 7)]
    ref_engine = build_engine("local", ref, optimizer=torch.optim.SGD(ref.parameters(), lr=0.1))
    plain = GradCache(ref_engine, chunk_size=None).step(inputs, _clip, chunk_loss=mim)
    assert "chunk_loss" in res.metrics and res.metrics["chunk_loss"] > 0
    assert abs(float(res.loss) - float(plain.loss)) < 1e-5
    assert abs(res.metrics["chunk_loss"] - plain.metrics["chunk_loss"]) < 1e-6
    got, want = _grads(model), _grads(ref)
    assert set(got) == set(want) and any(n.startswith("mim_decoder.") for n in got)
    assert max_rel(got, want) < 1e-5, max_rel(got, want)
    with pytest.raises(ValueError, match="chunk_loss"):
        GradCache(engine, chunk_size=4).step(inputs, _clip, chunk_loss=lambda ctx: torch.ones(2))


def test_hook_runs_under_each_chunks_replayed_rng() -> None:
    """With drop-path on, the hook's masked forward draws from the chunk's replayed RNG stream right
    after the chunk's forward: the cached step equals a reference that forwards the chunks in order
    and runs each hook from the RNG state its chunk's forward left."""
    model = _mim_model(drop_path_rate=0.3, text_config={"hidden_dropout_prob": 0.2})
    ref = copy.deepcopy(model)
    inputs = _batch(model, 7)
    sizes = {"image": 3, "text": 4}
    mim = MaskedImageModeling(weight=1.0, num_patches=16, seed=1)
    mim.start_step(5, 7)
    torch.manual_seed(11)
    engine = build_engine("local", model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    res = GradCache(engine, chunk_sizes=sizes).step(inputs, _clip, chunk_loss=mim)

    torch.manual_seed(11)
    chunks, outs = [], {}
    for tower, names in (("image", ("pixels",)), ("text", ("tokens", "attention_mask"))):
        for start in range(0, 7, sizes[tower]):
            tin = {n: inputs[n][start:start + sizes[tower]] for n in names}
            out = ref(**tin)
            chunks.append((tower, start, min(start + sizes[tower], 7), tin, out, torch.get_rng_state()))
            outs.setdefault(tower, []).append(out[tower])
    loss = _clip({"image": torch.cat(outs["image"]), "text": torch.cat(outs["text"]),
                  "logit_scale": chunks[0][4]["logit_scale"]})[0]
    for tower, start, stop, tin, out, state in chunks:
        torch.set_rng_state(state)
        term = mim(ChunkContext(tower, start, stop, 7, tin, out, ref))
        loss = loss + (term if term is not None else 0.0)
    loss.backward()
    assert abs(float(res.loss) - float(loss.detach())) < 1e-5
    assert max_rel(_grads(model), _grads(ref)) < 1e-5


# ---------------------------------------------------------------- vlscale concepts


def test_vocabulary_and_top_k_on_a_constructed_case() -> None:
    captions = ["A red dog on the grass.", "a red ball", "the dog and the ball", "Two dogs; 3 red-eyed birds",
                "grass grass grass", "a dog"]
    assert caption_terms("The red-eyed dog, 2 cats!") == ["red-eyed", "dog", "cats"]
    assert caption_terms("a red dog on grass", ngrams=2) == ["red", "dog", "grass", "red dog"]
    # Counted once per caption, ties alphabetical, stop words / numbers / single letters dropped.
    assert mine_vocabulary(captions, size=10, min_count=2) == [("dog", 3), ("ball", 2), ("grass", 2), ("red", 2)]
    assert mine_vocabulary(captions, size=2, min_count=1) == [("dog", 3), ("ball", 2)]
    words = ["dog", "ball", "grass", "red", "sky"]
    # Orthonormal word embeddings (rotated so no coordinate is special): the answer is exact.
    rot = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0]
    w = torch.eye(8)[:5] @ rot
    # Image 0 is "mostly grass, a bit of dog"; image 1 is exactly "sky".
    img = F.normalize(torch.stack([0.8 * w[2] + 0.5 * w[0], w[4]]), dim=-1)
    tops = top_concepts(img, w, words, 2, chunk=1)
    assert tops[0] == ["grass", "dog"] and tops[1][0] == "sky"
    with pytest.raises(ValueError, match="fit together"):
        top_concepts(img, w[:4], words, 2)


def test_vlscale_concepts_tags_a_shard_set_with_a_checkpoints_top_k(tmp_path: Path) -> None:
    from vlscale.cli import main as cli_main
    from vlscale.config import load_recipe, save_config
    from vlscale.data.stream import list_shards, open_shard
    from vlscale.demo_data import build_demo_dataset
    from vlscale.eval import build_classifier, embed_dataset
    from vlscale.eval.cli import load_model
    from vlscale.train.evaluate import eval_loader

    shards = build_demo_dataset(tmp_path / "data", n_train=9, n_eval=3, size=32)["eval"]  # 3 images, 5 captions each
    cfg = load_recipe("tiny-cpu", ["model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, "
                                   "\"num_heads\": 2}", "model.embed_dim=16", "eval.batch_size=4"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    torch.save(DualEncoder(cfg.model).state_dict(), ckpt / "model.pt")
    save_config(cfg, ckpt / "config.json")

    out = tmp_path / "tagged"
    assert cli_main(["concepts", str(shards), "--checkpoint", str(ckpt), "--out", str(out), "--top-k", "3",
                     "--min-count", "1", "--no-progress"]) == 0
    summary = json.loads((out / "concepts.json").read_text())
    vocab = [w for w, _ in summary["vocabulary"]]
    assert summary["summary"]["images"] == 3 and summary["summary"]["rows_written"] == 15
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic: no temp files left

    # Reference: the same checkpoint, embedded through the evaluation path, dense similarities.
    _, model = load_model(ckpt, torch.device("cpu"))
    img, _, _ = embed_dataset(model, eval_loader(cfg, str(shards), model.tokenizer, model.data_config()),
                              group_by="key")
    words = build_classifier(model, model.tokenizer, vocab, context_length=cfg.model.context_length)
    expected = [[vocab[j] for j in row] for row in (img @ words.T).topk(3, dim=1).indices.tolist()]
    keys: list[str] = []
    rows = []
    for path in list_shards(out):
        table = open_shard(path).read_all()
        rows += list(zip(table.column("key").to_pylist(), table.column("concepts").to_pylist()))
    for key, concepts in rows:
        if key not in keys:
            keys.append(key)
        assert concepts == expected[keys.index(key)], (key, concepts)
    assert cli_main(["concepts", str(shards), "--checkpoint", str(ckpt), "--out", str(shards)]) == 2
