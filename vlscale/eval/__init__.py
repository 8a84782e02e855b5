"""vlscale.eval: zero-shot retrieval and classification of a dual encoder.

``retrieval_metrics`` (tiled exact ranks, several captions per image), ``topk_search``,
``build_classifier`` / ``zero_shot_classify`` (class names × prompt templates) and
``embed_dataset`` (held-out shards → embeddings + caption→image map). The ``vlscale eval``
command lives in :mod:`vlscale.eval.cli`.
"""

from vlscale.eval.embed import embed_dataset
from vlscale.eval.retrieval import image_to_text_ranks, retrieval_metrics, text_to_image_ranks, topk_search
from vlscale.eval.zeroshot import DEFAULT_TEMPLATES, build_classifier, zero_shot_classify

__all__ = ["DEFAULT_TEMPLATES", "build_classifier", "embed_dataset", "image_to_text_ranks", "retrieval_metrics",
           "text_to_image_ranks", "topk_search", "zero_shot_classify"]
