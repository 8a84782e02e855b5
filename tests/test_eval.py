"""Evaluation: retrieval metrics (known answers, ties, several captions per image, chunked == dense),
top-k search, zero-shot classification, and dataset embedding with duplicate images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vlscale.eval import build_classifier, embed_dataset, retrieval_metrics, topk_search, zero_shot_classify
from vlscale.eval.retrieval import image_to_text_ranks, text_to_image_ranks


def dense_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference by sorting the full score matrix (stable: ties → lower index first)."""
    s = (txt.double() @ img.double().T)
    order = torch.sort(-s, dim=1, stable=True).indices  # (Nt, Ni)
    t_ranks = (order == t2i[:, None]).float().argmax(1)
    order_i = torch.sort(-s.T, dim=1, stable=True).indices  # (Ni, Nt)
    pos = t2i[order_i] == torch.arange(img.shape[0])[:, None]
    i_ranks = torch.where(pos.any(1), pos.float().argmax(1), torch.tensor(-1))
    return t_ranks, i_ranks


def test_known_answers_with_several_captions_and_ties() -> None:
    img = torch.eye(4)  # four orthogonal images
    # Texts 0-1 → image 0, 2-3 → image 1, 4-5 → image 2, 6 → image 3.
    t2i = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    txt = torch.stack([
        img[0],                       # exact: rank 0
        img[1],                       # wrong: image 0 has score 0, tied with 2 and 3, behind image 1
        img[1],                       # exact
        torch.zeros(4),               # all tied at 0: image 1 ranks after image 0 (index tie-break)
        img[3],                       # image 2 ties with 0, 1 (lower indices) and loses to 3 → rank 3
        0.5 * img[2] + 0.1 * img[0],  # image 2 first
        img[3],                       # exact
    ])
    t_ranks = text_to_image_ranks(img, txt, t2i)
    assert t_ranks.tolist() == [0, 1, 0, 1, 3, 0, 0]
    i_ranks, has = image_to_text_ranks(img, txt, t2i)
    # Image 0: best caption text 0 (score 1), only text 5 (0.1) is another image's: rank 0.
    # Image 1: texts 2 (score 1) — competitors: text 1 scores 1 too but has a lower index → rank 1.
    # Image 2: best caption text 5 (0.5); no other caption scores >= 0.5 before it → rank 0.
    # Image 3: text 6 (1); text 4 also scores 1 with a lower index → rank 1.
    assert i_ranks.tolist() == [0, 1, 0, 1] and has.all()
    m = retrieval_metrics(img, txt, t2i, ks=(1, 2, 5))  # CLIP_benchmark names, fractions
    assert m["image_retrieval_recall@1"] == pytest.approx(4 / 7)
    assert m["image_retrieval_recall@2"] == pytest.approx(6 / 7)
    assert m["image_retrieval_recall@5"] == 1.0
    assert m["text_retrieval_recall@1"] == 0.5 and m["text_retrieval_recall@2"] == 1.0
    assert m["rsum"] == pytest.approx(100 * sum(v for k, v in m.items() if "_recall@" in k))
    assert m["image_retrieval_median_rank"] == 1.0 and m["n_images"] == 4 and m["n_texts"] == 7
    oc = retrieval_metrics(img, txt, t2i, ks=(1, 2, 5), names="open_clip")  # open_clip's names
    assert oc["text_to_image_R@1"] == m["image_retrieval_recall@1"]
    assert oc["image_to_text_R@2"] == m["text_retrieval_recall@2"]
    assert oc["text_to_image_median_rank"] == 1.0 and oc["rsum"] == m["rsum"]
    with pytest.raises(ValueError, match="names must be one of"):
        retrieval_metrics(img, txt, t2i, names="percent")
    ref_t, ref_i = dense_ranks(img, txt, t2i)
    assert t_ranks.tolist() == ref_t.tolist() and i_ranks.tolist() == ref_i.tolist()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize(("n_img", "caps"), [(1, 1), (13, 5), (40, 2)])
def test_chunked_equals_dense_sort_with_many_ties(chunk: int, n_img: int, caps: int) -> None:
    g = torch.Generator().manual_seed(n_img * 100 + chunk)
    # Small integer coordinates: exact float arithmetic and many exact ties.
    img = torch.randint(-2, 3, (n_img, 6), generator=g).float()
    t2i = torch.arange(n_img).repeat_interleave(caps)[torch.randperm(n_img * caps, generator=g)]
    txt = (img[t2i] + torch.randint(-2, 3, (t2i.numel(), 6), generator=g)).float()
    ref_t, ref_i = dense_ranks(img, txt, t2i)
    assert text_to_image_ranks(img, txt, t2i, chunk=chunk).tolist() == ref_t.tolist()
    assert image_to_text_ranks(img, txt, t2i, chunk=chunk)[0].tolist() == ref_i.tolist()
    dense = retrieval_metrics(img, txt, t2i, chunk=10_000)
    assert retrieval_metrics(img, txt, t2i, chunk=chunk) == dense
    assert dense["text_retrieval_recall@1"] == pytest.approx((ref_i < 1).float().mean().item())


