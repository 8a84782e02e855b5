"""DualEncoder: output contract, towers, checkpointing, attention kernels, weights, tokenizers, optimizer groups."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlscale.model import DualEncoder, ModelConfig, build_tokenizer, param_groups, word_tokenizer
from vlscale.model import attention as attn_mod
from vlscale.model.towers import minilm_dir

WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "on", "left", "right", "of", "the")
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vision_model="vit_tiny_patch16_224", vision_kwargs={"patch_size": 8, "depth": 2},
                image_size=32, text_model="bert-tiny", tokenizer_words=WORDS, context_length=12,
                embed_dim=24, text_config=dict(NO_DROPOUT))
    base.update(kw)
    return ModelConfig(**base)


def text_batch(model: DualEncoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = model.tokenizer(texts, padding="max_length", truncation=True, max_length=model.cfg.context_length,
                          return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def tiny() -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(tiny_cfg(hier_image_layers=(0,), hier_text_layers=(-2,)))


def test_forward_contract(tiny: DualEncoder) -> None:
    pixels = torch.randn(3, 3, 32, 32)
    tokens, mask = text_batch(tiny, ["a red circle", "the blue square on the left", "green"])
    out = tiny(pixels=pixels, tokens=tokens, attention_mask=mask)
    assert set(out) == {"image", "text", "image_hier", "text_hier", "logit_scale"}
    for key in ("image", "text", "image_hier", "text_hier"):
        assert out[key].shape == (3, 24)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].shape == (1,)
    assert tiny.logit_scale.shape == (1,)
    torch.testing.assert_close(out["logit_scale"], torch.tensor([1 / 0.07]))
    # One tower per call (the gradient cache embeds them separately); logit_scale always present.
    img_only, txt_only = tiny(pixels=pixels), tiny(tokens=tokens, attention_mask=mask)
    assert set(img_only) == {"image", "image_hier", "logit_scale"}
    assert set(txt_only) == {"text", "text_hier", "logit_scale"}
    tiny.eval()  # dropout off: separate calls must give the joint call's values
    torch.testing.assert_close(tiny(pixels=pixels)["image"], tiny(pixels=pixels, tokens=tokens)["image"])
    tiny.train()
    with pytest.raises(ValueError, match="pixels and/or tokens"):
        tiny()
    with pytest.raises(ValueError, match="attention_mask shape"):
        tiny(tokens=tokens, attention_mask=mask[:, :-1])
    assert tiny.output_keys("text") == ["text", "text_hier"]


def test_logit_scale_clamped_and_its_gradient(tiny: DualEncoder) -> None:
    with torch.no_grad():
        tiny.logit_scale.fill_(7.0)  # beyond log(100)
    try:
        s = tiny(tokens=torch.ones(1, 4, dtype=torch.long))["logit_scale"]
        torch.testing.assert_close(s, torch.tensor([100.0]))
        s.sum().backward()
        assert tiny.logit_scale.grad is not None and float(tiny.logit_scale.grad.abs().sum()) == 0.0
        tiny.logit_scale.grad = None
        with torch.no_grad():
            tiny.logit_scale.fill_(1.0)
        tiny(tokens=torch.ones(1, 4, dtype=torch.long))["logit_scale"].sum().backward()
        torch.testing.assert_close(tiny.logit_scale.grad, torch.tensor([math.e]))  # d exp(t)/dt
    finally:
        tiny.zero_grad(set_to_none=True)
        with torch.no_grad():
            tiny.logit_scale.fill_(math.log(1 / 0.07))


def test_hierarchical_outputs_take_the_named_layers(tiny: DualEncoder) -> None:
    tiny.eval()
    pixels = torch.randn(2, 3, 32, 32)
    tokens, mask = text_batch(tiny, ["a red circle", "the left square"])
    out = tiny(pixels=pixels, tokens=tokens, attention_mask=mask)
    trunk = tiny.visual.trunk
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))
    cls0 = trunk.blocks[0](x)[:, 0]  # block 0's CLS token
    torch.testing.assert_close(out["image_hier"], F.normalize(tiny.image_hier_proj[0](cls0), dim=-1))
    hidden = tiny.textual.trunk(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    # layer -2 of a 2-layer tower is layer 0, whose output is hidden_states[1]; CLS pooling.
    torch.testing.assert_close(out["text_hier"], F.normalize(tiny.text_hier_proj[0](hidden[1][:, 0]), dim=-1))
    tiny.train()


def test_tower_outputs_are_never_views(tiny: DualEncoder) -> None:
    """CLS pooling (h[:, 0]) makes views; FSDP2 warns that an in-place op on a wrapped module's view
    output silently drops its pre-backward hook (wrong gradients). The towers return copies, the same
    values, and gradients still flow."""
    from vlscale.model.towers import owned

    pixels = torch.randn(3, 3, 32, 32, requires_grad=True)
    tokens, mask = text_batch(tiny, ["a red circle", "the left square", "a blue"])
    for out in (tiny.visual(pixels), tiny.textual(tokens, mask)):
        pooled, hier = out
        assert not pooled._is_view() and hier and not any(h._is_view() for h in hier)
    base = torch.randn(4, 5, requires_grad=True)
    view = base[:, 0]
    got = owned((view, [view, base]))
    assert not got[0]._is_view() and torch.equal(got[0], view) and got[1][1] is base
    got[0].sum().backward()
    assert torch.equal(base.grad[:, 0], torch.ones(4))


def test_hierarchical_on_a_cnn_pools_the_stage() -> None:
    torch.manual_seed(0)
    # image_size on a CNN: timm's ResNet takes no img_size, so it is built without one.
    model = DualEncoder(tiny_cfg(vision_model="test_resnet", vision_kwargs={}, image_size=32,
                                 hier_image_layers=(2, 1), hier_text_layers=(0, 1))).eval()
    assert model.data_config()["input_size"] == (3, 32, 32)
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixels=pixels)
    trunk = model.visual.trunk
    feats = {}
    hooks = [getattr(trunk, n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
             for n in ("layer1", "layer2")]
    trunk(pixels)
    for h in hooks:
        h.remove()
    # feature_info index 2 is layer2, index 1 is layer1 (index 0 is the stem); order as requested.
    ref0 = F.normalize(model.image_hier_proj[0](feats["layer2"].mean((2, 3))), dim=-1)
    ref1 = F.normalize(model.image_hier_proj[1](feats["layer1"].mean((2, 3))), dim=-1)
    torch.testing.assert_close(out["image_hier"], ref0)
    torch.testing.assert_close(out["image_hier1"], ref1)
    assert out["image"].shape == (2, 24)


def _outputs_and_grads(model: DualEncoder, pixels, tokens, mask):
    model.zero_grad(set_to_none=True)
    out = model(pixels=pixels, tokens=tokens, attention_mask=mask)
    loss = sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def test_grad_checkpointing_gives_the_same_outputs_and_gradients(tiny: DualEncoder) -> None:
    pixels = torch.randn(2, 3, 32, 32)
    tokens, mask = text_batch(tiny, ["a red circle on the left", "blue"])
    tiny.train()
    ref_out, ref_grads = _outputs_and_grads(tiny, pixels, tokens, mask)
    tiny.set_grad_checkpointing(True)
    try:
        assert tiny.visual.trunk.grad_checkpointing
        ck_out, ck_grads = _outputs_and_grads(tiny, pixels, tokens, mask)
    finally:
        tiny.set_grad_checkpointing(False)
        tiny.zero_grad(set_to_none=True)
    for k in ref_out:
        torch.testing.assert_close(ck_out[k], ref_out[k])
    assert ref_grads.keys() == ck_grads.keys() and len(ref_grads) > 20
    for n in ref_grads:
        torch.testing.assert_close(ck_grads[n], ref_grads[n], msg=n)


def test_eager_attention_matches_sdpa() -> None:
    torch.manual_seed(0)
    sdpa = DualEncoder(tiny_cfg(attn_impl="sdpa")).eval()
    eager = DualEncoder(tiny_cfg(attn_impl="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.attn_impl == "eager" and sdpa.attn_impl == "sdpa"
    assert all(not m.fused_attn for m in eager.visual.trunk.modules() if hasattr(m, "fused_attn"))
    pixels = torch.randn(2, 3, 32, 32)
    tokens, mask = text_batch(sdpa, ["a red circle", "the"])  # padding exercises the mask
    a = sdpa(pixels=pixels, tokens=tokens, attention_mask=mask)
    b = eager(pixels=pixels, tokens=tokens, attention_mask=mask)
    for k in ("image", "text"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_xformers_wiring_with_a_stand_in_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The xformers path's layouts and masks, with the CUDA kernel replaced by SDPA in xformers'
    (B, L, H, D) convention: outputs must equal the SDPA model's."""
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            DualEncoder(tiny_cfg(attn_impl="xformers"))
    monkeypatch.setattr(attn_mod, "_memory_efficient_attention",
                        lambda q, k, v, bias, p, scale: attn_mod.reference_attention(q, k, v, bias, p, scale))
    monkeypatch.setattr(attn_mod, "resolve_attn_impl", lambda requested: requested)
    monkeypatch.setattr("vlscale.model.dual_encoder.resolve_attn_impl", lambda requested: requested)
    torch.manual_seed(0)
    ref = DualEncoder(tiny_cfg(attn_impl="sdpa")).eval()
    xf = DualEncoder(tiny_cfg(attn_impl="xformers")).eval()
    xf.load_state_dict(ref.state_dict())
    assert type(xf.visual.trunk.blocks[0].attn).__name__ == "_XformersAttention"
    assert xf.textual.trunk.config._attn_implementation == attn_mod.HF_XFORMERS
    pixels = torch.randn(2, 3, 32, 32)
    tokens, mask = text_batch(ref, ["a red circle on the left", "blue"])
    a = ref(pixels=pixels, tokens=tokens, attention_mask=mask)
    b = xf(pixels=pixels, tokens=tokens, attention_mask=mask)
    for k in ("image", "text"):
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)


