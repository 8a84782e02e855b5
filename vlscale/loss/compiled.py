"""Compiled chunked backend (impl ``"compiled"``): the chunked tiles with ``torch.compile``d elementwise work.

For GPUs without Triton tensor cores (V100: Triton has no Volta ``tl.dot`` path) and for CPU. The
matmuls stay in cuBLAS / torch.mm (16-bit inputs, fp32 output, via
:func:`vlscale.loss.precision.mm_f32`); only the per-tile elementwise work of
:mod:`vlscale.loss.chunked` — scale, exponentials, row and column sums, the scaled 16-bit P cast — is
compiled, so each fp32 tile is written once by the GEMM and read once or twice by one fused kernel
(~26 bytes of traffic per element of S over forward + backward) instead of the eager backend's
series of full-tile passes (~158 bytes per element).

The functions are compiled once per process (``dynamic=True``: ragged edge tiles and new batch
sizes reuse the same kernels; a new dtype compiles once more). Whether compilation works on a
device is probed once by :func:`compiled_unavailable_reason` on a tiny tile; ``impl="auto"`` uses that
on V100-class GPUs and falls back to the eager chunked backend, with a log line, when it fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from vlscale.loss.chunked import EAGER, ChunkedBackend
from vlscale.loss.precision import LOW

_REASONS: dict[str, str | None] = {}


@functools.cache
def compiled_fns() -> dict[str, Callable[..., object]]:
    """The :data:`vlscale.loss.chunked.EAGER` functions wrapped in ``torch.compile`` (lazy: each
    compiles on its first call)."""
    return {name: torch.compile(fn, dynamic=True, fullgraph=True) for name, fn in EAGER.items()}


def compiled_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the compiled tile cannot run on ``device`` (None when it can); probed once per device.

    Runs every compiled function on a 5×3 tile (P cast to fp16 on CUDA, the V100's dtype) and
    compares with the eager functions.
    """
    device = torch.device(device)
    key = str(device)
    if key not in _REASONS:
        _REASONS[key] = _probe(device)
    return _REASONS[key]


def _probe(device: torch.device) -> str | None:
    low = LOW[0] if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)

    def vec(n: int) -> torch.Tensor:
        return torch.randn(n, generator=g).to(device)

    tile, s = torch.randn(5, 3, generator=g).to(device), torch.tensor(2.0, device=device)
    args = {"lse_rows_cols": (tile, s), "lse_rows": (tile, s),
            "probs_both": (tile, s, vec(5), vec(5), vec(3), vec(3), low),
            "probs_rows": (tile, s, vec(5), vec(5), low), "probs_cols": (tile, s, vec(3), vec(3), low)}
    fns = compiled_fns()
    try:
        for name, a in args.items():
            got, want = fns[name](*a), EAGER[name](*a)
            for x, y in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                if not torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-5):
                    return f"torch.compile gave wrong results on {device} ({name})"
    except Exception as err:  # any compiler failure (no C++ compiler, Triton cannot target the GPU, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"torch.compile failed on {device}: {type(err).__name__}: {first[:300]}"
    return None


class CompiledChunkedBackend(ChunkedBackend):
    """:class:`ChunkedBackend` whose per-tile elementwise work runs through ``torch.compile``.

    Same arguments and the same arithmetic (fp32 statistics, 16-bit P scaled by 2^k on CUDA); larger
    tiles than the eager default amortise the kernel launches.
    """

    name = "compiled"

    def __init__(self, block_m: int = 2048, block_n: int = 8192, *, cast_p: bool | None = None,
                 scale_p: bool = True) -> None:
        super().__init__(block_m, block_n, cast_p=cast_p, scale_p=scale_p)
        self.fns = compiled_fns()
