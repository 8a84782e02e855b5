"""Zero-shot image↔text retrieval metrics, computed in row blocks (never the full N×N score matrix).

Recall@K needs only the *rank* of the right answer, and a rank is a count: how many candidates
score above the positive. Each block of ``chunk`` queries is scored against *every* candidate in
one matrix product (``chunk × N`` scores in memory), and the positive's score is read from that
same product. Every score of a query thus comes from one computation, so exact duplicates
(the same image twice) score exactly alike and ties are broken the same way whatever ``chunk`` is:
by index, the lower index ranking first, as a stable sort of the scores would. (Scoring the positive
by a separate dot product, or the candidates in column tiles, lets rounding decide such ties.)

Several captions per image: image→text counts a hit when *any* of the image's captions is in the
top K (the rank of its best caption among the other images' captions).

Metric names follow the field's conventions, as fractions in [0, 1]:

* ``names="clip_benchmark"`` (``vlscale eval`` JSON): ``image_retrieval_recall@K`` (a caption
  retrieves its image: text→image), ``text_retrieval_recall@K`` (image→text), as CLIP_benchmark
  writes them;
* ``names="open_clip"`` (training logs): ``image_to_text_R@K`` / ``text_to_image_R@K``, as
  open_clip logs them;

plus median / mean ranks (1-based) under the same prefixes, ``rsum`` (the papers' RSUM: the six
recalls in percent, summed; at most 600 with K = 1, 5, 10) and the counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

Ks = tuple[int, ...]


def _check(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Ks, chunk: int) -> None:
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image_emb (Ni, E) and text_emb (Nt, E) must share E; got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image must have shape ({text_emb.shape[0]},), got {tuple(text_to_image.shape)}")
    if text_to_image.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"text_to_image must be an integer tensor, got {text_to_image.dtype}")
    n_img = image_emb.shape[0]
    if text_emb.shape[0] == 0 or n_img == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_img:
        raise ValueError(f"text_to_image holds indices outside [0, {n_img})")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


# Per convention: (prefix of image→text, prefix of text→image, recall key format).
NAMING = {
    "clip_benchmark": ("text_retrieval", "image_retrieval", "{prefix}_recall@{k}"),
    "open_clip": ("image_to_text", "text_to_image", "{prefix}_R@{k}"),
}


def text_to_image_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk: int = 1024) -> Tensor:
    """0-based rank of each text's image among all images (Nt,), int64."""
    img, txt = image_emb.float(), text_emb.float()
    t2i = text_to_image.long().to(txt.device)
    ranks = torch.empty(txt.shape[0], dtype=torch.long, device=txt.device)
    img_idx = torch.arange(img.shape[0], device=txt.device)[None, :]
    for t0 in range(0, txt.shape[0], chunk):
        s = txt[t0:t0 + chunk] @ img.T  # every score of these queries from one product
        gt = t2i[t0:t0 + chunk, None]
        pos = s.gather(1, gt)
        ranks[t0:t0 + chunk] = ((s > pos) | ((s == pos) & (img_idx < gt))).sum(1)
    return ranks


def image_to_text_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor,
                        chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """0-based rank of each image's best caption among the other images' captions (Ni,), and a
    mask of the images that have at least one caption (the others get rank -1)."""
    img, txt = image_emb.float(), text_emb.float()
    t2i = text_to_image.long().to(img.device)[None, :]
    n_img, n_txt = img.shape[0], txt.shape[0]
    txt_idx = torch.arange(n_txt, device=img.device)[None, :]
    ranks = torch.full((n_img,), -1, dtype=torch.long, device=img.device)
    has_text = torch.zeros(n_img, dtype=torch.bool, device=img.device)
    for i0 in range(0, n_img, chunk):
        s = img[i0:i0 + chunk] @ txt.T  # every score of these queries from one product
        own = t2i == torch.arange(i0, i0 + s.shape[0], device=img.device)[:, None]
        best = torch.where(own, s, float("-inf")).amax(1, keepdim=True)
        # The best caption: the lowest index among the image's equal-best captions (tie reference).
        best_idx = torch.where(own & (s == best), txt_idx, n_txt).amin(1, keepdim=True)
        before = ~own & ((s > best) | ((s == best) & (txt_idx < best_idx)))
        has = own.any(1)
        has_text[i0:i0 + chunk] = has
        ranks[i0:i0 + chunk] = torch.where(has, before.sum(1), -1)
    return ranks, has_text


