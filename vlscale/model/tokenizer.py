"""Text tokenizers for the text tower, built offline.

Three sources, all returning a ``transformers.PreTrainedTokenizerFast``-compatible object that
pads/truncates to ``context_length`` (``tokenizer(texts, padding="max_length", truncation=True,
max_length=L, return_tensors="pt")``):

* a folder with ``tokenizer.json`` / ``tokenizer_config.json`` (``AutoTokenizer``, local files only);
* a BERT ``vocab.txt`` — read into a ``tokenizers`` WordPiece model *by us*, because transformers 5
  silently ignores ``BertTokenizer(vocab_file=...)``;
* a word list (tiny CPU recipes): a WordPiece vocabulary of the words plus single characters and
  ``##`` continuation characters, so unseen words still tokenise (character by character).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

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
