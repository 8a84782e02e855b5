"""Test-session set-up shared by every test module.

Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be set
before triton is first imported, so it is done here, at the very top, by looking for an NVIDIA
driver rather than asking CUDA (no CUDA query at import time).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

_HAS_NVIDIA = shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()
if not _HAS_NVIDIA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _HAS_NVIDIA else os.environ.get("DS_ACCELERATOR", "cuda"))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Free the RAM earlier DeepSpeed runs leaked in /dev/shm (see :mod:`vlscale.engines.ds_shm`):
    only buffers no live process maps or holds open. A machine that ran the suite before vlscale
    stopped building the op could have gigabytes there, which starves this run."""
    from vlscale.engines.ds_shm import free_stale_shm_buffers

    files, freed = free_stale_shm_buffers()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if files and reporter is not None:
        reporter.write_line(f"freed {files} stale DeepSpeed shm buffers ({freed / 2**30:.2f} GiB of RAM) in /dev/shm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests when CUDA is not usable (checked lazily, once)."""
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo rendezvous in spawned tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()
