"""The 16-bit P cast at large batch (2^k scaling) and the fp32-output matmul decision.

With ``VLSCALE_LOSS_CAST_P=1`` (or ``cast_p=True``) the CPU backends round P to fp16 exactly where a
GPU does, so these tests check the GPU's arithmetic against float64 without a GPU.

Error bound (fp16, with the 2^k scaling): every entry of P keeps fp16's 11 significant bits, so its
relative rounding error is at most 2⁻¹¹ ≈ 4.9e-4; the products of fp16 values are exact in fp32 and
summed in fp32. Hence each gradient's max error is ≤ 2⁻¹¹ of its largest entry, and — the errors
being unbiased roundings — its mean error is ≤ 2⁻¹² of its mean magnitude (the backend primitives
return fp32). Through the public API the gradients are returned in the inputs' dtype, one more fp16
rounding of the same size: bounds 2⁻¹⁰ and 2⁻¹¹ there. Without the scaling, the
entries ≈ 1/B fall below fp16's smallest normal (2⁻¹⁴) and are flushed towards 0: a bias that grows
with B and breaks the mean bound from B ≈ 1M (emulated here by shifting the log-sum-exp by ln 2^j,
which scales every softmax entry by 2^−j exactly as a 2^j times larger batch would).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from vlscale.kernels import contrastive as kern

from vlscale.loss import ChunkedBackend, ReferenceBackend, info_nce, precision
from vlscale.loss.triton_backend import TritonBackend

MAX_BOUND, MEAN_BOUND = 2.0**-11, 2.0**-12


def rel_errors(got, want):
    err = (got.double() - want.double()).abs()
    return (err.max() / want.abs().max()).item(), (err.mean() / want.abs().mean()).item()


def unit(n: int, d: int, dtype=torch.float16) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1).to(dtype)


def test_info_nce_over_32k_keys_fp16_matches_float64(monkeypatch):
    """Softmax over 32,768 keys: its entries ≈ 2⁻¹⁵ are subnormal in fp16. Public API, P cast forced."""
    monkeypatch.setenv(precision.CAST_P_ENV, "1")
    torch.manual_seed(0)
    q, k = unit(512, 64).requires_grad_(), unit(32768, 64).requires_grad_()
    scale = torch.tensor(30.0, requires_grad=True)
    loss = info_nce(q, k, scale, labels=torch.arange(512) * 64, impl=ChunkedBackend(256, 8192))
    loss.backward()
    q64, k64, s64 = (x.detach().double().requires_grad_() for x in (q, k, scale))
    want = info_nce(q64, k64, s64, labels=torch.arange(512) * 64, impl=ChunkedBackend(256, 8192))
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    for name, g, w in [("d query", q.grad, q64.grad), ("d keys", k.grad, k64.grad), ("d scale", scale.grad, s64.grad)]:
        mx, mean = rel_errors(g, w)  # fp16 gradients: P's rounding plus the output's own
        assert mx <= 2 * MAX_BOUND and mean <= 2 * MEAN_BOUND, f"{name}: rel max err {mx:.3g}, rel mean err {mean:.3g}"


def _primitive_case(m: int, n: int, d: int, s: float, shift_bits: int):
    """Inputs of ``grad`` with softmax entries scaled by 2^−shift_bits (a 2^shift_bits larger batch)."""
    q, k, sc = unit(m, d), unit(n, d), torch.tensor([s])
    r, c = ReferenceBackend().lse(q.double(), k.double(), sc.double())
    r, c = r + shift_bits * math.log(2), c + shift_bits * math.log(2)
    rc, cc = torch.full((m,), 0.5 / m, dtype=torch.float64), torch.full((n,), 0.5 / n, dtype=torch.float64)
    want = ReferenceBackend().grad(q.double(), k.double(), sc.double(), r, c, rc, cc)
    return (q, k, sc, r.float(), c.float(), rc.float(), cc.float()), want


def _triton(backward: str, **kw) -> TritonBackend:
    return TritonBackend(kern.KernelSettings(16, 16, 16, row_bands=2, col_bands=2, upcast=True, grad_block_m=16,
                                             grad_block_n=16, backward=backward, band_elems=16 * 40, p_block=32,
                                             cast_p=True, **kw))


SCALED = {
    "chunked": lambda scale_p: ChunkedBackend(16, 24, cast_p=True, scale_p=scale_p),
    "triton-shared": lambda scale_p: _triton("shared", scale_p=scale_p),
    "triton-banded": lambda scale_p: _triton("banded", scale_p=scale_p),
    "triton-fused": lambda scale_p: _triton("fused", scale_p=scale_p),
}


@pytest.mark.parametrize("name", list(SCALED))
def test_fp16_p_scaling_at_an_emulated_1m_batch(name):
    """B_eff = 40·2¹⁵ ≈ 1.3M: with 2^k scaling within the bound; without it, P is flushed (bias)."""
    torch.manual_seed(1)
    args, want = _primitive_case(33, 40, 16, 10.0, shift_bits=15)
    for scale_p in (True, False):
        got = SCALED[name](scale_p).grad(*args)
        errs = [rel_errors(g, w) for g, w in zip(got, want)]
        ok = all(mx <= MAX_BOUND and mean <= MEAN_BOUND for mx, mean in errs)
        assert ok == scale_p, f"scale_p={scale_p}: (max, mean) rel errors {errs}"


def test_fp16_large_keys_with_and_without_scaling_chunked():
    """512 × 32,768 with an emulated 2⁵ larger batch (≈ 1M): the scaled cast stays within the bound."""
    torch.manual_seed(2)
    args, want = _primitive_case(512, 32768, 64, 30.0, shift_bits=5)
    errs = {sp: [rel_errors(g, w) for g, w in zip(ChunkedBackend(256, 8192, cast_p=True, scale_p=sp).grad(*args), want)]
            for sp in (True, False)}
    assert all(mx <= MAX_BOUND and mean <= MEAN_BOUND for mx, mean in errs[True]), errs
    assert max(mean for _, mean in errs[False]) > MEAN_BOUND, errs  # the bound would catch the unscaled cast


def test_bf16_needs_no_scaling_and_keeps_its_bound():
    """bf16 has fp32's exponent range: no scaling, and its 8-bit rounding bound holds at B_eff ≈ 1.3M.
    (Chunked only: Triton's interpreter converts fp32 → bf16 by truncation, a GPU rounds to nearest.)"""
    assert precision.p_scale_exp(torch.bfloat16) == 0 and precision.p_scale_exp(torch.float32) == 0
    assert precision.p_scale_exp(torch.float16) == 14
    torch.manual_seed(3)
    (q, k, sc, r, c, rc, cc), _ = _primitive_case(33, 40, 16, 10.0, shift_bits=15)
    q, k = q.bfloat16(), k.bfloat16()
    want = ReferenceBackend().grad(q.double(), k.double(), sc.double(), r.double(), c.double(), rc.double(), cc.double())
    for g, w in zip(ChunkedBackend(16, 24, cast_p=True).grad(q, k, sc, r, c, rc, cc), want):
        mx, mean = rel_errors(g, w)
        assert mx <= 2.0**-8 and mean <= 2.0**-9, (mx, mean)


def test_cast_p_switch(monkeypatch):
    x = torch.zeros(2, 2, dtype=torch.float16)
    monkeypatch.delenv(precision.CAST_P_ENV, raising=False)
    assert precision.p_dtype(x, torch.float32) == torch.float32  # CPU default: P stays fp32
    monkeypatch.setenv(precision.CAST_P_ENV, "1")
    assert precision.p_dtype(x, torch.float32) == torch.float16
    assert precision.p_dtype(x.float(), torch.float32) == torch.float32
    assert kern.kernel_settings(8, 8, 8, torch.float16, torch.device("cpu")).cast_p


# --- the fp32-output matmul decision -----------------------------------------------------------


@pytest.fixture
def fresh_modes(monkeypatch):
    monkeypatch.setattr(precision, "_MODE", {})


def _fake_out_dtype(real, *, fail_first: BaseException | None = None, calls: list | None = None):
    """Stand-in for torch.mm / torch.addmm that supports ``out_dtype`` on CPU (computed in fp32)."""
    state = {"fail": fail_first}
    is_addmm = real is torch.addmm

    def op(*args, out_dtype=None, out=None, beta=1, **kw):
        if calls is not None:
            calls.append(real.__name__)
        if state["fail"] is not None:
            err, state["fail"] = state["fail"], None
            raise err
        if out_dtype is None:
            return real(*args, out=out, **kw) if out is not None else real(*args, **kw)
        if is_addmm:
            acc, a, b = args
            res = beta * acc.float() + a.float() @ b.float()
        else:
            a, b = args
            res = a.float() @ b.float()
        return out.copy_(res) if out is not None else res

    return op


def test_out_dtype_decision_is_made_once_and_logged(fresh_modes, caplog):
    dev = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="vlscale.loss.precision"):
        modes = {precision.matmul_mode(dev, torch.float16) for _ in range(3)}
    assert modes == {"upcast"}  # torch has no CPU kernel for mm(out_dtype=)
    assert sum("matmuls on cpu torch.float16" in r.getMessage() for r in caplog.records) == 1


