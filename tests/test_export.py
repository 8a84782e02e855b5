"""``vlscale export`` → ``vlscale.load`` and open_clip itself → the same embeddings.

open_clip (pinned in requirements.lock) loads the export with ``create_model_and_transforms("local-dir:…")``:
its TimmModel + HFTextEncoder towers must give exactly our image and text embeddings, tokens and
logit scale. The vision tower is timm's ``test_vit`` (open_clip builds timm models by name only).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlscale
from vlscale.cli import main as vlscale_main
from vlscale.config import Config, load_recipe, save_config
from vlscale.model import DualEncoder

TEXT = "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, " \
       "\"intermediate_size\": 64}"
TEXTS = ["a red circle above a blue square", "Two cyclists ride past a bakery at dusk.", "x"]


def checkpoint(tmp_path: Path, *overrides: str) -> tuple[Config, DualEncoder, Path]:
    cfg = load_recipe("tiny-cpu", [TEXT, "model.embed_dim=16", *overrides])
    torch.manual_seed(0)
    model = DualEncoder(cfg.model).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000007"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "model.pt")
    save_config(cfg, ckpt / "config.json")
    (ckpt.parent / "latest").write_text("step_000007\n")
    return cfg, model, ckpt


def reference(model: DualEncoder, pixels: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tok = model.tokenizer(TEXTS, padding="max_length", truncation=True, max_length=cfg.model.context_length,
                          return_tensors="pt")
    with torch.no_grad():
        return (model(pixels=pixels)["image"], model(tokens=tok["input_ids"], attention_mask=tok["attention_mask"])["text"],
                tok)


def test_export_loads_in_vlscale_and_open_clip_with_the_same_embeddings(tmp_path: Path) -> None:
    import open_clip

    cfg, model, ckpt = checkpoint(tmp_path, "model.vision_model=test_vit", "model.vision_kwargs={}",
                                  "model.image_size=null")
    out = tmp_path / "export"
    assert vlscale_main(["export", str(tmp_path / "run"), str(out)]) == 0  # a run dir: its latest checkpoint
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["open_clip_config"] and manifest["source"] == str(ckpt)
    for name in ("config.json", "model.safetensors", "text", "tokenizer.json", "preprocessor_config.json",
                 "open_clip_config.json", "open_clip_model.safetensors"):
        assert (out / name).exists(), name
    pixels = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    ref_img, ref_txt, tok = reference(model, pixels, cfg)

    loaded = vlscale.load(out)
    assert torch.equal(loaded.encode_image(pixels), ref_img) and torch.equal(loaded.encode_text(TEXTS), ref_txt)
    assert torch.equal(loaded.encode_text(tok["input_ids"]), ref_txt)  # token ids: mask = ids != [PAD]
    assert loaded.logit_scale == pytest.approx(float(model.scale()))
    image = Image.new("RGB", (200, 120), (200, 40, 40))
    assert loaded.transform(image).shape == (3, 160, 160)
    assert torch.equal(loaded.encode_image(image), loaded.encode_image(loaded.transform(image)[None]))
    from_ckpt = vlscale.load(ckpt)  # a checkpoint folder loads the same way
    assert torch.equal(from_ckpt.encode_text(TEXTS), ref_txt)

    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc_tok = open_clip.get_tokenizer(f"local-dir:{out}")
    oc.eval()
    assert torch.equal(oc_tok(TEXTS), tok["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(pixels, normalize=True), ref_img, rtol=0, atol=1e-6)
        torch.testing.assert_close(oc.encode_text(oc_tok(TEXTS), normalize=True), ref_txt, rtol=0, atol=1e-6)
    assert float(oc.logit_scale.exp()) == pytest.approx(float(model.scale()))
    assert preprocess(image).shape == (3, 160, 160)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 160, "width": 160} and pre["image_mean"] == [0.5, 0.5, 0.5]


def test_export_reports_what_open_clip_cannot_describe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg, model, ckpt = checkpoint(tmp_path)  # tiny-cpu: a ViT built with vision_kwargs at 32 px
    out = tmp_path / "export"
    assert vlscale_main(["export", str(ckpt), str(out)]) == 0
    err = capsys.readouterr().err
    assert "open_clip_config.json not written" in err and "vision_kwargs" in err and "image_size=32" in err
    assert (out / "open_clip_model.safetensors").is_file() and not (out / "open_clip_config.json").exists()
    pixels = torch.randn(2, 3, 32, 32)
    ref_img, ref_txt, _ = reference(model, pixels, cfg)
    loaded = vlscale.load(out)
    assert torch.equal(loaded.encode_image(pixels), ref_img) and torch.equal(loaded.encode_text(TEXTS), ref_txt)
    assert vlscale_main(["export", str(ckpt), str(out)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert vlscale_main(["export", str(ckpt), str(out), "--overwrite"]) == 0
    assert vlscale_main(["export", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
