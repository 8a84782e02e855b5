"""Gradient caching (ZeroVL's decoupled gradient accumulation) beneath DeepSpeed, FSDP2 or torch.

``GradCache(engine, chunk_size=...).step(inputs, loss_fn)`` accumulates the exact gradient of one
big contrastive batch while holding the activations of one chunk at a time; see :mod:`.cache`.
"""

from vlscale.gradcache.cache import TOWER_INPUTS, ChunkContext, ChunkLossFn, GradCache, LossFn, StepResult

__all__ = ["TOWER_INPUTS", "ChunkContext", "ChunkLossFn", "GradCache", "LossFn", "StepResult"]
