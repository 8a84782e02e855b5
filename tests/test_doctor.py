"""``vlscale doctor``, the start-up check of the torch build against the GPU, and the V100 install files.

No GPU here: GPUs are simulated by replacing ``torch.cuda``'s queries (capability, arch list, names).
"""

from __future__ import annotations

import json
import mmap
import re
from pathlib import Path

import pytest
import torch

from vlscale import doctor
from vlscale.cli import main as cli_main
from vlscale.engines import ds_shm
from vlscale.loss import backends

ROOT = Path(__file__).resolve().parents[1]
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch ≥ 2.11 default wheels
CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize(("arch", "cap", "runs"), [
    ("sm_70", (7, 0), True), ("sm_75", (7, 0), False), ("sm_70", (7, 5), True), ("sm_80", (8, 6), True),
    ("sm_86", (8, 0), False), ("sm_90", (10, 0), False), ("sm_90a", (9, 0), True), ("sm_90a", (9, 1), False),
    ("compute_70", (9, 0), True), ("compute_90", (8, 0), False), ("sm_100f", (10, 3), True), ("bogus", (7, 0), False),
])
def test_arch_runs_on(arch, cap, runs):
    assert doctor.arch_runs_on(arch, cap) is runs


def test_build_problem_names_the_fix():
    assert doctor.build_problem((7, 0), CU126_ARCHS) is None
    assert doctor.build_problem((9, 0), CU130_ARCHS) is None
    assert doctor.build_problem((7, 0), []) is None  # unknown (custom build): nothing to say
    msg = doctor.build_problem((7, 0), CU130_ARCHS, "cuda:3 (Tesla V100-SXM2-32GB)")
    assert "cuda:3 (Tesla V100-SXM2-32GB) has compute capability 7.0" in msg
    assert "requirements-v100.txt" in msg and "cu126" in msg and "no kernel image" in msg
    assert "sm_130" in doctor.build_problem((13, 0), CU130_ARCHS)  # a future GPU: a generic fix


