"""Peak memory per phase of real training steps, observed from outside the gradient cache.

:class:`StepPhases` wraps three calls a training loop already makes — ``GradCache.step``, the loss
function it passes in, the feed that makes each chunk's inputs, and ``engine.optimizer_step`` — and
switches a :class:`~vlscale.memory.tracker.MemoryTracker` between the phases the memory model
predicts (:mod:`vlscale.memory.model`):

``embed``      from the start of ``GradCache.step`` to the loss call (pass 1, no graph);
``loss``       the loss and d(loss)/d(embeddings), up to pass 3's first feed call (the chunk's
               device inputs: uint8 pixels normalised to float, host rows copied);
``reforward``  pass 3, up to the end of ``GradCache.step``;
``fwd_bwd``    the whole ``GradCache.step`` when the cache is off (one plain step);
``step``       ``engine.optimizer_step()``.

Only ``steps`` steps after the first ``skip`` are recorded (the first step creates the gradients
and optimizer states, which the model counts in every phase), so a long run pays nothing after
them. The trainer writes :meth:`StepPhases.summary` into ``memory.json``; ``vlscale memory report``
puts it beside the prediction.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from vlscale.gradcache.transfer import chunk_to
from vlscale.memory.tracker import MemoryTracker


class StepPhases:
    """Records the phases of training steps ``skip … skip + steps − 1`` (0-based calls of ``GradCache.step``)."""

    def __init__(self, device: torch.device | str, *, steps: int = 3, skip: int = 1, backend: str = "auto",
                 interval: float = 0.002) -> None:
        if steps < 0 or skip < 0:
            raise ValueError(f"steps and skip must be >= 0, got {steps}, {skip}")
        self.tracker = MemoryTracker(device, backend=backend, interval=interval)
        self.steps, self.skip = steps, skip
        self.calls = 0
        self.recorded: list[int] = []
        self._tracking: contextlib.ExitStack | None = None
        self._pending_step = False

    # -- wiring --------------------------------------------------------------------------------
    def attach(self, *, gradcache: Any, engine: Any) -> StepPhases:
        """Wrap ``gradcache.step`` (and the feed it is given) and ``engine.optimizer_step`` (instance
        attributes: the classes are untouched). With ``steps=0`` nothing is wrapped."""
        if self.steps == 0:
            return self
        step, optimizer_step = gradcache.step, engine.optimizer_step
        plain = getattr(gradcache, "plain", getattr(gradcache, "chunk_size", 1) is None)

        def tracked_step(inputs: Any, loss_fn: Any, *args: Any, **kwargs: Any) -> Any:
            index, self.calls = self.calls, self.calls + 1
            self._pending_step = False  # a skipped optimizer step (non-finite loss) is not recorded
            if not self.skip <= index < self.skip + self.steps:
                self._close_tracking()
                return step(inputs, loss_fn, *args, **kwargs)
            self._open_tracking()
            self.recorded.append(index)

            def tracked_loss(embs: Any) -> Any:
                if self.tracker.active == "embed":
                    self.tracker.switch("loss")
                return loss_fn(embs)

            if not plain:  # pass 3 starts where its first chunk's inputs are made
                kwargs["feed"] = self._tracked_feed(kwargs.get("feed") or chunk_to)
            self.tracker.begin("fwd_bwd" if plain else "embed")
            try:
                return step(inputs, loss_fn if plain else tracked_loss, *args, **kwargs)
            finally:
                self.tracker.end()
                self._pending_step = True

        def tracked_optimizer_step(*args: Any, **kwargs: Any) -> Any:
            if not self._pending_step:
                return optimizer_step(*args, **kwargs)
            self._pending_step = False
            self.tracker.begin("step")
            try:
                return optimizer_step(*args, **kwargs)
            finally:
                self.tracker.end()
                if self.recorded and self.recorded[-1] == self.skip + self.steps - 1:
                    self._close_tracking()

        gradcache.step = tracked_step
        engine.optimizer_step = tracked_optimizer_step
        return self

    def _tracked_feed(self, feed: Any) -> Any:
        def tracked(*args: Any, **kwargs: Any) -> Any:
            if self.tracker.active == "loss" and torch.is_grad_enabled():
                self.tracker.switch("reforward")
            return feed(*args, **kwargs)

        return tracked

    def _open_tracking(self) -> None:
        # One tracking window over all recorded steps: what a step re-creates (e.g. DeepSpeed's
        # reduce bucket, re-allocated at each step's first backward) is then counted at the start of
        # the next step, and the last step shows the steady state.
        if self._tracking is None:
            self._tracking = contextlib.ExitStack()
            self._tracking.enter_context(self.tracker.tracking())

    def _close_tracking(self) -> None:
        if self._tracking is not None:
            self._tracking.close()
            self._tracking = None

    # -- results -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Per phase, the last recorded step (the steady state): start, peak and growth (peak − start)
        in bytes; over all recorded steps: the largest peak and growth and the mean seconds. JSON-able."""
        self._close_tracking()
        phases: dict[str, dict[str, float]] = {}
        for r in self.tracker.records:
            p = phases.setdefault(r.name, {"max_peak_bytes": 0, "max_delta_bytes": 0, "seconds": 0.0, "count": 0})
            p.update(start_bytes=r.start_bytes, peak_bytes=r.peak_bytes, delta_bytes=r.delta_bytes)
            p["max_peak_bytes"] = max(p["max_peak_bytes"], r.peak_bytes)
            p["max_delta_bytes"] = max(p["max_delta_bytes"], r.delta_bytes)
            p["seconds"] += r.seconds
            p["count"] += 1
        for p in phases.values():
            p["seconds"] /= max(1, p["count"])
        out: dict[str, Any] = {"backend": self.tracker.backend, "device": str(self.tracker.device),
                               "steps": [i + 1 for i in self.recorded], "phases": phases}
        if self.tracker.backend == "cuda":
            out["run_peak_bytes"] = max(self.tracker.run_peak, int(torch.cuda.max_memory_allocated(self.tracker.device)))
            out["device_total_bytes"] = int(torch.cuda.get_device_properties(self.tracker.device).total_memory)
        return out

    def merge_into(self, stats: dict[str, Any]) -> dict[str, Any]:
        """``stats`` (:func:`vlscale.train.metrics.memory_stats`) plus ``"phases"``; the CUDA peak is the
        whole run's (the phases reset the allocator's peak counter)."""
        if self.steps == 0:
            return stats
        summary = self.summary()
        if "run_peak_bytes" in summary and "mem/cuda_max_alloc_mib" in stats:
            stats["mem/cuda_max_alloc_mib"] = max(stats["mem/cuda_max_alloc_mib"], summary["run_peak_bytes"] / 2**20)
        return stats | {"phases": summary}
