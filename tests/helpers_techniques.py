"""Shared pieces of the technique tests: a tiny DualEncoder config, a plain stand-in dual encoder,
dense float64 references (soft-target cross entropy, 1 + K by explicit concatenation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WORDS = ("a", "red", "blue", "green", "circle", "square", "left", "right", "sky", "dog", "grass", "ball")


def tiny_model_cfg(**kw: object):
    """A DualEncoder config that builds in ~0.1 s: 2-block ViT (32 px, patch 8) + 2-layer BERT."""
    from vlscale.model import ModelConfig

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    text.update(kw.pop("text_config", {}))  # type: ignore[arg-type]
    vision = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    vision.update(kw.pop("vision_kwargs", {}))  # type: ignore[arg-type]
    return ModelConfig(vision_model="vit_tiny_patch16_224", vision_kwargs=vision, image_size=32,
                       text_model="bert-tiny", text_config=text, tokenizer_words=WORDS, context_length=8,
                       embed_dim=16, **kw)


def unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def targets(n: int, lam: float | None, width: int | None = None) -> Tensor:
    """lam·I + (1−lam)·R (R = batch reversal) padded with zero columns to ``width``; I when lam is None."""
    eye = torch.eye(n, dtype=torch.float64)
    t = eye if lam is None else lam * eye + (1 - lam) * eye.flip(0)
    return F.pad(t, (0, (width or n) - n))


def dense_clip(img: Tensor, txt: Tensor, s: Tensor, lam: float | None) -> Tensor:
    logits = s * img @ txt.T
    t = targets(img.shape[0], lam)
    return 0.5 * soft_ce(logits, t) + 0.5 * soft_ce(logits.T, t.T)


def dense_batch_queue(q: Tensor, k: Tensor, queue: Tensor | None, s: Tensor, lam: float | None) -> Tensor:
    """InfoNCE over [batch keys; queue] with (soft) targets on the batch keys."""
    keys = k if queue is None else torch.cat([k, queue])
    return soft_ce(s * q @ keys.T, targets(q.shape[0], lam, keys.shape[0]))


def dense_positive_queue(q: Tensor, k: Tensor, queue: Tensor | None, s: Tensor, lam: float | None) -> Tensor:
    """BriVL's 1 + K by explicit concatenation: row i's logits [s⟨q_i,k_i⟩, (s⟨q_i,k_rev(i)⟩), s·q_i·queueᵀ]."""
    n = q.shape[0]
    losses = []
    for i in range(n):
        j = n - 1 - i
        cols = [k[i]] + ([k[j]] if lam is not None and j != i else [])
        t = [1.0] if len(cols) == 1 else [lam, 1 - lam]
        if queue is not None:
            cols += list(queue)
            t += [0.0] * queue.shape[0]
        logits = s.reshape(()) * torch.stack(cols) @ q[i]
        losses.append(-(torch.tensor(t, dtype=q.dtype) * logits.log_softmax(-1)).sum())
    return torch.stack(losses).mean()


class TinyDual(nn.Module):
    """A small stand-in dual encoder with the DualEncoder call contract (and a buffer)."""

    def __init__(self, e: int = 8) -> None:
        super().__init__()
        self.img = nn.Linear(12, e)
        self.emb = nn.EmbeddingBag(20, e)
        self.norm = nn.BatchNorm1d(e)
        self.logit_scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, pixels=None, tokens=None, attention_mask=None) -> dict[str, Tensor]:
        out = {}
        if pixels is not None:
            out["image"] = F.normalize(self.norm(self.img(pixels.flatten(1))), dim=-1)
        if tokens is not None:
            out["text"] = F.normalize(self.emb(tokens), dim=-1)
        out["logit_scale"] = self.logit_scale.exp()
        return out


def max_rel(a: dict[str, Tensor], b: dict[str, Tensor], floor: float = 1e-5) -> float:
    """Worst ‖a−b‖ / max(‖b‖, floor) over the names of ``b`` (float64); the floor keeps gradients that
    are zero in exact arithmetic (e.g. attention key biases) from dividing rounding noise by ~0."""
    worst = 0.0
    for name, ref in b.items():
        ref = ref.double()
        err = (a[name].double() - ref).norm() / ref.norm().clamp_min(floor)
        worst = max(worst, float(err))
    return worst
