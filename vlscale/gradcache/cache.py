"""Gradient caching (ZeroVL's decoupled gradient accumulation) beneath any engine adapter.

One :meth:`GradCache.step` computes the gradient of one big contrastive batch while holding the
activations of one chunk at a time:

1. embed every chunk of each tower without a graph, recording the RNG state before each chunk;
2. concatenate the embeddings into detached fp32 leaves, call ``loss_fn`` once (it gathers across
   ranks when there is a process group) and take d(loss)/d(embeddings) — fp32, unscaled;
3. re-forward each chunk under its recorded RNG state and back-propagate the surrogate
   ``⟨embeddings, cached gradient⟩`` through the engine; only the last chunk is a reduction
   boundary. ``logit_scale`` (returned by every forward) receives ``⟨logit_scale, cached grad⟩``
   from the last chunk only, so it gets its gradient exactly once.

Gradient convention with several ranks: ``loss_fn`` must return, on every rank, gradients w.r.t.
the local embeddings equal to ``world_size ×`` the local share of d(global loss), and the plain
d(loss)/d(logit_scale); the engines *average* over ranks, which then gives exactly the
single-process gradient of the global batch. (The distributed loss follows this convention.)

Host-resident inputs: ``inputs`` may live on the host (ideally pinned) while the model is on a
GPU; each chunk's rows are moved to ``engine.device`` right before its forward, in both passes,
and the whole batch is never moved (see :mod:`.transfer`). The only O(B·D) device state of a
step is then the cached embeddings (written chunk by chunk into one preallocated fp32 buffer per
output, freed once the loss has been differentiated) and their cached gradients.

BatchNorm: chunks are normalised with per-chunk statistics (ghost batch norm, warned about once);
running statistics move once per step, in the no-grad pass only (see :mod:`.batchnorm`).

Per-chunk losses (``step(..., chunk_loss=fn)``): objectives that need a chunk's inputs and a graph
but not the whole batch — e.g. ViCHA's masked image modeling — are added by a hook that runs in
pass 3, right after each chunk's re-forward, under that chunk's replayed RNG state
(:class:`ChunkContext`). Its scalar joins the chunk's surrogate, so its gradient is added exactly
once (never in the no-grad pass). In the plain path it runs once per tower over the whole batch,
after the forward. The hook's values are a rank-local objective whose gradient the engines average
over ranks like every other gradient; the step's reported loss adds their mean over ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlscale.engines.base import EngineAdapter
from vlscale.gradcache import batchnorm, rng, transfer

log = logging.getLogger(__name__)

LossFn = Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, float]]]

# Which inputs belong to which tower: a chunk forward carries one tower's inputs only.
TOWER_INPUTS: dict[str, tuple[str, ...]] = {"image": ("pixels", "concept_tokens", "concept_mask"),
                                            "text": ("tokens", "attention_mask")}
_PRIMARY = {"image": "pixels", "text": "tokens"}


@dataclass
class StepResult:
    """Outcome of one step: the loss (detached fp32 scalar), the loss's metrics, chunk counts."""

    loss: Tensor
    metrics: dict[str, float]
    num_chunks: dict[str, int] = field(default_factory=dict)
    finite: bool = True


@dataclass
class ChunkContext:
    """What a per-chunk loss hook sees: one chunk of one tower, during its re-forward with a graph.

    ``inputs`` are on the engine's device, ``outputs`` carry the graph; ``forward`` runs the model
    through the engine (an extra forward of this chunk, e.g. a masked one, whose parameters get
    gathered and reduced like any other); rows ``[start, stop)`` of the tower's ``batch_size``."""

    tower: str
    start: int
    stop: int
    batch_size: int
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    forward: Callable[..., dict[str, Tensor]]


ChunkLossFn = Callable[[ChunkContext], "Tensor | None"]


@dataclass
class _Chunk:
    tower: str
    start: int
    stop: int
    state: rng.RngState
    offsets: dict[str, int]  # row of each per-sample output inside the concatenated embeddings


