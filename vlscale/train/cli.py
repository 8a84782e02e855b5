"""``vlscale train`` / ``python -m vlscale.train``: a recipe, overrides, optionally ``--resume``.

    python -m vlscale.train --recipe tiny-cpu train.steps=50 train.run_dir=runs/try
    deepspeed --num_gpus 8 --module vlscale.train --recipe zerovl-v100 --deepspeed_config ds.json
    torchrun --nproc_per_node 8 -m vlscale.train --recipe fsdp2 --resume auto train.lr=1e-4
    accelerate launch --config_file launch/accelerate/fsdp2.yaml -m vlscale.train --recipe fsdp2

Every setting lives in the typed config (``vlscale.config``); the command line only names the
recipe and overrides fields (``section.key=value``, anywhere on the line), so there is no second
list of flags to keep in sync. ``--deepspeed`` / ``--deepspeed_config`` are DeepSpeed's own
(``deepspeed.add_config_arguments``); the launcher's settings and a user's ds_config win over the
recipe (:mod:`vlscale.train.launchers`). ``--print-config`` shows the resolved config and exits.
A failure prints one line (once, not once per rank); ``--debug`` prints the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vlscale.config import config_to_dict, load_recipe

PROG = "vlscale train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny-cpu", help="recipe name in launch/recipes, or a .json/.toml path")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.lr=1e-3")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue a run: 'auto' = the run dir's latest checkpoint (if any), or a checkpoint / run dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--debug", action="store_true", help="on failure, print the full traceback (every rank)")
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # The arguments deepspeed.add_config_arguments defines (same names, types and defaults).
    ds = p.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    ds.add_argument("--deepspeed", default=False, action="store_true",
                    help="train with DeepSpeed (engine.kind=deepspeed)")
    ds.add_argument("--deepspeed_config", default=None, type=str,
                    help="DeepSpeed json configuration file: it wins for what it sets (stage, offload, precision, "
                         "buckets, optimizer/scheduler blocks); the recipe fills the rest")
    ds.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    ds.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    """The recipe overrides, with DeepSpeed's flags turned into the config fields they mean."""
    out = list(args.overrides)
    path = args.deepspeed_config or args.deepscale_config
    if path:
        given = [o.split("=", 1)[1] for o in out if o.startswith("engine.ds_config=")]
        if given and given[-1] != path:
            raise ValueError(f"--deepspeed_config {path} and engine.ds_config={given[-1]} disagree; give one")
        out += ["engine.kind=deepspeed", f"engine.ds_config={path}"]
    elif args.deepspeed or args.deepscale:
        out.append("engine.kind=deepspeed")
    return out


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report_failure(exc: BaseException, *, every_rank: bool) -> int:
    """One line on stderr for a failure (rank 0 only unless ``every_rank``); the exit status."""
    rank = _rank()
    if every_rank or rank == 0:
        where = f" (rank {rank})" if every_rank and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        if not isinstance(exc, ValueError):
            text = f"{type(exc).__name__}: {text}"
        print(f"{PROG}: error{where}: {text} (--debug for the traceback)", file=sys.stderr, flush=True)
    return 2 if isinstance(exc, ValueError) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    # accelerate launch --debug sets ACCELERATE_DEBUG_MODE for the processes it starts.
    debug = args.debug or os.environ.get("ACCELERATE_DEBUG_MODE", "").lower() in ("1", "true", "yes")
    try:  # the config and the launch settings: the same on every rank, reported once
        cfg = load_recipe(args.recipe, _overrides(args))
        from vlscale.train.launchers import resolve_launch

        spec = resolve_launch(cfg)
    except Exception as exc:
        if debug:
            raise
        return report_failure(exc, every_rank=False)
    if args.print_config:
        print(json.dumps(config_to_dict(spec.config), indent=2))
        print("\n".join([spec.headline(), *spec.conflicts]), file=sys.stderr)
        return 0
    try:  # heavy imports only when training
        from vlscale.train.trainer import train

        summary = train(spec.config, resume=args.resume, spec=spec)
    except Exception as exc:  # may differ between ranks: each failing rank says its own
        if debug:
            raise
        return report_failure(exc, every_rank=True)
    if summary.get("eval"):
        print(json.dumps({"step": summary["step"], "eval": summary["eval"]}))
    return 0
