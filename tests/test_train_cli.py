"""The command line's papercuts: DeepSpeed's own flags, overrides anywhere, one error line, entry points.

All in-process or tiny subprocesses (no training): ``vlscale train`` parses ``--deepspeed`` /
``--deepspeed_config`` exactly as ``deepspeed.add_config_arguments`` defines them, takes
``section.key=value`` overrides after flags too, reports a failure in one line (once, not per
rank; the traceback with ``--debug``); ``python -m vlscale`` and ``vlscale --version`` work; the
launch scripts run the project's interpreter and take several nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlscale.train.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_deepspeed_flags_are_deepspeeds_own() -> None:
    import deepspeed

    theirs = deepspeed.add_config_arguments(argparse.ArgumentParser())
    ours = {a.dest: a for a in build_parser()._actions}
    for action in theirs._actions:
        if action.dest == "help":
            continue
        mine = ours[action.dest]
        assert (mine.option_strings, mine.default, mine.type, mine.nargs, type(mine)) == (
            action.option_strings, action.default, action.type, action.nargs, type(action)), action.dest


def test_overrides_anywhere_and_deepspeed_config_on_the_command_line(tmp_path: Path, capsys) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": true}}')
    argv = ["--recipe", "tiny-cpu", "--resume", "auto", "train.lr=0.01", "--deepspeed_config", str(ds),
            "--print-config", "train.steps=5", "train.global_batch_size=16"]
    args = build_parser().parse_intermixed_args(argv)
    assert args.overrides == ["train.lr=0.01", "train.steps=5", "train.global_batch_size=16"] and args.resume == "auto"
    assert main(argv) == 0
    out = capsys.readouterr()
    cfg = json.loads(out.out)
    assert (cfg["train"]["lr"], cfg["train"]["steps"], cfg["engine"]["ds_config"]) == (0.01, 5, str(ds))
    assert (cfg["engine"]["zero_stage"], cfg["train"]["precision"]) == (3, "bf16")  # the user's file wins
    assert f"engine.zero_stage: 3 from ds_config {ds} overrides 2" in out.err
    assert main(["--recipe", "fsdp2", "--deepspeed", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"]["kind"] == "deepspeed"
    assert main(["--deepspeed_config", str(ds), "engine.ds_config=other.json"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_a_failure_is_one_line_on_rank_zero_and_a_traceback_with_debug(monkeypatch, capsys) -> None:
    bad = ["--recipe", "tiny-cpu", "train.lr=-1"]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlscale train: error: config: train.lr must be > 0"), err
    assert "(--debug for the traceback)" in err[0]
    monkeypatch.setenv("RANK", "1")  # the same config error on the other ranks: said once, by rank 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(bad) == 2 and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match=r"train\.lr must be > 0"):
        main([*bad, "--debug"])


def test_python_m_vlscale_and_version() -> None:
    from vlscale import __version__

    for cmd in ([sys.executable, "-m", "vlscale", "--version"], [sys.executable, "-m", "vlscale.cli", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert (out.returncode, out.stdout.strip()) == (0, f"vlscale {__version__}"), out.stderr
    out = subprocess.run([sys.executable, "-m", "vlscale"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "train" in out.stdout


def _dry_run(script: str, **env: str) -> str:
    mine = ("PYTHON", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")  # in-process runs may set some
    full = {k: v for k, v in os.environ.items() if k not in mine} | {"DRY_RUN": "1", **env}
    out = subprocess.run(["bash", str(ROOT / "launch" / script), "--recipe", "tiny-cpu", "train.steps=2"],
                         env=full, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="no project venv in this checkout")
def test_launch_scripts_use_the_project_venv_and_take_several_nodes() -> None:
    venv = str(ROOT / ".venv" / "bin" / "python")
    for script in ("deepspeed.sh", "torchrun.sh"):
        assert _dry_run(script).split()[0] == venv
    assert "--standalone --nnodes 1 --nproc_per_node 3 -m vlscale.train --recipe tiny-cpu train.steps=2" in _dry_run(
        "torchrun.sh", NPROC="3")
    cmd = _dry_run("torchrun.sh", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3", MASTER_PORT="29999", NPROC="4")
    assert "--nnodes 2 --node_rank 1 --master_addr 10.1.2.3 --master_port 29999 --nproc_per_node 4" in cmd
    assert _dry_run("torchrun.sh", PYTHON="/opt/py").split()[0] == "/opt/py"
