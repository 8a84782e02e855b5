"""Gradient cache with host-resident inputs: one chunk moved per forward, bit-identical results.

CPU has no second device, so the engine here *reports* the meta device and ``Tensor.to`` is
instrumented: a move to meta is recorded (bytes, non_blocking) and answered with a fresh copy
marked as moved. The model must only ever see moved tensors, each move at most one chunk's rows,
every row moved exactly twice (embedding pass + re-forward), and the gradients, loss and
parameters must equal the on-device path's bit for bit.
"""

from __future__ import annotations

import copy
import logging
import weakref

import pytest
import torch
from helpers_gradcache import TinyDualEncoder, clip_loss, make_batch

from vlscale.engines.local import LocalEngine
from vlscale.gradcache import GradCache, cache, transfer

SIZES = {"image": 4, "text": 3}  # batch 11: image chunks 4,4,3; text chunks 3,3,3,2
FAKE = torch.device("meta")
CHUNK_ROWS = {"pixels": 4, "tokens": 3, "attention_mask": 3}  # the rows one forward may see


class HostEngine(LocalEngine):
    """A local engine whose module is 'on another device'; its forward checks what it is given."""

    def __init__(self, model: torch.nn.Module, *, max_rows: int | None = None, **kw: object) -> None:
        super().__init__(model, **kw)
        self.max_rows = CHUNK_ROWS if max_rows is None else dict.fromkeys(CHUNK_ROWS, max_rows)

    @property
    def device(self) -> torch.device:
        return FAKE

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        for name, value in inputs.items():
            assert getattr(value, "_moved", False), f"{name} reached the model without a move"
            assert value.shape[0] <= self.max_rows[name], f"{name}: {value.shape[0]} rows in one forward"
        return super().forward(**inputs)


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Record every ``Tensor.to(meta)`` as (bytes, non_blocking); answer with a marked copy."""
    record: list[tuple[int, bool]] = []
    original = torch.Tensor.to

    def fake_to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if args and isinstance(args[0], torch.device) and args[0] == FAKE:
            record.append((self.numel() * self.element_size(), bool(kwargs.get("non_blocking", False))))
            out = self.clone()
            out._moved = True
            return out
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    return record


def _pair(batch: int = 11, max_rows: int | None = None):
    torch.manual_seed(0)
    model = TinyDualEncoder(hier=True)
    twin = copy.deepcopy(model)
    host = HostEngine(model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), max_rows=max_rows)
    local = LocalEngine(twin, optimizer=torch.optim.AdamW(twin.parameters(), lr=1e-2))
    return host, local, make_batch(batch, seed=4)


def _step(engine: LocalEngine, inputs: dict, **kw: object):
    torch.manual_seed(7)
    res = GradCache(engine, **kw).step(inputs, clip_loss)
    after = torch.rand(4)  # the RNG must be left where the on-device step leaves it
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None}
    return res, grads, after


def _assert_bitwise_equal(host: LocalEngine, local: LocalEngine, got: tuple, want: tuple) -> None:
    assert torch.equal(got[0].loss, want[0].loss)
    assert got[0].num_chunks == want[0].num_chunks
    assert set(got[1]) == set(want[1]) and got[1]
    for name, g in want[1].items():
        assert torch.equal(got[1][name], g), name
    assert torch.equal(got[2], want[2])
    assert host.optimizer_step() and local.optimizer_step()
    for (name, p), q in zip(host.module.named_parameters(), local.module.parameters()):
        assert torch.equal(p, q), name


def test_host_inputs_move_one_chunk_per_forward_and_match_bitwise(moves: list) -> None:
    host, local, inputs = _pair()
    got = _step(host, inputs, chunk_sizes=SIZES)
    want = _step(local, inputs, chunk_sizes=SIZES)
    _assert_bitwise_equal(host, local, got, want)

    row_bytes = {k: v[0].numel() * v.element_size() for k, v in inputs.items()}
    chunk_bytes = {"pixels": 4 * row_bytes["pixels"], "tokens": 3 * row_bytes["tokens"]}
    assert max(b for b, _ in moves) <= chunk_bytes["pixels"]
    assert all(b < sum(v.numel() * v.element_size() for v in inputs.values()) / 2 for b, _ in moves)
    # (3 image chunks × 1 input + 4 text chunks × 2 inputs) per pass, two passes
    assert len(moves) == 2 * (3 + 4 * 2)
    total = sum(v.numel() * v.element_size() for v in inputs.values())
    assert sum(b for b, _ in moves) == 2 * total, "every row must be moved exactly once per pass"
    assert not any(nb for _, nb in moves), "pageable memory must be copied synchronously"


def test_pinned_host_inputs_are_copied_non_blocking(moves: list, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, **k: self.device.type == "cpu")
    host, _, inputs = _pair()
    with caplog.at_level(logging.INFO, logger="vlscale.gradcache.cache"):
        GradCache(host, chunk_sizes=SIZES).step(inputs, clip_loss)
    assert moves and all(nb for _, nb in moves)
    notes = [r.getMessage() for r in caplog.records if "one chunk at a time" in r.getMessage()]
    assert len(notes) == 1 and "pinned, non_blocking" in notes[0]


def test_single_chunk_size_and_plain_path_with_host_inputs(moves: list) -> None:
    host, local, inputs = _pair(batch=10, max_rows=4)
    got = _step(host, inputs, chunk_size=4)
    want = _step(local, inputs, chunk_size=4)
    _assert_bitwise_equal(host, local, got, want)
    assert len(moves) == 2 * (3 + 3 * 2)

    # chunk_size=None: the reference path holds the whole batch by design and moves it once
    moves.clear()
    host, local, inputs = _pair(batch=6, max_rows=6)
    got = _step(host, inputs, chunk_size=None)
    want = _step(local, inputs, chunk_size=None)
    _assert_bitwise_equal(host, local, got, want)
    assert len(moves) == 3


def test_on_device_inputs_are_never_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        raise AssertionError(f"moved a tensor already on {device}")

    monkeypatch.setattr(transfer, "move", refuse)
    _, local, inputs = _pair()
    res, grads, _ = _step(local, inputs, chunk_sizes=SIZES)
    assert torch.isfinite(res.loss) and grads
    assert transfer.on_device(torch.zeros(1), torch.device("cpu", 0))
    assert not transfer.on_device(torch.zeros(1), FAKE)


def test_embeddings_are_freed_before_the_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """During the re-forward the only O(B·D) state left is the cached gradients."""
    refs: list[weakref.ref] = []
    finish = cache._EmbedBuffers.finish

    def tracked(self: cache._EmbedBuffers) -> dict[str, torch.Tensor]:
        out = finish(self)
        refs.extend(weakref.ref(v) for v in out.values())
        return out

    monkeypatch.setattr(cache._EmbedBuffers, "finish", tracked)
    _, local, inputs = _pair()
    seen: list[int] = []
    forward = local.forward

    def forward_checking(**kw: torch.Tensor) -> dict[str, torch.Tensor]:
        if torch.is_grad_enabled():  # the re-forward
            seen.append(sum(r() is not None for r in refs))
        return forward(**kw)

    monkeypatch.setattr(local, "forward", forward_checking)
    GradCache(local, chunk_sizes=SIZES).step(inputs, clip_loss)
    assert len(refs) == 4 and len(seen) == 7  # image, text, image_hier, text_hier; 3 + 4 re-forwards
    assert seen == [0] * 7, f"embedding buffers still alive during the replay: {seen}"


def test_inconsistent_chunk_outputs_raise() -> None:
    bufs = cache._EmbedBuffers()
    bufs.write("image", "image", 5, 0, torch.ones(3, 2))
    with pytest.raises(ValueError, match="changes shape"):
        bufs.write("image", "image", 5, 3, torch.ones(2, 4))
    with pytest.raises(ValueError, match="only some chunks"):
        bufs.finish()
    bufs = cache._EmbedBuffers()
    assert bufs.write("e", "image", 2, 0, torch.ones(2, 3)) == 0
    assert bufs.write("e", "text", 3, 1, torch.full((2, 3), 2.0)) == 3
    bufs.write("e", "text", 3, 0, torch.full((1, 3), 2.0))
    out = bufs.finish()["e"]
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 3))
