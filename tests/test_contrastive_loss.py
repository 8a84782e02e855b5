"""Contrastive losses (reference, chunked, triton via the interpreter) against a dense float64 oracle.

Every case checks the loss, every embedding gradient and d(loss)/d(logit_scale). Low-precision
inputs follow flash-attention's rule: the implementation's error against float64 must be within
2× PyTorch's own error in that dtype (a naive dense computation), plus a small atol.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vlscale.kernels.contrastive import KernelSettings

from vlscale.loss import ChunkedBackend, ContrastiveLoss, contrastive_loss, get_backend, info_nce
from vlscale.loss.triton_backend import TritonBackend

# Small tiles and 2×2 bands so a 33-row case spans several tiles per band in the interpreter; the
# shared backward with 16 × 32 P blocks, the banded one with bands of 16 rows, and the fused one.
SMALL = dict(row_bands=2, col_bands=2, upcast=True, grad_block_m=16, grad_block_n=16)
TRITON_SMALL = TritonBackend(KernelSettings(16, 16, 16, **SMALL, p_block=32))
TRITON_BANDED = TritonBackend(KernelSettings(16, 16, 16, **SMALL, backward="banded", band_elems=16 * 40))
TRITON_FUSED = TritonBackend(KernelSettings(16, 16, 16, **SMALL, backward="fused"))
IMPLS = {
    "reference": "reference",
    "chunked": ChunkedBackend(block_m=32, block_n=48),  # ragged edge tiles at 127 and 300
    "triton": TRITON_SMALL,
    "triton-banded": TRITON_BANDED,
    "triton-fused": TRITON_FUSED,
    "triton-default": TritonBackend(),  # the interpreter's own settings (BLOCK_D=64): D=768 in 12 chunks
}
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def dense_targets(n_rows: int, n_cols: int, labels: torch.Tensor, mix) -> torch.Tensor:
    y = torch.zeros(n_rows, n_cols, dtype=torch.float64, device=labels.device)
    lam = 1.0 if mix is None else float(mix[1])
    rows = torch.arange(n_rows, device=labels.device)
    y[rows, labels] += lam
    if mix is not None:
        y[rows, mix[0]] += 1.0 - lam
    return y


def oracle_symmetric(img, txt, scale, mix=None):
    """Dense open_clip-style loss with a dense soft-target matrix (the definition, not the algorithm)."""
    logits = scale.reshape(()) * img @ txt.T
    b = img.shape[0]
    eye = torch.arange(b, device=img.device)
    y_row = dense_targets(b, b, eye, mix).to(logits.dtype)
    # Column j targets lam on row j and 1−lam on row labels_b[j]: the same construction, transposed.
    y_col = dense_targets(b, b, eye, mix).to(logits.dtype).T
    row = -(y_row * F.log_softmax(logits, dim=1)).sum(1).mean()
    col = -(y_col * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (row + col) / 2


def oracle_info_nce(q, k, scale, labels, mix=None, extra=None):
    keys = k if extra is None else torch.cat([k, extra])
    logits = scale.reshape(()) * q @ keys.T
    y = dense_targets(q.shape[0], keys.shape[0], labels, mix).to(logits.dtype)
    return -(y * F.log_softmax(logits, dim=1)).sum(1).mean()


def emb(n: int, d: int, dtype: torch.dtype, normalise: bool = True) -> torch.Tensor:
    x = torch.randn(n, d, dtype=torch.float64)
    x = F.normalize(x, dim=-1) if normalise else x
    return x.to(dtype).requires_grad_()


def grads(fn, *xs):
    for x in xs:
        x.grad = None
    out = fn(*xs)
    out.backward()
    return [out.detach().double()] + [x.grad.detach().double() for x in xs]


def as64(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


def check_close(got, want, naive, dtype, what):
    """``got`` vs float64 ``want``; ``naive``: PyTorch's own result in ``dtype`` (None for fp32)."""
    for name, g, w, n in zip(["loss", *what], got, want, naive or [None] * len(got)):
        scale = w.abs().max().clamp_min(1e-2)  # all-zero gradients (B = 1) are judged absolutely
        err = (g - w).abs().max() / scale
        bound = ATOL[dtype] if n is None else 2 * ((n - w).abs().max() / scale) + ATOL[dtype]
        assert err <= bound, f"{name}: rel max err {err:.3g} > {bound:.3g} (mean abs err {(g - w).abs().mean():.3g})"


