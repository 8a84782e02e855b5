"""``Batch`` (what the training loop receives), caption tokenization, the collate, and ZeroVL's
caption token masking.

The collate runs inside DataLoader workers: it stacks the uint8 images, normalises them as one
float tensor (or keeps them uint8 for the device to normalise: ``pixel_dtype``), and tokenizes all
captions in one tokenizer call.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class Batch:
    """One training batch. ``worker``/``state``/``stats`` are the loader's bookkeeping: which
    logical worker made it, that worker's stream position after it, and its skip counts."""

    pixels: torch.Tensor  # (B, 3, H, W) float32 normalised, or uint8 (collate's pixel_dtype)
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

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``[start, stop)`` (clipped to the batch, so possibly fewer), every per-sample field
        cut alike; the loader's bookkeeping (``worker``, ``state``, ``stats``) is kept."""
        return replace(self, **{name: None if (v := getattr(self, name)) is None else v[start:stop]
                                for name in SAMPLE_FIELDS})

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """The batches' rows in order, as one batch (bookkeeping from the first)."""
        if len(batches) == 1:
            return batches[0]
        out = {}
        for name in SAMPLE_FIELDS:
            values = [getattr(b, name) for b in batches]
            if any(v is None for v in values):
                out[name] = None
            else:
                out[name] = torch.cat(values) if torch.is_tensor(values[0]) else [x for v in values for x in v]
        return replace(batches[0], **out)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors the DualEncoder / GradCache take (``pixels``, ``tokens``, ``attention_mask``)."""
        out = {"pixels": self.pixels}
        if self.tokens is not None:
            out["tokens"] = self.tokens
            out["attention_mask"] = self.attention_mask
        return out


# The per-sample fields of a Batch (cut and concatenated row-wise); the rest is loader bookkeeping.
SAMPLE_FIELDS = ("pixels", "tokens", "attention_mask", "source", "keys", "captions", "concepts")


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


PIXEL_DTYPES = ("uint8", "float32")


def norm_constants(mean: Sequence[float], std: Sequence[float], channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1/(255·std), −mean/std)`` as fp32 (1, C, 1, 1) on the CPU: normalisation is ``x·a + b``."""
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean {tuple(mean)} / std {tuple(std)} must have one value per channel ({channels})")
    std_t = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
    return 1.0 / (255.0 * std_t), -torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1) / std_t


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalised fp32 (contiguous) on the same device: one pass to float,
    then ``x·a + b`` in place (two passes instead of four temporaries). The one implementation of
    the normalisation: the collate's float path and the trainer's per-chunk device path
    (:class:`vlscale.train.pixels.PixelFeed`) give bit-identical pixels."""
    scale, shift = norm_constants(mean, std, pixels.shape[1])
    x = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
    x.copy_(pixels)
    return x.mul_(scale.to(pixels.device)).add_(shift.to(pixels.device))


def collate(images: list[np.ndarray], rows: list[dict], *, tokenizer: Callable | None, max_length: int,
            mean: Sequence[float], std: Sequence[float], with_concepts: bool,
            image_size: tuple[int, int] | None = None, pixel_dtype: str = "float32") -> Batch:
    """Stack uint8 HWC images into (B,3,H,W) pixels and tokenize the captions.

    ``pixel_dtype="float32"``: normalised with ``mean`` / ``std``; ``"uint8"``: the decoded values,
    a quarter of the bytes, for the consumer to normalise (the trainer does it on the device, per
    chunk). An empty ``rows`` gives a 0-row batch of the right shapes (``image_size`` = (H, W)): a
    debiased step keeps every rank in step even when a rank has no rows for it (see ``sampling.py``)."""
    if pixel_dtype not in PIXEL_DTYPES:
        raise ValueError(f"pixel_dtype must be one of {PIXEL_DTYPES}, got {pixel_dtype!r}")
    dtype = torch.uint8 if pixel_dtype == "uint8" else torch.float32
    if not rows:
        if image_size is None:
            raise ValueError("an empty batch needs image_size")
        ids = None if tokenizer is None else torch.zeros((0, max_length), dtype=torch.long)
        return Batch(pixels=torch.zeros((0, 3, *image_size), dtype=dtype), tokens=ids,
                     attention_mask=None if ids is None else ids.clone(),
                     source=[], keys=[], captions=[], concepts=[] if with_concepts else None)
    chw = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    pixels = chw.contiguous() if pixel_dtype == "uint8" else normalize(chw, mean, std)
    captions = [r["caption"] for r in rows]
    tokens, mask = tokenize(tokenizer, captions, max_length)
    concepts = [list(r.get("concepts") or []) for r in rows] if with_concepts else None
    return Batch(pixels=pixels, tokens=tokens, attention_mask=mask, source=[r["source"] for r in rows],
                 keys=[r["key"] for r in rows], captions=captions, concepts=concepts)


# -- ZeroVL caption token masking ---------------------------------------------------------------
ZEROVL_TEXT_MASK_SPLIT = (0.5, 0.1, 0.4)  # of the picked tokens: [MASK], random token, deleted


def check_text_mask(prob: float, split: Sequence[float]) -> tuple[float, tuple[float, float, float]]:
    """Validate ``(prob, split)``: prob in [0, 1), split = 3 non-negative fractions summing to 1."""
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"text_mask_prob must be in [0, 1) (ZeroVL uses 0.2; 0 = off), got {prob}")
    split = tuple(float(x) for x in split)
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"text_mask_split must be 3 fractions >= 0 summing to 1 (mask, random token, delete; "
                         f"ZeroVL: {ZEROVL_TEXT_MASK_SPLIT}), got {split}")
    return float(prob), split  # type: ignore[return-value]


def sample_seeds(seed: int, epoch: int, position: Sequence[int], sources: Sequence[str],
                 keys: Sequence[str]) -> list[int]:
    """One 64-bit seed per sample from (seed, epoch, batch position, source, key): a resumed run
    (which rebuilds the same batch at the same position) draws the same masks."""
    head = f"{seed}/{epoch}/{'.'.join(str(int(p)) for p in position)}/"
    return [int.from_bytes(hashlib.blake2b(f"{head}{src}\0{key}".encode(), digest_size=8).digest(), "little")
            for src, key in zip(sources, keys)]


class CaptionMasker:
    """ZeroVL's text augmentation on token ids (their ``process_caption``): each content token
    (not a special token such as [CLS] / [SEP] / [PAD]) is picked with probability ``prob``; a
    picked token becomes the mask token, a random vocabulary token, or is deleted, in the
    proportions ``split`` (ZeroVL: 0.2 and 50 / 10 / 40 %). Deleted tokens close up and the row
    is re-padded. ZeroVL edits the tokens before truncation; here they are edited after it, so
    a deletion shortens a truncated caption instead of pulling in a later word.
    """

    def __init__(self, prob: float, split: Sequence[float] = ZEROVL_TEXT_MASK_SPLIT, *, mask_id: int | None,
                 vocab_size: int | None, special_ids: Sequence[int] = (), pad_id: int = 0) -> None:
        self.prob, self.split = check_text_mask(prob, split)
        if self.split[0] > 0 and mask_id is None:
            raise ValueError("text_mask_prob > 0 needs a tokenizer with a mask token (this one has no mask_token_id, "
                             "e.g. CLIP's BPE tokenizer); set text_mask_split to [0, r, d] to only replace / delete")
        if self.split[1] > 0 and not vocab_size:
            raise ValueError("random-token replacement (text_mask_split[1] > 0) needs the tokenizer's vocabulary size")
        self.mask_id, self.vocab_size, self.pad_id = mask_id, int(vocab_size or 0), int(pad_id)
        self.special = frozenset(int(i) for i in special_ids)

    @classmethod
    def from_tokenizer(cls, tokenizer: object, prob: float,
                       split: Sequence[float] = ZEROVL_TEXT_MASK_SPLIT) -> CaptionMasker:
        """Read the mask / pad / special ids and the vocabulary size from a Hugging Face tokenizer
        (or any object with ``mask_token_id``, ``vocab_size``, ``all_special_ids``, ``pad_token_id``)."""
        if tokenizer is None:
            raise ValueError("text_mask_prob > 0 needs a tokenizer (the loader was built without one)")
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
        return cls(prob, split, mask_id=getattr(tokenizer, "mask_token_id", None), vocab_size=vocab,
                   special_ids=getattr(tokenizer, "all_special_ids", ()) or (),
                   pad_id=getattr(tokenizer, "pad_token_id", None) or 0)

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked copies of ``ids`` (B, L) and ``attention_mask``; row i draws from ``seeds[i]``."""
        if ids.shape[0] != len(seeds):
            raise ValueError(f"{ids.shape[0]} token rows but {len(seeds)} seeds")
        mask = (ids != self.pad_id).long() if attention_mask is None else attention_mask
        out_ids, out_mask = ids.clone(), mask.clone()
        p_mask, p_random = self.split[0], self.split[0] + self.split[1]
        for i, (row, valid) in enumerate(zip(ids.tolist(), mask.tolist())):
            rng = random.Random(seeds[i])
            kept: list[int] = []
            for tok, v in zip(row, valid):
                if not v:
                    continue
                if tok in self.special or rng.random() >= self.prob:
                    kept.append(tok)
                    continue
                u = rng.random()
                if u < p_mask:
                    kept.append(int(self.mask_id))  # type: ignore[arg-type]
                elif u < p_random:
                    kept.append(self._random_token(rng))
                # else: deleted
            n = len(kept)
            out_ids[i, :n] = torch.as_tensor(kept, dtype=ids.dtype)
            out_ids[i, n:] = self.pad_id
            out_mask[i, :n], out_mask[i, n:] = 1, 0
        return out_ids, out_mask

    def _random_token(self, rng: random.Random) -> int:
        while True:  # special tokens are few: rejection ends almost at once
            tok = rng.randrange(self.vocab_size)
            if tok not in self.special:
                return tok
