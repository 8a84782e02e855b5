"""Mining ViCHA visual concepts: a keyword vocabulary from captions, each image's top-k keywords.

ViCHA (arXiv 2208.13628, §3.2) tags every image with the vocabulary words an existing CLIP scores
highest for it, and stores them with the pair. Here, step by step (``vlscale concepts`` drives it,
:mod:`vlscale.techniques.cli`):

1. :func:`mine_vocabulary` — every caption of the shard set split into lower-case words (and, with
   ``ngrams=2``, adjacent word pairs), English stop words and numbers dropped; a word's count is
   the number of captions it occurs in; the vocabulary is the ``size`` most frequent with at least
   ``min_count`` (ties broken alphabetically, so the result is deterministic);
2. the keywords are embedded by a trained checkpoint's text tower, prompt-ensembled like zero-shot
   classification (:func:`vlscale.eval.build_classifier`);
3. :func:`top_concepts` — each image's ``k`` most similar keywords (cosine, in blocks: never the
   full images × vocabulary matrix).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# Function words that never make a visual concept (a deliberately short, fixed English list).
STOP_WORDS = frozenset(["a", "about", "above", "across", "after", "against", "all", "along", "also", "am", "among", "an", "and", "another", "any", "are", "around", "as", "at", "be", "been", "before", "behind", "being", "below", "beneath", "beside", "besides", "between", "both", "but", "by", "can", "could", "did", "do", "does", "doing", "down", "during", "each", "either", "every", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how", "i", "if", "in", "inside", "into", "is", "it", "its", "itself", "just", "like", "many", "me", "more", "most", "much", "my", "near", "neither", "next", "no", "nor", "not", "of", "off", "on", "once", "one", "only", "onto", "or", "other", "our", "out", "outside", "over", "own", "per", "she", "should", "since", "so", "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those", "through", "to", "too", "toward", "towards", "two", "under", "until", "up", "upon", "us", "very", "via", "was", "we", "were", "what", "when", "where", "which", "while", "who", "whom", "whose", "why", "will", "with", "within", "without", "would", "you", "your"])

_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*", re.UNICODE)


def caption_terms(caption: str, *, ngrams: int = 1) -> list[str]:
    """The candidate concepts of one caption: content words, and adjacent content-word pairs
    (``ngrams=2``) — a pair never spans a stop word."""
    if ngrams not in (1, 2):
        raise ValueError(f"ngrams must be 1 or 2, got {ngrams}")
    words = [w.lower() for w in _WORD.findall(caption)]
    keep = [w if (len(w) > 1 and w not in STOP_WORDS) else None for w in words]
    terms = [w for w in keep if w is not None]
    if ngrams == 2:
        terms += [f"{a} {b}" for a, b in itertools.pairwise(keep) if a is not None and b is not None]
    return terms


def mine_vocabulary(captions: Iterable[str], *, size: int = 1000, min_count: int = 2,
                    ngrams: int = 1) -> list[tuple[str, int]]:
    """``(term, number of captions containing it)`` for the ``size`` most frequent terms."""
    if size < 1 or min_count < 1:
        raise ValueError(f"vocabulary size and min_count must be >= 1, got {size}, {min_count}")
    counts: Counter = Counter()
    for caption in captions:
        counts.update(set(caption_terms(caption, ngrams=ngrams)))
    ranked = sorted(((t, c) for t, c in counts.items() if c >= min_count), key=lambda tc: (-tc[1], tc[0]))
    return ranked[:size]


@torch.no_grad()
def top_concepts(image_emb: Tensor, word_emb: Tensor, words: Sequence[str], k: int, *,
                 chunk: int = 4096) -> list[list[str]]:
    """Each image's ``k`` most similar words, best first ((N, E) × (V, E), L2-normalised rows)."""
    if image_emb.shape[1] != word_emb.shape[1] or word_emb.shape[0] != len(words):
        raise ValueError(f"image embeddings {tuple(image_emb.shape)}, word embeddings {tuple(word_emb.shape)} "
                         f"and {len(words)} words do not fit together")
    k = min(k, len(words))
    out: list[list[str]] = []
    for block in image_emb.split(chunk):
        idx = (block.float() @ word_emb.float().T).topk(k, dim=1).indices
        out += [[words[j] for j in row] for row in idx.tolist()]
    return out
