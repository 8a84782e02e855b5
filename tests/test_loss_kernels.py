"""The two backend primitives (``lse``, ``grad``) of the Triton kernels and the chunked backend.

Checked directly against :class:`ReferenceBackend` in float64 with arbitrary (also negative)
per-row / per-column coefficients, so every term of ``dS`` is exercised independently of the
loss built on top. Triton runs in the CPU interpreter here (``TRITON_INTERPRET=1``, conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from vlscale.kernels import contrastive as kern

from vlscale.loss import ChunkedBackend, ReferenceBackend
from vlscale.loss.triton_backend import TritonBackend

REF = ReferenceBackend()


def small(bm: int, bn: int, bd: int, bands: int, backward: str = "shared", **kw):
    return kern.KernelSettings(bm, bn, bd, row_bands=bands, col_bands=bands, upcast=True,
                               grad_block_m=bm, grad_block_n=bn, backward=backward, **kw)


BACKENDS = {
    "triton-16x32-3bands-fused": TritonBackend(small(16, 32, 16, 3, backward="fused")),
    "triton-32x16-1band-shared": TritonBackend(small(32, 16, 32, 1, p_block=32)),  # several P blocks
    "triton-banded-16rows": TritonBackend(small(16, 16, 16, 2, backward="banded", band_elems=16 * 50)),
    "triton-nested-forward": TritonBackend(small(16, 16, 16, 2, p_block=16, flatten=False)),
    "triton-default": TritonBackend(),
    "chunked-8x13": ChunkedBackend(block_m=8, block_n=13),
}
SHAPES = [(1, 1, 3), (7, 50, 40), (45, 19, 64), (33, 33, 17), (3, 5, 1000)]


def inputs(m: int, n: int, d: int, dtype: torch.dtype, s: float):
    q = torch.randn(m, d, dtype=torch.float64).to(dtype)
    k = torch.randn(n, d, dtype=torch.float64).to(dtype)
    return q, k, torch.tensor([s])


def close(got, want, tol):
    err = (got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-3)
    assert err < tol, f"rel max err {err:.3g} (mean abs err {(got.double() - want.double()).abs().mean():.3g})"


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize(("m", "n", "d"), SHAPES)
def test_lse_matches_reference(name, m, n, d):
    torch.manual_seed(m * n + d)
    q, k, s = inputs(m, n, d, torch.float32, 0.7)  # unnormalised: logits of tens
    want_r, want_c = REF.lse(q.double(), k.double(), s.double())
    row, col = BACKENDS[name].lse(q, k, s)
    close(row, want_r, 1e-6)
    close(col, want_c, 1e-6)
    row_only, none = BACKENDS[name].lse(q, k, s, need_col=False)
    assert none is None
    close(row_only, want_r, 1e-6)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize(("m", "n", "d"), SHAPES)
def test_grad_matches_reference(name, m, n, d):
    torch.manual_seed(m + n * d)
    q, k, s = inputs(m, n, d, torch.float32, 0.3)
    r, c = REF.lse(q.double(), k.double(), s.double())
    rc, cc = torch.randn(m) / m, torch.randn(n) / n  # signed, ~1/B like a real loss
    for row_coef, col_coef, need_dk in [(rc, cc, True), (rc, None, True), (None, cc, False)]:
        want = REF.grad(q.double(), k.double(), s.double(), r, c, _d(row_coef), _d(col_coef), need_dk=need_dk)
        got = BACKENDS[name].grad(q, k, s, r.float(), c.float(), row_coef, col_coef, need_dk=need_dk)
        close(got[0], want[0], 1e-5)
        if need_dk:
            close(got[1], want[1], 1e-5)
        else:
            assert got[1] is None


def _d(x):
    return None if x is None else x.double()


@pytest.mark.parametrize("name", ["triton-16x32-3bands-fused", "triton-32x16-1band-shared",
                                  "triton-banded-16rows", "chunked-8x13"])
def test_extreme_logits_do_not_overflow(name):
    """|S| up to ~10³: exp would overflow fp32 without the running-max shift. (fp32 S itself carries
    an absolute error ~|S|·2⁻²³, hence the looser gradient tolerance.)"""
    torch.manual_seed(1)
    q, k, s = inputs(20, 30, 16, torch.float32, 100.0)
    row, col = BACKENDS[name].lse(q, k, s)
    want_r, want_c = REF.lse(q.double(), k.double(), s.double())
    assert torch.isfinite(row).all() and torch.isfinite(col).all()
    close(row, want_r, 1e-6)
    close(col, want_c, 1e-6)
    dq, dk = BACKENDS[name].grad(q, k, s, row, col, torch.full((20,), 0.05), torch.full((30,), 0.05))
    want = REF.grad(q.double(), k.double(), s.double(), want_r, want_c, torch.full((20,), 0.05).double(),
                    torch.full((30,), 0.05).double())
    close(dq, want[0], 2e-3)
    close(dk, want[1], 2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_inputs(dtype):
    """16-bit loads are cast to fp32 at once in the interpreter: matches fp64 on the same values."""
    torch.manual_seed(2)
    q, k, s = inputs(21, 35, 64, dtype, 2.0)
    backend = BACKENDS["triton-32x16-1band-shared"]
    row, col = backend.lse(q, k, s)
    want_r, want_c = REF.lse(q.double(), k.double(), s.double())
    close(row, want_r, 1e-6)
    close(col, want_c, 1e-6)
    dq, dk = backend.grad(q, k, s, row, col, torch.full((21,), 1 / 42), torch.full((35,), 1 / 70))
    want = REF.grad(q.double(), k.double(), s.double(), want_r, want_c, torch.full((21,), 1 / 42).double(),
                    torch.full((35,), 1 / 70).double())
    close(dq, want[0], 1e-5)
    close(dk, want[1], 1e-5)


def test_kernel_settings_are_powers_of_two():
    for d in (3, 64, 768, 1024, 1000):
        cfg = kern.kernel_settings(300, 300, d, torch.float32, torch.device("cpu"))
        for v in (cfg.block_m, cfg.block_n, cfg.block_d, cfg.grad_block_m, cfg.grad_block_n):
            assert v >= 16 and v & (v - 1) == 0
        assert cfg.upcast and cfg.input_precision == "ieee"


# Compiles every kernel for real GPUs (no GPU needed: triton ships ptxas). The interpreter accepts
# code that the compiler rejects (e.g. reading a non-constexpr global), so this guards the GPU path.
_COMPILE = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vlscale.kernels import contrastive as K

common = {"M": "i32", "N": "i32", "D": "i32"}
lse_sig = {"Q": "*DT", "K": "*DT", **{n: "*fp32" for n in ("SCALE", "ROW_M", "ROW_L", "COL_M", "COL_L")},
           **common, "stride_q": "i32", "stride_k": "i32", "ROW_BAND": "i32", "COL_BAND": "i32",
           "NUM_COL_BANDS": "i32"}
grad_sig = {"A": "*DT", "B": "*DT", **{n: "*fp32" for n in ("SCALE", "A_LSE", "A_COEF", "B_LSE", "B_COEF", "DA")},
            **common, "stride_a": "i32", "stride_b": "i32", "stride_da": "i32"}
probs_sig = {"A": "*DT", "B": "*DT", **{n: "*fp32" for n in ("SCALE", "A_LSE", "A_COEF", "B_LSE", "B_COEF")},
             "P": "*DT", **common, "stride_a": "i32", "stride_b": "i32", "stride_p": "i32"}
UNALIGNED = ("M", "N", "ROW_BAND", "COL_BAND", "NUM_COL_BANDS")
SMEM = {80: 99 * 1024, 90: 227 * 1024}  # sm_86's limit for the sm_80 build (it runs there too); H100's


def compile_for(cap, fn, sig, ce):
    # A real launch specialises pointers, strides and D as divisible by 16: say so, or the loads
    # are not vectorised and the D loop is not software-pipelined.
    s = {**sig, **{k: "constexpr" for k in ce}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(s) if s[n] != "constexpr" and n not in UNALIGNED}
    src = ASTSource(fn, s, constexprs=ce, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 8, "num_stages": 3})


for cap in (80, 90):
    for dt in ("bf16", "fp16", "fp32"):
        sub = lambda sig: {k: v.replace("DT", dt) for k, v in sig.items()}
        prec = "tf32x3" if dt == "fp32" else "tf32"
        tiles = {"BLOCK_D": 32 if dt == "fp32" else 64, "UPCAST": False, "INPUT_PRECISION": prec}
        lse_flags = [{"FLATTEN": True}] + ([{"FLATTEN": False}] if dt == "bf16" else [])
        jobs = [(K._lse_kernel, sub(lse_sig), {"HAS_COL": True, "BLOCK_M": 128, "BLOCK_N": 64, **f}) for f in lse_flags]
        jobs += [(K._grad_kernel, sub(grad_sig), {"HAS_A": True, "HAS_B": True, "BLOCK_M": 64, "BLOCK_N": 64,
                                                  "CAST_P": True}),
                 (K._probs_kernel, sub(probs_sig), {"HAS_A": True, "HAS_B": True, "BLOCK_M": 128, "BLOCK_N": 128})]
        for fn, sig, flags in jobs:
            out = compile_for(cap, fn, sig, {**flags, **tiles})
            what = (cap, dt, fn.__name__, flags.get("FLATTEN"))
            ptx = out.asm["ptx"]
            assert out.metadata.shared <= SMEM[cap], (what, out.metadata.shared)
            assert ("wgmma" if cap == 90 else "mma.sync") in ptx, what
            assert "cp.async" in ptx, ("loads not software-pipelined", what)
            print(*what, out.metadata.shared)
print("ok")
"""


