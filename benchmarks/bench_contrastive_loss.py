"""Benchmark of the symmetric CLIP loss, forward + backward: vlscale's backends against peers.

Providers: ``naive`` (open_clip's formulation: dense logits + two cross-entropies), ``chunked``
and ``triton`` (vlscale), ``infcl`` (Inf-CL's ``cal_flash_loss`` once per direction; skipped with
a note when ``inf_cl`` is not importable or D is not a multiple of 256). For each batch size B
and dimension D it records the median time (``triton.testing.do_bench``), the achieved TFLOP/s
counting the floor of 8·B²·D FLOPs, the ratio to that floor at the device's MEASURED bf16 matmul
rate, the peak memory beyond the inputs, and (for B ≤ ``--check-max``) each provider's error
against a float64 reference: loss, both embedding gradients and the logit-scale gradient.

Results go to ``benchmarks/results/contrastive_loss_<device>_<timestamp>.{json,md}`` with the
device name, versions and the full config. ``--smoke`` runs a tiny CPU configuration (Triton in
its interpreter) in seconds: it checks the script, not performance — no GPU numbers are made up.

    python benchmarks/bench_contrastive_loss.py                       # GPU sweep, bf16, D=512,768
    python benchmarks/bench_contrastive_loss.py --sizes 32768 --dims 512 --providers triton,infcl
    TRITON_INTERPRET=1 python benchmarks/bench_contrastive_loss.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import peak_extra_mib, time_ms  # noqa: E402  (sibling script; benchmarks/ is no package)


def _ensure_vlscale_importable() -> None:
    """Run from a plain checkout too (e.g. the GPU machine, no pip install): put the repository on
    ``sys.path`` and map the top-level ``kernels/`` folder to ``vlscale.kernels`` as pyproject does."""
    try:
        import vlscale.kernels
        return
    except ImportError:
        pass
    import importlib.util

    sys.path.insert(0, str(ROOT))
    import vlscale

    spec = importlib.util.spec_from_file_location(
        "vlscale.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["vlscale.kernels"] = module
    spec.loader.exec_module(module)
    vlscale.kernels = module


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIZES = [4096, 8192, 16384, 32768, 65536, 131072, 262144]
RESULTS = ROOT / "benchmarks" / "results"


def naive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """open_clip ``ClipLoss`` on one device: materialises the B×B logits."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def vlscale_loss(impl: object) -> Callable:
    from vlscale.loss import contrastive_loss

    return lambda img, txt, scale: contrastive_loss(img, txt, scale, impl=impl)


def triton_loss(overrides: dict) -> Callable:
    """vlscale's triton backend, with KernelSettings ``overrides`` (e.g. ``{"block_n": 128}``)."""
    if not overrides:
        return vlscale_loss("triton")
    from vlscale.loss.triton_backend import TritonBackend

    return vlscale_loss(TritonBackend(**overrides))


def infcl_loss() -> Callable | str:
    """Inf-CL, one call per direction, averaged (what ANCHORS.md measured); or why it is skipped."""
    try:
        from inf_cl import cal_flash_loss
    except Exception as exc:  # any import failure means "not available here"
        return f"inf_cl not importable ({type(exc).__name__}: {exc})"

    def loss(img, txt, scale):
        labels = torch.arange(img.shape[0], device=img.device)
        return (cal_flash_loss(img, txt, labels, scale) + cal_flash_loss(txt, img, labels, scale)) / 2

    return loss


def provider_fn(name: str, d: int, overrides: dict | None = None) -> Callable | str:
    if name == "naive":
        return naive_loss
    if name == "chunked":
        return vlscale_loss(name)
    if name == "triton":
        return triton_loss(overrides or {})
    if name == "infcl":
        if d % 256:
            return f"Inf-CL needs D divisible by 256 (D={d})"
        return infcl_loss()
    raise ValueError(f"unknown provider {name!r}")




