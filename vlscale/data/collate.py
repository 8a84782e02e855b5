"""``Batch`` (what the training loop receives), caption tokenization, and the collate.

The collate runs inside DataLoader workers: it stacks the uint8 images, normalises them as one
float tensor, and tokenizes all captions in one tokenizer call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class Batch:
    """One training batch. ``worker``/``state``/``stats`` are the loader's bookkeeping: which
    logical worker made it, that worker's stream position after it, and its skip counts."""

    pixels: torch.Tensor  # (B, 3, H, W) float32, normalised
    tokens: torch.Tensor | None  # (B, L) long
    attention_mask: torch.Tensor | None  # (B, L) long
    source: list[str]
    keys: list[str]
    captions: list[str]
    concepts: list[list[str]] | None = None
    worker: int = 0
    state: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (only enabled when CUDA is present)."""
        return replace(self, pixels=self.pixels.pin_memory(),
                       tokens=None if self.tokens is None else self.tokens.pin_memory(),
                       attention_mask=None if self.attention_mask is None else self.attention_mask.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(self, pixels=move(self.pixels), tokens=move(self.tokens),
                       attention_mask=move(self.attention_mask))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors the DualEncoder / GradCache take (``pixels``, ``tokens``, ``attention_mask``)."""
        out = {"pixels": self.pixels}
        if self.tokens is not None:
            out["tokens"] = self.tokens
            out["attention_mask"] = self.attention_mask
        return out


@dataclass
class EndOfStream:
    """Last item of each worker's stream: its final position and skip counts, so skips after
    its last batch (or in a worker that made no batch at all) still reach ``loader.stats``.
    ``ShardLoader`` consumes it; the training loop never sees it."""

    worker: int
    state: dict
    stats: dict


def _pad(seqs: Sequence[Sequence[int]], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max_length), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)[:max_length]
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _fit(t: torch.Tensor, max_length: int, pad: int) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.long)[:, :max_length]
    if t.shape[1] < max_length:
        t = torch.nn.functional.pad(t, (0, max_length - t.shape[1]), value=pad)
    return t


def tokenize(tokenizer: Callable | None, captions: list[str], max_length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(input_ids, attention_mask)`` of shape (B, max_length), long.

    ``tokenizer`` is a Hugging Face tokenizer (called with padding/truncation to ``max_length``)
    or any callable ``captions -> ids`` returning a dict with ``input_ids`` (and optionally
    ``attention_mask``), an ``(ids, mask)`` tuple, a (B, L) tensor (mask = ids != 0, open_clip
    style), or a list of id lists. ``None`` gives ``(None, None)`` (image-only loading).
    """
    if tokenizer is None:
        return None, None
    if hasattr(tokenizer, "pad_token_id") and hasattr(tokenizer, "batch_decode"):  # HF tokenizer
        pad_id = tokenizer.pad_token_id or 0
        out = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    else:
        pad_id = 0
        out = tokenizer(list(captions))
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        ids = out["input_ids"]
        mask = out.get("attention_mask") if hasattr(out, "get") else None
        if isinstance(ids, torch.Tensor) or (isinstance(ids, np.ndarray) and ids.ndim == 2):
            ids = _fit(torch.as_tensor(ids), max_length, pad_id)
            mask = (ids != pad_id).long() if mask is None else _fit(torch.as_tensor(mask), max_length, 0)
            return ids, mask
        return _pad(ids, max_length, pad_id)
    if isinstance(out, tuple) and len(out) == 2:
        return _fit(out[0], max_length, pad_id), _fit(out[1], max_length, 0)
    if isinstance(out, (torch.Tensor, np.ndarray)):
        ids = _fit(torch.as_tensor(out), max_length, pad_id)
        return ids, (ids != pad_id).long()
    return _pad(out, max_length, pad_id)


def collate(images: list[np.ndarray], rows: list[dict], *, tokenizer: Callable | None, max_length: int,
            mean: Sequence[float], std: Sequence[float], with_concepts: bool) -> Batch:
    """Stack uint8 HWC images into normalised float (B,3,H,W) and tokenize the captions."""
    chw = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    pixels = torch.empty(chw.shape, dtype=torch.float32)
    pixels.copy_(chw)  # one pass: uint8 HWC -> float CHW (contiguous)
    # (x/255 - mean)/std as x*a + b, in place: two passes instead of four temporaries
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels.mul_(1.0 / (255.0 * std_t)).add_(-torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t)
    captions = [r["caption"] for r in rows]
    tokens, mask = tokenize(tokenizer, captions, max_length)
    concepts = [list(r.get("concepts") or []) for r in rows] if with_concepts else None
    return Batch(pixels=pixels, tokens=tokens, attention_mask=mask, source=[r["source"] for r in rows],
                 keys=[r["key"] for r in rows], captions=captions, concepts=concepts)
