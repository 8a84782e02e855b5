"""Parallel, splittable, resumable shard builds: the output depends only on the inputs.

``--workers 1`` and ``--workers 2`` write byte-identical shards; ``--part 0/2`` + ``--part 1/2`` +
``vlscale shards index`` equal one build (shards, manifest, summary, rejected list); a build
killed with SIGKILL and rerun finishes with the same output.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from vlscale.cli import main as vlscale_main
from vlscale.data.synthetic import synthetic_image

_OUTPUTS = (".arrow", ".json", ".jsonl")


def _inputs(root: Path, n_tars: int = 3, per_tar: int = 14, folder_rows: int = 30) -> list[str]:
    """webdataset tars (one damaged image, one duplicate key) and a folder with captions."""
    rng = np.random.default_rng(0)
    for t in range(n_tars):
        with tarfile.open(root / f"part{t}.tar", "w") as tar:
            for i in range(per_tar):
                key = f"t{t}-{i:03d}" if (t, i) != (1, 5) else "t0-003"  # a key seen in an earlier tar
                image = synthetic_image(rng, (12, 12)) if (t, i) != (2, 0) else b"\xff\xd8broken"
                for ext, data in (("jpg", image), ("txt", f"caption {t} {i}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "imgs").mkdir()
    lines = ["file,caption"]
    for i in range(folder_rows):
        (root / "imgs" / f"{i}.png").write_bytes(synthetic_image(rng, (10, 10), fmt="PNG"))
        lines.append(f"{i}.png,folder caption {i}")
    (root / "caps.csv").write_text("\n".join(lines) + "\n")
    return ["--wds", "web", str(root / "part*.tar"), "--folder", "pics", str(root / "imgs"), str(root / "caps.csv"),
            "--task-rows", "8", "--rows-per-batch", "4", "--shard-size", "3KB", "--no-progress"]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in _OUTPUTS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, bytes]]:
    root = tmp_path_factory.mktemp("inputs")
    args = _inputs(root)
    out = root / "ref"
    assert vlscale_main(["shards", "build", str(out), *args, "--workers", "1"]) == 0
    return args, _files(out)


def test_reference_build_is_sound(reference) -> None:
    _, files = reference
    summary = json.loads(files["build_summary.json"])
    assert summary["sources"]["web"]["written"] == 40 and summary["sources"]["pics"]["written"] == 30
    assert summary["sources"]["web"]["rejected"] == {"duplicate_key": 1, "unreadable_image": 1}
    assert summary["sources"]["pics"]["tasks"] == 4 and summary["sources"]["web"]["tasks"] == 3
    rejected = [json.loads(line) for line in files["rejected.jsonl"].decode().splitlines()]
    assert {(r["key"], r["reason"]) for r in rejected} == {("t0-003", "duplicate_key"), ("t2-000", "unreadable_image")}
    manifest = json.loads(files["manifest.json"])
    assert [s["path"] for s in manifest["shards"]] == sorted(n for n in files if n.endswith(".arrow"))
    assert manifest["counts"] == {"pics": 30, "web": 40}


def test_two_workers_write_the_same_bytes(reference, tmp_path) -> None:
    args, files = reference
    assert vlscale_main(["shards", "build", str(tmp_path / "out"), *args, "--workers", "2"]) == 0
    assert _files(tmp_path / "out") == files


def test_parts_on_two_machines_then_index_equal_one_build(reference, tmp_path) -> None:
    args, files = reference
    out = str(tmp_path / "out")
    assert vlscale_main(["shards", "build", out, *args, "--workers", "1", "--part", "1/2"]) == 0
    assert vlscale_main(["shards", "index", out]) == 1  # part 0 has not run: refused, naming what is missing
    assert vlscale_main(["shards", "build", out, *args, "--workers", "1", "--part", "0/2"]) == 0
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert vlscale_main(["shards", "index", out]) == 0
    assert _files(tmp_path / "out") == files


def test_killed_build_resumes_to_the_same_output(reference, tmp_path) -> None:
    args, files = reference
    out = tmp_path / "out"
    # the build runs in a child whose every write is followed by a pause, so that the kill lands
    # between a task's shards and its record (the library is untouched: the test wraps one function)
    script = ("import sys, time\nimport vlscale.data.fs as fs\nwrite = fs.write_bytes\n"
              "def slow(*a, **k):\n    write(*a, **k)\n    time.sleep(0.15)\nfs.write_bytes = slow\n"
              "from vlscale.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-c", script, "shards", "build", str(out), *args, "--workers", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    try:
        while len(list(out.glob(".build/*/task-*.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.2)  # inside the third task: some of its shards written, no record yet
        os.killpg(proc.pid, signal.SIGKILL)  # the machine dies: no cleanup of any kind
    finally:
        proc.wait()
    done = len(list(out.glob(".build/*/task-*.json")))
    assert 2 <= done < 7, "the build was not interrupted mid-way"
    assert vlscale_main(["shards", "build", str(out), *args, "--workers", "1"]) == 0
    assert _files(out) == files
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
