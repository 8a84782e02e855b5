"""Paper techniques against dense float64 references: ZeroVL coin-flip mixup (every loss term's targets),
WenLan / BriVL momentum contrast (fp32 EMA of the masters, chunked keys, queue, B + K and 1 + K
losses, checkpoint state), ViCHA hierarchical alignment and concept sampling.
Multi-rank and engine checks: ``test_techniques_dist.py``; ViCHA model parts: ``test_techniques_vicha.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_techniques import (
    TinyDual,
    dense_batch_queue,
    dense_clip,
    dense_positive_queue,
    tiny_model_cfg,
    unit,
)

from vlscale.techniques import (
    CoinFlipMixup,
    ConceptSampler,
    MixPlan,
    MomentumContrast,
    hierarchical_loss,
    momentum_copy,
    positive_queue_nce,
)

TOL = {"atol": 1e-9, "rtol": 1e-7}  # float64 throughout
MIX_TOL = {"atol": 1e-8, "rtol": 1e-6}  # the fused loss stores target weights (lam) in fp32


# ---------------------------------------------------------------- ZeroVL coin-flip mixup


def test_mixup_draws_are_deterministic_and_have_the_paper_distribution() -> None:
    mix = CoinFlipMixup(alpha=0.1, p_image=0.5, seed=3)
    assert mix.plan(17, 8) == mix.plan(17, 8)
    assert mix.plan(17, 8, offset=8).lam == mix.plan(17, 8).lam  # every rank draws the same
    plans = [mix.plan(step, 8) for step in range(4000)]
    frac_image = sum(p.mode == "image" for p in plans) / len(plans)
    lams = torch.tensor([p.lam for p in plans])
    assert 0.46 < frac_image < 0.54
    assert abs(lams.mean().item() - 0.5) < 0.03
    assert ((lams > 0.1) & (lams < 0.9)).float().mean() < 0.3  # Beta(0.1, 0.1): mass near 0 and 1
    assert all(p.mode == "none" and p.mix() is None for p in (CoinFlipMixup(prob=0.0).plan(s, 4) for s in range(20)))
    with pytest.raises(ValueError, match="alpha"):
        CoinFlipMixup(alpha=0.0)
    with pytest.raises(ValueError, match="p_image"):
        CoinFlipMixup(p_image=1.5)


def test_mix_pixels_text_embeddings_and_per_term_targets() -> None:
    x = torch.randn(5, 3, 4, 4)
    plan = MixPlan("image", 0.7, 5, offset=10)
    torch.testing.assert_close(plan.mix_pixels(x), 0.7 * x + 0.3 * x[[4, 3, 2, 1, 0]])
    t = unit(5, 6, 0)
    assert plan.mix_text(t) is t and plan.mixes_image and not plan.mixes_text
    tplan = MixPlan("text", 0.25, 5, offset=10)
    assert tplan.mix_pixels(x) is x
    torch.testing.assert_close(tplan.mix_text(t), F.normalize(0.25 * t + 0.75 * t.flip(0), dim=-1))
    labels_b, lam = tplan.targets(query_mixed=False, key_mixed=True)
    assert labels_b.tolist() == [14, 13, 12, 11, 10] and lam == 0.25
    assert tplan.targets(query_mixed=True, key_mixed=False, local=True)[0].tolist() == [4, 3, 2, 1, 0]
    assert tplan.targets(query_mixed=False, key_mixed=False) is None  # neither side mixed: identity
    assert MixPlan("none", 1.0, 5).targets(query_mixed=True, key_mixed=False) is None
    with pytest.raises(ValueError, match="both sides"):
        tplan.targets(query_mixed=True, key_mixed=True)
    with pytest.raises(ValueError, match="batch"):
        plan.mix_pixels(x[:4])


def _objective(candidates: str, *, hier_weight: float = 0.3):
    from vlscale.config import Config, LossConfig, TechniquesConfig
    from vlscale.model import DualEncoder
    from vlscale.train.losses import Objective

    cfg = Config(model=tiny_model_cfg(hier_levels=1),
                 techniques=TechniquesConfig(mixup=True, momentum_queue=6, momentum_candidates=candidates,
                                             momentum_weight=0.7, contrastive_weight=1.3, hier_weight=hier_weight),
                 loss=LossConfig(impl="reference"))
    torch.manual_seed(0)
    return Objective(cfg, process_group=None, module=DualEncoder(cfg.model))


@pytest.mark.parametrize("candidates", ["batch_queue", "positive_queue"])
@pytest.mark.parametrize("mode", ["image", "text", "none"])
def test_every_term_gets_the_targets_of_its_own_inputs(mode: str, candidates: str) -> None:
    """The contrastive, hierarchical and both momentum terms against dense float64 soft-target CE
    with targets derived by hand from what each term's two sides hold (see vlscale.techniques.mixup)."""
    obj = _objective(candidates)
    n, e, lam = 7, 16, 0.7
    embs = {name: unit(n, e, seed).requires_grad_() for seed, name in
            enumerate(("image", "text", "image_hier", "text_hier"), start=1)}
    embs["logit_scale"] = torch.tensor([9.0], dtype=torch.float64, requires_grad=True)
    obj.plan = MixPlan(mode, lam, n)
    obj.keys = {"image": unit(n, e, 5), "text": unit(n, e, 6)}
    obj.momentum.enqueue({"image": unit(4, e, 7, torch.float32), "text": unit(4, e, 8, torch.float32)})
    loss, metrics = obj(embs)

    leaves = {k: v.detach().clone().requires_grad_() for k, v in embs.items()}
    s, img, txt = leaves["logit_scale"], leaves["image"], leaves["text"]
    if mode == "text":
        txt = F.normalize(lam * txt + (1 - lam) * txt.flip(0), dim=-1)
    soft = lam if mode != "none" else None
    image_soft = lam if mode == "image" else None
    img_q, txt_q = obj.momentum.negatives()
    dense = dense_batch_queue if candidates == "batch_queue" else dense_positive_queue
    ref = {
        "loss/contrastive": dense_clip(img, txt, s, soft),                      # one side mixed on every mixed step
        "loss/loss_hier0": dense_clip(leaves["image_hier"], leaves["text_hier"], s, image_soft),  # text levels plain
        "loss/momentum_i2t": dense(img, obj.keys["text"], txt_q.double(), s, image_soft),  # text keys plain
        "loss/momentum_t2i": dense(txt, obj.keys["image"], img_q.double(), s, soft),  # image keys mixed on image steps
    }
    for name, value in ref.items():
        value = float(value.detach())
        assert abs(metrics[name] - value) < 1e-6 * max(1.0, abs(value)), (name, metrics[name], value)
    total = 1.3 * ref["loss/contrastive"] + 0.3 * ref["loss/loss_hier0"] + 0.7 * 0.5 * (
        ref["loss/momentum_i2t"] + ref["loss/momentum_t2i"])
    torch.testing.assert_close(loss, total, **MIX_TOL)
    names = list(embs)
    for g, r in zip(torch.autograd.grad(loss, [embs[k] for k in names]),
                    torch.autograd.grad(total, [leaves[k] for k in names])):
        torch.testing.assert_close(g, r, **MIX_TOL)


