"""The ``vlscale`` command: a thin dispatcher to each subcommand's own module.

Each subcommand lives beside the code it drives and exposes ``main(argv) -> int``; importing
one never imports the others (``vlscale shards`` does not pull in DeepSpeed).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("vlscale.data.cli", "build / inspect / verify Arrow shards"),
    "train": ("vlscale.train.cli", "train a dual encoder (use under deepspeed / torchrun / accelerate launch)"),
    "eval": ("vlscale.eval.cli", "zero-shot retrieval / classification of a checkpoint"),
    "doctor": ("vlscale.doctor", "torch build vs GPUs, the loss backend auto picks, DeepSpeed ops"),
    "concepts": ("vlscale.techniques.cli", "tag a shard set with ViCHA visual concepts mined by a checkpoint"),
    "memory": ("vlscale.memory.cli", "will a recipe fit (plan), what did it take (measure / report)"),
    "export": ("vlscale.export", "a checkpoint as an open_clip + Hugging Face folder"),
}


def _usage() -> str:
    lines = ["usage: vlscale [--version] <command> [args]   (also: python -m vlscale)", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from vlscale import __version__

        print(f"vlscale {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"vlscale: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