def test_vision_weights_from_a_local_file_and_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vlscale.model.towers import VisionTower

    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in VisionTower(tiny_cfg(), "sdpa").trunk.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    # A classifier checkpoint: its head is dropped (the trunk is built with num_classes=0).
    torch.save({"state_dict": {**state, "head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}},
               tmp_path / "w.pth")
    for path in (tmp_path / "model.safetensors", tmp_path, tmp_path / "w.pth"):
        torch.manual_seed(2)
        tower = VisionTower(tiny_cfg(vision_weights=str(path)), "sdpa")
        for k, v in tower.trunk.state_dict().items():
            torch.testing.assert_close(v, state[k], msg=k)
    with pytest.raises(ValueError, match="do not match"):
        VisionTower(tiny_cfg(vision_weights=str(tmp_path / "w.pth"), vision_kwargs={"patch_size": 8, "depth": 3}),
                    "sdpa")
    with pytest.raises(ValueError, match="does not exist"):
        VisionTower(tiny_cfg(vision_weights=str(tmp_path / "missing.pth")), "sdpa")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds none of"):
        VisionTower(tiny_cfg(vision_weights=str(empty)), "sdpa")


def test_minilm_loads_offline_with_its_weights_and_tokenizer() -> None:
    from safetensors import safe_open

    cfg = ModelConfig(vision_model="test_vit", text_model="minilm-l6", text_pretrained=True, text_pooling="mean",
                      context_length=16, embed_dim=32)
    model = DualEncoder(cfg).eval()
    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("word_embeddings.weight"))  # noqa: SIM118 (safe_open is no dict)
        ref = f.get_tensor(name)
    torch.testing.assert_close(model.textual.trunk.embeddings.word_embeddings.weight, ref)
    texts = ["a dog runs on the grass", "a puppy plays in the park", "stock prices fell sharply today"]
    tokens, mask = text_batch(model, texts)
    assert tokens[0, 0].item() == 101  # [CLS] of the uncased BERT vocabulary
    with torch.no_grad():
        pooled, _ = model.textual(tokens, mask)
    emb = F.normalize(pooled, dim=-1)
    # Real sentence embeddings: the paraphrase is far closer than the unrelated sentence.
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2


def test_tokenizers() -> None:
    tok = word_tokenizer(["Circle", "red", "circle"], context_length=8)
    enc = tok(["red circle", "red circles!"], padding="max_length", truncation=True, max_length=8)
    ids = enc["input_ids"]
    vocab = tok.get_vocab()
    assert ids[0][:4] == [vocab["[CLS]"], vocab["red"], vocab["circle"], vocab["[SEP]"]]
    assert ids[0][4:] == [vocab["[PAD]"]] * 4 and enc["attention_mask"][0] == [1] * 4 + [0] * 4
    assert ids[1][2:4] == [vocab["circle"], vocab["##s"]]  # unseen word → word piece + char
    assert vocab["[UNK]"] not in ids[1]
    # A bare vocab.txt (transformers 5 would silently ignore BertTokenizer(vocab_file=...)).
    from_txt = build_tokenizer(ModelConfig(text_model="bert-tiny", tokenizer=str(minilm_dir() / "vocab.txt")))
    from_folder = build_tokenizer(ModelConfig(text_model="minilm-l6"))
    text = ["A Dog's day, out!", "unbelievable tokenisation"]
    assert from_txt(text)["input_ids"] == from_folder(text)["input_ids"]
    assert len(from_txt) == 30522
    with pytest.raises(ValueError, match="does not exist"):
        build_tokenizer(ModelConfig(tokenizer="/nonexistent/vocab.txt"))
    with pytest.raises(ValueError, match="has no tokenizer"):
        build_tokenizer(ModelConfig(text_model="bert", text_config={"num_hidden_layers": 1}))


def test_word_tokenizer_sizes_the_text_embedding(tiny: DualEncoder) -> None:
    assert tiny.textual.trunk.config.vocab_size == len(tiny.tokenizer)
    assert tiny.textual.trunk.embeddings.word_embeddings.weight.shape[0] == len(tiny.tokenizer)


def test_param_groups(tiny: DualEncoder) -> None:
    groups = param_groups(tiny, 0.2)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    assert not decay & no_decay
    assert decay | no_decay == {id(p) for p in tiny.parameters() if p.requires_grad}
    # Independent rule: only the weight matrices / kernels of Linear and Conv layers decay.
    expect_decay = {id(m.weight) for m in tiny.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert decay == expect_decay
    for p in (tiny.logit_scale, tiny.visual.trunk.pos_embed, tiny.visual.trunk.cls_token,
              tiny.textual.trunk.embeddings.word_embeddings.weight, tiny.image_hier_proj[0].net[0].weight):
        assert id(p) in no_decay
    with pytest.raises(ValueError):
        param_groups(tiny, -1.0)


def test_data_config_and_frozen_temperature() -> None:
    model = DualEncoder(tiny_cfg(learn_logit_scale=False, init_logit_scale=math.log(50.0)))
    assert model.data_config()["input_size"] == (3, 32, 32)
    assert not model.logit_scale.requires_grad
    assert all(id(p) != id(model.logit_scale) for g in param_groups(model, 0.1) for p in g["params"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attn_impl": "flash"}, "attn_impl"),
        ({"proj": "conv"}, "proj"),
        ({"text_pooling": "max"}, "text_pooling"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"context_length": -3}, "context_length"),
        ({"image_size": 4}, "image_size"),
        ({"init_logit_scale": 6.0}, "exceeds max_logit_scale"),
        ({"init_logit_scale": float("nan")}, "finite"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"hier_image_layers": (1,)}, "pair up"),
        ({"tokenizer": "x", "tokenizer_words": ("a",)}, "either tokenizer"),
        ({"text_pretrained": True, "tokenizer_words": ("a",)}, "tokenizer_words"),
        ({"vision_model": ""}, "vision_model"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vision_model": "no_such_model_xyz"}, "no_such_model_xyz"),
        ({"text_model": "no-such-text-model"}, "neither a local folder"),
        ({"text_model": "bert-tiny", "text_pretrained": True, "tokenizer_words": ()}, "local folder"),
        ({"hier_image_layers": (5,), "hier_text_layers": (0,)}, "out of range"),
        ({"hier_image_layers": (0,), "hier_text_layers": (2,)}, "out of range"),
        ({"context_length": 600}, "max_position_embeddings"),
    ],
)
def test_build_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DualEncoder(tiny_cfg(**kwargs))