# ---------------------------------------------------------------- BriVL's 1 + K candidates


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize(("n", "k", "lam"), [(1, 5, None), (7, 0, None), (7, 13, None), (7, 13, 0.8), (6, 1, 0.3)])
def test_positive_queue_loss_equals_explicit_concatenation(impl: str, n: int, k: int, lam: float | None) -> None:
    q, keys = unit(n, 9, 1).requires_grad_(), unit(n, 9, 2)
    queue = unit(k, 9, 3) if k else None
    s = torch.tensor([7.0], dtype=torch.float64, requires_grad=True)
    mix = (torch.arange(n).flip(0), lam) if lam is not None else None
    loss = positive_queue_nce(q, keys, queue, s, mix=mix, impl=impl)
    ref = dense_positive_queue(q, keys, queue, s, lam)
    torch.testing.assert_close(loss, ref, **TOL)
    for g, r in zip(torch.autograd.grad(loss, (q, s)), torch.autograd.grad(ref, (q, s))):
        torch.testing.assert_close(g, r, **TOL)
    with pytest.raises(ValueError, match="LOCAL"):
        positive_queue_nce(q, keys, queue, s, mix=(torch.arange(n) + n, 0.5))


# ---------------------------------------------------------------- WenLan / BriVL momentum contrast


