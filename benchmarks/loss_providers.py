"""The loss benchmark's providers, inputs and float64 checks (``benchmarks/bench_contrastive_loss.py``).

* :func:`all_providers` — ``naive`` (open_clip's ``ClipLoss`` on one device: dense logits, two
  cross-entropies), every backend registered in :mod:`vlscale.loss.backends` (enumerated, never
  hard-coded) and ``infcl`` (Inf-CL's ``cal_flash_loss`` once per direction; it returns a per-row
  loss VECTOR, so each direction is averaged before the two are);
* :func:`provider_fn` — a provider's ``(img, txt, scale) -> scalar`` callable, or why it cannot run;
* :func:`make_inputs` / :func:`step_fn` — L2-normalised embeddings and a learnable logit scale; one
  call of a mode (``fwd`` without a graph, ``bwd`` of a retained graph, ``full``);
* :func:`errors_vs_float64` / :func:`error_limits` — relative max errors of the loss and of every
  gradient against a float64 dense reference; flash-attention's rule for the thresholds: 2× PyTorch's
  own error in that dtype (the naive loss) plus a floor per dtype;
* :func:`build_case` — what the fresh-process memory measurement (``harness.peak_extra_fresh_process``)
  builds and calls.

benchmarks/ is not a package: the benchmark script imports this sibling and re-exports its names.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import harness
import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error floors per dtype, added to 2× the naive loss's own error (flash-attention's rule).
REL_FLOOR = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 1e-2}
ERROR_KEYS = ("loss", "d_image", "d_text", "d_logit_scale")


def registered_backends() -> list[str]:
    """Names of the backends registered in :mod:`vlscale.loss.backends` ("auto" excluded: it is a choice
    among them). Reads a registry function or mapping if the module has one, else ``IMPLS``."""
    from vlscale.loss import backends as reg

    names: list[str] = []
    for attr in ("registered_backends", "available_backends", "list_backends", "backend_names"):
        fn = getattr(reg, attr, None)
        if callable(fn):
            names = list(fn())
            break
    else:
        for attr in ("REGISTRY", "BACKENDS", "_REGISTRY"):
            table = getattr(reg, attr, None)
            if isinstance(table, dict):
                names = list(table)
                break
        else:
            names = list(reg.IMPLS)
    return [n for n in dict.fromkeys(str(n) for n in names) if n != "auto"]


def all_providers() -> list[str]:
    return ["naive", *registered_backends(), "infcl"]


def naive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """open_clip ``ClipLoss`` on one device: materialises the B×B logits."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def infcl_loss() -> Callable | str:
    """Inf-CL, one call per direction; each returns a per-row vector: mean per direction, then average."""
    try:
        from inf_cl import cal_flash_loss
    except Exception as exc:  # any import failure means "not available here"
        return f"inf_cl not importable ({type(exc).__name__}: {exc})"

    def loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(img.shape[0], device=img.device)
        i2t = cal_flash_loss(img, txt, labels, scale)
        t2i = cal_flash_loss(txt, img, labels, scale)
        return (i2t.mean() + t2i.mean()) / 2

    return loss


def provider_fn(name: str, d: int, device: torch.device, overrides: dict | None = None) -> Callable | str:
    """The loss callable ``(img, txt, scale) -> scalar`` of a provider, or why it cannot run here."""
    if name == "naive":
        return naive_loss
    if name == "infcl":
        return f"Inf-CL needs D divisible by 256 (D={d})" if d % 256 else infcl_loss()
    from vlscale.loss import contrastive_loss
    from vlscale.loss.backends import get_backend

    if name not in registered_backends():
        raise SystemExit(f"unknown provider {name!r}: choose among {', '.join(all_providers())}")
    try:
        backend = get_backend(name, device)
    except ValueError as exc:  # e.g. triton without a capable GPU or the interpreter
        return str(exc)
    if overrides and name == "triton":
        from vlscale.loss.triton_backend import TritonBackend

        backend = TritonBackend(**overrides)
    return lambda img, txt, scale: contrastive_loss(img, txt, scale, impl=backend)


