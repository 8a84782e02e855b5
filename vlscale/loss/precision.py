"""Precision policy shared by the loss backends: the 16-bit P cast, its 2^k scaling, fp32-output matmuls.

The gradient products ``dQ = P·K`` and ``dK = Pᵀ·Q`` run with P cast to the embeddings' 16-bit dtype
(tensor cores need both operands in one dtype). P's entries are softmax probabilities ≈ 1/B times a
coefficient normalised to |c| ≤ 1, so |P| ≤ 2. In fp16 that is a problem at large batch: 1/B is
subnormal from B ≈ 16k (fp16's smallest normal is 2⁻¹⁴), where the format keeps only the bits above
2⁻²⁴ — ~1.5% relative precision per entry at B = 262,144, ~6% at 1M. So P is multiplied by
``2^k`` before the cast (:func:`p_scale_exp`: k = 14 for fp16, so |P|·2^k ≤ 2¹⁵ stays below fp16's
65,504) and ``2^−k`` is folded back into the fp32 result. Powers of two are exact: the scaling adds
no rounding, and entries down to 2⁻²⁸ of the largest stay normal (11 significant bits). bf16 has
fp32's exponent range and needs no scaling (k = 0). The backends apply the factor to the per-row /
per-column coefficients, so P comes out of the exponential already scaled.

``VLSCALE_LOSS_CAST_P=1`` (read at call time) forces the 16-bit P cast on every device: on CPU, and
in the Triton interpreter, P is then rounded to the embeddings' dtype exactly as on a GPU, and the
products of 16-bit operands are summed in fp32 (an fp32 matmul of the rounded values is exact up to
the summation order, like cuBLAS with an fp32 compute type). Tests use it to check the GPU's
arithmetic against float64 without a GPU; by default CPU runs keep P in fp32.

:func:`mm_f32` is ``a @ b`` with an fp32 result for 16-bit operands. On CUDA it uses cuBLAS with
16-bit inputs and an fp32 output (``torch.addmm / torch.mm(out_dtype=torch.float32)``, torch ≥ 2.9;
older builds or GPUs fall back to an fp32 matmul of upcast operands — never to a 16-bit result, which
would round S before its exponential: ~3% error in fp16, ~28% in bf16 at |S| ≈ 100). Which of the
three is used is decided once per (device, dtype) by a probe on a 16×16 product, checked against an
fp32 result, and logged. A probe failing with anything but "this op/dtype is not supported" (e.g. an
out-of-memory) is *not* cached: that one call upcasts and the next call probes again.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

log = logging.getLogger(__name__)

LOW = (torch.float16, torch.bfloat16)
CAST_P_ENV = "VLSCALE_LOSS_CAST_P"
_P_SCALE_EXP = {torch.float16: 14}  # 2·2¹⁴ = 32,768 < 65,504 (fp16 max); |P| ≤ 2 before scaling

# (device, dtype) -> "addmm" (fp32-output accumulate in place), "mm" (fp32-output product, then +=),
# or "upcast" (fp32 matmul of upcast operands). Only definite answers are stored.
_MODE: dict[tuple[str, torch.dtype], str] = {}


def cast_p_forced() -> bool:
    """True when ``VLSCALE_LOSS_CAST_P=1``: round P to the 16-bit input dtype on every device."""
    return os.environ.get(CAST_P_ENV, "0") == "1"


def p_dtype(x: Tensor, acc: torch.dtype, *, cast_p: bool | None = None) -> torch.dtype:
    """The dtype P is cast to before the products with ``x``'s rows.

    16-bit ``x`` on CUDA (or anywhere when ``cast_p`` / :func:`cast_p_forced`): ``x.dtype``;
    otherwise the accumulation dtype ``acc`` (fp32, fp64 for fp64 inputs).
    """
    if x.dtype not in LOW:
        return acc
    if cast_p is None:
        cast_p = x.is_cuda or cast_p_forced()
    return x.dtype if cast_p else acc


def p_scale_exp(dtype: torch.dtype) -> int:
    """k of the 2^k factor applied to P before it is cast to ``dtype`` (0: no scaling needed)."""
    return _P_SCALE_EXP.get(dtype, 0)


def normalised_coefs(row_coef: Tensor | None, col_coef: Tensor | None, acc: torch.dtype,
                     k: int) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Coefficients divided by their largest magnitude α and multiplied by 2^k, and ``α/2^k``.

    Every entry of ``P = rc·exp(S−r) + cc·exp(S−c)`` is then at most 2·2^k in magnitude (fits fp16
    for k ≤ 14), and multiplying the products by ``α/2^k`` (a power of two times α) undoes both.
    """
    parts = [c.abs().max() for c in (row_coef, col_coef) if c is not None]
    if not parts:
        raise ValueError("grad needs row_coef or col_coef (both are None)")
    alpha = torch.stack(parts).max().to(acc).clamp_min(1e-30)
    mult = 2.0**k / alpha
    rc = None if row_coef is None else (row_coef.to(acc) * mult).contiguous()
    cc = None if col_coef is None else (col_coef.to(acc) * mult).contiguous()
    return rc, cc, alpha / 2.0**k


