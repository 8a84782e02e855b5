"""``vlscale eval --classes``: zero-shot classification next to retrieval, on cases with known answers.

The classifier / accuracy functions belong to vlscale.eval.zeroshot (tested there); here: the CLI
reads class files (text / JSON), reads each image's true class (caption / key / column), and its
top-1 / top-5 equal an oracle's known answers and a brute-force computation on a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlscale.eval.cli as cli
from vlscale.config import Config, load_recipe, save_config
from vlscale.demo_data import COLORS, SHAPES, build_demo_dataset
from vlscale.eval import DEFAULT_TEMPLATES
from vlscale.model import DualEncoder
from vlscale.train.evaluate import eval_loader

N_IMAGES, CAPTIONS = 7, 3
OBJECTS = [f"{c} {s}" for c in COLORS for s in SHAPES]  # the demo's 18 objects


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_dataset(tmp_path_factory.mktemp("shards"), n_train=2, n_eval=N_IMAGES,
                              captions_per_image=CAPTIONS, size=32)


def tiny_config(shards: dict[str, Path], run: Path) -> Config:
    return load_recipe("tiny-cpu", [
        f"train.run_dir={run}", f"data.eval_shards={shards['eval']}", "eval.batch_size=8",
        "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
        "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
        "\"intermediate_size\": 64}", "model.embed_dim=16"])


def save_checkpoint(cfg: Config, model: nn.Module, run: Path) -> Path:
    ckpt = run / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / "model.pt")
    save_config(cfg, ckpt / "config.json")
    return ckpt


def _digest(x: Tensor) -> str:
    return hashlib.sha1(x.detach().float().contiguous().numpy().tobytes()).hexdigest()


def first_objects(cfg: Config, shards: Path, tokenizer, data_config) -> dict[str, tuple[str, Tensor]]:
    """key → (its first concept, its pixels) straight from the loader."""
    out: dict[str, tuple[str, Tensor]] = {}
    for batch in eval_loader(cfg, str(shards), tokenizer, data_config):
        for key, concepts, pixels in zip(batch.keys, batch.concepts, batch.pixels):
            out.setdefault(key, (concepts[0], pixels))
    return out


class Oracle(nn.Module):
    """Image → mostly class (label + shift), a little the true class; prompt → its class, one-hot."""

    def __init__(self, cfg: Config, label_of_pixels: dict[str, int], shift: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.cfg, self.label_of_pixels, self.shift = cfg, label_of_pixels, shift
        real = DualEncoder(cfg.model)
        self.tokenizer, self._data_config = real.tokenizer, real.data_config()
        prompts = [(t.format(c), i) for i, c in enumerate(OBJECTS) for t in DEFAULT_TEMPLATES]
        tok = self.tokenizer([p for p, _ in prompts], padding="max_length", truncation=True,
                             max_length=cfg.model.context_length, return_tensors="pt")["input_ids"]
        self.class_of_tokens = {_digest(t): i for t, (_, i) in zip(tok, prompts)}
        assert len(set(self.class_of_tokens.values())) == len(OBJECTS)

    def data_config(self) -> dict:
        return self._data_config

    def forward(self, pixels: Tensor | None = None, tokens: Tensor | None = None,
                attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        eye = torch.eye(len(OBJECTS))
        if pixels is not None:
            labels = [self.label_of_pixels[_digest(p)] for p in pixels]
            emb = eye[[(lab + self.shift) % len(OBJECTS) for lab in labels]] + 0.5 * eye[labels]
            return {"image": F.normalize(emb, dim=-1)}
        # Captions (retrieval) are not prompts: any fixed vector will do for them.
        return {"text": eye[[self.class_of_tokens.get(_digest(t), 0) for t in tokens]]}


@pytest.mark.parametrize(("shift", "top1", "top5"), [(0, 1.0, 1.0), (1, 0.0, 1.0)])
def test_oracle_known_answers(shards: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture, shift: int, top1: float, top5: float) -> None:
    cfg = tiny_config(shards, tmp_path / "run")
    model = DualEncoder(cfg.model)
    ckpt = save_checkpoint(cfg, model, tmp_path / "run")
    firsts = first_objects(cfg, shards["eval"], model.tokenizer, model.data_config())
    oracle = Oracle(cfg, {_digest(p): OBJECTS.index(obj) for obj, p in firsts.values()}, shift)
    monkeypatch.setattr(cli, "load_model", lambda _ckpt, _dev: (cfg, oracle))
    classes = tmp_path / "objects.txt"
    classes.write_text("# the demo's objects\n" + "\n".join(OBJECTS) + "\n\n")
    out = tmp_path / "m.json"
    argv = [str(ckpt), "--classes", str(classes), "--labels-from", "column:concepts", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "image→text" in printed and "zero-shot" in printed and "18 classes" in printed
    zs = json.loads(out.read_text())["zeroshot_classification"]  # CLIP_benchmark names, fractions
    m = zs["metrics"]
    assert (m["acc1"], m["acc5"], zs["n_images"], zs["skipped"]) == (top1, top5, N_IMAGES, {})
    assert m["mean_per_class_recall"] == top1  # every labelled class is right (or wrong) alike
    assert zs["chance_acc1"] == pytest.approx(1 / 18) and zs["templates"] == list(DEFAULT_TEMPLATES)


def brute_force(model: DualEncoder, cfg: Config, shards: Path, classes: list[str],
                templates: list[str]) -> tuple[float, float]:
    """Top-1 / top-5 from the definition: mean normalised prompt embedding per class, arg-sort."""
    firsts = first_objects(cfg, shards, model.tokenizer, model.data_config())
    with torch.no_grad():
        weights = []
        for name in classes:
            tok = model.tokenizer([t.format(name) for t in templates], padding="max_length", truncation=True,
                                  max_length=cfg.model.context_length, return_tensors="pt")
            txt = model(tokens=tok["input_ids"], attention_mask=tok["attention_mask"])["text"]
            weights.append(F.normalize(F.normalize(txt, dim=-1).mean(0), dim=0))
        pixels = torch.stack([p for _, p in firsts.values()])
        sim = model(pixels=pixels)["image"] @ torch.stack(weights).T
    labels = torch.tensor([classes.index(obj) for obj, _ in firsts.values()])
    rank = (sim > sim[torch.arange(len(labels)), labels][:, None]).sum(1)  # classes strictly better
    return float((rank < 1).float().mean()), float((rank < 5).float().mean())


def test_real_checkpoint_matches_brute_force(shards: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(shards, tmp_path / "run")
    torch.manual_seed(0)
    model = DualEncoder(cfg.model).eval()
    ckpt = save_checkpoint(cfg, model, tmp_path / "run")
    templates = ["a {} .", "a picture of a {}"]
    # Only the objects that are some image's label: fewer classes, so top-1 is not trivially 0.
    present = {obj for obj, _ in first_objects(cfg, shards["eval"], model.tokenizer, model.data_config()).values()}
    names = [o for o in OBJECTS if o in present]
    classes = tmp_path / "objects.json"
    classes.write_text(json.dumps({"classes": names, "templates": templates}))
    result = cli.evaluate_checkpoint(ckpt, classes=str(classes), labels_from="column:concepts")
    zs = result["zeroshot_classification"]
    top1, top5 = brute_force(model, cfg, shards["eval"], names, templates)
    assert zs["metrics"]["acc1"] == pytest.approx(top1) and zs["metrics"]["acc5"] == pytest.approx(top5)
    assert zs["n_images"] == N_IMAGES and result["metrics"]["n_images"] == N_IMAGES  # retrieval still there


def test_read_labels_sources() -> None:
    classes = ["circle", "red circle", "blue square", "tabby cat"]
    images = [("k0", ["a photo of a Red circle.", "a red circle"]),  # nested names: the longer one
              ("k1", ["a red circle above a blue square"]),  # two classes: ambiguous
              ("k2", ["nothing here"]), ("k3", ["a circle", "one circle"]), ("k4", ["a red_circle"]),
              ("k5", ["a red circle", "a blue square"])]  # captions disagree: ambiguous
    labels, skipped = cli.read_labels(images, classes, "caption")
    assert labels == [1, None, None, 0, 1, None] and skipped == {"ambiguous": 2, "unlabelled": 1}
    keys = [("tabby_cat/0001.jpg", []), ("Blue Square/7", []), ("circle", []), ("dog/1", [])]
    labels, skipped = cli.read_labels(keys, classes, "key")
    assert labels == [3, 2, 0, None] and skipped == {"unlabelled": 1}
    index = {cli._norm(c): i for i, c in enumerate(classes)}
    values = [3, 4, -1, True, "Tabby Cat", ["dog", "blue square", "circle"], None, 1.0]
    assert [cli._value_class(v, index, 4) for v in values] == [3, None, None, None, 3, 2, None, None]


def test_class_files_and_errors(shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plain = tmp_path / "c.txt"
    plain.write_text("cat\n  dog  \n# comment\n\n")
    assert cli.load_classes(plain) == (["cat", "dog"], DEFAULT_TEMPLATES)
    bad = {"dupes.txt": ("cat\nCat\n", "duplicate class names"),
           "tmpl.json": (json.dumps({"classes": ["cat"], "templates": ["a photo"]}), "must contain '{}'"),
           "keys.json": (json.dumps({"names": ["cat"]}), "expected keys 'classes'"),
           "broken.json": ("{", "not valid JSON"), "empty.txt": ("# nothing\n", "no class names")}
    for name, (text, msg) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=msg):
            cli.load_classes(tmp_path / name)
    with pytest.raises(ValueError, match="caption, key or column:NAME"):
        cli.parse_labels_from("column:")

    cfg = tiny_config(shards, tmp_path / "run")
    ckpt = save_checkpoint(cfg, DualEncoder(cfg.model), tmp_path / "run")
    objects = tmp_path / "objects.txt"
    objects.write_text("\n".join(OBJECTS))
    cases = [(["--labels-from", "caption"], "none of the 7 held-out images"),  # captions name two objects
             (["--labels-from", "key"], "none of the 7 held-out images"),  # keys are shapes-eval-000000 …
             (["--labels-from", "column:label"], "has no such column"),
             (["--labels-from", "folder"], "--labels-from must be")]
    for extra, msg in cases:
        assert cli.main([str(ckpt), "--classes", str(objects), *extra]) == 2
        assert msg in capsys.readouterr().err
    assert cli.main([str(ckpt), "--classes", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