class GradCache:
    """Two-pass gradient-cached step over an :class:`EngineAdapter`.

    ``chunk_size``: rows per chunk for both towers (None with no ``chunk_sizes`` = one plain
    big-batch step, the reference path). ``chunk_sizes``: per-tower override, e.g.
    ``{"image": 128, "text": 512}``. ``replay_rng=False`` disables the RNG replay (for tests
    and ablations only: with dropout the gradient is then wrong). ``global_keys``: outputs that
    are per-model, not per-sample (taken once from the first chunk).
    """

    def __init__(
        self,
        engine: EngineAdapter,
        chunk_size: int | None = 256,
        chunk_sizes: dict[str, int] | None = None,
        *,
        replay_rng: bool = True,
        global_keys: tuple[str, ...] = ("logit_scale",),
    ) -> None:
        sizes = dict(chunk_sizes or {})
        unknown = set(sizes) - set(TOWER_INPUTS)
        if unknown:
            raise ValueError(f"chunk_sizes keys must be among {sorted(TOWER_INPUTS)}, got {sorted(unknown)}")
        for name, value in [("chunk_size", chunk_size), *sizes.items()]:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self.engine = engine
        self.chunk_size = chunk_size
        self.chunk_sizes = sizes
        self.plain = chunk_size is None and not sizes
        self.replay_rng = replay_rng
        self.global_keys = global_keys
        self._bn_warned = False
        self._host_logged = False
        self._feed: transfer.ChunkFeed = transfer.chunk_to

    # -- public ------------------------------------------------------------------------------
    def step(self, inputs: dict[str, Tensor], loss_fn: LossFn, *, chunk_loss: ChunkLossFn | None = None,
             feed: transfer.ChunkFeed | None = None) -> StepResult:
        """Accumulate the gradient of ``loss_fn`` (plus ``chunk_loss`` per chunk) over the whole
        batch into the engine.

        ``inputs`` may be on the engine's device or on the host (pin them for asynchronous
        copies): only the chunk about to run is moved to ``engine.device``, by ``feed`` (default
        :func:`~vlscale.gradcache.transfer.chunk_to`), in both passes; the per-chunk loss sees what
        ``feed`` returned."""
        towers = _split_inputs(inputs)
        device = self.engine.device
        self._feed = feed or transfer.chunk_to
        self._log_placement(towers, device)
        if self.plain:
            return self._plain_step(towers, loss_fn, device, chunk_loss)
        chunks, embs = self._embed(towers, device)
        loss, metrics, grads = _loss_and_grads(loss_fn, embs)
        del embs  # the replay needs only the gradients: keep one O(B·D) set on the device
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads.values())
        if not finite:
            # Still back-propagate: an fp16 engine must see the overflow to skip the step and
            # lower its loss scale exactly as for a plain step.
            log.warning("gradcache: non-finite loss or embedding gradient (loss=%s)", float(loss))
        extra = self._replay(towers, chunks, grads, device, chunk_loss)
        counts = {t: sum(c.tower == t for c in chunks) for t in towers}
        return self._result(loss, metrics, counts, finite, extra)

    def _result(self, loss: Tensor, metrics: dict[str, float], counts: dict[str, int], finite: bool,
                extra: Tensor | None) -> StepResult:
        """The step's outcome; per-chunk loss values (rank-local) join the loss as their rank mean."""
        loss = loss.detach().float().reshape(())
        if extra is not None:
            extra = extra.detach().float().reshape(1).to(loss.device)
            if self.engine.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(extra, group=self.engine.process_group)
                extra /= self.engine.world_size
            metrics = {**metrics, "chunk_loss": float(extra)}
            loss = loss + extra.reshape(())
            finite = finite and bool(torch.isfinite(loss))
        return StepResult(loss, metrics, counts, finite)

    # -- pass 1: embed without a graph ---------------------------------------------------------
    def _chunk_size(self, tower: str, batch: int) -> int:
        size = self.chunk_sizes.get(tower, self.chunk_size)
        return batch if size is None else size

    def _log_placement(self, towers: dict[str, dict[str, Tensor]], device: torch.device) -> None:
        if self._host_logged:
            return
        note = transfer.describe({k: v for tin in towers.values() for k, v in tin.items()}, device)
        if note is not None:
            log.info(note)
            self._host_logged = True

    @torch.no_grad()
    def _embed(self, towers: dict[str, dict[str, Tensor]],
               device: torch.device) -> tuple[list[_Chunk], dict[str, Tensor]]:
        with batchnorm.single_update(self._batchnorms()):
            return self._embed_chunks(towers, device)

    def _embed_chunks(self, towers: dict[str, dict[str, Tensor]],
                      device: torch.device) -> tuple[list[_Chunk], dict[str, Tensor]]:
        chunks: list[_Chunk] = []
        buffers = _EmbedBuffers()
        glob: dict[str, Tensor] = {}
        for tower, tin in towers.items():
            batch = tin[_PRIMARY[tower]].shape[0]
            size = self._chunk_size(tower, batch)
            for start in range(0, batch, size):
                stop = min(start + size, batch)
                state = rng.capture(device)
                out = self.engine.forward(**self._feed(tin, start, stop, device))
                offsets: dict[str, int] = {}
                for key, value in out.items():
                    if key in self.global_keys:
                        glob.setdefault(key, value.detach().float())
                        continue
                    _check_rows(key, value, stop - start)
                    offsets[key] = buffers.write(key, tower, batch, start, value.detach())
                del out  # this chunk's outputs now live in the buffers only
                chunks.append(_Chunk(tower, start, stop, state, offsets))
        embs = buffers.finish()
        embs.update(glob)
        return chunks, embs

    # -- pass 3: re-forward and back-propagate the surrogate ----------------------------------
    def _replay(self, towers: dict[str, dict[str, Tensor]], chunks: list[_Chunk], grads: dict[str, Tensor],
                device: torch.device, chunk_loss: ChunkLossFn | None) -> Tensor | None:
        last = len(chunks) - 1
        total: Tensor | None = None
        with batchnorm.frozen(self._batchnorms()), self.engine.accumulate(), rng.preserved(device):
            for i, chunk in enumerate(chunks):
                boundary = i == last
                with self.engine.micro_step(boundary=boundary):
                    if self.replay_rng:
                        rng.restore(chunk.state)
                    tin = self._feed(towers[chunk.tower], chunk.start, chunk.stop, device)
                    out = self.engine.forward(**tin)
                    surrogate = self._surrogate(out, grads, chunk, boundary)
                    if chunk_loss is not None:
                        rows = towers[chunk.tower][_PRIMARY[chunk.tower]].shape[0]
                        ctx = ChunkContext(chunk.tower, chunk.start, chunk.stop, rows, tin, out, self.engine.forward)
                        extra = _check_chunk_loss(chunk_loss(ctx))
                        if extra is not None:
                            surrogate = surrogate + extra.float()
                            total = extra.detach() if total is None else total + extra.detach()
                        del ctx, extra
                    self.engine.backward(surrogate, boundary=boundary)
                    del out, surrogate, tin  # free this chunk's graph and inputs before the next one
        return total

    def _surrogate(self, out: dict[str, Tensor], grads: dict[str, Tensor], chunk: _Chunk, last: bool) -> Tensor:
        """⟨outputs, cached gradient⟩ for this chunk; the global keys join on the last chunk only."""
        per_sample = {k for k in out if k not in self.global_keys}
        if per_sample != set(chunk.offsets):
            raise RuntimeError(f"gradcache: the re-forward returned {sorted(per_sample)}, the first pass "
                               f"{sorted(chunk.offsets)}")
        rows = chunk.stop - chunk.start
        terms: list[Tensor] = []
        for key, value in out.items():
            if key in self.global_keys:
                if last and key in grads:
                    terms.append((value.float() * grads[key]).sum())
            elif key in grads:
                g = grads[key][chunk.offsets[key] : chunk.offsets[key] + rows]
                terms.append((value.float() * g).sum())
        if not terms:
            raise ValueError(f"gradcache: the loss uses none of this chunk's outputs {sorted(out)}")
        return torch.stack(terms).sum()

    # -- reference path ----------------------------------------------------------------------
    def _plain_step(self, towers: dict[str, dict[str, Tensor]], loss_fn: LossFn, device: torch.device,
                    chunk_loss: ChunkLossFn | None) -> StepResult:
        """One forward over the whole batch with a graph, one backward: the exact reference.
        (Host-resident inputs are moved whole here: this path holds the whole batch by design.)"""
        fed = {tower: self._feed(tin, 0, tin[_PRIMARY[tower]].shape[0], device) for tower, tin in towers.items()}
        extra: Tensor | None = None
        with self.engine.micro_step(boundary=True):
            out = self.engine.forward(**{k: v for tin in fed.values() for k, v in tin.items()})
            embs = {k: v.float() for k, v in out.items()}
            loss, metrics = loss_fn(embs)
            _check_loss(loss)
            total = loss.float()
            if chunk_loss is not None:  # the whole batch is one chunk per tower
                for tower, tin in fed.items():
                    rows = tin[_PRIMARY[tower]].shape[0]
                    term = _check_chunk_loss(chunk_loss(ChunkContext(tower, 0, rows, rows, tin, out,
                                                                     self.engine.forward)))
                    if term is not None:
                        total = total + term.float()
                        extra = term.detach() if extra is None else extra + term.detach()
            self.engine.backward(total, boundary=True)
        counts = {t: 1 for t in towers}
        return self._result(loss, metrics, counts, bool(torch.isfinite(loss)), extra)

    # -- BatchNorm -----------------------------------------------------------------------------
    def _batchnorms(self) -> list[batchnorm.BatchNorm]:
        layers = batchnorm.batchnorms(self.engine.module)
        if layers and not self._bn_warned:
            log.warning(
                "gradcache: %d BatchNorm layer(s): each chunk is normalised with its own statistics "
                "(ghost batch norm, not the big batch's); running statistics move once per step, towards "
                "the mean of the chunks' statistics", len(layers))
            self._bn_warned = True
        return layers


