"""Benchmark of the distributed contrastive loss: communication model + one rank's work on one GPU.

Part ``model`` (CPU): bytes per rank per step for vlscale, open_clip's gather-with-grad local loss,
DisCo-CLIP and Inf-CL's ring (see ``benchmarks/comm_model.py``), written to
``benchmarks/results/comm_model.{json,md}``.

Part ``rank`` (GPU): the exact work ONE rank does at world size W (default 8), with the other ranks'
embeddings simulated on the same device — local rows B/W × all B columns — for each provider:

- ``vlscale-<impl>`` (triton, chunked, reference): the real autograd core
  (:func:`vlscale.loss.contrastive.fused_loss`) behind the distributed module's overlap wrapper,
  on local rows and a gather buffer it allocates, with a comm object that does the column
  log-sum-exp merge's arithmetic and slices the reduce-scatter (the network is not simulated: see
  the model for its bytes). ``vlscale-<impl>`` computes one block per owner (the pipelined
  gather, W ≤ 16); ``vlscale-<impl>-allgather`` the own block then the rest in two calls (the
  single all-gather path): comparing them tells whether W smaller kernel calls cost throughput;
- ``openclip-local``: ``ClipLoss(local_loss=True, gather_with_grad=True)``'s per-rank math: both
  sides gathered, two (B/W)×B logit blocks, two cross-entropies;

recording median ms (``triton.testing.do_bench``), achieved TFLOP/s counting 8·(B/W)·B·D, and the
peak memory beyond the inputs (``torch.cuda.max_memory_allocated``), through the shared
``benchmarks/harness.py`` (timing, record schema, plots). Without CUDA this part is
skipped with a message (no GPU numbers are made up); ``--smoke`` runs it on CPU at a tiny size with
wall-clock timing to check the script (used by the tests).

    python benchmarks/bench_distributed_loss.py --part model
    python benchmarks/bench_distributed_loss.py --part rank --world 8 --sizes 32768,262144,1048576
    python benchmarks/bench_distributed_loss.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comm_model  # sibling scripts (benchmarks/ is not a package)
import harness

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class SimulatedComm:
    """Rank 0 of W with no network: the merge does its arithmetic, the reduce-scatter slices."""

    def __init__(self, local_cols: int) -> None:
        self.local_cols = local_cols

    def merge_col_lse(self, col_lse_partial: torch.Tensor) -> torch.Tensor:
        peak = col_lse_partial.clone()  # stands for the all-reduce MAX output buffer
        return peak + torch.log(torch.exp(col_lse_partial - peak))

    def reduce_dk(self, dk_all: torch.Tensor) -> torch.Tensor:
        return dk_all[: self.local_cols].clone()

    def sum_scalar(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def vlscale_step(provider: str, world: int) -> Callable:
    """``vlscale-<impl>[-allgather]``: rank 0's forward + backward exactly as the distributed loss
    runs it (the overlap wrapper's per-owner blocks, or own block + the rest after one all-gather),
    with every gathered piece already landed."""
    from vlscale.loss.backends import get_backend
    from vlscale.loss.comm import PendingGather
    from vlscale.loss.contrastive import fused_loss, symmetric_plan
    from vlscale.loss.distributed import _OverlappedGather

    impl, pipelined = provider.split("-")[1], not provider.endswith("-allgather")

    def loss(img_loc, txt_loc, txt_others, scale):
        k_all = torch.cat([txt_loc.detach(), txt_others])  # the gather buffer this rank allocates
        b = img_loc.shape[0]
        pending = PendingGather(k_all, [b] * world, [None] * (world if pipelined else 1), pipelined=pipelined)
        backend = _OverlappedGather(get_backend(impl, img_loc.device), pending, txt_loc, 0)
        plan = symmetric_plan(b, num_total=k_all.shape[0], offset=0, device=img_loc.device)
        return fused_loss(img_loc, txt_loc, scale, plan, backend=backend, k_all=k_all, comm=SimulatedComm(b))

    return loss


def openclip_local_step(img_loc, txt_loc, txt_others, scale, img_others):
    """open_clip ClipLoss(local_loss=True, gather_with_grad=True) on rank 0."""
    all_img = torch.cat([img_loc, img_others])
    all_txt = torch.cat([txt_loc, txt_others])
    labels = torch.arange(img_loc.shape[0], device=img_loc.device)
    logits_i = scale * img_loc @ all_txt.T
    logits_t = scale * txt_loc @ all_img.T
    return (F.cross_entropy(logits_i.float(), labels) + F.cross_entropy(logits_t.float(), labels)) / 2




def inputs(b: int, world: int, d: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(b + d)
    local = b // world

    def emb(n, grad):
        x = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, dtype)
        return x.requires_grad_(grad)

    return emb(local, True), emb(local, True), emb(b - local, False), emb(b - local, False)


def measure(provider: str, b: int, mode: str, args, device: torch.device) -> dict:
    row = {"provider": provider, "B": b, "W": args.world, "local_rows": b // args.world, "D": args.dim,
           "dtype": args.dtype, "mode": mode}
    try:
        img, txt, txt_o, img_o = inputs(b, args.world, args.dim, DTYPES[args.dtype], device)
        t = torch.tensor([2.659], device=device, requires_grad=True)  # log(1/0.07)
        if provider == "openclip-local":
            fn = lambda: openclip_local_step(img, txt, txt_o, t.exp(), img_o)  # noqa: E731
        else:
            fn = (lambda lf: lambda: lf(img, txt, txt_o, t.exp()))(vlscale_step(provider, args.world))

        def run() -> None:
            for x in (img, txt, t):
                x.grad = None
            if mode == "fwd":
                with torch.no_grad():
                    fn()
            else:
                fn().backward()

        if device.type == "cuda" and args.memory != "off":
            row["peak_extra_mib"] = harness.peak_extra_cuda(run, device) / 2**20
        timing = harness.time_fn(run, device, reps=args.reps, min_time_s=args.min_time)
        flops = (8 if mode == "full" else 2) * (b // args.world) * b * args.dim
        row.update(status="ok", ms=timing["median_ms"], q20_ms=timing["q20_ms"], q80_ms=timing["q80_ms"],
                   reps=timing["reps"], tflops=flops / (timing["median_ms"] * 1e-3) / 1e12)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except ValueError as err:  # e.g. impl='triton' cannot run here
        row.update(status="skipped", note=str(err))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_rank_part(args) -> list[dict] | None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("part 'rank' needs a CUDA device: skipped (use --smoke for a CPU check of the script)")
        return None
    stem = "distributed_loss_" + ("smoke" if args.smoke else harness.environment(device)["device_name"].replace(" ", "_"))
    rec = harness.Recorder("distributed_loss", args, device, stem=stem)
    for b in args.sizes:
        for provider in args.providers:
            for mode in args.modes:
                rec.add(measure(provider, b, mode, args, device))
    rec.write(rank_markdown, [dict(name="time", x="B", y="ms", series=("provider", "mode"), ylabel="ms",
                                   title=f"one rank of W={args.world}: time vs global batch")])
    return rec.rows


def rank_markdown(rec: dict) -> str:
    cfg = rec["config"]
    lines = harness.md_header(rec, f"One rank's distributed loss work at W={cfg['world']} (other ranks simulated)")
    lines += [f"D={cfg['dim']}, {cfg['dtype']}; TFLOP/s counts 8·(B/W)·B·D (fwd+bwd) or 2·(B/W)·B·D (fwd); "
              "memory = peak beyond the inputs.", "",
              "| provider | mode | B | local rows | ms | TFLOP/s | peak extra MiB | status |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rec["rows"]:
        ms = f"{r['ms']:.2f}" if "ms" in r else "–"
        tf = f"{r['tflops']:.3g}" if "tflops" in r else "–"
        mem = f"{r['peak_extra_mib']:,.0f}" if "peak_extra_mib" in r else "–"
        lines.append(f"| {r['provider']} | {r['mode']} | {r['B']:,} | {r['local_rows']:,} | {ms} | {tf} | {mem} | "
                     f"{r['status']} |")
    lines += ["", *[f"![{p}]({p})" for p in rec.get("plots", [])]]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(p, sizes="32768,131072,262144,1048576",
                          providers="vlscale-triton,vlscale-triton-allgather,vlscale-chunked,openclip-local",
                          reps=10)
    p.add_argument("--part", choices=("model", "rank", "all"), default="all")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes, a.dim, a.dtype, a.reps = "64,96", 32, "fp32", 2
        a.providers = "vlscale-chunked,vlscale-reference-allgather,openclip-local"
    a.sizes = harness.parse_list(a.sizes, int)
    a.providers = harness.parse_list(a.providers)
    a.modes = harness.parse_modes(a.modes)
    if "bwd" in a.modes:
        p.error("modes: fwd and full (the distributed backward needs its forward's communication)")
    if any(s % a.world for s in a.sizes):
        p.error(f"every size must be a multiple of --world {a.world}")
    return a


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.part in ("model", "all") and not args.smoke:
        comm_model.main(["--out", str(args.out)])
    if args.part in ("rank", "all") or args.smoke:
        run_rank_part(args)


if __name__ == "__main__":
    main()
