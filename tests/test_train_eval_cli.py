"""``vlscale eval`` and the retrieval driver on constructed cases with known answers.

The metric functions belong to vlscale.eval (tested there); here: the driver groups the five
captions of each image, embeds through the model, and the CLI loads a checkpoint's config and
weights and reports the same numbers as a brute-force computation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from vlscale.config import Config, load_recipe, save_config
from vlscale.demo_data import build_demo_dataset
from vlscale.eval.cli import main as eval_main
from vlscale.model import DualEncoder
from vlscale.train.evaluate import eval_loader, evaluate_retrieval

N_IMAGES, CAPTIONS = 7, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_dataset(tmp_path_factory.mktemp("shards"), n_train=4, n_eval=N_IMAGES,
                              captions_per_image=CAPTIONS, size=32)


def tiny_config(shards: dict[str, Path], run: Path) -> Config:
    return load_recipe("tiny-cpu", [
        f"train.run_dir={run}", f"data.eval_shards={shards['eval']}", "eval.batch_size=8",
        "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
        "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 64}", "model.embed_dim=16"])


def _digest(x: Tensor) -> str:
    return hashlib.sha1(x.detach().float().contiguous().numpy().tobytes()).hexdigest()


class Oracle(nn.Module):
    """Embeds an image as one-hot(its index) and a caption as one-hot(index of its image + shift)."""

    def __init__(self, image_of_pixels: dict[str, int], image_of_tokens: dict[str, int], shift: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # something for embed_dataset to find the device on
        self.image_of_pixels, self.image_of_tokens, self.shift = image_of_pixels, image_of_tokens, shift

    def forward(self, pixels: Tensor | None = None, tokens: Tensor | None = None,
                attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        eye = torch.eye(N_IMAGES)
        if pixels is not None:
            return {"image": eye[[self.image_of_pixels[_digest(p)] for p in pixels]]}
        ids = [(self.image_of_tokens[_digest(t)] + self.shift) % N_IMAGES for t in tokens]
        return {"text": eye[ids]}


@pytest.mark.parametrize(("shift", "r1"), [(0, 100.0), (1, 0.0)])
def test_driver_groups_captions_and_gets_known_answers(shards: dict[str, Path], tmp_path: Path,
                                                        shift: int, r1: float) -> None:
    cfg = tiny_config(shards, tmp_path)
    model = DualEncoder(cfg.model)
    keys: dict[str, int] = {}
    pix, tok = {}, {}
    for batch in eval_loader(cfg, str(shards["eval"]), model.tokenizer, model.data_config()):
        for key, p, t in zip(batch.keys, batch.pixels, batch.tokens):
            idx = keys.setdefault(key, len(keys))
            pix[_digest(p)], tok[_digest(t)] = idx, idx
    assert len(keys) == N_IMAGES and len(tok) == N_IMAGES * CAPTIONS  # five distinct captions per image
    m = evaluate_retrieval(Oracle(pix, tok, shift), cfg, model.tokenizer, model.data_config(), str(shards["eval"]))
    assert (m["n_images"], m["n_texts"]) == (N_IMAGES, N_IMAGES * CAPTIONS)
    # Training-time evaluation logs open_clip's names, as fractions.
    assert m["image_to_text_R@1"] == r1 / 100 and m["text_to_image_R@1"] == r1 / 100


def brute_force(model: DualEncoder, cfg: Config, shards: Path) -> dict[str, float]:
    """Recall@k from the full similarity matrix, straight from the definition."""
    images: dict[str, Tensor] = {}
    texts, owner = [], []
    with torch.no_grad():
        for batch in eval_loader(cfg, str(shards), model.tokenizer, model.data_config()):
            img = model(pixels=batch.pixels)["image"]
            txt = model(tokens=batch.tokens, attention_mask=batch.attention_mask)["text"]
            for key, i, t in zip(batch.keys, img, txt):
                images.setdefault(key, i)
                texts.append(t)
                owner.append(list(images).index(key))
    img_m, txt_m, owner_t = torch.stack(list(images.values())), torch.stack(texts), torch.tensor(owner)
    sim = txt_m @ img_m.T  # (texts, images)
    t2i_rank = (sim > sim[torch.arange(len(owner)), owner_t][:, None]).sum(1)
    i2t_best = []
    for i in range(len(images)):
        own = sim[owner_t == i, i]
        i2t_best.append(int((sim[:, i] > own.max()).sum()))
    i2t_rank = torch.tensor(i2t_best)
    return {f"{n}_recall@{k}": float((r < k).float().mean())
            for n, r in (("image_retrieval", t2i_rank), ("text_retrieval", i2t_rank)) for k in (1, 5)}


def test_eval_cli_on_a_saved_checkpoint(shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_config(shards, tmp_path / "run")
    torch.manual_seed(0)
    model = DualEncoder(cfg.model).eval()
    ckpt = tmp_path / "run" / "checkpoints" / "step_000005"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "model.pt")
    save_config(cfg, ckpt / "config.json")
    (ckpt.parent / "latest").write_text("step_000005\n")

    out = tmp_path / "metrics.json"
    assert eval_main([str(tmp_path / "run"), "--out", str(out)]) == 0  # a run dir: its latest checkpoint
    printed = capsys.readouterr().out
    assert "image→text" in printed and f"{N_IMAGES} images, {N_IMAGES * CAPTIONS} captions" in printed
    result = json.loads(out.read_text())
    assert result["pretrained"] == str(ckpt) and result["memory"]["mem/peak_rss_mib"] > 0
    # CLIP_benchmark's layout: task, dataset, model, pretrained, metrics (fractions); plus where from.
    assert result["task"] == "zeroshot_retrieval" and result["dataset"]["shards"] == str(shards["eval"])
    assert (result["dataset"]["n_images"], result["dataset"]["n_texts"]) == (N_IMAGES, N_IMAGES * CAPTIONS)
    assert result["checkpoint"] == {"path": str(ckpt), "step": 5, "recipe": cfg.recipe,
                                    "run_dir": str(tmp_path / "run")}
    assert result["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert all(0.0 <= v <= 1.0 for k, v in result["metrics"].items() if "recall@" in k)
    expected = brute_force(model, cfg, shards["eval"])
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-4), key


def test_eval_cli_errors(shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert eval_main([str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    cfg = tiny_config(shards, tmp_path / "run")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"bogus": torch.zeros(1)}, ckpt / "model.pt")
    save_config(cfg, ckpt / "config.json")
    assert eval_main([str(ckpt)]) == 2
    assert "does not match the config's model" in capsys.readouterr().err