def run_symmetric(impl, b, d, dtype, s, mix=None, ref_dtype_naive=False):
    img, txt = emb(b, d, dtype), emb(b, d, dtype)
    scale = torch.tensor([s], dtype=torch.float32, requires_grad=True)
    got = grads(lambda i, t, sc: contrastive_loss(i, t, sc, mix=mix, impl=impl), img, txt, scale)
    want = grads(lambda i, t, sc: oracle_symmetric(i, t, sc, mix), *as64(img, txt, scale))
    naive = None
    if dtype != torch.float32:
        naive = grads(lambda i, t, sc: oracle_symmetric(i, t, sc.to(dtype), mix).float(),
                      img, txt, scale)
    check_close(got, want, naive, dtype, ["d image", "d text", "d scale"])


SYM_CASES = [
    ("triton", 1, 3), ("triton", 7, 64), ("triton", 33, 64), ("triton-fused", 33, 3), ("triton-banded", 33, 64),
    ("triton-default", 20, 768),
    ("chunked", 1, 3), ("chunked", 7, 64), ("chunked", 127, 64), ("chunked", 300, 3), ("chunked", 40, 768),
    ("reference", 7, 64), ("reference", 127, 3),
]


@pytest.mark.parametrize(("impl", "b", "d"), SYM_CASES)
def test_symmetric_matches_float64(impl, b, d):
    torch.manual_seed(b * 1000 + d)
    run_symmetric(IMPLS[impl], b, d, torch.float32, s=14.3)


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
@pytest.mark.parametrize("s", [1.0, 100.0])
def test_symmetric_extreme_temperature(impl, s):
    torch.manual_seed(int(s))
    run_symmetric(IMPLS[impl], 33 if impl == "triton" else 127, 64, torch.float32, s=s)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_symmetric_low_precision(impl, dtype):
    torch.manual_seed(3)
    run_symmetric(IMPLS[impl], 33, 64, dtype, s=50.0)


@pytest.mark.parametrize("impl", ["triton", "triton-banded", "triton-fused", "chunked", "reference"])
@pytest.mark.parametrize("kind", ["reversal", "permutation"])
def test_symmetric_mix(impl, kind):
    torch.manual_seed(11)
    b = 33
    labels_b = torch.arange(b).flip(0) if kind == "reversal" else torch.randperm(b)
    run_symmetric(IMPLS[impl], b, 64, torch.float32, s=20.0, mix=(labels_b, 0.3))


def run_info_nce(impl, m, n, e, d, dtype, s, *, permuted=True, mix_lam=None):
    q, k = emb(m, d, dtype), emb(n, d, dtype)
    extra = None if e == 0 else emb(e, d, dtype).detach()
    labels = torch.randperm(n)[:m] if permuted else None
    mix = None if mix_lam is None else (torch.randint(0, n, (m,)), mix_lam)
    scale = torch.tensor(s, dtype=torch.float32, requires_grad=True)  # shape [] this time
    got = grads(lambda a, b, c: info_nce(a, b, c, labels=labels, mix=mix, extra_keys=extra, impl=impl),
                q, k, scale)
    lab = torch.arange(m) if labels is None else labels
    ex64 = None if extra is None else extra.double()
    want = grads(lambda a, b, c: oracle_info_nce(a, b, c, lab, mix, ex64), *as64(q, k, scale))
    check_close(got, want, None, dtype, ["d query", "d keys", "d scale"])


NCE_CASES = [
    ("triton", 7, 33, 19, 64), ("triton", 33, 7, 0, 3), ("triton-fused", 7, 33, 19, 64), ("triton", 1, 1, 0, 64),
    ("triton-banded", 7, 33, 19, 64),
    ("chunked", 127, 300, 50, 64), ("chunked", 300, 127, 0, 3), ("chunked", 7, 33, 19, 768),
    ("reference", 127, 300, 50, 64),
]


@pytest.mark.parametrize(("impl", "m", "n", "e", "d"), NCE_CASES)
def test_info_nce_matches_float64(impl, m, n, e, d):
    torch.manual_seed(m + n + e + d)
    if m > n:  # labels must index keys: positives drawn with replacement
        q, k = emb(m, d, torch.float32), emb(n, d, torch.float32)
        labels = torch.randint(0, n, (m,))
        scale = torch.tensor([7.0], requires_grad=True)
        got = grads(lambda a, b, c: info_nce(a, b, c, labels=labels, impl=IMPLS[impl]), q, k, scale)
        want = grads(lambda a, b, c: oracle_info_nce(a, b, c, labels), *as64(q, k, scale))
        check_close(got, want, None, torch.float32, ["d query", "d keys", "d scale"])
    else:
        run_info_nce(IMPLS[impl], m, n, e, d, torch.float32, s=7.0)


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_info_nce_mix_and_default_labels(impl):
    torch.manual_seed(5)
    run_info_nce(IMPLS[impl], 7, 33, 19, 64, torch.float32, s=30.0, mix_lam=0.6)
    run_info_nce(IMPLS[impl], 33, 33, 0, 64, torch.float32, s=100.0, permuted=False)