class _EmbedBuffers:
    """The no-grad pass's outputs, written chunk by chunk into one preallocated fp32 buffer per
    (output, tower) — no list of pieces plus a concatenated copy (which would double the peak)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[tuple[str, Tensor, list[int]]]] = {}  # key -> [(tower, buf, [filled])]

    def write(self, key: str, tower: str, batch: int, start: int, value: Tensor) -> int:
        """Store ``value`` at rows ``start:`` of ``tower``'s buffer; returns its row in the final tensor."""
        parts = self.parts.setdefault(key, [])
        if not parts or parts[-1][0] != tower:  # towers run one after the other: a new tower starts
            parts.append((tower, value.new_empty((batch, *value.shape[1:]), dtype=torch.float32), [0]))
        _, buf, filled = parts[-1]
        if value.shape[1:] != buf.shape[1:]:
            raise ValueError(f"gradcache: output {key!r} changes shape between chunks: "
                             f"{tuple(value.shape[1:])} vs {tuple(buf.shape[1:])}")
        buf[start : start + value.shape[0]].copy_(value)
        filled[0] += value.shape[0]
        return sum(b.shape[0] for _, b, _ in parts[:-1]) + start

    def finish(self) -> dict[str, Tensor]:
        out = {}
        for key, parts in self.parts.items():
            for tower, buf, filled in parts:
                if filled[0] != buf.shape[0]:
                    raise ValueError(f"gradcache: output {key!r} came from only some chunks of the {tower} "
                                     f"tower ({filled[0]} of {buf.shape[0]} rows)")
            # one tower per output (the model contract): the buffer itself, no copy
            out[key] = parts[0][1] if len(parts) == 1 else torch.cat([b for _, b, _ in parts])
        return out


