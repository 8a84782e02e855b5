"""Text tokenizers for the text tower, built offline.

Three sources, all returning a ``transformers.PreTrainedTokenizerFast``-compatible object that
pads/truncates to ``context_length`` (``tokenizer(texts, padding="max_length", truncation=True,
max_length=L, return_tensors="pt")``):

* a folder with ``tokenizer.json`` / ``tokenizer_config.json`` (``AutoTokenizer``, local files only);
* a BERT ``vocab.txt`` — read into a ``tokenizers`` WordPiece model *by us*, because transformers 5
  silently ignores ``BertTokenizer(vocab_file=...)``;
* a word list (tiny CPU recipes): a WordPiece vocabulary of the words plus single characters and
  ``##`` continuation characters, so unseen words still tokenise (character by character).

A vocabulary that does not fit the text mangles it silently, so :func:`audit_texts` (a sample,
before training) and :class:`TokenStats` (every batch, into the metrics) measure unknown tokens,
words spelled out character by character and captions cut at the context length.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlscale.model.config import ModelConfig

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_BASE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-/&"


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer ``cfg`` asks for (see :class:`ModelConfig` ``tokenizer`` / ``tokenizer_words``)."""
    from vlscale.model.towers import text_source  # lazily: towers imports timm, word lists need none

    if cfg.tokenizer_words:
        return word_tokenizer(cfg.tokenizer_words, context_length=cfg.context_length)
    path = cfg.tokenizer
    if path is None:
        path = text_source(cfg).tokenizer_path
        if path is None:
            raise ValueError(
                f"ModelConfig.text_model={cfg.text_model!r} has no tokenizer of its own: set "
                "ModelConfig.tokenizer (a folder, tokenizer.json or vocab.txt) or tokenizer_words"
            )
    return load_tokenizer(path, context_length=cfg.context_length)


def load_tokenizer(path: str | Path, *, context_length: int, lowercase: bool = True) -> PreTrainedTokenizerBase:
    """A tokenizer from a folder, a ``tokenizer.json`` or a ``vocab.txt`` (never downloads)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"tokenizer path {str(path)!r} does not exist")
    if path.is_dir() and (path / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    elif path.is_dir() and (path / "vocab.txt").exists():
        lowercase = _folder_lowercase(path, lowercase)
        tok = _wrap(_wordpiece(_read_vocab(path / "vocab.txt"), lowercase), context_length)
    elif path.is_file() and path.suffix == ".json":
        tok = _wrap(Tokenizer.from_file(str(path)), context_length)
    elif path.is_file() and path.suffix == ".txt":
        tok = _wrap(_wordpiece(_read_vocab(path), lowercase), context_length)
    else:
        raise ValueError(f"no tokenizer.json or vocab.txt found at {str(path)!r}")
    tok.model_max_length = context_length
    return tok


def word_tokenizer(words: Iterable[str], *, context_length: int) -> PreTrainedTokenizerFast:
    """A tiny lowercase WordPiece tokenizer whose vocabulary is ``words`` plus characters.

    Token ids are deterministic: specials first, then sorted characters, their ``##`` forms,
    then the sorted words."""
    words = sorted({w.strip().lower() for w in words if w.strip()})
    if not words:
        raise ValueError("word_tokenizer needs at least one non-empty word")
    bad = [w for w in words if any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"tokenizer words must not contain whitespace: {bad[:5]}")
    chars = sorted(set(_BASE_CHARS) | {c for w in words for c in w})
    vocab_list = [*SPECIALS, *chars, *(f"##{c}" for c in chars)]
    vocab_list += [w for w in words if w not in set(vocab_list)]
    return _wrap(_wordpiece({t: i for i, t in enumerate(vocab_list)}, lowercase=True), context_length)


def _read_vocab(path: Path) -> dict[str, int]:
    tokens = path.read_text(encoding="utf-8").splitlines()
    vocab = {t: i for i, t in enumerate(tokens) if t}
    missing = [s for s in SPECIALS if s not in vocab]
    if missing:
        raise ValueError(f"vocabulary {str(path)!r} lacks the special tokens {missing}")
    return vocab


def _folder_lowercase(folder: Path, default: bool) -> bool:
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.exists():
        return bool(json.loads(cfg_file.read_text()).get("do_lower_case", default))
    return default


def _wordpiece(vocab: dict[str, int], lowercase: bool) -> Tokenizer:
    tok = Tokenizer(WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None,
                                                clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tok


def _wrap(tok: Tokenizer, context_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=context_length, pad_token="[PAD]", unk_token="[UNK]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )


# --------------------------------------------------------------------------- is the text tokenized well?
# A tokenizer whose vocabulary does not fit the captions mangles them silently: unknown tokens,
# words spelled out character by character (a word-list tokenizer on real text), captions cut at
# the context length. These measure it, on a sample before training (audit_texts) and on every
# batch during training (TokenStats), with the thresholds past which the run warns.
UNK_WARN, CHAR_SPLIT_WARN, TRUNCATED_WARN = 0.01, 0.05, 0.05


def _piece_ids(tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int], list[int]]:
    """(special ids, ids of one-character tokens, ids of one-character ``##`` continuations)."""
    vocab = tok.get_vocab()
    specials = sorted({i for i in tok.all_special_ids if i is not None})
    single = [i for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)]
    cont = [i for t, i in vocab.items() if t.startswith("##") and len(t) == 3]
    return specials, single, cont