@pytest.fixture
def fake_gpus(monkeypatch):
    """Simulated GPUs (capabilities by index) under a given torch arch list."""
    state = {"caps": [(7, 0)], "archs": CU130_ARCHS}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(state["caps"]))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: state["archs"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def index(device):
        return device if isinstance(device, int) else (torch.device(device).index or 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["caps"][index(device)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB"
                        if state["caps"][index(device)] < (8, 0) else "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(backends, "_CACHE", {})
    monkeypatch.setattr(backends, "_compiled_unavailable", lambda device: None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return state


def test_runtime_refuses_a_torch_build_without_the_gpus_arch(fake_gpus, monkeypatch):
    """The training start-up fails at once (before set_device / any CUDA op) naming the fix."""
    from vlscale.config import load_recipe
    from vlscale.train.runtime import init_runtime

    touched = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: touched.append(device))
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = load_recipe("tiny-cpu", ["engine.kind=local", "engine.zero_stage=0"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match=r"compute capability 7\.0.*requirements-v100\.txt"):
        init_runtime(cfg)
    assert touched == []
    fake_gpus["archs"] = CU126_ARCHS
    rt = init_runtime(cfg)
    assert rt.device == torch.device("cuda", 0) and touched == [torch.device("cuda", 0)]


def test_check_torch_build_ignores_cpu_and_rocm(fake_gpus, monkeypatch):
    doctor.check_torch_build(torch.device("cpu"))
    monkeypatch.setattr(torch.version, "cuda", None)  # a ROCm build: no sm_ arch list to judge
    doctor.check_torch_build(torch.device("cuda", 0))


def test_doctor_on_cpu(capsys):
    """The real machine (no GPU): every section, the auto choice with its reason, DeepSpeed's ops."""
    assert cli_main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["torch"]["version"] == torch.__version__ and rep["torch"]["arch_list"] == torch.cuda.get_arch_list()
    assert rep["gpus"] == []
    auto = rep["loss"]["auto"]["cpu"]
    assert auto["impl"] == "chunked" and "not a CUDA device" in auto["why"]
    assert set(rep["loss"]["backends"]) == set(backends.registered_backends())
    assert rep["loss"]["backends"]["chunked"]["cpu"] == "ok"
    ops = rep["deepspeed"]["ops"]
    assert rep["deepspeed"]["version"] and "cpu_adam" in ops and "used_for" in ops["cpu_adam"]
    assert "skipped by vlscale on CPU" in ops["deepspeed_shm_comm"]["skipped"]
    assert cli_main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "impl='auto' on cpu -> chunked" in text and "DeepSpeed:" in text and "none visible" in text


def test_doctor_finds_and_frees_deepspeeds_leftover_shm_buffers(tmp_path, capsys, monkeypatch):
    """DeepSpeed's CPU shm-comm op leaves a 66 MB RAM-backed file per rank that nothing removes (20 GB
    had piled up on the dev machine). The doctor counts the ones no process uses and ``--free-shm``
    deletes exactly those: a buffer a live process maps, and other files, stay."""
    monkeypatch.setattr(ds_shm, "SHM_DIR", str(tmp_path))
    assert ds_shm.shm_buffers() == []
    for rank in range(3):
        (tmp_path / f"deepspeed_allreduce_buffer_0_127.0.0.1_29500_{rank}").write_bytes(b"\0" * 4096)
    other = tmp_path / "torch_123"
    other.write_bytes(b"\0" * 5)
    live = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_29500_1"
    with open(live, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mapped:  # a running rank's buffer
        fh.close()
        assert [(Path(b["path"]).name[-1], b["in_use"]) for b in ds_shm.shm_buffers()] == [
            ("0", False), ("1", True), ("2", False)]
        assert doctor.main(["--json"]) == 0
        assert json.loads(capsys.readouterr().out)["deepspeed"]["shm_buffers"] == {
            "dir": str(tmp_path), "in_use": 1, "stale_files": 2, "stale_bytes": 8192}
        assert doctor.main([]) == 0
        out = capsys.readouterr().out
        assert f"note: 2 DeepSpeed shm-comm buffers in {tmp_path} that no process uses hold 0.00 GiB" in out
        assert "`vlscale doctor --free-shm` deletes them" in out
        assert doctor.main(["--free-shm", "--json"]) == 0
        captured = capsys.readouterr()
        assert f"freed 2 stale DeepSpeed shm-comm buffers (0.00 GiB) in {tmp_path}" in captured.err
        assert json.loads(captured.out)["deepspeed"]["shm_buffers"]["stale_files"] == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, other.name]
        assert mapped[0] == 0
    assert ds_shm.free_stale_shm_buffers() == (1, 4096)  # unmapped now
    assert [p.name for p in tmp_path.iterdir()] == [other.name]


def test_doctor_with_a_v100_and_an_h100(fake_gpus, capsys, monkeypatch):
    fake_gpus["caps"] = [(7, 0), (9, 0)]
    monkeypatch.setattr(doctor, "_nvcc", lambda: {"nvcc": "/usr/local/cuda/bin/nvcc", "version": "13.0"})
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert doctor.main(["--json"]) == 1  # the V100 cannot run under this (cu130-like) build
    rep = json.loads(capsys.readouterr().out)
    v100, h100 = rep["gpus"]
    assert v100["capability"] == "7.0" and "requirements-v100.txt" in v100["problem"]
    assert h100["capability"] == "9.0" and h100["problem"] is None
    assert set(rep["loss"]["auto"]) == {"cpu", "cuda:1"}  # no backend for a GPU torch cannot run on
    assert rep["loss"]["auto"]["cuda:1"]["impl"] == "triton"
    notes = " ".join(rep["deepspeed"]["notes"])
    assert "cannot compile for Tesla V100" in notes and "TORCH_CUDA_ARCH_LIST='9.0' leaves out Tesla V100" in notes

    fake_gpus["archs"] = CU126_ARCHS  # the V100 install: runs, and auto takes the compiled tile
    assert doctor.main([]) == 0
    text = capsys.readouterr().out
    assert "cuda:0 Tesla V100-SXM2-32GB  capability 7.0" in text
    assert re.search(r"impl='auto' on cuda:0 -> compiled: .*capability 7\.0", text)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_v100_requirements_track_the_lock():
    """requirements-v100.txt = requirements.lock with torch's CUDA 12.6 build (same versions)."""
    lock, v100 = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-v100.txt")
    assert "--extra-index-url https://download.pytorch.org/whl/cu126" in (ROOT / "requirements-v100.txt").read_text()
    for pkg in ("torch", "torchvision"):
        assert v100[pkg] == f"{lock[pkg].split('+')[0]}+cu126", pkg
    assert v100["triton"] == lock["triton"]
    cuda13 = {p for p in lock if p.startswith(("nvidia-", "cuda-"))} | {"xformers"}
    same = {p: v for p, v in lock.items() if p not in cuda13 | {"torch", "torchvision"}}
    assert same == {p: v for p, v in v100.items() if p not in ("torch", "torchvision")}
    extra = re.search(r"^v100 = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert sorted(x.strip().strip('"') for x in extra.split(",")) == [f"torch=={v100['torch']}", f"torchvision=={v100['torchvision']}"]
