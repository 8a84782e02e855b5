"""``vlscale export CHECKPOINT OUT``: a trained checkpoint as a folder other tools load.

``OUT`` is one folder in the layout open_clip pushes to the Hugging Face Hub, plus the files a
Hugging Face user expects, so the same folder serves three readers::

    config.json                   vlscale: the model config, embedding width, logit scale, source
                                  (``vlscale_model_type``, not ``model_type``: no transformers class reads it)
    model.safetensors             vlscale's DualEncoder weights (fp32) — read by ``vlscale.load``
    text/config.json              the text tower's transformers config (AutoConfig / AutoModel)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (AutoTokenizer)
    preprocessor_config.json      the image preprocessing, as CLIPImageProcessor fields + timm's data config
    open_clip_config.json         open_clip's model_cfg + preprocess_cfg
    open_clip_model.safetensors   the weights under open_clip's names (``visual.trunk.*``,
                                  ``visual.head.proj.weight``, ``text.transformer.*``,
                                  ``text.proj.weight``, ``logit_scale``)
    export.json                   what was written, and why a part was left out

open_clip then loads it with ``open_clip.create_model_and_transforms("local-dir:OUT")`` and
``open_clip.get_tokenizer("local-dir:OUT")`` (its ``TimmModel`` + ``HFTextEncoder`` towers, CLS or
mean pooling without the BERT pooler, a bias-free linear projection each). Limits of open_clip's
config, reported rather than papered over: its ``TimmModel`` passes no timm keyword arguments, so a
vision tower built with ``model.vision_kwargs`` or a non-default ``model.image_size`` cannot be
described (the open_clip state dict is still written; the config is not); MLP projections have other
shapes there; ``hf_model_name`` must be a path, so it is written absolute — move the folder and
edit it. open_clip's preprocessing resizes the short side to the crop size (no ``crop_pct``), so
its transform crops a little differently from vlscale's eval transform; the weights are the same.
Hierarchical-alignment heads, the masked-image-modeling decoder and ViCHA's concept path have no
open_clip counterpart: they are in ``model.safetensors`` only, and a concept-token model gets no
open_clip config (its image embeddings need the concepts: ``vlscale.load(...).encode_image(images,
concepts)``).

``vlscale.load(path)`` reads such a folder — or a checkpoint folder / run dir directly — into a
:class:`PretrainedDualEncoder`: ``encode_image`` / ``encode_text`` (L2-normalised embeddings from
PIL images or pixel tensors, strings or token ids), its ``transform`` and ``tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
EXPORT_TYPE = "vlscale_dual_encoder"
_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}


def resolve_source(path: str | Path) -> Path:
    """A checkpoint folder (model.pt + config.json) from itself, a checkpoints/ dir or a run dir."""
    from vlscale.eval.cli import resolve_checkpoint

    return resolve_checkpoint(path)


def open_clip_state_dict(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """DualEncoder weights under open_clip's CustomTextCLIP names (timm vision + HF text tower)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("visual.trunk."):
            out[key] = value
        elif key.startswith("textual.trunk."):
            out["text.transformer." + key[len("textual.trunk."):]] = value
        elif key == "image_proj.net.0.weight":
            out["visual.head.proj.weight"] = value
        elif key == "text_proj.net.0.weight":
            out["text.proj.weight"] = value
    # open_clip keeps log(scale) as a 0-d parameter; clamp as our forward does, so exp() agrees.
    out["logit_scale"] = state["logit_scale"].clamp(max=model.cfg.max_logit_scale).reshape(())
    return {k: v.contiguous() for k, v in out.items()}


def open_clip_blockers(model: Any) -> list[str]:
    """Why open_clip's config cannot describe this model (empty: it can)."""
    import timm

    cfg, why = model.cfg, []
    if cfg.proj != "linear":
        why.append(f"model.proj={cfg.proj!r}: open_clip's MLP heads have other shapes (only 'linear' maps)")
    extra = {k: v for k, v in cfg.vision_kwargs.items() if k != "drop_path_rate"}
    if extra:
        why.append(f"model.vision_kwargs={extra}: open_clip's TimmModel passes no timm keyword arguments")
    if cfg.concept_tokens:
        why.append(f"model.concept_tokens={cfg.concept_tokens}: the image tower also reads the images' concept "
                   "tokens (ViCHA), which open_clip's towers cannot take")
    default = timm.create_model(cfg.vision_model, pretrained=False, num_classes=0).default_cfg.get("input_size")
    size = tuple(model.data_config()["input_size"])
    if cfg.image_size is not None and default is not None and tuple(default) != size:
        why.append(f"model.image_size={cfg.image_size}: open_clip builds {cfg.vision_model} at its default "
                   f"{tuple(default)[1:]} (TimmModel does not pass img_size)")
    return why


