"""The README's first command: ``python -m vlscale.demo`` — data, training, evaluation in minutes on a CPU.

1. **data**: renders two-object scenes with compositional captions ("a red circle above a blue
   square", ...) into Arrow shards (:mod:`vlscale.demo_data`): a train split and a held-out split
   with five captions per image;
2. **train**: the ``tiny-cpu`` recipe through the **DeepSpeed launcher** — ``deepspeed
   --num_gpus 2 --module vlscale.train`` (two processes over gloo on a CPU; DeepSpeed's launcher
   honours ``--num_gpus`` with ``DS_ACCELERATOR=cpu``), ZeRO-2, gradient cache, the fused
   contrastive loss through its chunked path, loss gathered across both ranks;
3. **eval**: ``vlscale eval`` on the held-out split: Recall@1/5/10 both ways, against chance;
4. **memory**: ``vlscale memory report`` on the run: the memory model's per-rank prediction for
   this recipe beside what the training step really allocated, phase by phase (the trainer records
   a few steps; on CPU the demo asks for exact live tensor bytes), written to ``<out>/memory/``.

Each phase runs in its own process(es) and reports its own peak memory (RSS on CPU, CUDA
``max_memory_allocated`` per rank on GPU); the summary table prints them side by side.
``--launcher torchrun`` runs the same training under torchrun instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_nvidia() -> bool:
    # No CUDA query here: the demo process itself never touches the accelerator.
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()


def child_env(nproc: int) -> dict[str, str]:
    """Environment of the training processes: CPU accelerator for DeepSpeed without a GPU, and
    the cores split between the ranks (two ranks each using every core thrash each other)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not _has_nvidia():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TRITON_INTERPRET", "1")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    return env


def launch_command(launcher: str, nproc: int, port: int, train_args: list[str]) -> list[str]:
    """``deepspeed --num_gpus N --module vlscale.train ...`` (or torchrun), with this interpreter."""
    if launcher == "deepspeed":
        # Same as the `deepspeed` console script, but bound to this interpreter's environment.
        runner = "import sys; from deepspeed.launcher.runner import main; sys.exit(main())"
        return [sys.executable, "-c", runner, "--num_gpus", str(nproc), "--master_port", str(port),
                "--module", "vlscale.train", *train_args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "vlscale.train", *train_args]
    raise ValueError(f"launcher must be deepspeed or torchrun, got {launcher!r}")


def _run(cmd: list[str], env: dict[str, str], *, capture: bool) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise SystemExit(f"demo: command failed with exit code {proc.returncode}:\n  {' '.join(cmd)}")
    return time.perf_counter() - start, proc.stdout or ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlscale.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run folder (data/, checkpoints/, metrics.jsonl, ...)")
    p.add_argument("--nproc", type=int, default=2, help="training processes")
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    p.add_argument("--n-train", type=int, default=4000, help="training images to render")
    p.add_argument("--n-eval", type=int, default=300, help="held-out images (5 captions each)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra tiny-cpu recipe overrides")
    return p.parse_args(argv)


def _phase_rows(data: dict[str, Any], train_s: float, memory: dict[str, Any], ev: dict[str, Any]) -> list[str]:
    def mem(stats: dict[str, float]) -> str:
        cuda = stats.get("mem/cuda_max_alloc_mib")
        return f"{stats['mem/peak_rss_mib']:.0f} MiB RSS" + (f", {cuda:.0f} MiB CUDA" if cuda is not None else "")

    ranks = "; ".join(f"rank {i}: {mem(r)}" for i, r in enumerate(memory.get("ranks", [])))
    return [f"  data   {data['seconds']:6.1f} s   peak {data['peak_rss_mib']:.0f} MiB RSS",
            f"  train  {train_s:6.1f} s   peak {ranks}",
            f"  eval   {ev['seconds']:6.1f} s   peak {mem(ev['memory'])}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    env = child_env(args.nproc)
    t0 = time.perf_counter()
    print(f"[1/4] rendering {args.n_train} train + {args.n_eval} held-out scenes into Arrow shards ...", flush=True)
    _, text = _run([sys.executable, "-m", "vlscale.demo_data", str(out / "data"), "--n-train", str(args.n_train),
                    "--n-eval", str(args.n_eval)], env, capture=True)
    data = json.loads(text.strip().splitlines()[-1])
    if (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")  # a fresh run each time (the data is rebuilt too)
    for name in ("metrics.jsonl", "memory.json"):
        (out / name).unlink(missing_ok=True)
    # Exact tensor bytes per phase on CPU (the default there, sampled RSS, cannot see freed-and-reused
    # memory); on a GPU the allocator's own counters.
    backend = [] if _has_nvidia() else ["train.memory_backend=tensors"]
    train_args = ["--recipe", "tiny-cpu", f"train.run_dir={out}", f"data.train_shards={data['dirs']['train']}",
                  f"data.eval_shards={data['dirs']['eval']}", *backend, *args.overrides]
    cmd = launch_command(args.launcher, args.nproc, _free_port(), train_args)
    print(f"[2/4] training: {args.launcher} {' '.join(cmd[3:])}", flush=True)  # cmd[:3]: python -c/-m launcher
    train_s, _ = _run(cmd, env, capture=False)
    memory = json.loads((out / "memory.json").read_text())
    print("[3/4] evaluating zero-shot retrieval on the held-out scenes ...", flush=True)
    _, text = _run([sys.executable, "-m", "vlscale.eval.cli", str(out), "--out", str(out / "eval.json")], env,
                   capture=True)
    print(text.rstrip())
    ev = json.loads((out / "eval.json").read_text())
    print("[4/4] memory report of the training run: predicted vs measured per phase (rank 0) ...", flush=True)
    _, text = _run([sys.executable, "-m", "vlscale.memory.cli", "report", str(out), "--out", str(out / "memory")],
                   env, capture=True)
    print(text.rstrip())
    print(f"\nphases (wall time, peak memory), total {time.perf_counter() - t0:.0f} s:")
    print("\n".join(_phase_rows(data, train_s, memory, ev)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
