"""The training objective handed to the gradient cache, and the per-step technique hooks.

``Objective.prepare(step, batch, inputs)`` runs before the step (it may change the inputs);
``Objective(embs) -> (loss, metrics)`` is the gradient cache's ``loss_fn`` (``embs`` holds the whole
per-rank batch's outputs as detached fp32 leaves); ``Objective.finish()`` runs after the optimizer
step. The loss is the symmetric contrastive loss of :mod:`vlscale.loss` over all ranks' pairs, plus,
when enabled (see :mod:`vlscale.techniques`):

- ZeroVL coin-flip mixup: pixels mixed in ``prepare``, text embeddings mixed here, soft targets;
- ViCHA visual concepts: sampled concepts appended to the captions, re-tokenised in ``prepare``;
- ViCHA hierarchical alignment: ``techniques.hier_weight`` × the loss on each intermediate level;
- WenLan momentum contrast: the EMA towers' keys and queues, an InfoNCE term added to the loss
  (EMA update and key encoding in ``prepare``, enqueue in ``finish``).

Every random draw is a pure function of (seed, step[, sample key]), so ranks agree without
communicating and a resumed run replays them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vlscale.config import Config
from vlscale.loss import contrastive_loss
from vlscale.techniques import CoinFlipMixup, ConceptSampler, MomentumContrast, hierarchical_loss


class Objective:
    """Callable loss for :meth:`vlscale.gradcache.GradCache.step` with the techniques' hooks."""

    def __init__(self, cfg: Config, *, process_group: Any, module: nn.Module, tokenizer: Any, rank: int,
                 micro_batch: int) -> None:
        tech, seed = cfg.techniques, cfg.train.seed
        self.impl, self.process_group, self.module = cfg.loss.impl, process_group, module
        self.tokenizer, self.max_length = tokenizer, cfg.model.context_length
        self.offset = rank * micro_batch  # this rank's first row in the global batch
        self.hier_weight = tech.hier_weight
        if self.hier_weight > 0 and cfg.model.n_hier == 0:
            raise ValueError("techniques.hier_weight > 0 needs model.hier_image_layers / hier_text_layers")
        self.mixup = CoinFlipMixup(alpha=tech.mixup_alpha, seed=seed) if tech.mixup else None
        self.concepts = ConceptSampler(p=tech.concept_prob, seed=seed) if tech.concept_prob > 0 else None
        self.momentum = None
        if tech.momentum_queue:
            self.momentum = MomentumContrast(module, queue_size=tech.momentum_queue,
                                             embed_dim=cfg.model.embed_dim, momentum=tech.momentum)
        self.plan: Any = None
        self.keys: dict[str, Tensor] | None = None

    # -- before the step ---------------------------------------------------------------------
    def prepare(self, step: int, batch: Any, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inputs of optimizer step ``step`` (0-based) with concepts / mixup / momentum keys."""
        if self.concepts is not None and batch.concepts is not None:
            tokens, mask = self.concepts.tokenize(self.tokenizer, batch.captions, batch.concepts,
                                                  max_length=self.max_length, keys=batch.keys, step=step)
            inputs["tokens"], inputs["attention_mask"] = tokens.to(inputs["tokens"].device), mask.to(inputs["tokens"].device)
        if self.mixup is not None:
            self.plan = self.mixup.plan(step, inputs["pixels"].shape[0], offset=self.offset)
            inputs["pixels"] = self.plan.mix_pixels(inputs["pixels"])
        if self.momentum is not None:
            self.momentum.update(self.module)  # EMA of the weights the previous step produced
            dtype = next(self.momentum.ema.parameters()).dtype  # fp16 / bf16 under DeepSpeed
            self.keys = self.momentum.encode_keys(pixels=inputs["pixels"].to(dtype), tokens=inputs["tokens"],
                                                  attention_mask=inputs.get("attention_mask"))
        return inputs

    # -- the loss ------------------------------------------------------------------------------
    def __call__(self, embs: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        scale = embs["logit_scale"]
        mix, text = None, embs["text"]
        if self.plan is not None:
            mix, text = self.plan.mix(text.device), self.plan.mix_text(text)
        kw = {"mix": mix, "impl": self.impl, "process_group": self.process_group}
        loss = contrastive_loss(embs["image"], text, scale, **kw)
        metrics = {"logit_scale": float(scale.detach().reshape(-1)[0]), "loss/contrastive": float(loss.detach())}
        if self.hier_weight > 0:
            hier, parts = hierarchical_loss(embs, scale, weight=self.hier_weight, **kw)
            if hier is not None:
                loss = loss + hier
                metrics.update({f"loss/{k}": v for k, v in parts.items()})
        if self.momentum is not None and self.keys is not None:
            moco = self.momentum.loss({"image": embs["image"], "text": text}, self.keys, scale, **kw)
            loss = loss + moco
            metrics["loss/momentum"] = float(moco.detach())
        if self.plan is not None:
            metrics.update({"mixup/lam": float(self.plan.lam), "mixup/image": float(self.plan.mode == "image")})
        return loss, metrics

    # -- after the step ----------------------------------------------------------------------
    def finish(self) -> None:
        if self.momentum is not None and self.keys is not None:
            self.momentum.enqueue(self.keys, process_group=self.process_group)
        self.keys = None

    def state_dict(self) -> dict[str, Any]:
        """Technique state a resume needs (the momentum towers and queues; the rest is stateless)."""
        return {"momentum": self.momentum.state_dict() if self.momentum is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.momentum is not None:
            if state.get("momentum") is None:
                raise ValueError("the checkpoint has no momentum-contrast state, but techniques.momentum_queue > 0")
            self.momentum.load_state_dict(state["momentum"])


def build_loss_fn(cfg: Config, *, process_group: Any, module: nn.Module, tokenizer: Any = None, rank: int = 0,
                  micro_batch: int = 0) -> Objective:
    """The run's objective (see the module docstring)."""
    return Objective(cfg, process_group=process_group, module=module, tokenizer=tokenizer, rank=rank,
                     micro_batch=micro_batch)


__all__ = ["Objective", "build_loss_fn"]