def test_info_nce_fp16_and_unnormalised_inputs():
    torch.manual_seed(6)
    run_info_nce(IMPLS["chunked"], 33, 40, 16, 64, torch.float16, s=1.0)
    q, k = emb(9, 16, torch.float32, normalise=False), emb(9, 16, torch.float32, normalise=False)
    sc = torch.tensor(1.0, requires_grad=True)
    got = grads(lambda a, b, c: info_nce(a, b, c, impl=TRITON_SMALL), q, k, sc)
    want = grads(lambda a, b, c: oracle_info_nce(a, b, c, torch.arange(9)), *as64(q, k, sc))
    check_close(got, want, None, torch.float32, ["d query", "d keys", "d scale"])


def test_symmetric_is_mean_of_both_directions():
    """contrastive_loss equals ½(info_nce(I, T) + info_nce(T, I)) — one matrix, both directions."""
    torch.manual_seed(8)
    img, txt = emb(50, 32, torch.float32), emb(50, 32, torch.float32)
    both = contrastive_loss(img, txt, 10.0, impl="chunked")
    halves = (info_nce(img, txt, 10.0, impl="chunked") + info_nce(txt, img, 10.0, impl="chunked")) / 2
    torch.testing.assert_close(both, halves)


def test_module_form_and_keys_without_grad():
    torch.manual_seed(9)
    img, txt = emb(12, 16, torch.float32), emb(12, 16, torch.float32)
    sc = torch.tensor([5.0])
    module = ContrastiveLoss(impl="chunked")
    torch.testing.assert_close(module(img, txt, sc), contrastive_loss(img, txt, sc, impl="reference"))
    k = txt.detach()
    info_nce(img, k, sc, impl=TRITON_SMALL).backward()  # no dK requested: keys are constants
    assert img.grad is not None and k.grad is None


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_strided_inputs(impl):
    """Row-strided views and column-major embeddings give the same loss and gradients."""
    torch.manual_seed(10)
    base = torch.zeros(25, 40)
    base[:, 3:35] = F.normalize(torch.randn(25, 32), dim=-1)
    img_view = base[:, 3:35].requires_grad_()  # row stride 40, storage offset 3
    txt = F.normalize(torch.randn(32, 25), dim=0).T.requires_grad_()  # strides (1, 25): column-major
    sc = torch.tensor([9.0], requires_grad=True)
    got = grads(lambda a, b, c: contrastive_loss(a, b, c, impl=IMPLS[impl]), img_view, txt, sc)
    want = grads(lambda a, b, c: oracle_symmetric(a, b, c), *as64(img_view, txt, sc))
    check_close(got, want, None, torch.float32, ["d image", "d text", "d scale"])


def test_auto_is_logged_once(caplog):
    import logging

    from vlscale.loss import backends

    backends._CACHE.clear()
    with caplog.at_level(logging.INFO, logger="vlscale.loss.backends"):
        for _ in range(3):
            contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), 2.0)
    assert [r.getMessage() for r in caplog.records].count("contrastive loss: impl='auto' on cpu -> chunked backend") == 1


