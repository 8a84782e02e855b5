"""``vlscale doctor``: can this machine run vlscale, and which paths will it take?

Prints the torch build (version, CUDA version, the GPU architectures it carries kernels for), every
visible GPU (name, compute capability, memory, whether this torch build can run on it), which loss
backend ``impl="auto"`` picks on each device and why (and every registered backend's status), and
DeepSpeed's C++/CUDA ops (compatible / pre-built) with the toolkit its JIT builds would use. ``--json``
gives the same as one JSON object. Exit status 1 when a visible GPU cannot run with this torch build.

:func:`check_torch_build` is the start-up check of :mod:`vlscale.train.runtime`: a torch build without
kernels for the GPU present (torch ≥ 2.11's default CUDA 12.8 / 13.x wheels carry none for a V100,
sm_70) would otherwise fail at the first CUDA op with "no kernel image is available for execution on
the device"; it fails at once instead, naming the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
from typing import Any

import torch

from vlscale.engines import ds_shm

V100_FIX = ("install a torch build with sm_70 kernels — the CUDA 12.6 builds: `pip install -r requirements-v100.txt` "
            "(torch from https://download.pytorch.org/whl/cu126), see README 'V100 (sm_70)'")
# DeepSpeed ops a vlscale run can reach. vlscale itself builds torch's AdamW (no op); these come in
# with a user ds_config: an "optimizer" block (Adam/AdamW on GPU) or optimizer offload.
USED_OPS = {"fused_adam": "a ds_config 'optimizer' block (Adam/AdamW) on GPU",
            "cpu_adam": "ZeRO-Offload of the optimizer"}
# Ops DeepSpeed would build on its own that vlscale turns off.
SKIPPED_OPS = {"deepspeed_shm_comm": "skipped by vlscale on CPU (inference all-reduce only; VLSCALE_DS_SHM_COMM=1 "
                                     "builds it)"}

def arch_runs_on(arch: str, cap: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` (an entry of ``torch.cuda.get_arch_list()``) runs on ``cap``.

    ``sm_XY`` machine code runs on the same major version from minor Y up (``sm_XYa``: on X.Y only);
    ``compute_XY`` PTX is compiled by the driver for any capability ≥ X.Y.
    """
    m = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", arch)
    if m is None:
        return False
    num = int(m.group(2))
    major, minor = divmod(num, 10)
    if m.group(1) == "compute":
        return cap >= (major, minor)
    if m.group(3) == "a":
        return cap == (major, minor)
    return cap[0] == major and cap[1] >= minor


def build_problem(cap: tuple[int, int], arch_list: list[str], name: str = "the GPU") -> str | None:
    """Why this torch build cannot run on a GPU of capability ``cap`` (None when it can)."""
    if not arch_list or any(arch_runs_on(a, cap) for a in arch_list):
        return None
    fix = V100_FIX if cap < (7, 5) else ("install a torch build whose arch list includes "
                                        f"sm_{cap[0]}{cap[1]} (https://pytorch.org/get-started/locally/)")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) carries kernels for {' '.join(arch_list)} "
            f"but {name} has compute capability {cap[0]}.{cap[1]} (sm_{cap[0]}{cap[1]}): every CUDA op would "
            f"fail with 'no kernel image is available'. Fix: {fix}; `vlscale doctor` shows the details")


def check_torch_build(device: torch.device) -> None:
    """Raise ``RuntimeError`` naming the fix when this torch build has no kernels for ``device``."""
    if device.type != "cuda" or torch.version.cuda is None:  # CPU, or a ROCm build
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = tuple(torch.cuda.get_device_capability(index))
    problem = build_problem(cap, torch.cuda.get_arch_list(), f"cuda:{index} ({torch.cuda.get_device_name(index)})")
    if problem is not None:
        raise RuntimeError(problem)


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    arch_list = torch.cuda.get_arch_list()
    out = []
    for i in range(torch.cuda.device_count()):
        cap = tuple(torch.cuda.get_device_capability(i))
        name = torch.cuda.get_device_name(i)
        try:
            mem = round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
        except Exception:  # memory is informative only
            mem = None
        out.append({"index": i, "name": name, "capability": f"{cap[0]}.{cap[1]}", "memory_gib": mem,
                    "problem": build_problem(cap, arch_list, f"cuda:{i} ({name})")})
    return out


