"""ViCHA visual concepts (Shukor et al., arXiv 2208.13628, §3.2).

Each image carries keywords mined offline (``vlscale concepts``: the vocabulary words a trained
checkpoint scores highest for it), stored in the shard's ``concepts`` column. During training a
random subset is used, in one of two places (``techniques.concept_mode``):

* ``"image_tokens"`` — ViCHA's way: the subset is encoded by the text tower and given to the
  image tower as extra tokens (:meth:`vlscale.model.DualEncoder.concept_inputs`); evaluation feeds
  every concept (official ``dataset/caption_dataset.py``: ``randkw_p`` at training, all at test);
* ``"caption"`` — appended to the caption, so the text tower sees image-grounded words.

Sampling: each concept is kept independently with probability ``p`` (≈0.3), at most
``max_concepts``, in a shuffled order, after the caption and a separator. Draws depend only on
(seed, step, sample key), so every rank and a resumed run make the same choices.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor


class ConceptSampler:
    """``sampler(captions, concepts, keys, step) -> list[str]``; ``tokenize(...)`` adds the tokenizer."""

    def __init__(self, p: float = 0.3, *, max_concepts: int | None = 8, sep: str = " ", seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"concept probability p must be in [0, 1], got {p}")
        if max_concepts is not None and max_concepts < 0:
            raise ValueError(f"max_concepts must be >= 0 or None, got {max_concepts}")
        self.p, self.max_concepts, self.sep, self.seed = float(p), max_concepts, sep, int(seed)

    def sample(self, concepts: Sequence[str], *, key: str = "", step: int = 0) -> list[str]:
        """The concepts kept for one sample (deterministic in seed, step, key)."""
        cleaned = list(dict.fromkeys(c.strip() for c in concepts if c and c.strip()))  # dedupe, keep order
        if not cleaned or self.p == 0.0:
            return []
        rng = np.random.default_rng([self.seed, step, zlib.crc32(key.encode("utf-8"))])
        keep = [c for c, u in zip(cleaned, rng.random(len(cleaned))) if u < self.p]
        keep = [keep[i] for i in rng.permutation(len(keep))]
        return keep if self.max_concepts is None else keep[: self.max_concepts]

    def sample_lists(self, concepts: Sequence[Sequence[str] | None], keys: Sequence[str] | None = None,
                     step: int = 0) -> list[list[str]]:
        """Each sample's kept concepts (image-token mode)."""
        if keys is not None and len(keys) != len(concepts):
            raise ValueError(f"concepts ({len(concepts)}) and keys ({len(keys)}) must align")
        return [self.sample(cs or [], key=keys[i] if keys is not None else str(i), step=step)
                for i, cs in enumerate(concepts)]

    def __call__(self, captions: Sequence[str], concepts: Sequence[Sequence[str] | None] | None,
                 keys: Sequence[str] | None = None, step: int = 0) -> list[str]:
        """Captions with sampled concepts appended (unchanged where a sample has none)."""
        if concepts is None:
            return list(captions)
        if len(concepts) != len(captions) or (keys is not None and len(keys) != len(captions)):
            raise ValueError(f"captions ({len(captions)}), concepts ({len(concepts)}) and keys must align")
        out = []
        for i, (cap, cs) in enumerate(zip(captions, concepts)):
            key = keys[i] if keys is not None else str(i)
            picked = self.sample(cs or [], key=key, step=step)
            out.append(cap if not picked else cap + self.sep + " ".join(picked))
        return out

    def tokenize(self, tokenizer: Any, captions: Sequence[str], concepts: Sequence[Sequence[str] | None] | None,
                 *, max_length: int, keys: Sequence[str] | None = None, step: int = 0) -> tuple[Tensor, Tensor]:
        """(tokens, attention_mask) of the augmented captions, padded / truncated to ``max_length``.

        Concepts go after the caption, so truncation cuts concepts before caption words."""
        texts = self(captions, concepts, keys, step)
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
