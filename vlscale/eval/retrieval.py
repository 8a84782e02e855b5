"""Zero-shot image↔text retrieval metrics, computed in tiles (never the full N×N score matrix).

Recall@K needs only the *rank* of the right answer, and a rank is a count: how many candidates
score above the positive. Counting tile by tile (``chunk × chunk`` scores at a time) gives exact
ranks in O(chunk²) memory for any N.

Ties are broken deterministically by index (the lower index ranks first), as a stable sort of
the scores would: a candidate ranks before the positive if it scores higher, or equally with a
lower index. Several captions per image: image→text counts a hit when *any* of the image's
captions is in the top K (the rank of its best caption among the other images' captions).
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


def text_to_image_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk: int = 4096) -> Tensor:
    """0-based rank of each text's image among all images (Nt,), int64."""
    img, txt = image_emb.float(), text_emb.float()
    t2i = text_to_image.long().to(txt.device)
    ranks = torch.empty(txt.shape[0], dtype=torch.long, device=txt.device)
    img_idx = torch.arange(img.shape[0], device=txt.device)
    for t0 in range(0, txt.shape[0], chunk):
        t = txt[t0:t0 + chunk]
        gt = t2i[t0:t0 + chunk]
        pos = (t * img[gt]).sum(-1, keepdim=True)
        count = torch.zeros(t.shape[0], dtype=torch.long, device=txt.device)
        for i0 in range(0, img.shape[0], chunk):
            s = t @ img[i0:i0 + chunk].T
            idx = img_idx[i0:i0 + chunk][None, :]
            before = (s > pos) | ((s == pos) & (idx < gt[:, None]))
            before &= idx != gt[:, None]  # the positive never outranks itself (rounding-safe)
            count += before.sum(1)
        ranks[t0:t0 + chunk] = count
    return ranks


def image_to_text_ranks(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor,
                        chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """0-based rank of each image's best caption among the other images' captions (Ni,), and a
    mask of the images that have at least one caption (the others get rank -1)."""
    img, txt = image_emb.float(), text_emb.float()
    t2i = text_to_image.long().to(img.device)
    n_img, n_txt = img.shape[0], txt.shape[0]
    pos_score = (txt * img[t2i]).sum(-1)  # each caption's score with its own image (Nt,)
    best = torch.full((n_img,), float("-inf"), device=img.device).scatter_reduce(
        0, t2i, pos_score, reduce="amax", include_self=True)
    # Index of the best caption (lowest index among equal-best): the tie-break reference.
    txt_idx = torch.arange(n_txt, device=img.device)
    is_best = pos_score == best[t2i]
    best_idx = torch.full((n_img,), n_txt, device=img.device).scatter_reduce(
        0, t2i[is_best], txt_idx[is_best], reduce="amin", include_self=True)
    has_text = best_idx < n_txt
    ranks = torch.full((n_img,), -1, dtype=torch.long, device=img.device)
    for i0 in range(0, n_img, chunk):
        im = img[i0:i0 + chunk]
        b, bi = best[i0:i0 + chunk, None], best_idx[i0:i0 + chunk, None]
        own = torch.arange(i0, i0 + im.shape[0], device=img.device)[:, None]
        count = torch.zeros(im.shape[0], dtype=torch.long, device=img.device)
        for t0 in range(0, n_txt, chunk):
            s = im @ txt[t0:t0 + chunk].T
            idx = txt_idx[t0:t0 + chunk][None, :]
            before = (s > b) | ((s == b) & (idx < bi))
            before &= t2i[t0:t0 + chunk][None, :] != own  # own captions are positives, not competitors
            count += before.sum(1)
        ranks[i0:i0 + chunk] = torch.where(has_text[i0:i0 + chunk], count, -1)
    return ranks, has_text


@torch.no_grad()
def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Ks = (1, 5, 10),
                      chunk: int = 4096) -> dict[str, float]:
    """Recall@K in percent for image→text (``i2t_R@K``) and text→image (``t2i_R@K``), their sum
    ``rsum`` (the papers' RSUM), median / mean ranks (1-based), and the counts.

    ``text_to_image[t]`` is the index of text t's image (several texts may share one image).
    Images without any caption are left out of image→text and counted in ``images_without_text``.
    Embeddings are compared by dot product (L2-normalise them first for cosine similarity)."""
    _check(image_emb, text_emb, text_to_image, ks, chunk)
    t_ranks = text_to_image_ranks(image_emb, text_emb, text_to_image, chunk)
    i_ranks, has_text = image_to_text_ranks(image_emb, text_emb, text_to_image, chunk)
    i_ranks = i_ranks[has_text]
    out: dict[str, float] = {}
    for name, r in (("i2t", i_ranks), ("t2i", t_ranks)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * (r < k).float().mean().item()
        out[f"{name}_median_rank"] = float((r + 1).float().median().item())
        out[f"{name}_mean_rank"] = float((r + 1).float().mean().item())
    out["rsum"] = sum(out[f"{n}_R@{k}"] for n in ("i2t", "t2i") for k in ks)
    out["n_images"] = float(image_emb.shape[0])
    out["n_texts"] = float(text_emb.shape[0])
    out["images_without_text"] = float((~has_text).sum().item())
    return out


@torch.no_grad()
def topk_search(query: Tensor, keys: Tensor, k: int, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Top-``k`` keys per query by dot product, merged over key chunks: (scores, indices), both (Q, k).

    Ties go to the lower key index, as in :func:`retrieval_metrics`."""
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"query (Q, E) and keys (N, E) must share E; got {tuple(query.shape)}, {tuple(keys.shape)}")
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be in [1, {keys.shape[0]}], got {k}")
    q, kf = query.float(), keys.float()
    best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for k0 in range(0, kf.shape[0], chunk):
        s = q @ kf[k0:k0 + chunk].T
        idx = torch.arange(k0, k0 + s.shape[1], device=q.device).expand_as(s)
        cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
        # Stable sort on -score after sorting by index keeps the lower index first among ties.
        order = torch.sort(cand_i, dim=1, stable=True).indices
        cand_s, cand_i = cand_s.gather(1, order), cand_i.gather(1, order)
        order = torch.sort(-cand_s, dim=1, stable=True).indices[:, :k]
        best_s, best_i = cand_s.gather(1, order), cand_i.gather(1, order)
    return best_s, best_i