def test_auto_and_explicit_backend_selection(monkeypatch):
    assert get_backend("auto", "cpu").name == "chunked"
    assert get_backend("reference", "cpu").name == "reference"
    for variant in ("triton", "triton-banded", "triton-fused"):  # the interpreter runs all of them
        assert get_backend(variant, "cpu").name == variant
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for variant in ("triton", "triton-banded", "triton-fused"):
        with pytest.raises(ValueError, match="not CUDA"):
            get_backend(variant, "cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        get_backend("fast", "cpu")


def test_process_group_without_distributed_module(monkeypatch):
    import importlib.util

    import vlscale.loss.contrastive as mod

    monkeypatch.setattr(mod, "_world_size", lambda pg: 2)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vlscale.loss.distributed" else real(name, *a))
    x = emb(4, 8, torch.float32)
    with pytest.raises(NotImplementedError, match="world size > 1"):
        contrastive_loss(x, x, 1.0, process_group=object())


def _bad(**kw):
    base = dict(a=torch.randn(4, 8), b=torch.randn(4, 8), s=torch.tensor([2.0]))
    base.update(kw)
    return base


BAD = [
    ("rank", _bad(a=torch.randn(4, 8, 1)), "rank 2"),
    ("rows", _bad(b=torch.randn(5, 8)), "shape mismatch"),
    ("dim", _bad(b=torch.randn(4, 7)), "D mismatch"),
    ("dtype", _bad(b=torch.randn(4, 8, dtype=torch.float64)), "dtype mismatch"),
    ("device", _bad(b=torch.randn(4, 8, device="meta")), "device mismatch"),
    ("nan", _bad(a=torch.full((4, 8), float("nan"))), "image_emb contains non-finite"),
    ("inf", _bad(b=torch.full((4, 8), float("inf"))), "text_emb contains non-finite"),
    ("scale_inf", _bad(s=torch.tensor([float("inf")])), "logit_scale contains non-finite"),
    ("scale_shape", _bad(s=torch.ones(2)), "logit_scale must have shape"),
    ("scale_sign", _bad(s=torch.tensor(-1.0)), "logit_scale must be > 0"),
    ("int", _bad(a=torch.ones(4, 8, dtype=torch.int64)), "must be float"),
]


@pytest.mark.parametrize(("case", "kw", "msg"), BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_symmetric(case, kw, msg):
    with pytest.raises(ValueError, match=msg):
        contrastive_loss(kw["a"], kw["b"], kw["s"], impl="chunked")


def test_bad_inputs_info_nce():
    q, k, s = torch.randn(4, 8), torch.randn(6, 8), torch.tensor(2.0)
    with pytest.raises(ValueError, match="labels out of range"):
        info_nce(q, k, s, labels=torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="labels out of range"):
        info_nce(q, k, s, labels=torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="must have shape"):
        info_nce(q, k, s, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        info_nce(q, k, s, labels=torch.zeros(4))
    with pytest.raises(ValueError, match="mix labels out of range"):
        info_nce(q, k, s, mix=(torch.tensor([0, 1, 2, 9]), 0.5))
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        info_nce(q, k, s, mix=(torch.tensor([0, 1, 2, 3]), 1.5))
    with pytest.raises(ValueError, match="extra_keys contains non-finite"):
        info_nce(q, k, s, extra_keys=torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match="D mismatch"):
        info_nce(q, k, s, extra_keys=torch.randn(3, 5))
    with pytest.raises(ValueError, match="keys has only"):
        info_nce(torch.randn(7, 8), k, s)
    with pytest.raises(ValueError, match="float64"):
        info_nce(q.double(), k.double(), s, impl=TRITON_SMALL)


def test_benchmark_smoke(tmp_path):
    """The benchmark script runs end to end on CPU and every provider it ran matches float64."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_contrastive_loss.py"
    spec = importlib.util.spec_from_file_location("bench_contrastive_loss", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads(out.read_text())
    ran = {r["provider"]: r for r in report["rows"] if r["status"] == "ok"}
    assert {"naive", "chunked", "triton"} <= set(ran), report["rows"]
    for row in ran.values():
        assert row["ms"] > 0 and row["floor_ms"] > 0
        assert max(row["max_rel_err_vs_fp64"].values()) < 1e-4, row
    assert out.with_suffix(".md").read_text().count("| triton |") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "triton-banded", "triton-fused", "compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("b", "d"), [(1, 64), (127, 512), (1000, 768), (4097, 512), (300, 1024)])
def test_triton_on_gpu_matches_float64(impl, dtype, b, d):
    """The compiled kernels (tensor-core dots in the input dtype) on a real GPU, sm_80+; the compiled
    chunked tile (cuBLAS 16-bit products with fp32 outputs) on any GPU."""
    torch.manual_seed(b + d)
    dev = torch.device("cuda")
    if impl.startswith("triton") and torch.cuda.get_device_capability(dev)[0] < 8:
        pytest.skip("triton backend needs sm_80+")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no bf16 on this GPU")
    img = F.normalize(torch.randn(b, d, device=dev, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=dev, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor([30.0], device=dev, requires_grad=True)
    labels_b = torch.randperm(b, device=dev)
    for mix in (None, (labels_b, 0.4)):
        got = grads(lambda i, t, sc, m=mix: contrastive_loss(i, t, sc, mix=m, impl=impl), img, txt, scale)
        want = grads(lambda i, t, sc, m=mix: oracle_symmetric(i, t, sc, m), *as64(img, txt, scale))
        naive = None
        if dtype != torch.float32:
            naive = grads(lambda i, t, sc, m=mix: oracle_symmetric(i, t, sc.to(dtype), m).float(),
                          img, txt, scale)
        check_close([x.cpu() for x in got], [x.cpu() for x in want],
                    None if naive is None else [x.cpu() for x in naive], dtype, ["d image", "d text", "d scale"])
