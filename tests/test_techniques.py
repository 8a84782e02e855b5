"""Paper techniques against dense references: ZeroVL coin-flip mixup, WenLan momentum contrast
(EMA math, queue wrap-around, loss over [keys; queue], checkpoint state, gathered enqueue),
ViCHA hierarchical alignment and visual-concept sampling."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytest.importorskip("vlscale.loss", reason="vlscale.loss not built yet")
try:
    from vlscale.loss import contrastive_loss, info_nce  # noqa: F401
except ImportError:  # the loss part is written in parallel
    pytest.skip("vlscale.loss does not export contrastive_loss / info_nce yet", allow_module_level=True)

from vlscale.techniques import CoinFlipMixup, ConceptSampler, MixPlan, MomentumContrast, hierarchical_loss

TOL = {"atol": 2e-5, "rtol": 2e-5}


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def dense_mixed_clip(img, txt, s, labels_b, lam):
    """Symmetric CLIP loss with soft targets lam·I + (1−lam)·P(labels_b), dense, in float64."""
    n = img.shape[0]
    target = lam * torch.eye(n, dtype=img.dtype) + (1 - lam) * F.one_hot(labels_b, n).to(img.dtype)
    logits = s * img @ txt.T
    return 0.5 * soft_ce(logits, target) + 0.5 * soft_ce(logits.T, target)


# ---------------------------------------------------------------- ZeroVL coin-flip mixup


def test_mixup_draws_are_deterministic_and_have_the_paper_distribution() -> None:
    mix = CoinFlipMixup(alpha=0.1, p_image=0.5, seed=3)
    assert mix.plan(17, 8) == mix.plan(17, 8)
    plans = [mix.plan(step, 8) for step in range(4000)]
    frac_image = sum(p.mode == "image" for p in plans) / len(plans)
    lams = torch.tensor([p.lam for p in plans])
    assert 0.46 < frac_image < 0.54
    assert {p.mode for p in plans} == {"image", "text"}
    # Beta(0.1, 0.1): symmetric around 0.5, most mass near 0 or 1.
    assert abs(lams.mean().item() - 0.5) < 0.03
    assert ((lams > 0.1) & (lams < 0.9)).float().mean() < 0.3
    assert all(p.mode == "none" and p.mix() is None for p in (CoinFlipMixup(prob=0.0).plan(s, 4) for s in range(20)))
    with pytest.raises(ValueError, match="alpha"):
        CoinFlipMixup(alpha=0.0)
    with pytest.raises(ValueError, match="p_image"):
        CoinFlipMixup(p_image=1.5)


def test_mix_pixels_and_text_embeddings() -> None:
    x = torch.randn(5, 3, 4, 4)
    plan = MixPlan("image", 0.7, 5)
    torch.testing.assert_close(plan.mix_pixels(x), 0.7 * x + 0.3 * x[[4, 3, 2, 1, 0]])
    t = unit(5, 6, 0)
    assert plan.mix_text(t) is t
    tplan = MixPlan("text", 0.25, 5, offset=10)
    assert tplan.mix_pixels(x) is x
    torch.testing.assert_close(tplan.mix_text(t), F.normalize(0.25 * t + 0.75 * t.flip(0), dim=-1))
    labels_b, lam = tplan.mix()
    assert labels_b.tolist() == [14, 13, 12, 11, 10] and lam == 0.25
    with pytest.raises(ValueError, match="batch"):
        plan.mix_pixels(x[:4])


@pytest.mark.parametrize("mode", ["image", "text"])
def test_mixed_loss_and_gradients_match_a_dense_soft_target_reference(mode: str) -> None:
    n, d, lam = 7, 16, 0.8
    img, txt = unit(n, d, 1).requires_grad_(), unit(n, d, 2).requires_grad_()
    s = torch.tensor([12.0], dtype=torch.float64, requires_grad=True)
    plan = MixPlan(mode, lam, n)
    # Image mode: pretend the image tower is linear, so mixed pixels → mixed (unnormalised) embeddings.
    img_in = F.normalize(plan.mix_pixels(img), dim=-1) if mode == "image" else img
    loss = contrastive_loss(img_in, plan.mix_text(txt), s, mix=plan.mix(), impl="reference")
    grads = torch.autograd.grad(loss, (img, txt, s))
    img_r, txt_r, s_r = (t.detach().clone().requires_grad_() for t in (img, txt, s))
    rev = torch.arange(n).flip(0)
    if mode == "image":
        a, b = F.normalize(lam * img_r + (1 - lam) * img_r[rev], dim=-1), txt_r
    else:
        a, b = img_r, F.normalize(lam * txt_r + (1 - lam) * txt_r[rev], dim=-1)
    ref = dense_mixed_clip(a, b, s_r, rev, lam)
    ref_grads = torch.autograd.grad(ref, (img_r, txt_r, s_r))
    torch.testing.assert_close(loss.double(), ref, **TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **TOL)


# ---------------------------------------------------------------- WenLan / BriVL momentum contrast


class TinyDual(nn.Module):
    """A small stand-in dual encoder with the DualEncoder call contract (and a buffer)."""

    def __init__(self, e: int = 8) -> None:
        super().__init__()
        self.img = nn.Linear(12, e)
        self.emb = nn.EmbeddingBag(20, e)
        self.norm = nn.BatchNorm1d(e)
        self.logit_scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, pixels=None, tokens=None, attention_mask=None) -> dict[str, torch.Tensor]:
        out = {}
        if pixels is not None:
            out["image"] = F.normalize(self.norm(self.img(pixels.flatten(1))), dim=-1)
        if tokens is not None:
            out["text"] = F.normalize(self.emb(tokens), dim=-1)
        out["logit_scale"] = self.logit_scale.exp()
        return out


def test_ema_update_math_and_frozen_momentum_copy() -> None:
    torch.manual_seed(0)
    model = TinyDual()
    mc = MomentumContrast(model, queue_size=4, embed_dim=8, momentum=0.9)
    assert all(not p.requires_grad for p in mc.ema.parameters())
    old = {n: p.detach().clone() for n, p in mc.ema.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.norm.running_mean.fill_(3.0)
    mc.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(dict(mc.ema.named_parameters())[n], 0.9 * old[n] + 0.1 * p.detach())
    torch.testing.assert_close(mc.ema.norm.running_mean, torch.full((8,), 3.0))
    mc.train()
    assert mc.training and not mc.ema.training  # keys are always computed without dropout
    with pytest.raises(ValueError, match="momentum"):
        MomentumContrast(model, queue_size=4, embed_dim=8, momentum=1.0)


def test_queue_wraps_around_like_a_ring_buffer() -> None:
    mc = MomentumContrast(TinyDual(), queue_size=5, embed_dim=8)
    assert mc.negatives() == (None, None)
    slots: list = [None] * 5  # reference ring: the newest 5 rows, oldest overwritten in place
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


def test_momentum_loss_equals_dense_reference_over_keys_and_queue() -> None:
    torch.manual_seed(0)
    model = TinyDual()
    mc = MomentumContrast(model, queue_size=6, embed_dim=8)
    pixels, tokens = torch.randn(5, 3, 2, 2), torch.randint(0, 20, (5, 4))
    mc.enqueue(mc.encode_keys(pixels=torch.randn(4, 3, 2, 2), tokens=torch.randint(0, 20, (4, 4))))
    keys = mc.encode_keys(pixels=pixels, tokens=tokens, chunk_size=2)
    mc.ema.eval()
    whole = mc.ema(pixels=pixels, tokens=tokens)
    torch.testing.assert_close(keys["image"], whole["image"])  # chunked key encoding == one pass
    model.eval()
    embs = model(pixels=pixels, tokens=tokens)
    s = embs["logit_scale"]
    loss = mc.loss(embs, keys, s, impl="reference")
    grads = torch.autograd.grad(loss, [model.img.weight, model.emb.weight, model.logit_scale], retain_graph=True)
    img_q, txt_q = mc.negatives()
    i2t = F.cross_entropy(s * embs["image"] @ torch.cat([keys["text"], txt_q]).T, torch.arange(5))
    t2i = F.cross_entropy(s * embs["text"] @ torch.cat([keys["image"], img_q]).T, torch.arange(5))
    ref = 0.5 * (i2t + t2i)
    ref_grads = torch.autograd.grad(ref, [model.img.weight, model.emb.weight, model.logit_scale])
    torch.testing.assert_close(loss, ref, **TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL)
    # Empty queue: plain InfoNCE over the batch keys.
    fresh = MomentumContrast(model, queue_size=6, embed_dim=8)
    plain = fresh.loss(embs, keys, s, impl="reference")
    ref_plain = 0.5 * (F.cross_entropy(s * embs["image"] @ keys["text"].T, torch.arange(5))
                       + F.cross_entropy(s * embs["text"] @ keys["image"].T, torch.arange(5)))
    torch.testing.assert_close(plain, ref_plain, **TOL)


def test_momentum_state_round_trips_through_state_dict() -> None:
    torch.manual_seed(0)
    model = TinyDual()
    mc = MomentumContrast(model, queue_size=4, embed_dim=8)
    mc.enqueue({"image": unit(3, 8, 1).float(), "text": unit(3, 8, 2).float()})
    with torch.no_grad():
        model.img.weight.add_(1.0)
    mc.update(model)
    state = mc.state_dict()
    assert {"image_queue", "text_queue", "queue_ptr", "queue_filled", "ema.img.weight"} <= set(state)
    other = MomentumContrast(TinyDual(), queue_size=4, embed_dim=8)
    other.load_state_dict(state)
    for k, v in state.items():
        torch.testing.assert_close(other.state_dict()[k], v)
    assert int(other.queue_ptr) == 3 and int(other.queue_filled) == 3


def _enqueue_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        mc = MomentumContrast(TinyDual(), queue_size=16, embed_dim=8)
        n = 3 + rank  # uneven local batches
        keys = {"image": torch.full((n, 8), float(rank)), "text": torch.full((n, 8), 10.0 + rank)}
        mc.enqueue(keys, process_group=dist.group.WORLD)
        torch.save(mc.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_distributed_enqueue_gathers_keys_in_rank_order(port: int, tmp_path) -> None:
    mp.spawn(_enqueue_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    expected = torch.cat([torch.full((3, 8), 0.0), torch.full((4, 8), 1.0)])
    for s in (s0, s1):
        assert int(s["queue_filled"]) == 7 and int(s["queue_ptr"]) == 7
        torch.testing.assert_close(s["image_queue"][:7], expected)
        torch.testing.assert_close(s["text_queue"][:7], expected + 10.0)


# ---------------------------------------------------------------- ViCHA hierarchical alignment


def test_hierarchical_loss_is_the_weighted_sum_of_level_losses() -> None:
    n, d = 6, 8
    embs = {"image": unit(n, d, 0), "text": unit(n, d, 1), "image_hier": unit(n, d, 2).requires_grad_(),
            "text_hier": unit(n, d, 3), "image_hier1": unit(n, d, 4), "text_hier1": unit(n, d, 5)}
    s = torch.tensor([5.0], dtype=torch.float64)
    total, parts = hierarchical_loss(embs, s, weight=(0.1, 0.3), impl="reference")
    eye = torch.arange(n)

    def clip(a, b):
        logits = s * a @ b.T
        return 0.5 * (F.cross_entropy(logits, eye) + F.cross_entropy(logits.T, eye))

    ref = 0.1 * clip(embs["image_hier"], embs["text_hier"]) + 0.3 * clip(embs["image_hier1"], embs["text_hier1"])
    torch.testing.assert_close(total.double(), ref, **TOL)
    assert set(parts) == {"loss_hier0", "loss_hier1"}
    g, = torch.autograd.grad(total, embs["image_hier"])
    g_ref, = torch.autograd.grad(ref, embs["image_hier"])
    torch.testing.assert_close(g.double(), g_ref, **TOL)
    assert hierarchical_loss({"image": embs["image"], "text": embs["text"]}, s) == (None, {})
    with pytest.raises(ValueError, match="both be present"):
        hierarchical_loss({"image_hier": embs["image"]}, s)
    with pytest.raises(ValueError, match="weights"):
        hierarchical_loss(embs, s, weight=(0.1,))


# ---------------------------------------------------------------- ViCHA visual concepts


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
    with pytest.raises(ValueError, match="p must be"):
        ConceptSampler(p=1.2)


def test_concepts_are_appended_after_the_caption_and_tokenized() -> None:
    from vlscale.model import word_tokenizer

    sampler = ConceptSampler(p=1.0, max_concepts=2, sep=" ", seed=0)
    texts = sampler(["a dog", "a cat", "a bird"], [["grass", "ball"], None, []], keys=["1", "2", "3"])
    assert texts[0].startswith("a dog ") and set(texts[0].split()[2:]) == {"grass", "ball"}
    assert texts[1:] == ["a cat", "a bird"]
    assert sampler(["a dog"], None) == ["a dog"]
    tok = word_tokenizer(["a", "dog", "cat", "grass", "ball"], context_length=5)
    ids, mask = sampler.tokenize(tok, ["a dog"], [["grass", "ball"]], max_length=5, keys=["1"])
    vocab = tok.get_vocab()
    assert ids.shape == (1, 5) and mask.tolist() == [[1] * 5]
    # Truncation keeps the caption and drops trailing concepts.
    assert ids[0, :3].tolist() == [vocab["[CLS]"], vocab["a"], vocab["dog"]] and ids[0, 4] == vocab["[SEP]"]
    with pytest.raises(ValueError, match="align"):
        sampler(["a", "b"], [["x"]])


# ---------------------------------------------------------------- all of them on a DualEncoder


def test_techniques_compose_on_a_dual_encoder_and_learn() -> None:
    """Mixup + hierarchical alignment + momentum queues on a tiny DualEncoder: a few AdamW steps
    on one fixed batch must lower the plain contrastive loss."""
    from vlscale.model import DualEncoder, ModelConfig, param_groups

    words = ("a", "red", "blue", "green", "circle", "square", "left", "right")
    cfg = ModelConfig(vision_model="vit_tiny_patch16_224",
                      vision_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}, image_size=32,
                      text_model="bert-tiny", text_config={"hidden_size": 64, "intermediate_size": 128},
                      tokenizer_words=words, context_length=8, embed_dim=16,
                      hier_image_layers=(0,), hier_text_layers=(0,))
    torch.manual_seed(0)
    model = DualEncoder(cfg)
    captions = ["a red circle", "a blue square", "green left", "a right circle", "blue blue", "red square"]
    enc = model.tokenizer(captions, padding="max_length", truncation=True, max_length=8, return_tensors="pt")
    pixels = torch.randn(6, 3, 32, 32)
    mixup = CoinFlipMixup(seed=0)
    mc = MomentumContrast(model, queue_size=8, embed_dim=16, momentum=0.9)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-3)

    def clean_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = model(pixels=pixels, tokens=enc["input_ids"], attention_mask=enc["attention_mask"])
        model.train()
        return float(contrastive_loss(out["image"], out["text"], out["logit_scale"], impl="reference"))

    before = clean_loss()
    for step in range(8):
        plan = mixup.plan(step, 6)
        px = plan.mix_pixels(pixels)
        mc.update(model)
        keys = mc.encode_keys(pixels=px, tokens=enc["input_ids"], attention_mask=enc["attention_mask"])
        embs = model(pixels=px, tokens=enc["input_ids"], attention_mask=enc["attention_mask"])
        s = embs["logit_scale"]
        text = plan.mix_text(embs["text"])
        loss = contrastive_loss(embs["image"], text, s, mix=plan.mix(), impl="reference")
        hier, parts = hierarchical_loss(embs, s, weight=0.1, mix=plan.mix(), impl="reference")
        loss = loss + hier + 0.5 * mc.loss({"image": embs["image"], "text": text}, keys, s, mix=plan.mix(),
                                           impl="reference")
        assert set(parts) == {"loss_hier0"} and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mc.enqueue(keys)
    assert int(mc.queue_filled) == 8
    after = clean_loss()
    assert after < 0.8 * before, (before, after)
