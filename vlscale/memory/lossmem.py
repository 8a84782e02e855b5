"""Memory of the contrastive loss: which backend a recipe's ``loss.impl`` becomes on a target device,
and the bytes its terms hold (gathered columns, column-gradient partials, O(B) statistics, working
buffers) during the ``loss`` phase.

The backend is resolved as :func:`vlscale.loss.backends.explain_auto` resolves it at run time, but for
a device kind given by name (``v100``, ``a100``, ``h100``, ``cpu``, …; :data:`DEVICE_KINDS`), so a plan
made on a laptop follows what the target GPU will run: ``auto`` is ``triton`` on compute capability
≥ 8.0, ``compiled`` below (V100, T4 — ``chunked`` when compilation fails there, which a plan cannot
know), ``chunked`` on CPU. An impl that cannot run on the kind raises ``ValueError``, as it would.

Working buffers per backend, for ``m`` local rows against ``n`` columns of width ``d`` (the
embeddings reach the loss in fp32 under the gradient cache, so P has ``q_bytes`` = 4 bytes there);
each backend's forward and backward run one after the other, so the workspace is the larger of the two:

==================  =====================================================================================
``chunked``         5 fp32 tiles of ``min(m, 1024) × min(n, 4096)`` (S, s·S, the exponentials, P; measured),
                    6 when there is more than one tile (the previous P is alive while the next is made)
``compiled``        one fp32 tile of ``min(m, 2048) × min(n, 8192)`` (the GEMM's output) + P of the same
                    size in the embeddings' dtype (+ the previous P with more than one tile): the
                    compiled elementwise pass fuses everything else
``triton``          forward: per-band partial (max, sum) pairs, ``8·(R·n + C·m)`` bytes for the R × C
                    rectangles of the persistent grid (R·C ≈ the SM count), + two partial-sized
                    temporaries of the host merge; backward ("shared"): one P block of
                    ``min(m, 4096) × min(n, 4096)`` (rounded up to 128) in the embeddings' dtype
``triton-banded``   forward as triton; backward: a P band of ≈ 2²⁷ elements (whole rows), per direction
``triton-fused``    forward as triton; backward: nothing (P recomputed per tile in registers)
==================  =====================================================================================

The fp32 dQ / dK the backward returns are the ``embedding grads`` / ``column grad partials``
components. A term with a queue (momentum contrast) adds one more pass over the K queue rows and
its own fp32 dQ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Sources: NVIDIA's architecture whitepapers (compute capability, SMs of the data-centre parts).
DEVICE_KINDS: dict[str, tuple[tuple[int, int] | None, int]] = {
    "cpu": (None, 0),
    "v100": ((7, 0), 80), "t4": ((7, 5), 40),
    "a100": ((8, 0), 108), "a10": ((8, 6), 72), "l4": ((8, 9), 58), "l40s": ((8, 9), 142),
    "h100": ((9, 0), 132), "h200": ((9, 0), 132),
}
DEFAULT_KIND = "h100"  # no --gpu given and no CUDA here: a current data-centre GPU (auto → triton)
FUSED_IMPLS = ("chunked", "compiled", "triton", "triton-banded", "triton-fused")
LOSS_IMPLS = ("naive", *FUSED_IMPLS)

# open_clip-style naive loss keeps, per direction, the b×B logits and the log-softmax that
# cross-entropy saves for backward; the backward's gradient buffers reuse memory the forward
# copies free. Measured on CPU by benchmarks/memory_report.py (results/memory_model_cpu.md).
NAIVE_COPIES_PER_DIRECTION = 2
# The eager chunked backend's gradient pass (vlscale.loss.chunked.probs_both) holds the tile of S,
# s·S, the row term, exp(s·S − col lse) and its scaled product at once: 5 fp32 tiles; with more than
# one tile the previous tile's P is still referenced while the next tile is made: 6. The compiled
# backend fuses the elementwise work: the tile and P (+ the previous P). Measured on CPU with exact
# allocation counts (benchmarks/memory_report.py, results/memory_model_cpu.md).
CHUNKED_TILE_COPIES = 5
TILES = {"chunked": (1024, 4096), "compiled": (2048, 8192)}  # the backends' default tiles
# Per term: row statistics (lse, coefficient, its normalised copy) and column statistics (partial
# lse, merged lse, coefficient, normalised copy), fp32 each.
ROW_STATS, COL_STATS = 3, 4


@dataclass(frozen=True)
class TritonShape:
    """The Triton kernels' launch shape on a GPU (:func:`vlscale.kernels.contrastive_settings.kernel_settings`):
    forward tiles 128 × 64 on a persistent grid of one program per SM, backward blocks of 128,
    "shared" P blocks of 4096², "banded" P bands of 2²⁷ elements. ``bands`` fixes the forward's
    (row, column) rectangles instead of deriving them from the SM count (the CPU interpreter: 2 × 2)."""

    block_m: int = 128
    block_n: int = 64
    grad_block: int = 128
    p_block: int = 4096
    band_elems: int = 1 << 27
    bands: tuple[int, int] | None = None


@dataclass(frozen=True)
class DeviceKind:
    """A target device for the plan: its name, compute capability (None: CPU) and SM count."""

    name: str
    capability: tuple[int, int] | None
    sms: int

    @property
    def is_cuda(self) -> bool:
        return self.capability is not None


def device_kind(name: str) -> DeviceKind:
    """``"v100"``, ``"h100"``, ``"cpu"``, … or ``"sm_86"`` / ``"sm_86:84"`` (capability, optional SM count)."""
    key = name.strip().lower()
    if key in DEVICE_KINDS:
        cap, sms = DEVICE_KINDS[key]
        return DeviceKind(key, cap, sms)
    if key.startswith("sm_") and key[3:].split(":")[0].isdigit() and len(key[3:].split(":")[0]) >= 2:
        digits, _, sms = key[3:].partition(":")
        cap = (int(digits[:-1]), int(digits[-1]))
        return DeviceKind(key, cap, int(sms) if sms.isdigit() else DEVICE_KINDS[DEFAULT_KIND][1])
    raise ValueError(f"unknown GPU kind {name!r}: use one of {', '.join(DEVICE_KINDS)} or sm_XY[:SMS] "
                     "(e.g. sm_86:84 for an RTX 3090)")


def current_device_kind(device: object) -> DeviceKind:
    """The kind of a real ``torch.device`` (the one a measurement ran on)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return device_kind("cpu")
    major, minor = torch.cuda.get_device_capability(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    return DeviceKind(torch.cuda.get_device_name(dev), (major, minor), sms)


def resolve_impl(impl: str, kind: DeviceKind) -> tuple[str, str]:
    """``(backend, why)``: the fused backend ``loss.impl`` runs as on ``kind`` (ValueError if it cannot)."""
    if impl == "reference":
        raise ValueError("loss.impl='reference' materialises the logits (the test oracle): plan it as the "
                         "'naive' strategy, or pick a fused backend")
    if impl not in ("auto", *FUSED_IMPLS):
        raise ValueError(f"the fused loss is one of auto, {', '.join(FUSED_IMPLS)}; got {impl!r}")
    if impl == "auto":
        if not kind.is_cuda:
            return "chunked", "auto on CPU: the eager chunked backend"
        if kind.capability >= (8, 0):
            return "triton", f"auto on {kind.name} (sm_{kind.capability[0]}{kind.capability[1]} ≥ 8.0): fused Triton"
        return "compiled", (f"auto on {kind.name} (sm_{kind.capability[0]}{kind.capability[1]}: no Triton tensor "
                            "cores): the compiled chunked tile (eager chunked if it fails to compile there)")
    if impl.startswith("triton") and not (kind.is_cuda and kind.capability >= (8, 0)):
        raise ValueError(f"loss.impl={impl!r} cannot run on {kind.name}: Triton tensor-core kernels need a CUDA "
                         "GPU of compute capability ≥ 8.0; use loss.impl=auto, compiled or chunked")
    return impl, f"loss.impl={impl!r}"


def _bands(sms: int, m: int, n: int, shape: TritonShape) -> tuple[int, int]:
    """(row bands R, column bands C) of the Triton forward's persistent grid, as the kernel makes them."""
    tiles_m, tiles_n = math.ceil(m / shape.block_m), math.ceil(n / shape.block_n)
    if shape.bands is not None:
        r, c = shape.bands
    else:
        try:
            from vlscale.kernels.contrastive_settings import _bands as kernel_bands
        except ImportError:  # no triton here: the planner still works, with the even split it approximates
            r = max(1, min(tiles_m, math.isqrt(max(sms, 1))))
            c = max(1, min(tiles_n, max(sms, 1) // r))
        else:
            r, c = kernel_bands(max(sms, 1), tiles_m, tiles_n)
    row_band = math.ceil(tiles_m / r) * shape.block_m
    col_band = math.ceil(tiles_n / c) * shape.block_n
    return math.ceil(m / row_band), math.ceil(n / col_band)


def _block_rows(total: int, target: int, block: int) -> int:
    """Rows of a P block / band: ``_rows_per_block`` of kernels/contrastive.py."""
    return min(math.ceil(total / block) * block, max(block, target // block * block))


def workspace(impl: str, m: int, n: int, *, q_bytes: int = 4, sms: int = 132, tile: tuple[int, int] | None = None,
              need_col: bool = True, triton: TritonShape = TritonShape()) -> float:
    """Bytes of working buffers of one loss call (``m`` rows × ``n`` columns): max(forward, backward).

    ``tile``: the chunked / compiled backends' tile; ``triton``: the Triton kernels' launch shape."""
    if m <= 0 or n <= 0:
        return 0.0
    if impl in TILES:
        bm, bn = tile or TILES[impl]
        cells, loop = min(bm, m) * min(bn, n), math.ceil(m / bm) * math.ceil(n / bn) > 1
        if impl == "chunked":
            return float((CHUNKED_TILE_COPIES + loop) * 4 * cells)
        return float((4 + q_bytes * (1 + loop)) * cells)
    if impl not in FUSED_IMPLS:
        raise ValueError(f"no workspace model for loss impl {impl!r}")
    rows, cols = _bands(sms, m, n, triton)
    col_part, row_part = rows * n if need_col else 0, cols * m
    # (max, sum) pairs per band, then the host merge: log2 of the sums, their sum with the maxes,
    # the ln 2 scaling and logsumexp's shifted copy — two partial-sized temporaries at a time.
    forward = 8.0 * (col_part + row_part) + 8.0 * max(col_part, row_part)
    g, band = triton.grad_block, triton.band_elems
    if impl == "triton":
        backward = _block_rows(m, triton.p_block, g) * _block_rows(n, triton.p_block, g) * q_bytes
    elif impl == "triton-banded":
        backward = max(_block_rows(m, band // n, g) * n, _block_rows(n, band // m, g) * m) * q_bytes
    else:
        backward = 0
    return float(max(forward, backward))


@dataclass(frozen=True)
class LossTerm:
    """One contrastive term of the objective as its memory sees it (``b`` local rows of width D)."""

    name: str
    columns: str = "global"
    """"global": the B columns are all-gathered (the symmetric loss, hierarchical levels); "keys": B
    momentum keys gathered, without gradient; "local": no gather (BriVL's 1 + K: own positive only)."""
    column_grads: bool = True
    """The columns get a gradient: an fp32 B×D partial before the reduce-scatter."""
    column_stats: bool = True
    """Column log-sum-exp (the symmetric loss's text → image direction)."""
    queue: int = 0
    """Extra negatives (momentum queue rows): one more pass over them, with its own fp32 dQ."""
    directions: int = 2
    """Softmax directions a naive (dense-logits) version materialises."""


SYMMETRIC = LossTerm("contrastive")


def term_bytes(term: LossTerm, impl: str, *, b_local: int, global_batch: int, d: int, emb_bytes: int,
               sms: int = 132, tile: tuple[int, int] | None = None) -> dict[str, float]:
    """One term's gathered columns, column-gradient partial, statistics and workspace (bytes)."""
    m, q = b_local, term.queue
    n = {"global": global_batch, "keys": global_batch, "local": 0}[term.columns]
    if impl == "naive":
        # open_clip gathers both modalities and back-propagates into both gathered copies.
        both = 2 if term.columns == "global" else 1
        return {"gathered": float(both * n * d * emb_bytes), "col_grads": float(both * n * d * 4 * term.column_grads),
                "stats": 0.0, "workspace": float(NAIVE_COPIES_PER_DIRECTION * term.directions * m * (n + q) * 4)}
    ws = workspace(impl, m, n, q_bytes=emb_bytes, sms=sms, tile=tile, need_col=term.column_stats)
    if q:
        ws = max(ws, m * d * 4 + workspace(impl, m, q, q_bytes=emb_bytes, sms=sms, tile=tile, need_col=False))
    gathered = n * d * (4 if term.columns == "keys" else emb_bytes)
    stats = (ROW_STATS * m + COL_STATS * n * term.column_stats) * 4
    return {"gathered": float(gathered), "col_grads": float(n * d * 4 * term.column_grads),
            "stats": float(stats), "workspace": float(ws)}


def loss_components(terms: tuple[LossTerm, ...], impl: str, **kw: object) -> dict[str, float]:
    """The ``loss`` phase's components over all terms: every term's forward keeps its gathered
    columns and statistics until the backward; the backwards run one after another, so the
    column-gradient partial and the workspace are the largest term's."""
    parts = [term_bytes(t, impl, **kw) for t in terms]  # type: ignore[arg-type]
    return {"gathered columns": sum(p["gathered"] for p in parts),
            "column grad partials": max((p["col_grads"] for p in parts), default=0.0),
            "loss statistics": sum(p["stats"] for p in parts),
            "loss workspace": max((p["workspace"] for p in parts), default=0.0)}
