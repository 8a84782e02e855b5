"""The training objective handed to the gradient cache, and the per-step technique hooks.

``Objective.prepare(step, batch, inputs)`` runs before the step (it may change the inputs);
``Objective(embs) -> (loss, metrics)`` is the gradient cache's ``loss_fn`` (``embs`` holds the whole
per-rank batch's outputs as detached fp32 leaves); ``Objective.chunk_loss`` is its per-chunk hook
(or None); ``Objective.finish()`` runs after the optimizer step. The loss is
``techniques.contrastive_weight`` × the symmetric contrastive loss of :mod:`vlscale.loss` over all
ranks' pairs, plus, when enabled (see :mod:`vlscale.techniques`):

- ZeroVL coin-flip mixup: pixels mixed in ``prepare`` (float pixels) or by the step's feed on the
  device, chunk by chunk (uint8 pixels: :class:`vlscale.train.pixels.PixelFeed`), text embeddings
  mixed here; every term's targets follow what was mixed in its own inputs
  (:mod:`vlscale.techniques.mixup`);
- ViCHA visual concepts: sampled concepts appended to the captions, or tokenised as image-side
  tokens (``techniques.concept_mode``), in ``prepare``; appended ones are re-tokenised with the
  caption, so ZeroVL caption masking (``data.text_mask_prob``) is applied again to that text;
- ViCHA hierarchical alignment: each level's weight × the loss on that intermediate level;
- WenLan momentum contrast: ``techniques.momentum_weight`` × ½(image→text + text→image) against the
  fp32 EMA towers' keys and queues (EMA update from the engine's master weights and chunked key
  encoding in ``prepare``, enqueue in ``finish``);
- ViCHA masked image modeling: ``techniques.mim_weight`` × the per-chunk MAE loss (``chunk_loss``).

Every random draw is a pure function of (seed, step[, rank, sample key]), so ranks agree where they
must, without communicating, and a resumed run replays them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlscale.config import Config
from vlscale.data.collate import CaptionMasker, sample_seeds
from vlscale.loss import contrastive_loss
from vlscale.techniques import (
    CoinFlipMixup,
    ConceptSampler,
    MaskedImageModeling,
    MomentumContrast,
    hierarchical_loss,
    momentum_copy,
)
from vlscale.train.pixels import PixelFeed

_HALF = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_CAPTION_MASK_SALT = 0xC0C3  # keeps these masks apart from the loader's (same seed, other positions)


class Objective:
    """Callable loss for :meth:`vlscale.gradcache.GradCache.step` with the techniques' hooks.

    ``engine``: the run's :class:`~vlscale.engines.EngineAdapter` (momentum reads its
    ``master_params()``); without one, ``module`` is a plain model whose own weights are the masters.
    ``chunk_sizes``: the gradient cache's per-tower chunk sizes (the momentum keys use the same).
    ``micro_batch``: the nominal per-rank rows. Every rank must hold the same rows at a step (the
    trainer trims short steps so), which may be fewer than ``micro_batch``: the mixup targets use
    the step's own rows. ``pixel_norm``: the loader transform's ``(mean, std)``, needed for uint8
    pixels; after ``prepare``, :attr:`feed` is the gradient cache's feed for the step."""

    def __init__(self, cfg: Config, *, process_group: Any, engine: Any = None, module: nn.Module | None = None,
                 tokenizer: Any = None, rank: int = 0, micro_batch: int = 0,
                 chunk_sizes: dict[str, int] | None = None,
                 pixel_norm: tuple[Any, Any] | None = None) -> None:
        tech, seed = cfg.techniques, cfg.train.seed
        self.pixel_feed = PixelFeed(*pixel_norm) if pixel_norm is not None else PixelFeed()
        self.feed = self.pixel_feed
        self.engine = engine
        self.module = engine.module if engine is not None else module
        if self.module is None:
            raise ValueError("Objective needs an engine or a module")
        self.impl, self.process_group, self.rank = cfg.loss.impl, process_group, rank
        self.tokenizer, self.max_length = tokenizer, cfg.model.context_length
        self.micro_batch = micro_batch
        self.chunk_sizes = dict(chunk_sizes or {})
        self.contrastive_weight = tech.contrastive_weight
        self.hier_weight = tech.hier_weight if tech.hier_on else 0.0
        self.mixup = CoinFlipMixup(alpha=tech.mixup_alpha, seed=seed) if tech.mixup else None
        self.concept_mode = tech.concept_mode
        self.concepts = None
        self.caption_masker = None
        if tech.concept_prob > 0 or tech.concept_mode == "image_tokens":
            self.concepts = ConceptSampler(p=tech.concept_prob, max_concepts=tech.max_concepts, seed=seed)
            if tech.concept_mode == "caption" and cfg.data.text_mask_prob > 0:
                # Captions re-tokenised with their concepts lose the loader's caption masking: redo it.
                self.caption_masker = CaptionMasker.from_tokenizer(tokenizer, cfg.data.text_mask_prob,
                                                                   cfg.data.text_mask_split)
        self.seed = seed
        self.momentum, self.momentum_weight = None, tech.momentum_weight
        if tech.momentum_queue:
            self.momentum = self._build_momentum(cfg)
        self.mim = None
        if tech.mim_weight > 0:
            from vlscale.model import vit

            self.mim = MaskedImageModeling(weight=tech.mim_weight, num_patches=vit.num_patches(self.module.visual.trunk),
                                           mask_ratio=tech.mim_mask_ratio, norm_pix=tech.mim_norm_pix, seed=seed,
                                           rank=rank)
        self.plan: Any = None
        self.keys: dict[str, Tensor] | None = None

    def _build_momentum(self, cfg: Config) -> MomentumContrast:
        """The fp32 momentum copy, built from the config on this rank and set to the master weights."""
        tech = cfg.techniques
        device = next(iter(self._master_params()))[1].device if self.engine is None else self.engine.device
        mc = MomentumContrast(momentum_copy(self.module).to(device), queue_size=tech.momentum_queue,
                              embed_dim=cfg.model.embed_dim, momentum=tech.momentum,
                              candidates=tech.momentum_candidates, key_dtype=_HALF[cfg.train.precision])
        mc.init_from(self._master_params(), self.module.named_buffers())
        return mc

    def _master_params(self) -> Any:
        if self.engine is not None:
            return self.engine.master_params()  # a collective under ZeRO-3 / FSDP2: every rank runs it
        return ((n, p.detach().float()) for n, p in self.module.named_parameters())

    @property
    def chunk_loss(self) -> MaskedImageModeling | None:
        """The gradient cache's per-chunk loss hook (masked image modeling), or None."""
        return self.mim

    # -- before the step ---------------------------------------------------------------------
    def prepare(self, step: int, batch: Any, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inputs of optimizer step ``step`` (0-based) with concepts / mixup / momentum keys."""
        device = inputs["pixels"].device
        self.feed = self.pixel_feed
        if self.concepts is not None and self.concept_mode == "caption" and batch.concepts is not None:
            tokens, mask = self.concepts.tokenize(self.tokenizer, batch.captions, batch.concepts,
                                                  max_length=self.max_length, keys=batch.keys, step=step)
            if self.caption_masker is not None:
                # ZeroVL caption masking (data.text_mask_prob), which the loader applied to the caption
                # alone, applied to the text the tower now reads (caption + concepts); seeded per
                # (seed, step, sample) so a resumed run replays it.
                seeds = sample_seeds(self.seed, step, (_CAPTION_MASK_SALT,), batch.source, batch.keys)
                tokens, mask = self.caption_masker(tokens, mask, seeds)
            inputs["tokens"], inputs["attention_mask"] = tokens.to(inputs["tokens"].device), mask.to(inputs["tokens"].device)
        if self.concept_mode == "image_tokens":
            if batch.concepts is None:
                raise ValueError("techniques.concept_mode='image_tokens' but the training shards have no 'concepts' "
                                 "column: mine them with `vlscale concepts`")
            picked = self.concepts.sample_lists(batch.concepts, batch.keys, step)
            inputs.update({k: v.to(device) for k, v in self.module.concept_inputs(picked).items()})
        if self.mixup is not None:
            rows = inputs["pixels"].shape[0]
            # Global partner indices: every rank holds the same rows this step (the trainer cuts the
            # ranks' batches to one length), so this rank's first row is rank × rows — not
            # rank × micro_batch, which a short step would shift onto the wrong samples.
            self.plan = self.mixup.plan(step, rows, offset=self.rank * rows)
            if inputs["pixels"].is_floating_point():
                inputs["pixels"] = self.plan.mix_pixels(inputs["pixels"])
            else:  # uint8: mixed on the device, chunk by chunk, after normalisation (same arithmetic)
                self.feed = self.pixel_feed.with_lam(self.plan.image_lam(inputs["pixels"]))
            if self.plan.mixes_image and self.plan.lam < 0.5 and "concept_tokens" in inputs:
                # A mixed image keeps the concepts of its dominant source image.
                for key in ("concept_tokens", "concept_mask"):
                    inputs[key] = inputs[key].flip(0)
        if self.momentum is not None:
            self.momentum.update(self._master_params(), self.module.named_buffers())  # EMA of the last step's weights
            self.keys = self.momentum.encode_keys(inputs, self.chunk_sizes or None, feed=self.feed)
        if self.mim is not None:
            self.mim.start_step(step, inputs["pixels"].shape[0])
        return inputs

    # -- the loss ------------------------------------------------------------------------------
    def _targets(self, query_mixed: bool, key_mixed: bool, *, local: bool = False) -> Any:
        if self.plan is None:
            return None
        return self.plan.targets(query_mixed=query_mixed, key_mixed=key_mixed, local=local)

    def __call__(self, embs: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        scale = embs["logit_scale"]
        plan = self.plan
        img_mixed, txt_mixed = (plan.mixes_image, plan.mixes_text) if plan is not None else (False, False)
        text = plan.mix_text(embs["text"]) if plan is not None else embs["text"]
        kw = {"impl": self.impl, "process_group": self.process_group}
        metrics = {"logit_scale": float(scale.detach().reshape(-1)[0])}
        terms: list[Tensor] = []
        if self.contrastive_weight > 0:
            value = contrastive_loss(embs["image"], text, scale, mix=self._targets(img_mixed, txt_mixed), **kw)
            terms.append(self.contrastive_weight * value)
            metrics["loss/contrastive"] = float(value.detach())
        if self.hier_weight:
            # Only the final text embedding is mixed: the text levels are plain.
            hier, parts = hierarchical_loss(embs, scale, weight=self._hier_weights(),
                                            mix=self._targets(img_mixed, False), **kw)
            if hier is not None:
                terms.append(hier)
                metrics.update({f"loss/{k}": v for k, v in parts.items()})
        if self.momentum is not None and self.keys is not None:
            local = self.momentum.candidates == "positive_queue"
            i2t, t2i = self.momentum.loss_terms(
                {"image": embs["image"], "text": text}, self.keys, scale,
                mix_i2t=self._targets(img_mixed, False, local=local),       # text keys are never mixed
                mix_t2i=self._targets(txt_mixed, img_mixed, local=local), **kw)  # image keys: mixed pixels
            moco = 0.5 * (i2t + t2i)
            terms.append(self.momentum_weight * moco)
            metrics.update({"loss/momentum": float(moco.detach()), "loss/momentum_i2t": float(i2t.detach()),
                            "loss/momentum_t2i": float(t2i.detach())})
        if plan is not None:
            metrics.update({"mixup/lam": float(plan.lam), "mixup/image": float(img_mixed)})
        loss = terms[0]
        for term in terms[1:]:
            loss = loss + term
        return loss, metrics

    def _hier_weights(self) -> float | tuple[float, ...]:
        w = self.hier_weight
        return tuple(w) if isinstance(w, list) else float(w)

    # -- after the step ----------------------------------------------------------------------
    def finish(self) -> None:
        if self.momentum is not None and self.keys is not None:
            self.momentum.enqueue(self.keys, process_group=self.process_group)
        self.keys = None

    def state_dict(self) -> dict[str, Any]:
        """Technique state a resume needs: the momentum EMA and queues (identical on every rank, so
        saved by rank 0 only; the rest of the objective is stateless)."""
        if self.momentum is None:
            return {"momentum": None}
        return {"momentum": self.momentum.state_dict() if self.rank == 0 else "rank0"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the momentum state; every rank calls it (rank 0's copy is broadcast)."""
        if self.momentum is None:
            return
        saved = state.get("momentum")
        if saved is None:
            raise ValueError("the checkpoint has no momentum-contrast state, but techniques.momentum_queue > 0")
        if isinstance(saved, dict):
            self.momentum.load_state_dict(saved)
        elif self.rank == 0:
            raise ValueError("the checkpoint's rank-0 file has no momentum-contrast state (saved with another rank 0?)")
        self.momentum.broadcast_(0, self.process_group)


def build_loss_fn(cfg: Config, *, process_group: Any, engine: Any = None, module: nn.Module | None = None,
                  tokenizer: Any = None, rank: int = 0, micro_batch: int = 0,
                  chunk_sizes: dict[str, int] | None = None, pixel_norm: tuple[Any, Any] | None = None) -> Objective:
    """The run's objective (see the module docstring)."""
    return Objective(cfg, process_group=process_group, engine=engine, module=module, tokenizer=tokenizer,
                     rank=rank, micro_batch=micro_batch, chunk_sizes=chunk_sizes, pixel_norm=pixel_norm)


__all__ = ["Objective", "build_loss_fn"]
