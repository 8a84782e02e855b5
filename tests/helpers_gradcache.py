"""Shared pieces of the gradient-cache / engine tests: a tiny dual encoder, the loss, references.

The model follows the DualEncoder contract (``model(pixels=, tokens=, attention_mask=) -> dict``
with L2-normalised "image"/"text", "logit_scale" of shape [1] always, optional "*_hier" sets) and
has dropout and drop-path on, optional activation checkpointing and BatchNorm.

Multi-rank gradient convention (the one the distributed loss follows): every rank computes the
exact global loss from all-gathered embeddings; the gather's backward hands each rank
``world_size ×`` the gradient of its own rows, so the engines' average over ranks equals the
single-process gradient. ``logit_scale`` is not gathered (each rank holds the full d/ds).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

try:  # the real loss when its owner has shipped it; the tests do not depend on it
    from vlscale.loss import contrastive_loss as _vl_contrastive_loss
except ImportError:  # pragma: no cover - depends on the parallel work
    _vl_contrastive_loss = None


class Block(nn.Module):
    """Pre-norm residual MLP with dropout and drop-path (LayerNorm or BatchNorm)."""

    def __init__(self, dim: int, drop: float, drop_path: float, batchnorm: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim) if batchnorm else nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.fc2(self.drop(F.gelu(self.fc1(self.norm(x))))))


class Tower(nn.Module):
    """Blocks + projection; also returns a projected intermediate state (hierarchical set)."""

    def __init__(self, dim: int, embed_dim: int, depth: int, drop: float, drop_path: float,
                 checkpointing: bool, batchnorm: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, drop, drop_path, batchnorm) for _ in range(depth))
        self.proj = nn.Linear(dim, embed_dim)
        self.hier_proj = nn.Linear(dim, embed_dim)
        self.checkpointing = checkpointing

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        first = x
        for i, blk in enumerate(self.blocks):
            x = checkpoint(blk, x, use_reentrant=False) if self.checkpointing else blk(x)
            if i == 0:
                first = x
        return F.normalize(self.proj(x), dim=-1), F.normalize(self.hier_proj(first), dim=-1)


class ImageTower(nn.Module):
    def __init__(self, image_size: int, **kw: object) -> None:
        super().__init__()
        self.stem = nn.Linear(3 * image_size * image_size, kw["dim"])  # type: ignore[arg-type]
        self.tower = Tower(**kw)  # type: ignore[arg-type]

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.tower(self.stem(pixels.flatten(1)))


class TextTower(nn.Module):
    def __init__(self, vocab: int, **kw: object) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, kw["dim"])  # type: ignore[arg-type]
        self.tower = Tower(**kw)  # type: ignore[arg-type]

    def forward(self, tokens: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        e = self.embed(tokens)
        m = torch.ones_like(tokens) if attention_mask is None else attention_mask
        m = m.to(e.dtype).unsqueeze(-1)
        return self.tower((e * m).sum(1) / m.sum(1).clamp(min=1))


class TinyDualEncoder(nn.Module):
    """A small dual encoder following the vlscale model contract."""

    def __init__(self, *, dim: int = 16, embed_dim: int = 8, depth: int = 2, vocab: int = 50,
                 image_size: int = 4, drop: float = 0.2, drop_path: float = 0.3,
                 checkpointing: bool = False, hier: bool = False, batchnorm: bool = False) -> None:
        super().__init__()
        kw = dict(dim=dim, embed_dim=embed_dim, depth=depth, drop=drop, drop_path=drop_path,
                  checkpointing=checkpointing)
        self.visual = ImageTower(image_size, batchnorm=batchnorm, **kw)
        self.textual = TextTower(vocab, batchnorm=False, **kw)
        self.logit_t = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.hier = hier

    def forward(self, pixels: Tensor | None = None, tokens: Tensor | None = None,
                attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if pixels is not None:
            out["image"], hier = self.visual(pixels)
            if self.hier:
                out["image_hier"] = hier
        if tokens is not None:
            out["text"], hier = self.textual(tokens, attention_mask)
            if self.hier:
                out["text_hier"] = hier
        out["logit_scale"] = self.logit_t.clamp(max=math.log(100.0)).exp()
        return out


def make_batch(batch: int, *, seed: int, image_size: int = 4, seq: int = 6, vocab: int = 50) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {
        "pixels": torch.randn(batch, 3, image_size, image_size, generator=g),
        "tokens": torch.randint(1, vocab, (batch, seq), generator=g) * mask,
        "attention_mask": mask,
    }


# -- loss ----------------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """All-gather rows; backward returns world_size × this rank's rows (see module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank, ctx.world = x.shape[0], rank, world
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows] * ctx.world


def gather_rows(x: Tensor) -> Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return _GatherRows.apply(x)


def _pair_loss(img: Tensor, txt: Tensor, scale: Tensor) -> Tensor:
    if _vl_contrastive_loss is not None:
        return _vl_contrastive_loss(img, txt, scale, impl="reference")
    logits = scale.reshape(()) * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def clip_loss(embs: dict[str, Tensor], loss_mult: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """Symmetric CLIP loss over the (gathered) batch, + 0.1 × the hierarchical pair when present."""
    s = embs["logit_scale"]
    loss = _pair_loss(gather_rows(embs["image"]), gather_rows(embs["text"]), s)
    if "image_hier" in embs:
        loss = loss + 0.1 * _pair_loss(gather_rows(embs["image_hier"]), gather_rows(embs["text_hier"]), s)
    loss = loss * loss_mult
    return loss, {"loss": float(loss.detach())}


# -- references and comparisons ----------------------------------------------------------------
def reference_step(model: nn.Module, inputs: dict[str, Tensor], chunk_sizes: dict[str, int],
                   loss_fn: Callable = clip_loss) -> Tensor:
    """One plain step with a full graph: forward chunk by chunk (the same RNG draws as the cached
    step), concatenate, one loss, one backward. Returns the loss."""
    outs: dict[str, list[Tensor]] = {}
    scale = None
    for tower, names in (("image", ("pixels",)), ("text", ("tokens", "attention_mask"))):
        batch = inputs[names[0]].shape[0]
        size = chunk_sizes[tower]
        for start in range(0, batch, size):
            out = model(**{n: inputs[n][start : start + size] for n in names})
            scale = out.pop("logit_scale") if scale is None else scale
            out.pop("logit_scale", None)
            for k, v in out.items():
                outs.setdefault(k, []).append(v)
    embs = {k: torch.cat(v) for k, v in outs.items()}
    embs["logit_scale"] = scale
    loss, _ = loss_fn(embs)
    loss.backward()
    return loss.detach()


def average_grads(model: nn.Module) -> None:
    """Average reference gradients over ranks (what every engine does)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def max_rel_err(got: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, str]:
    """Largest per-tensor max|got−ref| / max|ref| (and its name)."""
    worst, name = 0.0, ""
    for k, r in ref.items():
        if k not in got or got[k] is None:
            return math.inf, f"{k} (missing)"
        g = got[k].detach().float().reshape(r.shape).cpu()
        err = float((g - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-12))
        if err > worst:
            worst, name = err, k
    return worst, name