def audit_texts(tok: PreTrainedTokenizerBase, texts: list[str], *, max_length: int) -> dict[str, float]:
    """Rates over ``texts``: ``unk_rate`` (unknown / non-special tokens), ``char_split_rate`` (words
    that became two or more one-character pieces / words), ``truncated_rate`` (texts longer than
    ``max_length`` tokens, specials included), and the counts."""
    enc = tok(list(texts), truncation=False, add_special_tokens=True, verbose=False)  # no too-long warning
    specials = set(_piece_ids(tok)[0])
    unk = tok.unk_token_id
    words = split = tokens = unknown = truncated = 0
    for i, ids in enumerate(enc["input_ids"]):
        truncated += len(ids) > max_length
        pieces: dict[int, list[str]] = {}
        for pos, (tid, word) in enumerate(zip(ids, enc.word_ids(i))):
            if tid in specials and tid != unk:
                continue
            tokens += 1
            unknown += tid == unk
            if word is not None:
                pieces.setdefault(word, []).append(tok.convert_ids_to_tokens(ids[pos]))
        words += len(pieces)
        split += sum(len(p) >= 2 and all(len(x.removeprefix("##")) == 1 for x in p) for p in pieces.values())
    n = max(1, len(texts))
    return {"unk_rate": unknown / max(1, tokens), "char_split_rate": split / max(1, words),
            "truncated_rate": truncated / n, "texts": float(len(texts)), "words": float(words),
            "tokens": float(tokens)}


def text_warning(stats: dict[str, float], *, context_length: int, word_list: bool) -> str | None:
    """One sentence naming what is too high and the fix, or None when the text tokenizes well."""
    bad = []
    if stats.get("unk_rate", 0.0) > UNK_WARN:
        bad.append(f"{100 * stats['unk_rate']:.1f}% of tokens are [UNK]")
    if stats.get("char_split_rate", 0.0) > CHAR_SPLIT_WARN:
        bad.append(f"{100 * stats['char_split_rate']:.1f}% of words are split into single characters")
    if stats.get("truncated_rate", 0.0) > TRUNCATED_WARN:
        bad.append(f"{100 * stats['truncated_rate']:.1f}% of captions are cut at model.context_length="
                   f"{context_length}")
    if not bad:
        return None
    fixes = []
    if word_list and (stats.get("unk_rate", 0) > UNK_WARN or stats.get("char_split_rate", 0) > CHAR_SPLIT_WARN):
        fixes.append("model.tokenizer_words=[] (the text model's own WordPiece vocabulary; BERT-sized "
                     "named configs use the bundled uncased BERT vocab)")
    elif stats.get("unk_rate", 0) > UNK_WARN or stats.get("char_split_rate", 0) > CHAR_SPLIT_WARN:
        fixes.append("model.tokenizer=PATH (a tokenizer.json / vocab.txt that covers this text)")
    if stats.get("truncated_rate", 0) > TRUNCATED_WARN:
        fixes.append(f"a larger model.context_length (now {context_length})")
    return ", ".join(bad) + "; the tokenizer mangles this text: fix: " + " and ".join(fixes)


class TokenStats:
    """Per-batch counts from token ids alone (cheap: no re-tokenizing), for the training metrics:
    unknown tokens, pieces in runs of one-character pieces (a word spelled out), and rows that fill
    the whole context (truncated, or exactly that long)."""

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        import torch

        specials, single, cont = _piece_ids(tok)
        self.unk = tok.unk_token_id
        self._special = torch.tensor([i for i in specials if i != self.unk], dtype=torch.long)
        self._single = torch.tensor(single, dtype=torch.long)
        self._cont = torch.tensor(cont, dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        self.counts = {"tokens": 0, "unk": 0, "char_split": 0, "rows": 0, "full_rows": 0}

    def update(self, tokens: Any, attention_mask: Any) -> None:
        import torch

        ids = tokens.detach().cpu()
        mask = attention_mask.detach().cpu().bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        real = mask & ~torch.isin(ids, self._special)
        split = torch.isin(ids[:, 1:], self._cont) & torch.isin(ids[:, :-1], self._single) & real[:, 1:]
        self.counts["tokens"] += int(real.sum())
        self.counts["unk"] += int(((ids == self.unk) & mask).sum()) if self.unk is not None else 0
        self.counts["char_split"] += int(split.sum())
        self.counts["rows"] += ids.shape[0]
        self.counts["full_rows"] += int(mask[:, -1].sum())

    def rates(self) -> dict[str, float]:
        """``unk_rate``, ``char_split_rate`` (per token) and ``truncated_rate`` (rows filling the
        context) since the last :meth:`reset`."""
        c = self.counts
        return {"unk_rate": c["unk"] / max(1, c["tokens"]), "char_split_rate": c["char_split"] / max(1, c["tokens"]),
                "truncated_rate": c["full_rows"] / max(1, c["rows"])}
