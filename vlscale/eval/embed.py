"""Embed a held-out set for retrieval: each distinct image once, every caption, and the map
``text_to_image`` from captions to images (several captions per image).

Shards store (image, caption) rows, so an image with five captions arrives five times. Rows are
grouped into images by their pixels (exact bytes of the deterministic eval transform: robust to
any key scheme), by ``key``, or by a function of the key. Duplicate images are embedded once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

GroupBy = str | Callable[[str], str]


def _field(batch: Any, name: str) -> Any:
    if isinstance(batch, dict):
        return batch.get(name)
    return getattr(batch, name, None)


def _image_ids(batch: Any, pixels: Tensor, group_by: GroupBy) -> list[str]:
    if group_by == "pixels":
        cpu = pixels.detach().to("cpu", torch.float32).contiguous()
        return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in cpu]
    keys = _field(batch, "keys")
    if keys is None:
        raise ValueError(f"group_by={group_by!r} needs batches with .keys")
    if group_by == "key":
        return [str(k) for k in keys]
    if callable(group_by):
        return [str(group_by(str(k))) for k in keys]
    raise ValueError(f"group_by must be 'pixels', 'key' or a callable, got {group_by!r}")


@torch.no_grad()
def embed_dataset(model: nn.Module, loader: Iterable[Any], *, group_by: GroupBy = "pixels",
                  max_batches: int | None = None, autocast_dtype: torch.dtype | None = None,
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(image_emb (Ni, E), text_emb (Nt, E), text_to_image (Nt,)) on the CPU, fp32.

    ``loader`` yields batches with ``pixels``, ``tokens``, ``attention_mask`` (a
    ``vlscale.data.Batch`` or a dict); one batch at a time is on the device. The model runs in
    eval mode (restored afterwards). Which forwards run depends only on the data, so under
    ZeRO-3 / FSDP (collective forwards) every rank must iterate the same loader.

    A model that takes ViCHA visual concepts as image tokens (``model.concept_inputs(concepts)``
    returns them; ``{}`` otherwise) gets every image's concepts from the batch's ``concepts``."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    index: dict[str, int] = {}
    img_chunks: list[Tensor] = []
    txt_chunks: list[Tensor] = []
    t2i: list[int] = []
    try:
        for step, batch in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            pixels, tokens = _field(batch, "pixels"), _field(batch, "tokens")
            if pixels is None or tokens is None:
                raise ValueError("embed_dataset needs batches with pixels and tokens")
            ids = _image_ids(batch, pixels, group_by)
            new_rows = []
            for row, image_id in enumerate(ids):
                if image_id not in index:
                    index[image_id] = len(index)
                    new_rows.append(row)
                t2i.append(index[image_id])
            mask = _field(batch, "attention_mask")
            with _autocast(device, autocast_dtype):
                if new_rows:
                    sel = torch.tensor(new_rows, dtype=torch.long, device=pixels.device)
                    extra = _concept_inputs(model, batch, new_rows, device)
                    out = model(pixels=pixels.index_select(0, sel).to(device, non_blocking=True), **extra)
                    img_chunks.append(out["image"].float().cpu())
                out = model(tokens=tokens.to(device), attention_mask=None if mask is None else mask.to(device))
                txt_chunks.append(out["text"].float().cpu())
    finally:
        model.train(was_training)
    if not txt_chunks:
        raise ValueError("embed_dataset: the loader yielded no batches")
    return torch.cat(img_chunks), torch.cat(txt_chunks), torch.tensor(t2i, dtype=torch.long)


def _concept_inputs(model: nn.Module, batch: Any, rows: list[int], device: torch.device) -> dict[str, Tensor]:
    """Concept-token inputs of ``rows`` for a model that takes them (ViCHA, train and eval alike)."""
    fn = getattr(model, "concept_inputs", None)
    if fn is None:
        return {}
    concepts = _field(batch, "concepts")
    out = fn(None if concepts is None else [concepts[r] for r in rows])
    return {k: v.to(device) for k, v in out.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)