def test_transient_failure_does_not_flip_the_decision(fresh_modes, monkeypatch):
    """A probe that fails with an out-of-memory (not "unsupported") upcasts that one call only."""
    calls: list[str] = []
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB")
    monkeypatch.setattr(torch, "addmm", _fake_out_dtype(torch.addmm, fail_first=oom, calls=calls))
    monkeypatch.setattr(torch, "mm", _fake_out_dtype(torch.mm, calls=calls))
    dev = torch.device("cpu")
    assert precision.matmul_mode(dev, torch.float16) == "upcast"
    assert (str(dev), torch.float16) not in precision._MODE  # not cached
    assert precision.matmul_mode(dev, torch.float16) == "addmm"  # probed again, now cached
    n = len(calls)
    assert precision.matmul_mode(dev, torch.float16) == "addmm" and len(calls) == n
    assert precision.matmul_mode(dev, torch.bfloat16) == "addmm"  # per (device, dtype)


def test_unsupported_accumulate_falls_back_to_mm_then_upcast(fresh_modes, monkeypatch):
    dev = torch.device("cpu")
    no_self_fp32 = RuntimeError("self and mat2 must have the same dtype, but got Float and Half")
    monkeypatch.setattr(torch, "addmm", _fake_out_dtype(torch.addmm, fail_first=no_self_fp32))
    monkeypatch.setattr(torch, "mm", _fake_out_dtype(torch.mm))
    assert precision.matmul_mode(dev, torch.float16) == "mm"
    monkeypatch.setattr(torch, "addmm", _fake_out_dtype(torch.addmm, fail_first=TypeError("no out_dtype")))
    monkeypatch.setattr(torch, "mm", _fake_out_dtype(torch.mm, fail_first=TypeError("no out_dtype")))
    assert precision.matmul_mode(dev, torch.bfloat16) == "upcast"
    assert {("cpu", torch.float16): "mm", ("cpu", torch.bfloat16): "upcast"} == precision._MODE