def test_perfect_and_chance_level_retrieval() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(200, 32, generator=g), dim=-1)
    t2i = torch.arange(200).repeat_interleave(2)
    perfect = retrieval_metrics(img, img[t2i] + 0.01 * torch.randn(400, 32, generator=g), t2i)
    assert perfect["rsum"] == pytest.approx(600.0)
    rand = retrieval_metrics(img, F.normalize(torch.randn(400, 32, generator=g), dim=-1), t2i)
    assert rand["image_retrieval_recall@10"] < 0.15  # chance: 5%


def duplicate_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> tuple[list[int], list[int]]:
    """Ranks by definition (one caption per image), scores in float64: a candidate ranks before the
    positive if it scores higher, or if it is an exact copy of the positive with a lower index."""
    s = txt.double() @ img.double().T  # (Nt, Ni)
    same_img = (img[:, None, :] == img[None, :, :]).all(-1)  # exact duplicates
    same_txt = (txt[:, None, :] == txt[None, :, :]).all(-1)
    t_ranks = []
    for t, gt in enumerate(t2i.tolist()):
        higher = (s[t] > s[t, gt]) & ~same_img[gt]
        t_ranks.append(int(higher.sum() + (same_img[gt] & (torch.arange(img.shape[0]) < gt)).sum()))
    i_ranks = []
    for i in range(img.shape[0]):
        pos = int((t2i == i).nonzero())
        rivals = t2i != i
        higher = (s[:, i] > s[pos, i]) & ~same_txt[pos] & rivals
        i_ranks.append(int(higher.sum() + (same_txt[pos] & rivals & (torch.arange(txt.shape[0]) < pos)).sum()))
    return t_ranks, i_ranks


def test_exact_duplicates_tie_by_index_whatever_the_chunk() -> None:
    """Duplicate images (and captions) score exactly alike only if every score of a query comes from
    one computation; then the lower index ranks first for any ``chunk``, as a stable sort says."""
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(24, 48, generator=g), dim=-1)
    dup_of = torch.randint(0, 24, (60,), generator=g)  # 60 images, many exact duplicates of 24
    img = base[dup_of]
    t2i = torch.randperm(60, generator=g)  # one caption per image, in shuffled order
    txt = F.normalize(img[t2i] + 0.3 * torch.randn(60, 48, generator=g), dim=-1)
    txt[::2] = img[t2i[::2]]  # half the captions are exact copies of their image: duplicates again
    ref_t, ref_i = duplicate_ranks(img, txt, t2i)
    results = set()
    for chunk in (1, 2, 5, 7, 16, 60, 1024):
        assert text_to_image_ranks(img, txt, t2i, chunk=chunk).tolist() == ref_t, f"text→image, chunk {chunk}"
        assert image_to_text_ranks(img, txt, t2i, chunk=chunk)[0].tolist() == ref_i, f"image→text, chunk {chunk}"
        m = retrieval_metrics(img, txt, t2i, chunk=chunk)
        results.add(tuple(sorted(m.items())))
    assert len(results) == 1
    assert sum(r > 0 for r in ref_t) > 10  # duplicates with lower indices really do outrank positives


def test_images_without_captions_are_left_out_and_counted() -> None:
    img = torch.eye(3)
    txt = torch.eye(3)[:2]
    m = retrieval_metrics(img, txt, torch.tensor([0, 1]), ks=(1,))
    assert m["images_without_text"] == 1.0 and m["text_retrieval_recall@1"] == 1.0
    assert m["image_retrieval_recall@1"] == 1.0


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_score_matrix_is_allocated() -> None:
    n, chunk = 384, 96
    img = F.normalize(torch.randn(n, 16), dim=-1)
    with LargestTensor() as probe:
        m = retrieval_metrics(img, img.clone(), torch.arange(n), chunk=chunk)
    assert m["rsum"] == 600.0
    # Row blocks: chunk queries × all N candidates at once, never N × N.
    assert probe.largest <= max(chunk * n, n * 16), f"an op produced {probe.largest} elements (N×N = {n * n})"
    with LargestTensor() as probe:
        topk_search(img, img, k=5, chunk=chunk)
    assert probe.largest <= chunk * n, probe.largest


