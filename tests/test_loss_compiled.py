"""The compiled chunked backend (impl "compiled") against float64, the backend registry, and ``auto``.

torch.compile runs once per process (the backend's functions are compiled on first use and cached;
``dynamic=True`` keeps odd sizes from recompiling), so this module pays the compile once.
"""

from __future__ import annotations

import logging
import typing

import pytest
import torch
from test_contrastive_loss import as64, check_close, emb, grads, oracle_symmetric, run_info_nce, run_symmetric

from vlscale.config import LossConfig
from vlscale.loss import ReferenceBackend, backends, contrastive_loss, get_backend, precision
from vlscale.loss.chunked import ChunkedBackend
from vlscale.loss.compiled import CompiledChunkedBackend, compiled_unavailable_reason


@pytest.fixture(scope="module")
def compiled() -> CompiledChunkedBackend:
    # CPU compilation needs a C++ compiler; the CI image has one, so a failure here is a real error.
    reason = compiled_unavailable_reason("cpu")
    assert reason is None, reason
    return CompiledChunkedBackend(block_m=32, block_n=48)  # ragged edge tiles at 7, 127 and 300


@pytest.mark.parametrize(("b", "d"), [(7, 64), (127, 3), (300, 64)])
def test_symmetric_matches_float64(compiled, b, d):
    torch.manual_seed(b + d)
    run_symmetric(compiled, b, d, torch.float32, s=14.3)
    run_symmetric(compiled, b, d, torch.float32, s=100.0, mix=(torch.randperm(b), 0.3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_with_the_gpu_p_cast(compiled, monkeypatch, dtype):
    """16-bit inputs with P rounded to 16 bits (scaled by 2^k for fp16) inside the compiled graph."""
    monkeypatch.setenv(precision.CAST_P_ENV, "1")
    torch.manual_seed(3)
    run_symmetric(compiled, 33, 64, dtype, s=50.0)


def test_info_nce_queue_and_one_way_paths(compiled):
    """Row-only P (one-way loss), extra keys without gradient, labels, mixup: odd sizes."""
    torch.manual_seed(5)
    run_info_nce(compiled, 7, 33, 19, 64, torch.float32, s=30.0, mix_lam=0.6)
    run_info_nce(compiled, 33, 127, 0, 3, torch.float32, s=7.0)


def test_column_only_probabilities_match_eager(compiled):
    """The column-direction-only P (``row_coef=None``) and the row-only lse, against the oracle."""
    torch.manual_seed(6)
    q, k, s = torch.randn(45, 24), torch.randn(70, 24), torch.tensor([0.4])
    r, c = ReferenceBackend().lse(q.double(), k.double(), s.double())
    cc = torch.randn(70) / 70
    want = ReferenceBackend().grad(q.double(), k.double(), s.double(), r, c, None, cc.double())
    got = compiled.grad(q, k, s, r.float(), c.float(), None, cc)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    row, none = compiled.lse(q, k, s, need_col=False)
    assert none is None
    torch.testing.assert_close(row.double(), r, rtol=1e-6, atol=1e-6)


def test_every_registered_backend_runs_and_matches(compiled):
    """Whatever is registered is reachable by name through the public API (benchmarks and the
    doctor enumerate the same list) and computes the same loss and gradients."""
    names = backends.registered_backends()
    assert {"reference", "chunked", "compiled", "triton", "triton-banded", "triton-fused"} <= set(names)
    assert backends.registered_backends(include_oracle=False) == tuple(n for n in names if n != "reference")
    torch.manual_seed(7)
    img, txt = emb(19, 16, torch.float32), emb(19, 16, torch.float32)
    scale = torch.tensor([12.0], requires_grad=True)
    want = grads(lambda i, t, sc: oracle_symmetric(i, t, sc), *as64(img, txt, scale))
    for name in names:
        backend = get_backend(name, "cpu")
        assert backend.name == name
        got = grads(lambda i, t, sc, n=name: contrastive_loss(i, t, sc, impl=n), img, txt, scale)
        check_close(got, want, None, torch.float32, [f"{name} d image", f"{name} d text", f"{name} d scale"])


def test_config_accepts_exactly_the_registered_names():
    assert set(typing.get_args(typing.get_type_hints(LossConfig)["impl"])) == set(backends.impls())


def test_register_backend_makes_a_name_usable(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_CACHE", {})
    backends.register_backend("chunked-small", lambda: ChunkedBackend(4, 4), summary="test")
    assert "chunked-small" in backends.registered_backends() and "chunked-small" in backends.impls()
    x = torch.randn(9, 8)
    torch.testing.assert_close(contrastive_loss(x, x, 3.0, impl="chunked-small"),
                               contrastive_loss(x, x, 3.0, impl="reference"))
    with pytest.raises(ValueError, match="invalid backend name"):
        backends.register_backend("auto", ChunkedBackend, summary="no")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen capability, seen only by the backend selection."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backends, "_CACHE", {})
    cap = {"value": (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    return cap


def test_auto_picks_the_compiled_tile_on_v100(fake_gpu, monkeypatch):
    monkeypatch.setattr(backends, "_compiled_unavailable", lambda device: None)
    name, why = backends.explain_auto("cuda:0")
    assert name == "compiled" and "7.0" in why and "compiles" in why
    assert get_backend("auto", "cuda:0").name == "compiled"
    fake_gpu["value"] = (8, 0)
    assert backends.explain_auto("cuda:0")[0] == "triton"


def test_auto_falls_back_with_a_log_line_when_compile_fails(fake_gpu, monkeypatch, caplog):
    reason = "torch.compile failed on cuda:0: BackendCompilerFailed: no sm_70 support"
    monkeypatch.setattr(backends, "_compiled_unavailable", lambda device: reason)
    with caplog.at_level(logging.INFO, logger="vlscale.loss.backends"):
        backend = get_backend("auto", "cuda:0")
        get_backend("auto", "cuda:0")
    assert backend.name == "chunked"
    falls = [r for r in caplog.records if "falls back to the eager chunked backend" in r.getMessage()]
    assert len(falls) == 1 and reason in falls[0].getMessage() and falls[0].levelno == logging.WARNING
    with pytest.raises(ValueError, match=r"impl='compiled' cannot run: torch\.compile failed"):
        get_backend("compiled", "cuda:0")


def test_compile_failure_is_reported_not_raised(monkeypatch):
    """The probe turns any compiler error into a reason (so auto can fall back)."""
    from vlscale.loss import compiled as mod

    def broken():
        def fail(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")

        return dict.fromkeys(mod.EAGER, fail)

    monkeypatch.setattr(mod, "compiled_fns", broken)
    monkeypatch.setattr(mod, "_REASONS", {})
    reason = compiled_unavailable_reason("cpu")
    assert reason is not None and "no working C++ compiler" in reason
