"""Memory model and memory profiling: does a configuration fit before GPU hours are spent?

* :mod:`vlscale.memory.model` — per-rank prediction (ZeRO model states, one chunk's activations,
  O(B·D) embeddings, O(B) loss statistics, loss working buffers), peak over the phases of a step,
  :func:`max_global_batch`; :mod:`vlscale.memory.lossmem` — the loss backend a device kind runs and
  its buffers; :mod:`vlscale.memory.techmem` — momentum contrast, hierarchical levels, MIM.
* :mod:`vlscale.memory.tracker` — :class:`MemoryTracker` (peak per phase: CUDA allocator, sampled
  RSS, or exact live tensor bytes) for the training loop and the demo.
* :mod:`vlscale.memory.towers` — parameter counts on the meta device and measured activation bytes.
* :mod:`vlscale.memory.workload` — one rank's gradient-cached step with the other ranks simulated,
  to compare measured peaks with predictions.
* :mod:`vlscale.memory.plan` — a recipe + world size + GPU → the prediction's inputs, the three
  strategies (naive / fused / fused_gradcache) with their largest global batch, the verdict.
* :mod:`vlscale.memory.measure` — a few real trainer steps, or one simulated rank under a CUDA
  memory cap; :mod:`vlscale.memory.phases` — the per-phase record the trainer writes to memory.json.
* :mod:`vlscale.memory.report` — report.md / report.json / PNG plots; :mod:`vlscale.memory.cli` —
  ``vlscale memory plan | measure | report``.

See docs/memory.md.
"""

from vlscale.memory.model import (
    GIB,
    MIB,
    PRECISIONS,
    MemoryEstimate,
    PrecisionSpec,
    deepspeed_bucket_bytes,
    max_global_batch,
    model_state_bytes,
    predict_memory,
)
from vlscale.memory.tracker import LiveTensorBytes, MemoryTracker, PhaseRecord

__all__ = [
    "GIB",
    "MIB",
    "PRECISIONS",
    "LiveTensorBytes",
    "MemoryEstimate",
    "MemoryTracker",
    "PhaseRecord",
    "PrecisionSpec",
    "deepspeed_bucket_bytes",
    "max_global_batch",
    "model_state_bytes",
    "predict_memory",
]
