"""WenLan / BriVL cross-modal momentum contrast (Huo et al., arXiv 2103.06561, §3; official
``BriVL-code-inference/models/vl_model.py``).

A momentum copy of the whole dual encoder (EMA, m = 0.99) embeds each batch without gradients.
Its embeddings are the keys: every image query is contrasted with momentum *text* keys and a queue
of K earlier text keys, every text query with momentum image keys and an image queue. Two candidate
sets (``candidates``):

* ``"batch_queue"`` — the B momentum keys of the whole (global) batch plus the queue: B + K
  candidates per query (MoCo / ALBEF style, what ViCHA uses), through :func:`vlscale.loss.info_nce`;
* ``"positive_queue"`` — BriVL's exact 1 + K: the query's own positive key and the queue only
  (``l_pos`` concatenated with ``l_neg`` over the queue in the official code), through
  :func:`vlscale.techniques.candidates.positive_queue_nce`.

After the step the keys are enqueued, gathered over ranks in rank order, so every rank holds the
same queue (the loss requires identical ``extra_keys``), overwriting the oldest.

The momentum copy is a plain single-device module built on every rank from the model's config
(:func:`momentum_copy`), never a copy of the engine's wrapped or sharded module, and it is kept in
**fp32**. Each step it moves towards the optimizer's fp32 *master* weights
(:meth:`vlscale.engines.EngineAdapter.master_params`: DeepSpeed's fp32 partitions gathered, FSDP2's
fp32 shards gathered — a collective there), not towards a half-precision working copy, so the EMA's
error is fp32 rounding whatever the training precision. Memory: one whole fp32 copy of the model
per rank (4Ψ bytes) plus the queues (2·K·E·4) — see docs/memory.md. Keys are encoded chunk by chunk
with the gradient cache's chunk sizes (optionally under autocast), so the key pass never holds more
activations than one chunk's no-grad forward.

Use per step (the trainer's :class:`~vlscale.train.losses.Objective` owns the order)::

    mc.update(engine.master_params(), engine.module.named_buffers())   # EMA step
    keys = mc.encode_keys(inputs, chunk_sizes={"image": 256, "text": 256})
    i2t, t2i = mc.loss_terms(embs, keys, embs["logit_scale"], process_group=pg)  # inside the loss_fn
    mc.enqueue(keys, process_group=pg)                                 # after the optimizer step

The queues, their pointer and the EMA weights are buffers / sub-module state: ``state_dict()``
checkpoints them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlscale.gradcache import TOWER_INPUTS
from vlscale.gradcache.transfer import ChunkFeed, chunk_to
from vlscale.loss import info_nce
from vlscale.techniques.candidates import positive_queue_nce

CANDIDATES = ("batch_queue", "positive_queue")
Mix = tuple[Tensor, float] | None


def momentum_copy(model: nn.Module) -> nn.Module:
    """A fresh fp32 :class:`~vlscale.model.DualEncoder` with ``model``'s architecture (values to be
    copied in by :meth:`MomentumContrast.init_from`). Built from the config, so it works for any
    engine — the online model may be ZeRO-3 partitioned or FSDP2-sharded. Weights are not loaded
    (no ``vision_weights`` / ``text_pretrained`` read), the MIM decoder is left out, nothing frozen."""
    from vlscale.model import DualEncoder

    if not isinstance(model, DualEncoder):
        raise ValueError(f"momentum_copy builds DualEncoders; for a {type(model).__name__} pass your own "
                         "plain copy to MomentumContrast")
    vocab = int(model.textual.trunk.config.vocab_size)  # a config value: readable under ZeRO-3 too
    cfg = dataclasses.replace(model.cfg, vision_weights=None, text_pretrained=False, grad_checkpointing=False,
                              mim_decoder_depth=0, freeze_image_layers=0, freeze_text_layers=0,
                              text_config={**model.cfg.text_config, "vocab_size": vocab})
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the run's RNG alone
        return DualEncoder(cfg, tokenizer=model.tokenizer)


class MomentumContrast(nn.Module):
    """An fp32 EMA dual encoder (``ema``, adopted as given) + image and text key queues."""

    def __init__(self, ema: nn.Module, *, queue_size: int, embed_dim: int, momentum: float = 0.99,
                 candidates: str = "batch_queue", key_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if queue_size < 1 or embed_dim < 1:
            raise ValueError(f"queue_size and embed_dim must be >= 1, got {queue_size}, {embed_dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if candidates not in CANDIDATES:
            raise ValueError(f"momentum candidates must be one of {CANDIDATES}, got {candidates!r}")
        _refuse_sharded(ema)
        self.momentum, self.candidates, self.key_dtype = float(momentum), candidates, key_dtype
        self.ema = ema.float()
        self.ema.requires_grad_(False)
        self.ema.eval()  # keys without dropout; train() below never flips it back
        self.register_buffer("image_queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("text_queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @classmethod
    def copy_of(cls, model: nn.Module, **kwargs: Any) -> MomentumContrast:
        """Deep-copy a plain, unwrapped single-device model (tests, notebooks). Sharded modules
        (FSDP2 DTensors, ZeRO-3 partitions) are refused: build the copy with :func:`momentum_copy`."""
        _refuse_sharded(model)
        return cls(copy.deepcopy(model), **kwargs)

    @property
    def queue_size(self) -> int:
        return int(self.image_queue.shape[0])

    def train(self, mode: bool = True) -> MomentumContrast:
        super().train(mode)
        self.ema.eval()
        return self

    # -- the EMA --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, params: Iterable[tuple[str, Tensor]],
                  buffers: Iterable[tuple[str, Tensor]] | None = None) -> None:
        """Set the momentum weights to ``params`` (e.g. ``engine.master_params()``): every parameter of
        the copy must be given (extra names, such as a MIM decoder's, are ignored)."""
        self._blend(params, weight=1.0)
        self._copy_buffers(buffers)

    @torch.no_grad()
    def update(self, params: Iterable[tuple[str, Tensor]] | nn.Module,
               buffers: Iterable[tuple[str, Tensor]] | None = None) -> None:
        """``θ_ema ← m·θ_ema + (1−m)·θ`` in fp32 for every parameter; buffers copied.

        ``params``: ``(name, full fp32 value)`` pairs — ``engine.master_params()`` (consume it on every
        rank: a collective under ZeRO-3 / FSDP2) — or a plain module (its parameters and buffers)."""
        if isinstance(params, nn.Module):
            module = params
            _refuse_sharded(module)
            params, buffers = module.named_parameters(), module.named_buffers()
        self._blend(params, weight=1.0 - self.momentum)
        self._copy_buffers(buffers)

    def _blend(self, params: Iterable[tuple[str, Tensor]], weight: float) -> None:
        own = dict(self.ema.named_parameters())
        seen = set()
        for name, value in params:  # consume every item: the source may be a collective iterator
            target = own.get(name)
            if target is None:
                continue
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"momentum: parameter {name!r} has shape {tuple(value.shape)}, the momentum "
                                 f"copy {tuple(target.shape)}: the copy was built for another architecture")
            target.lerp_(value.detach().to(target.device, torch.float32), weight)
            seen.add(name)
        missing = sorted(set(own) - seen)
        if missing:
            raise ValueError(f"momentum: the online model has no {missing[:5]} ({len(missing)} parameters of "
                             "the momentum copy were not updated)")

    def _copy_buffers(self, buffers: Iterable[tuple[str, Tensor]] | None) -> None:
        own = dict(self.ema.named_buffers())
        for name, value in buffers or ():
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)

    # -- keys -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_keys(self, inputs: Mapping[str, Tensor | None],
                    chunk_sizes: int | Mapping[str, int] | None = None, *,
                    feed: ChunkFeed | None = None) -> dict[str, Tensor]:
        """Momentum embeddings ``{"image": (B, E), "text": (B, E)}`` in fp32, each tower's rows in
        chunks of ``chunk_sizes`` (an int for both towers, a per-tower mapping, or None = whole),
        every chunk moved to the momentum copy's device right before its forward by ``feed`` (the
        gradient cache's: the keys see the pixels the query towers see; default ``chunk_to``)."""
        feed = feed or chunk_to
        device = next(self.ema.parameters()).device
        out: dict[str, Tensor] = {}
        for tower, names in TOWER_INPUTS.items():
            tin = {n: inputs[n] for n in names if inputs.get(n) is not None}
            if not tin:
                continue
            rows = next(iter(tin.values())).shape[0]
            size = chunk_sizes.get(tower) if isinstance(chunk_sizes, Mapping) else chunk_sizes
            step = size or rows
            parts = []
            for i in range(0, rows, step):
                chunk = feed(tin, i, min(i + step, rows), device)
                with self._autocast(device):
                    parts.append(self.ema(**chunk)[tower].float())
            out[tower] = torch.cat(parts)
        if set(out) != {"image", "text"} or out["image"].shape[0] != out["text"].shape[0]:
            raise ValueError(f"momentum keys need pixels and tokens of one batch size, got "
                             f"{ {k: tuple(v.shape) for k, v in out.items()} }")
        return out

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        # fp32 weights, half-precision arithmetic where it is supported (CUDA; bf16 on CPU).
        if self.key_dtype is None or (device.type != "cuda" and self.key_dtype is not torch.bfloat16):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.key_dtype)

    # -- the loss ---------------------------------------------------------------------------------
    def negatives(self) -> tuple[Tensor | None, Tensor | None]:
        """The filled part of (image_queue, text_queue); ``None`` while empty. Before the queue is
        full its valid rows are exactly ``[0, filled)`` (filled in order from 0)."""
        k = int(self.queue_filled)
        if k == 0:
            return None, None
        return self.image_queue[:k], self.text_queue[:k]

    def loss_terms(self, embs: Mapping[str, Tensor], keys: Mapping[str, Tensor], logit_scale: Tensor, *,
                   mix_i2t: Mix = None, mix_t2i: Mix = None, impl: str = "auto",
                   process_group: object | None = None) -> tuple[Tensor, Tensor]:
        """(image → text keys + text queue, text → image keys + image queue) InfoNCE values.

        ``mix_*``: that direction's targets (:meth:`~vlscale.techniques.MixPlan.targets`): GLOBAL
        partner indices for ``"batch_queue"``, LOCAL ones (``local=True``) for ``"positive_queue"``."""
        img_neg, txt_neg = self.negatives()
        terms = []
        for query, key, queue, mix in ((embs["image"], keys["text"], txt_neg, mix_i2t),
                                       (embs["text"], keys["image"], img_neg, mix_t2i)):
            key = key.to(query.dtype)
            queue = None if queue is None else queue.to(query.dtype)
            if self.candidates == "batch_queue":
                terms.append(info_nce(query, key, logit_scale, mix=mix, extra_keys=queue, impl=impl,
                                      process_group=process_group))
            else:
                terms.append(positive_queue_nce(query, key, queue, logit_scale, mix=mix, impl=impl,
                                                process_group=process_group))
        return terms[0], terms[1]

    def loss(self, embs: Mapping[str, Tensor], keys: Mapping[str, Tensor], logit_scale: Tensor,
             **kwargs: Any) -> Tensor:
        """½·(image → text + text → image); keyword arguments as :meth:`loss_terms`."""
        i2t, t2i = self.loss_terms(embs, keys, logit_scale, **kwargs)
        return 0.5 * (i2t + t2i)

    # -- the queues -------------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue(self, keys: Mapping[str, Tensor], *, process_group: object | None = None) -> None:
        """Append this step's keys (all ranks', in rank order) to the queues, oldest overwritten."""
        img, txt = keys["image"].detach(), keys["text"].detach()
        if img.shape != txt.shape or img.shape[1] != self.image_queue.shape[1]:
            raise ValueError(f"keys must be two (B, {self.image_queue.shape[1]}) tensors, got "
                             f"{tuple(img.shape)} and {tuple(txt.shape)}")
        if _world(process_group) > 1:
            img, txt = _all_gather_rows(img, process_group), _all_gather_rows(txt, process_group)
        self._write(img.to(self.image_queue.device), txt.to(self.text_queue.device))

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

    @torch.no_grad()
    def broadcast_(self, src: int = 0, process_group: object | None = None) -> None:
        """Copy rank ``src``'s EMA and queues to every rank (a resume that saved them once)."""
        if _world(process_group) <= 1:
            return
        for value in self.state_dict(keep_vars=True).values():
            dist.broadcast(value.data, src=src, group=process_group)


def _refuse_sharded(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or type(p.data).__name__ == "DTensor" or hasattr(p, "full_tensor"):
            raise ValueError(f"momentum contrast needs a plain module, but {name!r} is sharded (ZeRO-3 / "
                             "FSDP2): build the copy with vlscale.techniques.momentum_copy(model) and feed it "
                             "engine.master_params()")


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