def test_retrieval_input_errors() -> None:
    img, txt = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(img, txt, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(img, txt, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="share E"):
        retrieval_metrics(img, torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(img, txt, torch.zeros(5))
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(img, txt, torch.zeros(5, dtype=torch.long), ks=(0,))


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_topk_search_matches_a_stable_sort(chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    q = torch.randint(-1, 2, (9, 5), generator=g).float()
    keys = torch.randint(-1, 2, (23, 5), generator=g).float()
    scores, idx = topk_search(q, keys, k=6, chunk=chunk)
    ref = torch.sort(-(q @ keys.T), dim=1, stable=True).indices[:, :6]
    assert idx.tolist() == ref.tolist()
    torch.testing.assert_close(scores, (q @ keys.T).gather(1, ref))
    with pytest.raises(ValueError, match="k must be"):
        topk_search(q, keys, k=24)


class BagOfWords(nn.Module):
    """Fake text tower: normalised bag of token ids (ignoring specials) — known embeddings."""

    def __init__(self, vocab: int, ignore: list[int]) -> None:
        super().__init__()
        self.vocab, self.ignore = vocab, ignore
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        bag = F.one_hot(tokens, self.vocab).float() * attention_mask[..., None]
        bag[..., self.ignore] = 0
        return {"text": F.normalize(bag.sum(1), dim=-1)}


def test_zero_shot_classification_on_a_constructed_case() -> None:
    from vlscale.model import word_tokenizer

    classes = ["circle", "square", "triangle"]
    tok = word_tokenizer([*classes, "a", "photo", "of", "drawing"], context_length=8)
    vocab = tok.get_vocab()
    specials = [vocab[s] for s in ("[CLS]", "[SEP]", "[PAD]")]
    model = BagOfWords(len(tok), specials)
    templates = ["a photo of a {}", "a {}", "{}"]
    clf = build_classifier(model, tok, classes, templates, batch_size=2)
    assert clf.shape == (3, len(tok))
    # Reference: normalised mean of each class's normalised prompt embeddings.
    for c, name in enumerate(classes):
        enc = tok([t.format(name) for t in templates], padding="max_length", max_length=8, return_tensors="pt")
        ref = F.normalize(model(enc["input_ids"], enc["attention_mask"])["text"].mean(0), dim=-1)
        torch.testing.assert_close(clf[c], ref)
    # Images whose embedding is the class word's one-hot (plus a little of another class).
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    word_ids = torch.tensor([vocab[classes[int(c)]] for c in labels])
    img = F.one_hot(word_ids, len(tok)).float()
    img[-1, vocab["square"]] = 0.2
    out = zero_shot_classify(img, clf, labels, ks=(1, 2, 5))
    assert out["predictions"].tolist() == labels.tolist()
    assert out["acc1"] == 1.0 and out["acc2"] == 1.0 and "acc5" not in out  # CLIP_benchmark names, fractions
    assert out["mean_per_class_recall"] == 1.0
    wrong = zero_shot_classify(img, clf, torch.tensor([1, 1, 2, 0, 1, 0]), ks=(1,))
    assert wrong["acc1"] == pytest.approx(4 / 6)
    # Per class (labels 1,1,2,0,1,0 vs predictions 0,1,2,2,1,0): class 0 1/2, class 1 2/3, class 2 1/1.
    assert wrong["mean_per_class_recall"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    tie = zero_shot_classify(torch.ones(1, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert tie["predictions"].tolist() == [0]  # ties → lower class index
    with pytest.raises(ValueError, match="template"):
        build_classifier(model, tok, classes, ["no placeholder"])
    with pytest.raises(ValueError, match="outside"):
        zero_shot_classify(img, clf, torch.tensor([0, 1, 2, 3, 0, 0]))


class CountingModel(nn.Module):
    """Fake dual encoder: image = normalised mean colour, text = normalised first two token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.images_seen = 0

    def forward(self, pixels=None, tokens=None, attention_mask=None) -> dict[str, torch.Tensor]:
        assert not self.training
        if pixels is not None:
            self.images_seen += pixels.shape[0]
            return {"image": F.normalize(pixels.mean((2, 3)), dim=-1)}
        return {"text": F.normalize(tokens[:, :3].float(), dim=-1)}


def test_embed_dataset_groups_duplicate_images() -> None:
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    # Rows (image, caption): image 0 ×3, image 1 ×1, image 2 ×2, image 3 ×2, over three batches.
    rows = [0, 1, 0, 2, 3, 0, 2, 3]
    batches = []
    for lo, hi in ((0, 3), (3, 5), (5, 8)):
        ids = rows[lo:hi]
        batches.append({
            "pixels": colours[ids][:, :, None, None].expand(-1, 3, 4, 4).clone(),
            "tokens": torch.tensor([[int(i == c) for c in range(3)] + [9] for i in ids]),
            "attention_mask": torch.ones(len(ids), 4, dtype=torch.long),
            "keys": [f"img{i}#{lo + j}" for j, i in enumerate(ids)],
        })
    model = CountingModel().train()
    img, txt, t2i = embed_dataset(model, batches)
    assert model.training and model.images_seen == 4
    assert t2i.tolist() == [0, 1, 0, 2, 3, 0, 2, 3] and img.shape == (4, 3) and txt.shape == (8, 3)
    torch.testing.assert_close(img, F.normalize(colours, dim=-1))
    _, _, t2i_key = embed_dataset(model, batches, group_by=lambda k: k.split("#")[0])
    assert t2i_key.tolist() == t2i.tolist()
    _, _, t2i_rows = embed_dataset(model, batches, group_by="key")  # unique keys: one image per row
    assert t2i_rows.tolist() == list(range(8))
    _, txt2, t2i2 = embed_dataset(model, batches, max_batches=1)
    assert txt2.shape[0] == 3 and t2i2.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="no batches"):
        embed_dataset(model, [])