@torch.no_grad()
def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Ks = (1, 5, 10),
                      chunk: int = 1024, names: str = "clip_benchmark") -> dict[str, float]:
    """Recall@K both ways as fractions, median / mean ranks (1-based), ``rsum`` and the counts,
    named after ``names`` (``"clip_benchmark"`` or ``"open_clip"``, see the module docstring).

    ``text_to_image[t]`` is the index of text t's image (several texts may share one image).
    Images without any caption are left out of image→text and counted in ``images_without_text``.
    Embeddings are compared by dot product (L2-normalise them first for cosine similarity).
    ``chunk`` queries are scored at a time against all candidates (``chunk × N`` floats)."""
    if names not in NAMING:
        raise ValueError(f"names must be one of {sorted(NAMING)}, got {names!r}")
    _check(image_emb, text_emb, text_to_image, ks, chunk)
    t_ranks = text_to_image_ranks(image_emb, text_emb, text_to_image, chunk)
    i_ranks, has_text = image_to_text_ranks(image_emb, text_emb, text_to_image, chunk)
    i_ranks = i_ranks[has_text]
    i2t, t2i, recall = NAMING[names]
    out: dict[str, float] = {}
    rsum = 0.0
    for prefix, r in ((i2t, i_ranks), (t2i, t_ranks)):
        for k in ks:
            value = (r < k).double().mean().item() if r.numel() else 0.0
            out[recall.format(prefix=prefix, k=k)] = value
            rsum += 100.0 * value
        out[f"{prefix}_median_rank"] = float((r + 1).float().median().item()) if r.numel() else float("nan")
        out[f"{prefix}_mean_rank"] = float((r + 1).float().mean().item()) if r.numel() else float("nan")
    out["rsum"] = rsum
    out["n_images"] = float(image_emb.shape[0])
    out["n_texts"] = float(text_emb.shape[0])
    out["images_without_text"] = float((~has_text).sum().item())
    return out


def percent_table(metrics: dict[str, float], names: str = "clip_benchmark") -> dict[str, dict[str, float]]:
    """``{"image→text": {"R@1": 8.67, ...}, "text→image": {...}}``: the recalls in percent, for people."""
    i2t, t2i, recall = NAMING[names]
    table: dict[str, dict[str, float]] = {}
    for label, prefix in (("image→text", i2t), ("text→image", t2i)):
        start = recall.format(prefix=prefix, k="")
        row = {f"R@{key[len(start):]}": 100.0 * v for key, v in metrics.items() if key.startswith(start)}
        table[label] = dict(sorted(row.items(), key=lambda kv: int(kv[0][2:])))
    return table


@torch.no_grad()
def topk_search(query: Tensor, keys: Tensor, k: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Top-``k`` keys per query by dot product: (scores, indices), both (Q, k).

    Each block of ``chunk`` queries is scored against all keys in one product, so ties go to the
    lower key index whatever ``chunk`` is, as in :func:`retrieval_metrics`."""
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"query (Q, E) and keys (N, E) must share E; got {tuple(query.shape)}, {tuple(keys.shape)}")
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be in [1, {keys.shape[0]}], got {k}")
    q, kf = query.float(), keys.float()
    scores, indices = [], []
    for q0 in range(0, q.shape[0], chunk):
        s = q[q0:q0 + chunk] @ kf.T
        order = torch.sort(-s, dim=1, stable=True).indices[:, :k]  # stable: lower index first among ties
        scores.append(s.gather(1, order))
        indices.append(order)
    if not scores:
        return torch.empty(0, k, device=q.device), torch.empty(0, k, dtype=torch.long, device=q.device)
    return torch.cat(scores), torch.cat(indices)
