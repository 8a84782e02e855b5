"""WenLan / BriVL cross-modal momentum contrast (Huo et al., arXiv 2103.06561).

A momentum copy of the whole dual encoder (both towers and heads, EMA with m = 0.99) embeds each
batch without gradients. Its embeddings are the keys: every image query is contrasted with the
momentum *text* keys of the batch plus a queue of K earlier text keys, and every text query with
the momentum image keys plus an image queue — an InfoNCE over B + K candidates per direction
through :func:`vlscale.loss.info_nce` (``extra_keys`` = the queue: negatives only, no gradient).
After the step the keys are enqueued (gathered over ranks first, so every rank holds the same
queue — the distributed loss requires identical ``extra_keys``), overwriting the oldest.

Use per step (the trainer owns the order)::

    mc.update(model)                                   # EMA step (after the previous optimizer step)
    keys = mc.encode_keys(pixels=..., tokens=..., attention_mask=...)
    loss = mc.loss(embs, keys, embs["logit_scale"], process_group=pg)   # inside the loss_fn
    mc.enqueue(keys, process_group=pg)                 # after the backward

The queues, their pointer and the EMA weights are buffers / sub-module state, so
``mc.state_dict()`` checkpoints them. The momentum copy needs whole (unsharded) parameters on
every rank: use it with the local engine, DeepSpeed ZeRO 0–2 or FSDP2 (elementwise EMA of DTensor
shards); ZeRO-3 partitions the parameters in place and is refused with a clear error.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlscale.loss import info_nce


class MomentumContrast(nn.Module):
    """EMA copy of a dual encoder + image and text key queues of size ``queue_size``."""

    def __init__(self, model: nn.Module, *, queue_size: int, embed_dim: int, momentum: float = 0.99) -> None:
        super().__init__()
        if queue_size < 1 or embed_dim < 1:
            raise ValueError(f"queue_size and embed_dim must be >= 1, got {queue_size}, {embed_dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        _refuse_partitioned(model)
        self.momentum = float(momentum)
        self.ema = copy.deepcopy(model)
        self.ema.requires_grad_(False)
        self.ema.eval()  # keys without dropout; train() below never flips it back
        self.register_buffer("image_queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("text_queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @property
    def queue_size(self) -> int:
        return int(self.image_queue.shape[0])

    def train(self, mode: bool = True) -> MomentumContrast:
        super().train(mode)
        self.ema.eval()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``θ_ema ← m·θ_ema + (1−m)·θ`` for every parameter; buffers (e.g. norm statistics) copied."""
        _refuse_partitioned(model)
        src = dict(model.named_parameters())
        for name, p_ema in self.ema.named_parameters():
            if name not in src:
                raise ValueError(f"momentum model has parameter {name!r} that the online model lacks")
            p_ema.lerp_(src[name].detach().to(p_ema.dtype), 1.0 - self.momentum)
        src_buf = dict(model.named_buffers())
        for name, b_ema in self.ema.named_buffers():
            if name in src_buf:
                b_ema.copy_(src_buf[name])

    @torch.no_grad()
    def encode_keys(self, *, pixels: Tensor, tokens: Tensor, attention_mask: Tensor | None = None,
                    chunk_size: int | None = None) -> dict[str, Tensor]:
        """Momentum embeddings ``{"image": (B, E), "text": (B, E)}`` in fp32, in chunks of ``chunk_size``."""
        n = pixels.shape[0]
        if tokens.shape[0] != n:
            raise ValueError(f"pixels ({n}) and tokens ({tokens.shape[0]}) batch sizes differ")
        step = chunk_size or n
        img, txt = [], []
        for i in range(0, n, step):
            mask = None if attention_mask is None else attention_mask[i:i + step]
            img.append(self.ema(pixels=pixels[i:i + step])["image"].float())
            txt.append(self.ema(tokens=tokens[i:i + step], attention_mask=mask)["text"].float())
        return {"image": torch.cat(img), "text": torch.cat(txt)}

    def negatives(self) -> tuple[Tensor | None, Tensor | None]:
        """The filled part of (image_queue, text_queue); ``None`` while empty. Before the queue is
        full its valid rows are exactly ``[0, filled)`` (filled in order from 0)."""
        k = int(self.queue_filled)
        if k == 0:
            return None, None
        return self.image_queue[:k], self.text_queue[:k]

    def loss(self, embs: Mapping[str, Tensor], keys: Mapping[str, Tensor], logit_scale: Tensor, *,
             mix: tuple[Tensor, float] | None = None, impl: str = "auto",
             process_group: object | None = None) -> Tensor:
        """½·[InfoNCE(image → momentum text keys + text queue) + InfoNCE(text → image keys + image queue)]."""
        img_neg, txt_neg = self.negatives()
        kw = {"mix": mix, "impl": impl, "process_group": process_group}
        i2t = info_nce(embs["image"], keys["text"].to(embs["image"].dtype), logit_scale,
                       extra_keys=None if txt_neg is None else txt_neg.to(embs["image"].dtype), **kw)
        t2i = info_nce(embs["text"], keys["image"].to(embs["text"].dtype), logit_scale,
                       extra_keys=None if img_neg is None else img_neg.to(embs["text"].dtype), **kw)
        return 0.5 * (i2t + t2i)

    @torch.no_grad()
    def enqueue(self, keys: Mapping[str, Tensor], *, process_group: object | None = None) -> None:
        """Append this step's keys (all ranks', in rank order) to the queues, oldest overwritten."""
        img, txt = keys["image"].detach(), keys["text"].detach()
        if img.shape != txt.shape or img.shape[1] != self.image_queue.shape[1]:
            raise ValueError(f"keys must be two (B, {self.image_queue.shape[1]}) tensors, got "
                             f"{tuple(img.shape)} and {tuple(txt.shape)}")
        if _world(process_group) > 1:
            img, txt = _all_gather_rows(img, process_group), _all_gather_rows(txt, process_group)
        self._write(img, txt)

    def _write(self, img: Tensor, txt: Tensor) -> None:
        k, n = self.queue_size, img.shape[0]
        if n >= k:  # more keys than slots: keep the newest k
            self.image_queue.copy_(img[-k:])
            self.text_queue.copy_(txt[-k:])
            self.queue_ptr.zero_()
            self.queue_filled.fill_(k)
            return
        idx = (int(self.queue_ptr) + torch.arange(n, device=self.image_queue.device)) % k
        self.image_queue[idx] = img.to(self.image_queue.dtype)
        self.text_queue[idx] = txt.to(self.text_queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % k)
        self.queue_filled.fill_(min(k, int(self.queue_filled) + n))


def _refuse_partitioned(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") and getattr(p, "ds_status", None) is not None and p.numel() == 0:
            raise ValueError(f"momentum contrast needs whole parameters, but {name!r} is ZeRO-3 partitioned; "
                             "use ZeRO stage <= 2 or FSDP2")


def _world(group: object | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_gather_rows(x: Tensor, group: object | None) -> Tensor:
    """Concatenate every rank's rows in rank order; local row counts may differ (padded gather)."""
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s) for s in sizes]
    pad = x.new_zeros(max(counts), *x.shape[1:])
    pad[: x.shape[0]] = x
    out = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(out, pad, group=group)
    return torch.cat([o[:c] for o, c in zip(out, counts)])
