"""Zero-shot retrieval of the model being trained (or of a loaded checkpoint) on held-out shards.

The embedding and the metrics are :mod:`vlscale.eval`'s (``embed_dataset``, ``retrieval_metrics``);
this module drives them: the deterministic eval loader, the forward through the engine (so that
DeepSpeed's fp16 input cast and ZeRO-3 / FSDP2 parameter gathering happen), and which ranks run.
With ZeRO-3 or FSDP2 every rank must run the forward (parameters are gathered collectively);
otherwise rank 0 evaluates alone while the others wait at a barrier.

Names: training logs follow open_clip (``image_to_text_R@1``, ``text_to_image_R@5``, … as
fractions, logged under ``eval/``), so curves compare with open_clip runs; ``vlscale eval`` writes
CLIP_benchmark's names (see :mod:`vlscale.eval.cli`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from vlscale.config import Config


class EngineModule(nn.Module):
    """An ``nn.Module`` face for an engine adapter (what ``embed_dataset`` expects)."""

    def __init__(self, engine: Any) -> None:
        super().__init__()
        self._engine = [engine]  # a list: keep the engine out of this module's children

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self._engine[0].module.parameters(recurse)

    def train(self, mode: bool = True) -> EngineModule:
        self.training = mode
        self._engine[0].module.train(mode)
        return self

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        return self._engine[0].forward(**inputs)

    def concept_inputs(self, concepts: list[list[str]] | None) -> dict[str, Tensor]:
        """The model's ViCHA concept-token inputs (``{}`` when it takes none); see ``embed_dataset``."""
        fn = getattr(self._engine[0].module, "concept_inputs", None)
        return fn(concepts) if fn is not None else {}


def _collective_forward(engine: Any) -> bool:
    if engine is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    if engine.kind == "fsdp":
        return True
    return engine.kind == "deepspeed" and engine.raw.zero_optimization_stage() == 3


def eval_loader(cfg: Config, shards: str, tokenizer: Any, data_config: Mapping | None) -> Any:
    """The whole held-out set in a fixed order, every row, center-cropped (same on every rank)."""
    from vlscale.data import build_loader

    return build_loader(shards, tokenizer=tokenizer, image_size=cfg.data.image_size or None,
                        data_config=None if cfg.data.image_size else data_config, train=False,
                        batch_size=cfg.eval.batch_size, rank=0, world_size=1, num_workers=0,
                        seed=0, shuffle=False, drop_last=False, max_length=cfg.model.context_length,
                        on_error="skip")


def evaluate_retrieval(engine_or_model: Any, cfg: Config, tokenizer: Any, data_config: Mapping | None,
                       shards: str) -> dict[str, float]:
    """Retrieval metrics (open_clip names, fractions; rsum, ranks, counts) on ``shards``; {} on
    ranks that sat out."""
    from vlscale.eval import embed_dataset, retrieval_metrics

    engine = None if isinstance(engine_or_model, nn.Module) else engine_or_model
    model = engine_or_model if engine is None else EngineModule(engine)
    collective = _collective_forward(engine)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    results: dict[str, float] = {}
    if collective or rank == 0:
        loader = eval_loader(cfg, shards, tokenizer, data_config)
        img, txt, t2i = embed_dataset(model, loader, group_by="key", max_batches=cfg.eval.max_batches or None)
        if rank == 0:
            results = retrieval_metrics(img, txt, t2i, ks=tuple(cfg.eval.ks), chunk=cfg.eval.chunk,
                                        names="open_clip")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return results