def _split_inputs(inputs: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Group inputs by tower and validate them (ValueError naming the problem)."""
    known = {name for names in TOWER_INPUTS.values() for name in names}
    unknown = set(inputs) - known
    if unknown:
        raise ValueError(f"gradcache: unknown inputs {sorted(unknown)}; expected some of {sorted(known)}")
    towers: dict[str, dict[str, Tensor]] = {}
    for tower, names in TOWER_INPUTS.items():
        tin = {n: inputs[n] for n in names if inputs.get(n) is not None}
        if not tin:
            continue
        if _PRIMARY[tower] not in tin:
            raise ValueError(f"gradcache: {sorted(tin)} given without {_PRIMARY[tower]!r}")
        rows = {n: v.shape[0] for n, v in tin.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"gradcache: {tower} inputs disagree on the batch size: {rows}")
        if next(iter(rows.values())) == 0:
            raise ValueError(f"gradcache: empty {tower} batch")
        towers[tower] = tin
    if not towers:
        raise ValueError("gradcache: no inputs (need pixels and/or tokens)")
    return towers


def _check_rows(key: str, value: Tensor, rows: int) -> None:
    if value.dim() == 0 or value.shape[0] != rows:
        raise ValueError(
            f"gradcache: model output {key!r} has shape {tuple(value.shape)}, expected {rows} rows "
            "(per-model outputs must be listed in global_keys)")


def _check_loss(loss: Tensor) -> None:
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise ValueError(f"gradcache: loss_fn must return a scalar tensor, got {type(loss).__name__}"
                         f"{tuple(loss.shape) if torch.is_tensor(loss) else ''}")


def _check_chunk_loss(value: object) -> Tensor | None:
    if value is None:
        return None
    if not torch.is_tensor(value) or value.numel() != 1:
        raise ValueError(f"gradcache: chunk_loss must return a scalar tensor or None, got {type(value).__name__}"
                         f"{tuple(value.shape) if torch.is_tensor(value) else ''}")
    return value.reshape(())


def _loss_and_grads(loss_fn: LossFn, embs: dict[str, Tensor]) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
    """The loss over all embeddings (fp32 leaves) and its gradient w.r.t. each of them."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in embs.items()}
    with torch.enable_grad():
        loss, metrics = loss_fn(leaves)
        _check_loss(loss)
        if not loss.requires_grad:
            raise ValueError("gradcache: the loss does not depend on any model output")
        used = list(leaves)
        grads = torch.autograd.grad(loss.float().sum(), [leaves[k] for k in used], allow_unused=True)
    out = {k: g for k, g in zip(used, grads) if g is not None}
    if not out:
        raise ValueError("gradcache: the loss does not depend on any model output")
    return loss.detach().float().reshape(()), metrics, out


__all__ = ["TOWER_INPUTS", "ChunkContext", "ChunkLossFn", "GradCache", "LossFn", "StepResult"]