def _preprocess(data_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF CLIPImageProcessor fields, open_clip preprocess_cfg) for the eval transform."""
    _, h, w = data_cfg["input_size"]
    crop_pct = float(data_cfg.get("crop_pct") or 0.875)
    interp = str(data_cfg.get("interpolation") or "bicubic")
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}.get(interp, 3)
    hf = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
          "size": {"shortest_edge": int(h / crop_pct)}, "resample": resample, "do_center_crop": True,
          "crop_size": {"height": int(h), "width": int(w)}, "do_rescale": True, "rescale_factor": 1 / 255,
          "do_normalize": True, "image_mean": list(data_cfg["mean"]), "image_std": list(data_cfg["std"]),
          "do_convert_rgb": True, "timm_data_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in data_cfg.items()}}
    oc = {"size": [int(h), int(w)] if h != w else int(h), "mode": "RGB", "mean": list(data_cfg["mean"]),
          "std": list(data_cfg["std"]), "interpolation": interp, "resize_mode": "shortest", "fill_color": 0}
    return hf, oc


def export(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the export folder (see the module docstring); returns the manifest (``export.json``)."""
    from safetensors.torch import save_file

    import vlscale
    from vlscale.config import config_to_dict, load_config
    from vlscale.model import DualEncoder
    from vlscale.train.checkpoint import load_model_weights, load_weights_into

    src = resolve_source(checkpoint)
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: choose another folder or pass --overwrite")
    cfg = load_config(src / "config.json")
    model = DualEncoder(cfg.model).eval()
    state = load_model_weights(src)
    load_weights_into(model, state, source=f"{src}/model.pt")  # strict: proves the weights fit the config
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "text").mkdir(parents=True)

    model.textual.trunk.config.to_json_file(str(tmp / "text" / "config.json"))
    if model.tokenizer is None:
        raise ValueError(f"{src}: the model has no tokenizer to export (set model.tokenizer in its config)")
    model.tokenizer.save_pretrained(str(tmp))
    hf_pre, oc_pre = _preprocess(dict(model.data_config()))
    (tmp / "preprocessor_config.json").write_text(json.dumps(hf_pre, indent=2) + "\n")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "layout": EXPORT_TYPE})
    mcfg = config_to_dict(cfg)["model"]
    scale = float(state["logit_scale"].clamp(max=cfg.model.max_logit_scale).exp())
    step = int(src.name[5:]) if src.name.startswith("step_") and src.name[5:].isdigit() else None
    (tmp / "config.json").write_text(json.dumps({
        "vlscale_model_type": EXPORT_TYPE, "architectures": ["DualEncoder"], "vlscale_version": vlscale.__version__,
        "embed_dim": cfg.model.embed_dim, "context_length": cfg.model.context_length, "logit_scale": scale,
        "model": mcfg, "source": {"checkpoint": str(src), "step": step, "recipe": cfg.recipe}}, indent=2) + "\n")

    save_file(open_clip_state_dict(state, model), str(tmp / "open_clip_model.safetensors"), metadata={"format": "pt"})
    blockers = open_clip_blockers(model)
    files = sorted(p.name for p in tmp.iterdir())
    if not blockers:
        vision = {"timm_model_name": cfg.model.vision_model, "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "timm_proj_bias": False, "timm_drop": 0.0,
                  "image_size": int(model.data_config()["input_size"][1])}
        text = {"hf_model_name": str(out / "text"), "hf_tokenizer_name": str(out), "hf_model_pretrained": False,
                "hf_proj_type": "linear", "hf_pooler_type": _POOLERS[cfg.model.text_pooling],
                "context_length": cfg.model.context_length}
        oc = {"model_cfg": {"embed_dim": cfg.model.embed_dim, "vision_cfg": vision, "text_cfg": text,
                            "custom_text": True}, "preprocess_cfg": oc_pre}
        (tmp / "open_clip_config.json").write_text(json.dumps(oc, indent=2) + "\n")
        files.append("open_clip_config.json")
    manifest = {"source": str(src), "out": str(out), "files": sorted(files), "open_clip_config": not blockers,
                "open_clip_blockers": blockers, "vlscale_version": vlscale.__version__}
    (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


class PretrainedDualEncoder(torch.nn.Module):
    """A loaded dual encoder with its preprocessing: what ``vlscale.load`` returns (eval mode)."""

    def __init__(self, model: Any, source: Path) -> None:
        from vlscale.data.transforms import build_transform

        super().__init__()
        self.model, self.source = model.eval(), source
        self.tokenizer = model.tokenizer
        self.context_length = model.cfg.context_length
        self._transform = build_transform(train=False, data_config=model.data_config(), draft=False)
        self._warned_concepts = False

    def transform(self, image: Any) -> torch.Tensor:
        """A PIL image → the normalised (3, H, W) float tensor the vision tower takes (eval crop)."""
        import random

        arr = self._transform(image if image.mode == "RGB" else image.convert("RGB"), random.Random(0))
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(self._transform.mean).view(3, 1, 1)
        return (x - mean) / torch.tensor(self._transform.std).view(3, 1, 1)

    def tokenize(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, context_length), padded and truncated as in training."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def takes_concepts(self) -> bool:
        """The model was trained with visual concepts as image tokens (ViCHA, ``model.concept_tokens``)."""
        return self.model.concept_proj is not None

    @torch.no_grad()
    def encode_image(self, images: Any, concepts: list[list[str]] | None = None) -> torch.Tensor:
        """(B, E) L2-normalised embeddings of a (B, 3, H, W) tensor, a PIL image or a list of them.

        ``concepts``: each image's visual concepts (``vlscale concepts`` mines them), for a model that
        takes them (:attr:`takes_concepts`); all of them are fed, as at evaluation. Without them such
        a model sees an empty concept list per image (as in training when none was sampled), with a
        warning, since its embeddings are then not the ones its evaluation measured."""
        if not torch.is_tensor(images):
            images = torch.stack([self.transform(im) for im in (images if isinstance(images, list) else [images])])
        extra: dict[str, torch.Tensor] = {}
        if self.takes_concepts:
            if concepts is None:
                if not self._warned_concepts:
                    log.warning("encode_image: %s takes visual concepts as image tokens; none given, so every "
                                "image gets an empty list (pass concepts=[[...], ...])", self.source)
                    self._warned_concepts = True
                concepts = [[] for _ in range(images.shape[0])]
            if len(concepts) != images.shape[0]:
                raise ValueError(f"{len(concepts)} concept lists for {images.shape[0]} images")
            extra = {k: v.to(self.device) for k, v in self.model.concept_inputs(concepts).items()}
        elif concepts is not None:
            raise ValueError(f"{self.source} was trained without visual concepts (model.concept_tokens = 0); "
                             "drop concepts=")
        return self.model.encode_image(images.to(self.device, torch.float32), **extra)["image"]

    @torch.no_grad()
    def encode_text(self, texts: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E) L2-normalised embeddings of strings, or of token ids (+ mask; default ids != pad)."""
        if torch.is_tensor(texts):
            ids = texts
            if attention_mask is None:
                attention_mask = (ids != (self.tokenizer.pad_token_id or 0)).long()
        else:
            enc = self.tokenize(texts)
            ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        return self.model.encode_text(ids.to(self.device), attention_mask.to(self.device))["text"]

    @property
    def logit_scale(self) -> float:
        """The learned multiplier s of the similarities (exp of the clamped log-scale)."""
        return float(self.model.scale().detach())

    def forward(self, images: Any, texts: Any, concepts: list[list[str]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.encode_image(images, concepts), self.encode_text(texts), self.logit_scale


def load(path: str | Path, *, device: str | torch.device = "cpu") -> PretrainedDualEncoder:
    """A dual encoder from a ``vlscale export`` folder, a checkpoint folder or a run dir (its latest)."""
    from vlscale.config import load_config, model_config_from_dict
    from vlscale.model import DualEncoder
    from vlscale.train.checkpoint import load_model_weights, load_weights_into

    path = Path(path)
    meta = path / "config.json"
    if meta.is_file() and json.loads(meta.read_text()).get("vlscale_model_type") == EXPORT_TYPE:
        mcfg = dict(json.loads(meta.read_text())["model"])
        # The folder is self-contained: its text config and tokenizer, no package data or network.
        mcfg.update(text_model=str(path / "text"), text_config={}, text_pretrained=False, tokenizer=str(path),
                    tokenizer_words=[], vision_weights=None)
        # The model alone: a whole Config would cross-check it against default techniques (and
        # refuse, e.g., a ViCHA model's concept tokens under the default concept_mode).
        model_cfg, source = model_config_from_dict(mcfg), path
    else:
        source = resolve_source(path)
        model_cfg = load_config(source / "config.json").model
    model = DualEncoder(model_cfg)
    load_weights_into(model, load_model_weights(source), source=str(source))
    return PretrainedDualEncoder(model.to(device), source)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlscale export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (step_XXXXXX), a checkpoints/ dir or a run dir (latest)")
    p.add_argument("out", help="the folder to write (open_clip + Hugging Face layout)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = export(args.checkpoint, args.out, overwrite=args.overwrite)
    except ValueError as exc:
        print(f"vlscale export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {manifest['source']} -> {manifest['out']}: {', '.join(manifest['files'])}")
    if manifest["open_clip_blockers"]:
        print("open_clip_config.json not written (open_clip_model.safetensors is): "
              + "; ".join(manifest["open_clip_blockers"]), file=sys.stderr)
    else:
        print(f'open_clip: open_clip.create_model_and_transforms("local-dir:{manifest["out"]}")')
    print(f'vlscale:   vlscale.load("{manifest["out"]}")')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
