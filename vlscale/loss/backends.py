"""The registry of contrastive-loss backends and ``get_backend(impl, device)``.

Every implementation is registered here under one impl name, with a one-line summary and a
function saying why it cannot run on a device; tools that compare implementations (the benchmark
harness, ``vlscale doctor``) enumerate :func:`registered_backends` rather than keeping their own list.

==================  ============================================================================
``reference``       materialises the logits: the oracle (tests), O(M·N) memory
``chunked``         pure torch in row × column tiles (CPU, V100), eager elementwise work
``compiled``        the chunked tiles with ``torch.compile``d elementwise work (V100, CPU)
``triton``          fused Triton kernels, backward with one P per block feeding both products
``triton-banded``   Triton, backward per direction: P bands (row then column) + cuBLAS products
``triton-fused``    Triton, backward per direction in one kernel (no P buffer)
``auto``            triton on CUDA sm_80+; compiled on other CUDA GPUs when it compiles, else
                    chunked (logged); chunked on CPU
==================  ============================================================================

The choice is made once per (impl, device) and logged once; an explicit impl that cannot run raises
``ValueError`` naming the reason (never a silent fallback). A new backend calls
:func:`register_backend`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlscale.loss.backend import LossBackend, ReferenceBackend
from vlscale.loss.chunked import ChunkedBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendInfo:
    """One registered implementation: how to build it and whether it can run on a device."""

    name: str
    summary: str
    build: Callable[[], LossBackend]
    unavailable: Callable[[torch.device], str | None]  # reason it cannot run, None when it can
    oracle: bool = False  # materialises O(M·N): a correctness reference, not a contender at scale


_REGISTRY: dict[str, BackendInfo] = {}
_CACHE: dict[tuple[str, str, bool], LossBackend] = {}


def register_backend(name: str, build: Callable[[], LossBackend], *, summary: str,
                     unavailable: Callable[[torch.device], str | None] = lambda device: None,
                     oracle: bool = False) -> None:
    """Make ``impl=name`` available everywhere (``contrastive_loss``, configs, benchmarks, doctor)."""
    if name == "auto" or not name:
        raise ValueError(f"invalid backend name {name!r}")
    _REGISTRY[name] = BackendInfo(name, summary, build, unavailable, oracle)
    _CACHE.clear()


def registered_backends(*, include_oracle: bool = True) -> tuple[str, ...]:
    """Names of every registered implementation (without ``"auto"``), in registration order."""
    return tuple(n for n, info in _REGISTRY.items() if include_oracle or not info.oracle)


def backend_info(name: str) -> BackendInfo:
    if name not in _REGISTRY:
        raise ValueError(f"impl must be one of {impls()}, got {name!r}")
    return _REGISTRY[name]


def impls() -> tuple[str, ...]:
    """Every accepted ``impl`` string: ``"auto"`` and the registered names."""
    return ("auto", *_REGISTRY)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if _interpreting():
        return None
    if device.type != "cuda":
        return f"device {device} is not CUDA (set TRITON_INTERPRET=1 before importing triton to use the interpreter)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"device {device} has compute capability {major}.{minor}; Triton tensor-core kernels need ≥ 8.0 "
                "(Triton has no Volta tensor-core path)")
    return None


def _compiled_unavailable(device: torch.device) -> str | None:
    from vlscale.loss.compiled import compiled_unavailable_reason

    return compiled_unavailable_reason(device)


def explain_auto(device: torch.device | str) -> tuple[str, str]:
    """``(impl, why)``: the backend ``impl="auto"`` resolves to on ``device`` and the reason."""
    device = torch.device(device)
    if device.type != "cuda":
        return "chunked", (f"{device} is not a CUDA device: the eager chunked backend (the Triton interpreter is "
                           "for tests; impl='compiled' is the opt-in compiled tile)")
    why_not_triton = triton_unavailable_reason(device)
    if why_not_triton is None:
        return "triton", f"{device} has compute capability ≥ 8.0 and triton is installed: fused Triton kernels"
    why_not_compiled = _compiled_unavailable(device)
    if why_not_compiled is None:
        return "compiled", f"{why_not_triton}; the compiled chunked tile compiles here"
    return "chunked", f"{why_not_triton}; compiled tile unavailable ({why_not_compiled}): eager chunked"


def unavailable_reason(impl: str, device: torch.device | str) -> str | None:
    """Why ``impl`` cannot run on ``device`` (None when it can)."""
    return None if impl == "auto" else backend_info(impl).unavailable(torch.device(device))


def _build(impl: str, device: torch.device) -> LossBackend:
    if impl == "auto":
        name, why = explain_auto(device)
        if name == "chunked" and device.type == "cuda":
            log.warning("contrastive loss: impl='auto' on %s falls back to the eager chunked backend: %s", device, why)
        return _build(name, device)
    why = unavailable_reason(impl, device)
    if why is not None:
        raise ValueError(f"impl={impl!r} cannot run: {why}; use impl='chunked' or 'auto'")
    return backend_info(impl).build()


def get_backend(impl: str | LossBackend, device: torch.device | str) -> LossBackend:
    """The backend for ``impl`` on ``device``; resolved once per (impl, device) and logged.

    ``impl`` may also be a backend object (e.g. ``ChunkedBackend(block_m=256)``), returned as is.
    """
    if not isinstance(impl, str):
        if not (callable(getattr(impl, "lse", None)) and callable(getattr(impl, "grad", None))):
            raise ValueError(f"impl must be one of {impls()} or a LossBackend, got {impl!r}")
        return impl
    if impl not in impls():
        raise ValueError(f"impl must be one of {impls()}, got {impl!r}")
    device = torch.device(device)
    key = (impl, str(device), _interpreting())
    if key not in _CACHE:
        _CACHE[key] = _build(impl, device)
        log.info("contrastive loss: impl=%r on %s -> %s backend", impl, device, _CACHE[key].name)
    return _CACHE[key]


def _triton(backward: str | None = None) -> Callable[[], LossBackend]:
    def build() -> LossBackend:
        from vlscale.loss.triton_backend import TritonBackend

        return TritonBackend() if backward is None else TritonBackend(backward=backward)

    return build


def _compiled() -> LossBackend:
    from vlscale.loss.compiled import CompiledChunkedBackend

    return CompiledChunkedBackend()


register_backend("reference", ReferenceBackend, oracle=True,
                 summary="materialises the logits (the oracle; O(M·N) memory)")
register_backend("chunked", ChunkedBackend, summary="pure torch in row × column tiles, eager elementwise work")
# Reasons are looked up at call time (lambda), so they can be replaced (tests, other probes).
register_backend("compiled", _compiled, unavailable=lambda d: _compiled_unavailable(d),
                 summary="chunked tiles, torch.compile'd elementwise work, cuBLAS matmuls")
register_backend("triton", _triton(), unavailable=lambda d: triton_unavailable_reason(d),
                 summary="fused Triton kernels; backward: one P per block feeds both products (8·M·N·D)")
register_backend("triton-banded", _triton("banded"), unavailable=lambda d: triton_unavailable_reason(d),
                 summary="Triton; backward per direction: P bands + cuBLAS products (10·M·N·D)")
register_backend("triton-fused", _triton("fused"), unavailable=lambda d: triton_unavailable_reason(d),
                 summary="Triton; backward per direction in one kernel, no P buffer (10·M·N·D)")

IMPLS = impls()  # the built-in names; impls() also includes backends registered later