def test_kernels_compile_for_gpu():
    """Every kernel, for sm_80 (mma.sync) and sm_90 (wgmma), in bf16, fp16 and fp32 (tf32x3), the
    forward in both loop structures: fits the shared memory (99 KiB on sm_80-class, 227 KiB on H100)
    with 3 pipeline stages, and its loads are software-pipelined (cp.async)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    assert res.stdout.count("\n") == 2 * (3 * 3 + 1) + 1, res.stdout


class _Launch:
    """Stands in for a ``@triton.jit`` kernel: records the grid of each launch, runs nothing."""

    def __init__(self) -> None:
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kw: None


GPU_LIKE = kern.KernelSettings(128, 64, 64, row_bands=12, col_bands=11, num_warps=8, num_stages=3,
                               input_precision="tf32", grad_block_m=128, grad_block_n=128)


def test_large_grid_dimension_is_axis_0(monkeypatch):
    """N = 9M columns: 70,313 column tiles would pass axis 1's 65,535 limit; every grid is 1-D."""
    fake = _Launch()
    monkeypatch.setattr(kern, "_probs_kernel", fake)
    monkeypatch.setattr(kern, "_lse_kernel", fake)
    meta = dict(device="meta", dtype=torch.bfloat16)
    a, b = torch.empty(256, 64, **meta), torch.empty(9_000_000, 64, **meta)
    p, s = torch.empty(256, 9_000_000, **meta), torch.empty(1, device="meta")
    kern._write_p(p, a, b, s, (None, None), (None, None), GPU_LIKE)
    kern.lse(a, b, s, settings=GPU_LIKE)
    assert fake.grids == [(2 * 70313,), (2 * 11,)], fake.grids  # 2 row bands: only 2 row tiles


