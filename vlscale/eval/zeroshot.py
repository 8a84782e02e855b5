"""Zero-shot classification: class names × prompt templates → a text classifier → image predictions.

As in CLIP: each class's weight is the L2-normalised mean of its prompts' normalised text
embeddings ("a photo of a {}." …); an image's class is the arg-max of its similarity to them.
Metrics are CLIP_benchmark's, as fractions: ``acc1``, ``acc5`` (top-k accuracy) and
``mean_per_class_recall`` (the recall of each class present in the labels, averaged: balanced
accuracy, which a skewed class distribution cannot inflate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def build_classifier(model: nn.Module, tokenizer: Any, class_names: Sequence[str],
                     templates: Sequence[str] = DEFAULT_TEMPLATES, *, context_length: int | None = None,
                     batch_size: int = 256) -> Tensor:
    """(C, E) class weights from a model whose ``forward(tokens=, attention_mask=)`` returns ``"text"``."""
    if not class_names:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template must contain '{{}}', got {list(templates)}")
    max_len = context_length or getattr(tokenizer, "model_max_length", 77)
    prompts = [t.format(name) for name in class_names for t in templates]
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        embs = []
        for i in range(0, len(prompts), batch_size):
            tok = tokenizer(prompts[i:i + batch_size], padding="max_length", truncation=True,
                            max_length=max_len, return_tensors="pt")
            out = model(tokens=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
            embs.append(F.normalize(out["text"].float(), dim=-1))
    finally:
        model.train(was_training)
    per_prompt = torch.cat(embs).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(1), dim=-1)


@torch.no_grad()
def zero_shot_classify(image_emb: Tensor, classifier: Tensor, labels: Tensor | None = None,
                       ks: Sequence[int] = (1, 5), chunk: int = 4096) -> dict[str, Any]:
    """Predict classes for ``image_emb`` (N, E) with ``classifier`` (C, E).

    Returns ``predictions`` (N,) (ties → lower class index: each image is scored against every
    class in one product, then stably sorted) and ``n``; when ``labels`` (N,) are given, also
    ``acc{k}`` (fraction) for each k ≤ C and ``mean_per_class_recall`` (fraction)."""
    if image_emb.dim() != 2 or classifier.dim() != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(f"image_emb (N, E) and classifier (C, E) must share E; got {tuple(image_emb.shape)}, "
                         f"{tuple(classifier.shape)}")
    n_cls = classifier.shape[0]
    if labels is not None:
        if labels.shape != (image_emb.shape[0],):
            raise ValueError(f"labels must have shape ({image_emb.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
            raise ValueError(f"labels hold class indices outside [0, {n_cls})")
    ks = [k for k in ks if k <= n_cls]
    kmax = max(ks, default=1)
    w = classifier.float()
    preds, hits = [], {k: 0 for k in ks}
    for i in range(0, image_emb.shape[0], chunk):
        s = image_emb[i:i + chunk].float() @ w.T
        # torch.topk does not promise an order among ties; a stable sort does (lower index first).
        top = torch.sort(-s, dim=1, stable=True).indices[:, :kmax]
        preds.append(top[:, 0])
        if labels is not None:
            lab = labels[i:i + chunk].to(top.device)[:, None]
            for k in ks:
                hits[k] += int((top[:, :k] == lab).any(1).sum())
    predictions = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    out: dict[str, Any] = {"predictions": predictions, "n": int(image_emb.shape[0])}
    if labels is not None and image_emb.shape[0]:
        out.update({f"acc{k}": hits[k] / image_emb.shape[0] for k in ks})
        out["mean_per_class_recall"] = mean_per_class_recall(predictions, labels.to(predictions.device), n_cls)
    return out


def mean_per_class_recall(predictions: Tensor, labels: Tensor, n_classes: int) -> float:
    """Mean over the classes present in ``labels`` of the fraction of their images predicted right."""
    support = torch.bincount(labels, minlength=n_classes)
    correct = torch.bincount(labels[predictions == labels], minlength=n_classes)
    present = support > 0
    return float((correct[present].double() / support[present].double()).mean().item())