@pytest.mark.parametrize("mode", ["addmm", "mm", "upcast"])
def test_mm_f32_never_rounds_the_product_to_16_bits(fresh_modes, monkeypatch, mode):
    """Whatever the mode, 16-bit operands give the fp32 product of their values (S is not rounded)."""
    monkeypatch.setattr(torch, "addmm", _fake_out_dtype(torch.addmm))
    monkeypatch.setattr(torch, "mm", _fake_out_dtype(torch.mm))
    precision._MODE[("cpu", torch.float16)] = mode
    a, b = torch.randn(7, 33).half() * 10, torch.randn(33, 5).half() * 10
    want = a.float() @ b.float()
    assert torch.equal(precision.mm_f32(a, b), want)
    acc = torch.ones(7, 5)
    precision.mm_f32(a, b, out=acc, accumulate=True)
    torch.testing.assert_close(acc, want + 1, rtol=0, atol=1e-4)
    precision.mm_f32(a, b, out=acc)
    torch.testing.assert_close(acc, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shift_bits", [0, 5])
def test_fp16_large_batch_on_gpu(shift_bits):
    """B = 32,768 (and an emulated 2⁵ larger batch, ≈ 1M) in fp16 on a real GPU, every backend that
    runs there, against a float64 chunked reference on the same device."""
    from vlscale.loss import backends

    dev = torch.device("cuda")
    torch.manual_seed(4)
    b, d = 32768, 128
    q, k, sc = unit(b, d).to(dev), unit(b, d).to(dev), torch.tensor([30.0], device=dev)
    ref = ChunkedBackend(4096, 8192)
    r, c = ref.lse(q.double(), k.double(), sc.double())
    r, c = r + shift_bits * math.log(2), c + shift_bits * math.log(2)
    coef = torch.full((b,), 0.5 / b, dtype=torch.float64, device=dev)
    want = ref.grad(q.double(), k.double(), sc.double(), r, c, coef, coef)
    for name in backends.registered_backends(include_oracle=False):
        if backends.unavailable_reason(name, dev) is not None:
            continue
        got = backends.get_backend(name, dev).grad(q, k, sc, r.float(), c.float(), coef.float(), coef.float())
        for what, g, w in zip(("dq", "dk"), got, want):
            mx, mean = rel_errors(g, w)
            assert mx <= MAX_BOUND and mean <= MEAN_BOUND, f"{name} {what}: rel max {mx:.3g}, rel mean {mean:.3g}"