def test_forward_grid_fills_the_sms():
    """One program per SM where the tiles allow: the rectangles factorise the SM count."""
    assert kern._bands(132, 1000, 1000) in ((11, 12), (12, 11))
    assert kern._bands(108, 1000, 1000) == (9, 12)
    assert kern._bands(132, 3, 1000) == (3, 44)  # few row tiles: more column bands
    for sms, tm, tn in [(132, 1, 1), (132, 5, 7), (80, 1000, 2), (7, 100, 100)]:
        r, c = kern._bands(sms, tm, tn)
        assert 1 <= r <= tm and 1 <= c <= tn and r * c <= sms, (sms, tm, tn, r, c)


@pytest.mark.parametrize(("backward", "s_evals"), [("shared", 1), ("banded", 2)])
def test_backward_evaluates_s_once(monkeypatch, backward, s_evals):
    """"shared" computes each P element once and feeds both products from it: with the forward's one
    S, the loss executes 8·M·N·D FLOPs; "banded" recomputes S per direction (10·M·N·D)."""
    written, flops = [], []
    real_write, real_mm = kern._write_p, kern.mm_f32
    monkeypatch.setattr(kern, "_write_p", lambda p, *a: (written.append(p.numel()), real_write(p, *a)))
    monkeypatch.setattr(kern, "mm_f32", lambda a, b, **kw: (flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1]),
                                                             real_mm(a, b, **kw))[1])
    m, n, d = 45, 70, 24
    q, k, s = inputs(m, n, d, torch.float32, 0.5)
    r, c = REF.lse(q.double(), k.double(), s.double())
    backend = TritonBackend(small(16, 16, 16, 2, backward=backward, p_block=32, band_elems=32 * 70))
    got = backend.grad(q, k, s, r.float(), c.float(), torch.full((m,), 0.1), torch.full((n,), 0.1))
    want = REF.grad(q.double(), k.double(), s.double(), r, c, torch.full((m,), 0.1).double(),
                    torch.full((n,), 0.1).double())
    close(got[0], want[0], 1e-5)
    close(got[1], want[1], 1e-5)
    assert sum(written) == s_evals * m * n and len(written) > s_evals  # several blocks / bands
    assert sum(flops) == 2 * (2 * m * n * d)  # dQ and dK products, once each


def test_chunked_memory_is_bounded_by_the_tile(monkeypatch):
    """No product the chunked backend forms is larger than block_m × block_n (or a block × D)."""
    from vlscale.loss import chunked

    biggest = []
    real = chunked.mm_f32

    def spy(a, b, **kw):
        out = real(a, b, **kw)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(chunked, "mm_f32", spy)
    backend = ChunkedBackend(block_m=16, block_n=32)
    q, k, s = inputs(70, 100, 8, torch.float32, 1.0)
    row, col = backend.lse(q, k, s)
    backend.grad(q, k, s, row, col, torch.full((70,), 1e-3), torch.full((100,), 1e-3))
    assert max(biggest) <= 16 * 32, max(biggest)
