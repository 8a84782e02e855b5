"""Run a test helper as a one-rank torch.distributed script in a fresh process.

DeepSpeed cannot be set up again in a process whose group was destroyed, so tests that build
DeepSpeed engines in-process run them here: ``module.func(*args)`` is called with the launcher's
variables for one rank, and must write its results as JSON to its last argument.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_process(module: str, func: str, args: list[str], out: Path, port: int, timeout: int = 600) -> dict:
    """``module.func(*args, out)`` in a subprocess (rank 0 of 1); its JSON, after checking it ran."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{HERE}{os.pathsep}" + os.environ.get("PYTHONPATH", "")}
    code = f"import sys, {module} as m; m.{func}(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, *args, str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert out.exists(), f"worker died (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert "error" not in res, res["error"]
    return res
