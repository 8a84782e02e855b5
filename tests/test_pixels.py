"""uint8 pixel transport: the collate keeps uint8, the trainer's feed normalises and mixes per chunk.

The invariant: whatever ``data.pixel_dtype`` is, the model sees bit-identical pixels — normalised,
and mixed with their reversed partners on image-mixup steps — so a run's losses do not change, and
the host holds a quarter of the bytes.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from vlscale.data.collate import collate, normalize
from vlscale.techniques.mixup import mix_reversed
from vlscale.train.pixels import PixelFeed

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _images(n: int, h: int = 13, w: int = 11, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]


def _rows(n: int) -> list[dict]:
    return [{"caption": f"c{i}", "source": "s", "key": str(i)} for i in range(n)]


def _collate(images: list[np.ndarray], pixel_dtype: str):
    return collate(images, _rows(len(images)), tokenizer=None, max_length=4, mean=MEAN, std=STD,
                   with_concepts=False, image_size=(13, 11), pixel_dtype=pixel_dtype)


def _reference(u8: torch.Tensor, lam: float | None) -> torch.Tensor:
    """float64: (x/255 - mean)/std, then lam·x + (1-lam)·x.flip(0)."""
    x = (u8.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return x if lam is None else lam * x + (1 - lam) * x.flip(0)


def test_uint8_collate_then_normalize_is_the_float_collate_bit_for_bit() -> None:
    images = _images(7)
    flt, u8 = _collate(images, "float32"), _collate(images, "uint8")
    assert flt.pixels.dtype == torch.float32 and u8.pixels.dtype == torch.uint8
    assert u8.pixels.shape == flt.pixels.shape == (7, 3, 13, 11) and u8.pixels.is_contiguous()
    assert torch.equal(normalize(u8.pixels, MEAN, STD), flt.pixels)
    torch.testing.assert_close(flt.pixels.double(), _reference(u8.pixels, None), rtol=0, atol=2e-6)  # a few fp32 ulps of |x| <= 2.2
    empty = collate([], [], tokenizer=None, max_length=4, mean=MEAN, std=STD, with_concepts=False,
                    image_size=(13, 11), pixel_dtype="uint8")
    assert empty.pixels.dtype == torch.uint8 and empty.pixels.shape == (0, 3, 13, 11)
    with pytest.raises(ValueError, match="pixel_dtype"):
        _collate(images, "float16")


@pytest.mark.parametrize("lam", [None, 0.0, 0.3, 0.93])
@pytest.mark.parametrize("bounds", [[0, 3, 6, 7], [0, 7], [0, 1, 2, 5, 7]])
def test_feed_chunks_equal_the_materialised_normalise_then_mix(lam: float | None, bounds: list[int]) -> None:
    """Any chunking of an odd batch (the partner rows of a chunk are another chunk's): the same
    bits as normalising the whole batch in the collate and mixing it whole (the float path)."""
    u8 = torch.from_numpy(np.stack(_images(7, seed=1))).permute(0, 3, 1, 2).contiguous()
    whole = normalize(u8, MEAN, STD)
    expect = whole if lam is None else mix_reversed(whole, lam)
    feed = PixelFeed(MEAN, STD, lam)
    tokens = torch.arange(7 * 2).view(7, 2)
    parts = [feed({"pixels": u8, "tokens": tokens}, a, b, torch.device("cpu")) for a, b in itertools.pairwise(bounds)]
    got = torch.cat([p["pixels"] for p in parts])
    assert got.dtype == torch.float32 and torch.equal(got, expect)
    assert torch.equal(torch.cat([p["tokens"] for p in parts]), tokens)  # other inputs: plain rows
    torch.testing.assert_close(got.double(), _reference(u8, lam), rtol=0, atol=4e-6)
    # float pixels (already normalised) are only mixed, as Objective.prepare mixes them
    fparts = [PixelFeed(lam=lam)({"pixels": whole}, a, b, torch.device("cpu"))["pixels"] for a, b in itertools.pairwise(bounds)]
    assert torch.equal(torch.cat(fparts), expect)


def test_feed_and_model_errors_name_the_fix() -> None:
    u8 = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="mean and std"):
        PixelFeed()({"pixels": u8}, 0, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="uint8 or floating"):
        PixelFeed(MEAN, STD)({"pixels": u8.int()}, 0, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="lam"):
        PixelFeed(MEAN, STD, 1.5)
    with pytest.raises(ValueError, match="both mean and std"):
        PixelFeed(MEAN, None)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize(u8, MEAN[:2], STD[:2])
    from vlscale.model.dual_encoder import _check_pixels

    with pytest.raises(ValueError, match=r"pixel_dtype='uint8'.*normalize"):
        _check_pixels(u8)


def test_gradcache_feed_plain_and_chunked_paths_agree() -> None:
    """The gradient cache runs its feed in both passes and in the plain path: the chunked step's
    gradient equals the plain step's (the feed normalises + mixes each chunk identically)."""
    from vlscale.engines import build_engine
    from vlscale.gradcache import GradCache
    from vlscale.loss import contrastive_loss

    torch.manual_seed(0)
    u8 = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    tokens = torch.randint(0, 50, (7, 5))

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.img, self.txt = torch.nn.Linear(3 * 64, 6), torch.nn.Embedding(50, 6)
            self.t = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, pixels=None, tokens=None):
            out = {"logit_scale": self.t.exp().view(1)}
            if pixels is not None:
                assert pixels.dtype == torch.float32
                out["image"] = torch.nn.functional.normalize(self.img(pixels.flatten(1)), dim=-1)
            if tokens is not None:
                out["text"] = torch.nn.functional.normalize(self.txt(tokens).mean(1), dim=-1)
            return out

    def loss(embs):
        return contrastive_loss(embs["image"], embs["text"], embs["logit_scale"]), {}

    grads = []
    for chunk in (None, 3):
        model = Tiny()
        torch.manual_seed(1)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        engine = build_engine("local", model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        GradCache(engine, chunk_size=chunk).step({"pixels": u8, "tokens": tokens}, loss, feed=PixelFeed(MEAN, STD, 0.3))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_uint8_and_float32_transport_train_identically_with_mixup_momentum_and_mim(tmp_path: Path) -> None:
    """A few steps with every pixel consumer on (image + text mixup, momentum keys, masked image
    modeling): uint8 transport gives exactly the float run's losses, and its batches are uint8."""
    from test_train_smoke import tiny_overrides

    from vlscale.config import load_recipe
    from vlscale.demo_data import build_demo_dataset
    from vlscale.train.trainer import Trainer

    shards = build_demo_dataset(tmp_path / "shards", n_train=48, n_eval=6, size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for dtype in ("float32", "uint8"):
            cfg = load_recipe("tiny-cpu", tiny_overrides(
                shards, tmp_path / dtype, "train.steps=6", "train.eval_every=0", "train.ckpt_every=0",
                f"data.pixel_dtype={dtype}", "techniques.mixup=true", "techniques.mixup_alpha=1.0",
                "techniques.momentum_queue=32", "techniques.mim_weight=0.5", "model.mim_decoder_depth=1",
                "model.mim_decoder_width=16"))
            trainer = Trainer(cfg)
            seen = []
            original = trainer.objective.prepare

            def spy(step, batch, inputs, original=original, seen=seen, obj=trainer.objective):
                out = original(step, batch, inputs)
                seen.append((batch.pixels.dtype, obj.plan.mode))
                return out

            trainer.objective.prepare = spy
            runs[dtype] = (trainer.fit()["losses"], seen)
    finally:
        torch.set_num_threads(threads)
    (flt, flt_seen), (u8, u8_seen) = runs["float32"], runs["uint8"]
    assert {d for d, _ in flt_seen} == {torch.float32} and {d for d, _ in u8_seen} == {torch.uint8}
    assert {"image", "text"} <= {m for _, m in u8_seen}, u8_seen  # both kinds of mixup steps ran
    assert u8 == flt


# -- host memory of the data path -----------------------------------------------------------------
def _cfg(*overrides: str):
    from vlscale.config import load_recipe

    return load_recipe("zerovl-v100", list(overrides))


def test_host_batch_memory_by_hand() -> None:
    """1,048,576 pairs over 8 ranks: 131,072 images of 3×224² per rank; 8 workers × prefetch 2 + 2
    batches in flight; float32 with image mixup adds the mixed copy."""
    from vlscale.memory.hostmem import host_batch_memory

    u8 = host_batch_memory(_cfg("train.global_batch_size=1048576", "data.part_size=0"), 8)  # whole batches
    batch = 131072 * (3 * 224 * 224 + _cfg().model.context_length * 16)
    assert (u8["local_batch"], u8["image_side"], u8["bytes_per_image"]) == (131072, 224, 3 * 224 * 224)
    assert (u8["batches_held"], u8["batch_bytes"], u8["bytes_per_rank"]) == (18, batch, 18 * batch)
    f32 = host_batch_memory(_cfg("train.global_batch_size=1048576", "data.pixel_dtype=float32",
                                 "data.num_workers=2", "data.prefetch_factor=1", "data.part_size=0"), 8)
    assert f32["bytes_per_image"] == 4 * 3 * 224 * 224 and f32["batches_held"] == 2 * 1 + 2 + 1  # + mixed copy
    assert "mixed copy" in f32["formula"] and "mixed copy" not in u8["formula"]


def test_host_memory_check_errors_warns_and_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlscale.memory.hostmem import check_host_memory, ranks_per_node

    cfg = _cfg("train.global_batch_size=1048576", "data.pixel_dtype=float32")
    gb = 10**9
    err, warn = check_host_memory(cfg, 8, memory=(512 * gb, 500 * gb), local_ranks=8)
    assert warn is None and "exceeds this machine's 512.0 GB" in err and "data.pixel_dtype=uint8" in err
    ok_cfg = _cfg("train.global_batch_size=1048576", "data.part_size=0")
    err, warn = check_host_memory(ok_cfg, 8, memory=(512 * gb, 500 * gb), local_ranks=8)
    assert err is None and "data.prefetch_factor" in warn and "8 rank(s) on this machine" in warn
    assert check_host_memory(_cfg(), 8, memory=(512 * gb, 500 * gb), local_ranks=8) == (None, None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ranks_per_node(8) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert ranks_per_node(8) == 2


def test_preflight_checks_every_machine_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank reports its machine; the check covers every one with the ranks it runs and names the
    machine that cannot hold its ranks' batches (not only rank 0's machine)."""
    from vlscale.memory.hostmem import group_hosts
    from vlscale.train import preflight as pf
    from vlscale.train.preflight import PreflightError, preflight

    monkeypatch.setattr(pf, "_check_rows", lambda *args: None)  # no shards here: the host check alone

    gb = 10**9
    assert group_hosts([{"host": "a", "memory": (512, 500)}, {"host": "b", "memory": (256, 200)},
                        {"host": "a", "memory": (512, 490)}, {"host": "b", "memory": None}]) == [
        ("a", (512, 490), 2), ("b", (256, 200), 2)]
    cfg = _cfg("train.global_batch_size=1048576", "data.train_shards=")  # 19.8 GB per local batch (uint8 pixels + tokens)
    big, small = ("gpu-00", (512 * gb, 500 * gb), 4), ("gpu-01", (64 * gb, 60 * gb), 4)
    assert not [w for w in preflight(cfg, 8, hosts=[big, big]) if "host memory" in w]
    with pytest.raises(PreflightError, match=r"\(19\.8 GB × 4 ranks\) exceeds gpu-01's 64\.0 GB") as err:
        preflight(cfg, 8, hosts=[big, small])
    assert "gpu-00" not in str(err.value)
    warned = preflight(cfg, 8, hosts=[big, ("gpu-02", (512 * gb, 60 * gb), 4)])
    assert [w for w in warned if "host memory" in w and "4 rank(s) on gpu-02" in w], warned
    # one machine: the messages say "this machine", as a one-rank run's do
    with pytest.raises(PreflightError, match=r"exceeds this machine's 64\.0 GB"):
        preflight(cfg, 4, hosts=[small])


def test_preflight_and_plan_report_host_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The preflight stops a run whose one batch per rank exceeds the machine before any model is
    built; `vlscale memory plan` prints the data path's host memory."""
    from vlscale.memory import hostmem
    from vlscale.train.preflight import PreflightError, preflight

    monkeypatch.setattr(hostmem, "machine_memory", lambda: (64 * 10**9, 60 * 10**9))
    cfg = _cfg("train.global_batch_size=1048576", "data.train_shards=")
    with pytest.raises(PreflightError, match="host memory: one local batch per rank"):
        preflight(cfg, 8)
    from vlscale.memory.cli import main as memory_main

    assert memory_main(["plan", "--recipe", "zerovl-v100", "--world-size", "8", "--gpu-memory", "32GiB",
                        "--gpu", "v100", "--out", str(tmp_path)]) == 0
    import json

    host = json.loads((tmp_path / "report.json").read_text())["inputs"]["host"]
    assert host["local_batch"] == 2048 and host["pixel_dtype"] == "uint8"
    assert "## Host memory per rank (data path)" in (tmp_path / "report.md").read_text()