def test_ema_is_fp32_and_moves_towards_the_given_masters() -> None:
    torch.manual_seed(0)
    model = TinyDual()
    mc = MomentumContrast.copy_of(model.half(), queue_size=4, embed_dim=8, momentum=0.9)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in mc.ema.parameters())
    old = {n: p.detach().double().clone() for n, p in mc.ema.named_parameters()}
    # The masters differ from the (half) module: the EMA must follow the masters.
    masters = {n: p.detach().float() + torch.randn_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    mc.update(masters.items(), [("norm.running_mean", torch.full((8,), 3.0))])
    for n, p in mc.ema.named_parameters():
        torch.testing.assert_close(p.double(), 0.9 * old[n] + 0.1 * masters[n].double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mc.ema.norm.running_mean, torch.full((8,), 3.0))
    mc.train()
    assert mc.training and not mc.ema.training  # keys are always computed without dropout
    with pytest.raises(ValueError, match="not updated"):
        mc.update([(n, v) for n, v in masters.items() if n != "img.weight"])
    with pytest.raises(ValueError, match="shape"):
        mc.init_from([(n, v.flatten()) for n, v in masters.items()])
    sharded = TinyDual()
    sharded.img.weight.ds_id = 7  # what a ZeRO-3 parameter carries
    with pytest.raises(ValueError, match="momentum_copy"):
        MomentumContrast.copy_of(sharded, queue_size=4, embed_dim=8)
    with pytest.raises(ValueError, match="momentum"):
        MomentumContrast.copy_of(model, queue_size=4, embed_dim=8, momentum=1.0)


def test_momentum_copy_is_a_plain_fp32_rebuild_from_the_config() -> None:
    from vlscale.model import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder(tiny_model_cfg(hier_levels=1, freeze_text_layers=1, mim_decoder_depth=1,
                                       mim_decoder_heads=2)).to(torch.bfloat16)
    copy = momentum_copy(model)
    online = {n: p.shape for n, p in model.named_parameters() if not n.startswith("mim_decoder.")}
    assert {n: p.shape for n, p in copy.named_parameters()} == online
    assert all(p.dtype == torch.float32 for p in copy.parameters())
    assert copy.tokenizer is model.tokenizer
    rng = torch.get_rng_state()
    momentum_copy(model)
    assert torch.equal(rng, torch.get_rng_state()), "building the copy must not move the run's RNG"


def test_keys_are_encoded_chunk_by_chunk() -> None:
    from vlscale.model import DualEncoder

    torch.manual_seed(0)
    mc = MomentumContrast(momentum_copy(DualEncoder(tiny_model_cfg())), queue_size=8, embed_dim=16)
    sizes: dict[str, list[int]] = {"image": [], "text": []}
    mc.ema.visual.register_forward_pre_hook(lambda m, a: sizes["image"].append(a[0].shape[0]))
    mc.ema.textual.register_forward_pre_hook(lambda m, a: sizes["text"].append(a[0].shape[0]))
    tok = mc.ema.tokenizer(["a red circle"] * 11, padding="max_length", max_length=8, return_tensors="pt")
    inputs = {"pixels": torch.randn(11, 3, 32, 32), "tokens": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    keys = mc.encode_keys(inputs, {"image": 4, "text": 3})
    assert sizes == {"image": [4, 4, 3], "text": [3, 3, 3, 2]}  # never more than one chunk at once
    whole = mc.encode_keys(inputs, None)
    for tower in ("image", "text"):
        assert keys[tower].dtype == torch.float32 and keys[tower].shape == (11, 16)
        torch.testing.assert_close(keys[tower], whole[tower], atol=1e-6, rtol=1e-5)


def test_queue_wraps_around_like_a_ring_buffer() -> None:
    mc = MomentumContrast.copy_of(TinyDual(), queue_size=5, embed_dim=8)
    assert mc.negatives() == (None, None)
    slots: list = [None] * 5
    ptr = 0
    for step, n in enumerate((3, 3, 1, 7, 2)):
        keys = {"image": unit(n, 8, 10 + step).float(), "text": unit(n, 8, 20 + step).float()}
        mc.enqueue(keys)
        for row in range(n):
            slots[ptr] = (keys["image"][row], keys["text"][row])
            ptr = (ptr + 1) % 5
        if n >= 5:  # the implementation keeps the newest 5 in order from slot 0
            slots = [(keys["image"][r], keys["text"][r]) for r in range(n - 5, n)]
            ptr = 0
        filled = sum(s is not None for s in slots)
        img_neg, txt_neg = mc.negatives()
        assert int(mc.queue_ptr) == ptr and int(mc.queue_filled) == filled == img_neg.shape[0]
        torch.testing.assert_close(img_neg, torch.stack([s[0] for s in slots[:filled]]))
        torch.testing.assert_close(txt_neg, torch.stack([s[1] for s in slots[:filled]]))
    with pytest.raises(ValueError, match="keys must be"):
        mc.enqueue({"image": torch.zeros(2, 8), "text": torch.zeros(3, 8)})


@pytest.mark.parametrize("candidates", ["batch_queue", "positive_queue"])
def test_momentum_loss_equals_dense_reference(candidates: str) -> None:
    torch.manual_seed(0)
    model = TinyDual().double().eval()
    mc = MomentumContrast.copy_of(model, queue_size=6, embed_dim=8, candidates=candidates)
    pixels, tokens = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randint(0, 20, (5, 4))
    keys = {k: v.double() for k, v in mc.encode_keys({"pixels": pixels.float(), "tokens": tokens}, 2).items()}
    dense = dense_batch_queue if candidates == "batch_queue" else dense_positive_queue
    for fill in (0, 4):
        if fill:
            mc.enqueue({k: v.float() for k, v in
                        mc.encode_keys({"pixels": torch.randn(4, 3, 2, 2), "tokens": torch.randint(0, 20, (4, 4))}).items()})
        embs = model(pixels=pixels, tokens=tokens)
        s = embs["logit_scale"]
        loss = mc.loss(embs, keys, s, impl="reference")
        img_q, txt_q = (None, None) if not fill else (q.double() for q in mc.negatives())
        ref = 0.5 * (dense(embs["image"], keys["text"], txt_q, s, None) + dense(embs["text"], keys["image"], img_q, s, None))
        params = [model.img.weight, model.emb.weight, model.logit_scale]
        torch.testing.assert_close(loss, ref, **MIX_TOL)
        for g, r in zip(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(ref, params)):
            torch.testing.assert_close(g, r, **MIX_TOL)


def test_momentum_state_round_trips_through_state_dict() -> None:
    torch.manual_seed(0)
    model = TinyDual()
    mc = MomentumContrast.copy_of(model, queue_size=4, embed_dim=8)
    mc.enqueue({"image": unit(3, 8, 1).float(), "text": unit(3, 8, 2).float()})
    with torch.no_grad():
        model.img.weight.add_(1.0)
    mc.update(model)
    state = mc.state_dict()
    assert {"image_queue", "text_queue", "queue_ptr", "queue_filled", "ema.img.weight"} <= set(state)
    other = MomentumContrast.copy_of(TinyDual(), queue_size=4, embed_dim=8)
    other.load_state_dict(state)
    for k, v in state.items():
        torch.testing.assert_close(other.state_dict()[k], v)
    assert int(other.queue_ptr) == 3 and int(other.queue_filled) == 3


# ---------------------------------------------------------------- ViCHA hierarchical alignment + concepts


def test_hierarchical_loss_is_the_weighted_sum_of_level_losses() -> None:
    n, d = 6, 8
    embs = {"image": unit(n, d, 0), "text": unit(n, d, 1), "image_hier": unit(n, d, 2).requires_grad_(),
            "text_hier": unit(n, d, 3), "image_hier1": unit(n, d, 4), "text_hier1": unit(n, d, 5)}
    s = torch.tensor([5.0], dtype=torch.float64)
    total, parts = hierarchical_loss(embs, s, weight=(0.1, 0.3), impl="reference")
    ref = 0.1 * dense_clip(embs["image_hier"], embs["text_hier"], s, None) + 0.3 * dense_clip(
        embs["image_hier1"], embs["text_hier1"], s, None)
    torch.testing.assert_close(total, ref, **TOL)
    assert set(parts) == {"loss_hier0", "loss_hier1"}
    g, = torch.autograd.grad(total, embs["image_hier"])
    g_ref, = torch.autograd.grad(ref, embs["image_hier"])
    torch.testing.assert_close(g, g_ref, **TOL)
    assert hierarchical_loss({"image": embs["image"], "text": embs["text"]}, s) == (None, {})
    with pytest.raises(ValueError, match="both be present"):
        hierarchical_loss({"image_hier": embs["image"]}, s)
    with pytest.raises(ValueError, match="weights"):
        hierarchical_loss(embs, s, weight=(0.1,))


def test_concept_sampling_rate_determinism_and_caps() -> None:
    sampler = ConceptSampler(p=0.3, max_concepts=None, seed=1)
    concepts = [f"c{i}" for i in range(10)]
    kept = [len(sampler.sample(concepts, key=f"k{i}", step=0)) for i in range(2000)]
    assert abs(sum(kept) / (10 * 2000) - 0.3) < 0.02
    assert sampler.sample(concepts, key="x", step=5) == sampler.sample(concepts, key="x", step=5)
    assert any(sampler.sample(concepts, key="x", step=s) != sampler.sample(concepts, key="x", step=5)
               for s in range(6, 12))
    picked = ConceptSampler(p=1.0, max_concepts=3).sample(["dog", "dog", " ", "grass", "ball", "sky"], key="a")
    assert len(picked) == 3 and len(set(picked)) == 3 and set(picked) <= {"dog", "grass", "ball", "sky"}
    assert ConceptSampler(p=0.0).sample(concepts) == []
    lists = ConceptSampler(p=1.0).sample_lists([["dog", "sky"], None], ["k1", "k2"], step=3)
    assert sorted(lists[0]) == ["dog", "sky"] and lists[1] == []
    with pytest.raises(ValueError, match="p must be"):
        ConceptSampler(p=1.2)


def test_concepts_are_appended_after_the_caption_and_tokenized() -> None:
    from vlscale.model import word_tokenizer

    sampler = ConceptSampler(p=1.0, max_concepts=2, sep=" ", seed=0)
    texts = sampler(["a dog", "a cat", "a bird"], [["grass", "ball"], None, []], keys=["1", "2", "3"])
    assert texts[0].startswith("a dog ") and set(texts[0].split()[2:]) == {"grass", "ball"}
    assert texts[1:] == ["a cat", "a bird"]
    tok = word_tokenizer(["a", "dog", "cat", "grass", "ball"], context_length=5)
    ids, mask = sampler.tokenize(tok, ["a dog"], [["grass", "ball"]], max_length=5, keys=["1"])
    vocab = tok.get_vocab()
    assert ids.shape == (1, 5) and mask.tolist() == [[1] * 5]
    # Truncation keeps the caption and drops trailing concepts.
    assert ids[0, :3].tolist() == [vocab["[CLS]"], vocab["a"], vocab["dog"]] and ids[0, 4] == vocab["[SEP]"]
    with pytest.raises(ValueError, match="align"):
        sampler(["a", "b"], [["x"]])