def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int) -> float:
    """Measured dense matmul rate (n³, the given dtype): the denominator of the floor."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, reps=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def make_inputs(b: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    t = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)  # learnable scalar, like CLIP
    return img, txt, t


def step_fn(loss_fn: Callable, img, txt, t, mode: str) -> Callable[[], None]:
    def run() -> None:
        for x in (img, txt, t):
            x.grad = None
        if mode == "fwd":
            with torch.no_grad():
                loss_fn(img, txt, t.exp())
            return
        loss_fn(img, txt, t.exp()).backward()

    return run


def errors_vs_float64(loss_fn: Callable, img, txt, t) -> dict[str, float]:
    """Relative max error of loss and every gradient against the float64 reference backend."""
    from vlscale.loss import contrastive_loss

    def grads(fn, *xs):
        for x in xs:
            x.grad = None
        out = fn(xs[0], xs[1], xs[2].exp())
        out.backward()
        return [out.detach().double()] + [x.grad.detach().double() for x in xs]

    got = grads(loss_fn, img, txt, t)
    ref_in = [x.detach().double().requires_grad_() for x in (img, txt, t)]
    want = grads(lambda a, b, s: contrastive_loss(a, b, s, impl="reference"), *ref_in)
    names = ["loss", "d_image", "d_text", "d_logit_scale"]
    return {n: float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for n, g, w in zip(names, got, want)}


def measure(name: str, b: int, d: int, args, device: torch.device, rate: float) -> dict:
    row = {"provider": name, "B": b, "D": d, "dtype": args.dtype, "mode": args.mode}
    overrides = json.loads(args.triton_settings) if name == "triton" and args.triton_settings else {}
    if overrides:
        row["triton_settings"] = overrides
    fn = provider_fn(name, d, overrides)
    if isinstance(fn, str):
        return {**row, "status": "skipped", "note": fn}
    dtype = DTYPES[args.dtype]
    try:
        img, txt, t = make_inputs(b, d, dtype, device, seed=b + d)
        run = step_fn(fn, img, txt, t, args.mode)
        if device.type == "cuda":
            row["peak_extra_mib"] = peak_extra_mib(run, device)
        ms = time_ms(run, device, args.reps)
        flops = (8 if args.mode == "full" else 2) * b * b * d
        row.update(status="ok", ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
                   floor_ms=flops / (rate * 1e12) * 1e3)
        row["ratio_to_floor"] = ms / row["floor_ms"]
        if b <= args.check_max and args.mode == "full":
            row["max_rel_err_vs_fp64"] = errors_vs_float64(fn, img, txt, t)
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom")
    except Exception as exc:  # e.g. triton OutOfResources for a tuning candidate: record, go on
        if not args.tune:
            raise
        row.update(status="failed", note=f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def environment(device: torch.device, rate: float, args) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "matmul_tflops_measured": rate,
        "matmul_dtype": args.rate_dtype,
        "config": vars(args) | {"out": str(args.out)},
    }


def to_markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        "# Symmetric CLIP loss, forward + backward" if env["config"]["mode"] == "full" else "# forward only",
        "",
        f"Device: {env['device']} ({env['device_type']}); torch {env['torch']}, triton {env['triton']}; "
        f"{env['timestamp']}. Measured {env['matmul_dtype']} matmul: {env['matmul_tflops_measured']:.3g} TFLOP/s "
        "(the floor's denominator).",
        "",
        "| provider | B | D | ms | TFLOP/s | floor ms | × floor | peak extra MiB | max rel err (loss / dI / dT / ds) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {r['B']} | {r['D']} | {r['status']} | | | | | {r.get('note', '')} |")
            continue
        err = r.get("max_rel_err_vs_fp64")
        err_s = " / ".join(f"{v:.1e}" for v in err.values()) if err else "–"
        mem = f"{r['peak_extra_mib']:.0f}" if "peak_extra_mib" in r else "–"
        lines.append(f"| {r['provider']} | {r['B']} | {r['D']} | {r['ms']:.3f} | {r['tflops']:.3g} | "
                     f"{r['floor_ms']:.3f} | {r['ratio_to_floor']:.2f} | {mem} | {err_s} |")
    lines += ["", "Config: `" + json.dumps(env["config"]) + "`", ""]
    return "\n".join(lines)


# Coordinate descent over the Triton tile settings: one axis at a time, keep the fastest value.
TUNE_AXES = {
    "backward": ["banded", "fused"],
    "block_n": [64, 128],
    "block_m": [64, 128],
    "block_d": [32, 64, 128],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4],
    "grad_block_m": [32, 64, 128],
    "grad_block_n": [32, 64, 128],
    "band_elems": [1 << 26, 1 << 27, 1 << 28],
}


def tune(args, device: torch.device, rate: float) -> list[dict]:
    """Time the triton provider for each candidate setting at the first (B, D); every try is recorded."""
    b, d = int(args.sizes.split(",")[0]), int(args.dims.split(",")[0])
    best: dict = json.loads(args.triton_settings) if args.triton_settings else {}
    rows = []
    for axis, values in TUNE_AXES.items():
        timed = {}
        for v in values:
            args.triton_settings = json.dumps({**best, axis: v})
            rows.append(measure("triton", b, d, args, device, rate))
            print(json.dumps(rows[-1]), flush=True)
            if rows[-1]["status"] == "ok":
                timed[v] = rows[-1]["ms"]
        if timed:
            best[axis] = min(timed, key=timed.get)
    args.triton_settings = json.dumps(best)
    print(f"best triton settings at B={b}, D={d}: {args.triton_settings}", flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated batch sizes B")
    p.add_argument("--dims", default="512,768", help="comma-separated embedding dims D")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--providers", default="naive,chunked,triton,infcl")
    p.add_argument("--mode", default="full", choices=["full", "fwd"])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (CPU); do_bench on CUDA")
    p.add_argument("--check-max", type=int, default=8192, help="largest B checked against float64")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (checks the script, not speed)")
    p.add_argument("--triton-settings", default="", help='JSON KernelSettings overrides, e.g. {"block_n": 128}')
    p.add_argument("--tune", action="store_true",
                   help="first tune the triton tiles at the first size/dim (every try recorded), then sweep")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.dims, args.dtype, args.reps, args.check_max = "40", "32", "fp32", 1, 10**9
    args.rate_dtype = "bf16" if not args.smoke else "fp32"
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    _ensure_vlscale_importable()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("smoke: TRITON_INTERPRET is not 1, the triton provider will be skipped", file=sys.stderr)
        args.providers = args.providers.replace("triton", "").strip(",").replace(",,", ",")
    rate = matmul_tflops(DTYPES[args.rate_dtype], device, 8192 if device.type == "cuda" else 256)
    rows = tune(args, device, rate) if args.tune else []
    for d in (int(x) for x in args.dims.split(",")):
        for b in (int(x) for x in args.sizes.split(",")):
            for name in args.providers.split(","):
                rows.append(measure(name, b, d, args, device, rate))
                print(json.dumps(rows[-1]), flush=True)
    env = environment(device, rate, args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"contrastive_loss_{'smoke' if args.smoke else env['device'].replace(' ', '_')}_" \
           f"{env['timestamp'].replace(':', '').replace('+0000', 'Z')}"
    (args.out / f"{stem}.json").write_text(json.dumps({**env, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(to_markdown(env, rows))
    print(f"wrote {args.out / stem}.{{json,md}}")
    return args.out / f"{stem}.json"


if __name__ == "__main__":
    main()
