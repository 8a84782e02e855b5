"""Choosing a contrastive-loss backend: ``get_backend(impl, device)``.

``"reference"`` materialises the logits (the oracle), ``"chunked"`` is pure torch in blocks (CPU,
V100), ``"triton"`` is the fused kernel (CUDA sm_80+, or the CPU interpreter under
``TRITON_INTERPRET=1``), ``"auto"`` is triton on sm_80+ CUDA and chunked otherwise. The choice is
made once per (impl, device) and logged once; an explicit impl that cannot run raises ``ValueError``
naming the reason (never a silent fallback).
"""

from __future__ import annotations

import logging
import os

import torch

from vlscale.loss.backend import LossBackend, ReferenceBackend
from vlscale.loss.chunked import ChunkedBackend

log = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "chunked", "reference")
_CACHE: dict[tuple[str, str, bool], LossBackend] = {}


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
        return f"device {device} has compute capability {major}.{minor}; Triton tensor-core kernels need ≥ 8.0"
    return None


def _build(impl: str, device: torch.device) -> LossBackend:
    if impl == "reference":
        return ReferenceBackend()
    if impl == "chunked":
        return ChunkedBackend()
    why = triton_unavailable_reason(device)
    if impl == "auto":
        # The interpreter is for tests only: "auto" never picks it on CPU.
        use_triton = why is None and device.type == "cuda"
        return _build("triton" if use_triton else "chunked", device)
    if why is not None:
        raise ValueError(f"impl='triton' cannot run: {why}; use impl='chunked' or 'auto'")
    from vlscale.loss.triton_backend import TritonBackend

    return TritonBackend()


def get_backend(impl: str | LossBackend, device: torch.device | str) -> LossBackend:
    """The backend for ``impl`` on ``device``; resolved once per (impl, device) and logged.

    ``impl`` may also be a backend object (e.g. ``ChunkedBackend(block_m=256)``), returned as is.
    """
    if not isinstance(impl, str):
        if not (callable(getattr(impl, "lse", None)) and callable(getattr(impl, "grad", None))):
            raise ValueError(f"impl must be one of {IMPLS} or a LossBackend, got {impl!r}")
        return impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    key = (impl, str(device), _interpreting())
    if key not in _CACHE:
        _CACHE[key] = _build(impl, device)
        log.info("contrastive loss: impl=%r on %s -> %s backend", impl, device, _CACHE[key].name)
    return _CACHE[key]
