"""``vlscale train`` / ``python -m vlscale.train``: a recipe, overrides, optionally ``--resume``.

    python -m vlscale.train --recipe tiny-cpu train.steps=50 train.run_dir=runs/try
    deepspeed --num_gpus 8 --module vlscale.train --recipe zerovl-v100
    torchrun --nproc_per_node 8 -m vlscale.train --recipe fsdp2 --resume auto

Every setting lives in the typed config (``vlscale.config``); the command line only names the
recipe and overrides fields (``section.key=value``), so there is no second list of flags to keep
in sync. ``--print-config`` shows the resolved config and exits.
"""

from __future__ import annotations

import argparse
import json
import sys

from vlscale.config import config_to_dict, load_recipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlscale train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny-cpu", help="recipe name in launch/recipes, or a .json/.toml path")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.lr=1e-3")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue a run: 'auto' = the run dir's latest checkpoint (if any), or a checkpoint / run dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except ValueError as exc:
        print(f"vlscale train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    from vlscale.train.trainer import train  # heavy imports only when training

    summary = train(cfg, resume=args.resume)
    if summary.get("eval"):
        print(json.dumps({"step": summary["step"], "eval": summary["eval"]}))
    return 0