def _unsupported(err: BaseException) -> bool:
    """A definite "this torch / device cannot do it" (cached) rather than a transient failure."""
    if isinstance(err, (TypeError, NotImplementedError)):
        return True  # no out_dtype keyword (old torch), or no kernel for this backend
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        w in msg for w in ("dtype", "not supported", "not_supported", "not implemented"))


def _probe(device: torch.device, dtype: torch.dtype) -> str:
    """The best fp32-output product that works on (device, dtype), verified on a 16×16 case."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(16, 16, generator=g).to(device=device, dtype=dtype)
    want = a.float() @ b.float()
    acc = torch.ones(16, 16, device=device)
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        if torch.allclose(acc, want + 1, rtol=1e-3, atol=1e-3):
            return "addmm"
    except Exception as err:
        if not _unsupported(err):
            raise
    try:
        out = torch.mm(a, b, out_dtype=torch.float32)
        if out.dtype == torch.float32 and torch.allclose(out, want, rtol=1e-3, atol=1e-3):
            return "mm"
    except Exception as err:
        if not _unsupported(err):
            raise
    return "upcast"


def matmul_mode(device: torch.device, dtype: torch.dtype) -> str:
    """How 16-bit products with an fp32 result run on (device, dtype): "addmm", "mm" or "upcast"."""
    key = (str(device), dtype)
    mode = _MODE.get(key)
    if mode is not None:
        return mode
    try:
        mode = _probe(device, dtype)
    except Exception as err:  # transient (e.g. out of memory): upcast this once, probe again next call
        log.warning("fp32-output matmul probe on %s %s failed (%s: %s); this call upcasts to fp32, "
                    "the next one probes again", device, dtype, type(err).__name__, err)
        return "upcast"
    _MODE[key] = mode
    how = {"addmm": "cuBLAS 16-bit inputs, fp32 output, accumulated in place (addmm out_dtype)",
           "mm": "cuBLAS 16-bit inputs, fp32 output (mm out_dtype)",
           "upcast": "fp32 matmul of the 16-bit operands (no fp32-output 16-bit matmul here)"}[mode]
    level = logging.WARNING if mode == "upcast" and device.type == "cuda" else logging.INFO
    log.log(level, "contrastive loss matmuls on %s %s: %s", device, dtype, how)
    return mode


def mm_f32(a: Tensor, b: Tensor, *, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """``a @ b`` as fp32 (fp64 when both are fp64); written into / added to ``out`` when given.

    Operands of one dtype. 16-bit operands are multiplied as 16-bit values with fp32 accumulation
    (see :func:`matmul_mode`); fp32 / fp64 operands by a plain matmul.
    """
    if a.dtype not in LOW or b.dtype != a.dtype:
        acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        a, b = a.to(acc), b.to(acc)
        if out is None:
            return a @ b
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    mode = matmul_mode(a.device, a.dtype)
    if mode == "addmm" and out is not None:
        return torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=torch.float32, out=out)
    if mode in ("addmm", "mm"):
        prod = torch.mm(a, b, out_dtype=torch.float32)
    else:
        prod = a.float() @ b.float()
    if out is None:
        return prod
    return out.add_(prod) if accumulate else out.copy_(prod)