def make_inputs(b: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    t = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)  # learnable, like CLIP
    return img, txt, t


def step_fn(loss_fn: Callable, img, txt, t, mode: str) -> Callable[[], None]:
    """One call of ``mode``: ``fwd`` (no graph), ``bwd`` (the backward of a forward already run), ``full``."""
    def zero() -> None:
        for x in (img, txt, t):
            x.grad = None

    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                loss_fn(img, txt, t.exp())
    elif mode == "bwd":
        loss = loss_fn(img, txt, t.exp())

        def run() -> None:
            zero()
            loss.backward(retain_graph=True)
    else:
        def run() -> None:
            zero()
            loss_fn(img, txt, t.exp()).backward()
    return run


def errors_vs_float64(loss_fn: Callable, img, txt, t) -> dict[str, float]:
    """Relative max error of the loss and of every gradient against a float64 dense reference."""
    def grads(fn: Callable, *xs: torch.Tensor) -> list[torch.Tensor]:
        for x in xs:
            x.grad = None
        out = fn(xs[0], xs[1], xs[2].exp())
        out.backward()
        return [out.detach()] + [x.grad.detach() for x in xs]

    got = grads(loss_fn, img, txt, t)
    ref_in = [x.detach().double().requires_grad_() for x in (img, txt, t)]
    want = grads(naive_loss, *ref_in)
    return {k: harness.rel_err(g, w) for k, g, w in zip(ERROR_KEYS, got, want)}


def error_limits(naive_errors: dict[str, float], dtype: str) -> dict[str, float]:
    return {k: 2.0 * naive_errors[k] + REL_FLOOR[dtype] for k in ERROR_KEYS}


def build_case(case: dict) -> Callable[[], None]:
    """Inputs and the call of one case (the fresh-process memory measurement builds it here)."""
    device = torch.device(case["device"])
    fn = provider_fn(case["provider"], case["D"], device, case.get("triton_settings"))
    if isinstance(fn, str):
        raise RuntimeError(fn)
    if case["provider"] == "compiled":
        # torch.compile runs at the first call: compile on a small batch first (dynamic shapes: no
        # recompilation at the real size), so the compiler's memory is not charged to the call.
        step_fn(fn, *make_inputs(64, case["D"], DTYPES[case["dtype"]], device, seed=0), "full")()
    img, txt, t = make_inputs(case["B"], case["D"], DTYPES[case["dtype"]], device, seed=case["B"] + case["D"])
    return step_fn(fn, img, txt, t, case["mode"])


def warm_compiled(device: torch.device, dtypes: list[str], *, b: int = 256, d: int = 512,
                  done: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Compile the ``compiled`` provider for each dtype (the backend's probe + torch.compile of the tile
    functions at their first call) and time it: ``{dtype: {"status", "probe_s", "first_s", "second_s",
    "compile_s", "note"}}``. Later processes reuse the compiler's on-disk caches. ``done`` gets the
    result after every dtype (a time limit then still leaves the dtypes finished so far)."""
    import time

    out: dict[str, dict] = {}
    for name in dtypes:
        row: dict = {"status": "ok"}
        try:
            t0 = time.perf_counter()
            fn = provider_fn("compiled", d, device)  # the backend's probe compiles on a tiny tile
            if isinstance(fn, str):
                raise RuntimeError(fn)
            probe = time.perf_counter() - t0
            run = step_fn(fn, *make_inputs(b, d, DTYPES[name], device, seed=b + d), "full")
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            row.update(probe_s=probe, first_s=times[0], second_s=times[1],
                       compile_s=probe + max(0.0, times[0] - times[1]))
        except Exception as exc:  # a compiler failure is the answer this step exists for
            row.update(status="failed", note=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
        out[name] = row
        if done is not None:
            done(out)
    return out