def _loss(devices: list[str], probe_compile: bool) -> dict[str, Any]:
    from vlscale.loss import backends

    auto = {}
    for dev in devices:
        name, why = backends.explain_auto(dev)
        auto[dev] = {"impl": name, "why": why}
    table = {}
    for name in backends.registered_backends():
        info = backends.backend_info(name)
        row = {"summary": info.summary}
        for dev in devices:
            if name == "compiled" and dev == "cpu" and not probe_compile:
                row[dev] = "not probed on CPU (--probe-compile)"
                continue
            why = backends.unavailable_reason(name, dev)
            row[dev] = "ok" if why is None else why
        table[name] = row
    return {"auto": auto, "backends": table}


def _nvcc() -> dict[str, Any]:
    """The CUDA toolkit DeepSpeed's JIT builds would use (CUDA_HOME, else nvcc on PATH)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else "nvcc"
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {"nvcc": None}
    m = re.search(r"release (\d+)\.(\d+)", text)
    return {"nvcc": nvcc, "version": f"{m.group(1)}.{m.group(2)}" if m else None}


def _deepspeed(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    noise = io.StringIO()  # DeepSpeed prints its own warnings; keep them out of --json output
    try:
        with contextlib.redirect_stdout(noise):
            import deepspeed
            from deepspeed.git_version_info import installed_ops
            from deepspeed.ops.op_builder.all_ops import ALL_OPS, accelerator_name
            from deepspeed.ops.op_builder.builder import probe_is_compatible

            ops = {name: {"compatible": bool(probe_is_compatible(b, False)), "installed": bool(installed_ops.get(name)),
                          **({"used_for": USED_OPS[name]} if name in USED_OPS else {}),
                          **({"skipped": SKIPPED_OPS[name]} if name in SKIPPED_OPS else {})}
                   for name, b in sorted(ALL_OPS.items())}
    except Exception as err:  # report, do not crash the doctor
        return {"error": f"{type(err).__name__}: {err}"}
    out: dict[str, Any] = {"version": deepspeed.__version__, "accelerator": accelerator_name, "ops": ops,
                           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"), "notes": []}
    if gpus:
        out["toolkit"] = tk = _nvcc()
        old = [g for g in gpus if tuple(map(int, g["capability"].split("."))) < (7, 5)]
        if old and tk.get("version") and int(tk["version"].split(".")[0]) >= 13:
            out["notes"].append(f"nvcc {tk['version']} cannot compile for {old[0]['name']} (sm_70 was dropped in "
                                "CUDA 13): DeepSpeed's JIT ops need a CUDA 12.x toolkit (set CUDA_HOME); vlscale's own "
                                "optimizer (torch AdamW, no ds_config 'optimizer' block, no offload) needs none")
        archs = out["TORCH_CUDA_ARCH_LIST"]
        for g in gpus if archs else []:
            if g["capability"] not in re.split(r"[;\s]+", archs.replace("+PTX", "")):
                out["notes"].append(f"TORCH_CUDA_ARCH_LIST={archs!r} leaves out {g['name']} ({g['capability']}): "
                                    "DeepSpeed's JIT ops would not run on it")
    out["shm_buffers"] = shm = _shm_summary()
    if shm["stale_files"]:
        out["notes"].append(f"{shm['stale_files']} DeepSpeed shm-comm buffers in {shm['dir']} that no process uses "
                            f"hold {shm['stale_bytes'] / 2**30:.2f} GiB of RAM (DeepSpeed never removes them; vlscale "
                            "does not create them): `vlscale doctor --free-shm` deletes them")
    return out


def _shm_summary() -> dict[str, Any]:
    bufs = ds_shm.shm_buffers()
    stale = [b for b in bufs if not b["in_use"]]
    return {"dir": ds_shm.SHM_DIR, "in_use": len(bufs) - len(stale), "stale_files": len(stale),
            "stale_bytes": sum(b["bytes"] for b in stale)}


def collect(probe_compile: bool = False) -> dict[str, Any]:
    """Everything the doctor reports, as one JSON-able dict."""
    import triton  # noqa: F401 — vlscale needs it; an ImportError here is the answer

    gpus = _gpus()
    devices = ["cpu"] + [f"cuda:{g['index']}" for g in gpus if g["problem"] is None]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "arch_list": torch.cuda.get_arch_list(),
                  "cuda_available": torch.cuda.is_available()},
        "triton": sys.modules["triton"].__version__,
        "gpus": gpus,
        "loss": _loss(devices, probe_compile),
        "deepspeed": _deepspeed(gpus),
    }


def render(rep: dict[str, Any]) -> str:
    """The human-readable report."""
    t = rep["torch"]
    lines = [f"python {rep['python']} on {rep['platform']}",
             f"torch {t['version']} (CUDA {t['cuda'] or 'none: CPU build'}), triton {rep['triton']}",
             f"torch build carries GPU code for: {' '.join(t['arch_list']) or '-'}", "", "GPUs:"]
    for g in rep["gpus"]:
        lines.append(f"  cuda:{g['index']} {g['name']}  capability {g['capability']}  {g['memory_gib']} GiB  "
                     + ("ok" if g["problem"] is None else "CANNOT RUN"))
        if g["problem"]:
            lines.append(f"    {g['problem']}")
    if not rep["gpus"]:
        lines.append("  none visible (CPU only)")
    lines += ["", "contrastive loss:"]
    for dev, a in rep["loss"]["auto"].items():
        lines.append(f"  impl='auto' on {dev} -> {a['impl']}: {a['why']}")
    for name, row in rep["loss"]["backends"].items():
        status = "; ".join(f"{dev}: {v}" for dev, v in row.items() if dev != "summary")
        lines.append(f"  {name:<14} {row['summary']}  [{status}]")
    ds = rep["deepspeed"]
    lines += ["", "DeepSpeed:"]
    if "error" in ds:
        lines.append(f"  not importable: {ds['error']}")
    else:
        lines.append(f"  {ds['version']} (accelerator {ds['accelerator']}); TORCH_CUDA_ARCH_LIST="
                     f"{ds['TORCH_CUDA_ARCH_LIST']}; toolkit {ds.get('toolkit', {}).get('version', '-')}")
        for name, op in ds["ops"].items():
            why = op.get("used_for") or op.get("skipped")
            used = f"  <- {why}" if why else ""
            lines.append(f"  {name:<26} compatible {'yes' if op['compatible'] else 'NO ':<4} "
                         f"pre-built {'yes' if op['installed'] else 'no (JIT on first use)'}{used}")
        lines += [f"  note: {n}" for n in ds["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vlscale doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    ap.add_argument("--probe-compile", action="store_true",
                    help="also try torch.compile on CPU for the 'compiled' loss backend (~15 s)")
    ap.add_argument("--free-shm", action="store_true",
                    help=f"delete DeepSpeed's shm-comm buffers in {ds_shm.SHM_DIR} that no live process uses")
    args = ap.parse_args(argv)
    if args.free_shm:
        files, freed = ds_shm.free_stale_shm_buffers()
        print(f"freed {files} stale DeepSpeed shm-comm buffers ({freed / 2**30:.2f} GiB) in {ds_shm.SHM_DIR}",
              file=sys.stderr)
    rep = collect(probe_compile=args.probe_compile)
    print(json.dumps(rep, indent=2) if args.json else render(rep))
    return 1 if any(g["problem"] for g in rep["gpus"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
