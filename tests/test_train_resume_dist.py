"""Whole multi-process runs resumed from checkpoints: FSDP2 (2 gloo processes) and DeepSpeed (the launcher).

* FSDP2, 2 ranks: resuming from step 2 reproduces the uninterrupted run's losses bit for bit (dropout
  and drop-path on), and a resume whose FSDP2 load skips the optimizer state is caught;
* the same 2-rank run's per-step losses equal a 1-rank run's fed the same global batches (gradient
  cache + distributed loss + rank scaling together), and a 1-process FSDP2 run resumes the 2-rank
  checkpoint (DCP re-shards; the rest of the epoch is read in the old split) with the same losses;
* ``train.init_from`` takes only the weights, from any engine's checkpoint or an export;
* DeepSpeed ZeRO-2 under ``deepspeed --num_gpus 2``: a crash after the epoch-ending checkpoint of
  step 2 resumes with ``--resume auto`` bit for bit and each step once in metrics.jsonl; DeepSpeed's
  ``zero_to_fp32.py`` works without ``--tag`` and agrees with model.pt; one process resumes the
  2-rank checkpoint (universal checkpoint + data re-split) with the same loss.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers_resume_dist import fsdp_worker, overrides

from vlscale.config import load_recipe
from vlscale.data import Batch
from vlscale.demo import child_env, launch_command
from vlscale.demo_data import build_demo_dataset
from vlscale.train.checkpoint import load_model_weights
from vlscale.train.trainer import Trainer, train


class Replay:
    """A loader that yields recorded global batches (for the 1-rank comparison)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.stats = batches, {}

    def __iter__(self):
        yield from self.batches

    def state_dict(self) -> dict:
        return {"worker_states": {}}


def _losses(obj: dict) -> dict[int, float]:
    return {int(k): v for k, v in obj.items()}


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp2_resume_bitwise_and_two_ranks_equal_one(port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # the in-process runs below set them: undone after the test
    shards = build_demo_dataset(tmp_path / "shards", n_train=40, n_eval=4, size=32)
    mp.spawn(fsdp_worker, args=(2, port, str(shards["train"]), str(tmp_path)), nprocs=2, join=True)
    res = json.loads((tmp_path / "losses.json").read_text())
    assert "error" not in res, res.get("error")
    full, resumed, broken = _losses(res["full"]), _losses(res["resumed"]), _losses(res["broken"])
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == full[step], f"FSDP2 step {step}: resumed {resumed[step]!r} vs {full[step]!r}"
    assert broken[3] == full[3] and broken[4] != full[4], "a resume without the optimizer state went unnoticed"

    # 1 rank, the 2-rank run's global batches (rank 0's rows, then rank 1's): the same losses.
    nodrop = _losses(res["nodrop"])
    per_rank = [torch.load(tmp_path / f"batches_rank{r}.pt", weights_only=False) for r in range(2)]
    global_batches = [Batch(pixels=torch.cat([a["pixels"], b["pixels"]]), tokens=torch.cat([a["tokens"], b["tokens"]]),
                            attention_mask=torch.cat([a["attention_mask"], b["attention_mask"]]), source=[],
                            keys=a["keys"] + b["keys"], captions=[]) for a, b in zip(*per_rank)]
    one = Trainer(load_recipe("tiny-cpu", overrides(str(shards["train"]), tmp_path / "one", "local", "train.steps=5",
                                                    dropout=0.0)))
    one.loader = Replay(global_batches)
    try:
        single = one.fit()["losses"]
    finally:
        one.close()
    for step in (1, 2, 3, 4, 5):
        assert single[step] == pytest.approx(nodrop[step], rel=1e-5, abs=1e-6), f"step {step}: 1 rank vs 2 ranks"

    # World size 2 -> 1: one FSDP2 process resumes the 2-rank checkpoint (DCP re-shards), reading
    # the rest of the epoch (5 steps) in the 2-rank split; its own checkpoint of step 4, taken
    # mid re-split, resumes too.
    step2 = tmp_path / "nodrop" / "checkpoints" / "step_000002"

    def w1(run: str) -> list[str]:
        return overrides(str(shards["train"]), tmp_path / run, "fsdp", "train.steps=5", "train.ckpt_every=2",
                         dropout=0.0)

    again = train(load_recipe("tiny-cpu", w1("w1")), resume=str(step2))
    assert sorted(again["losses"]) == [3, 4, 5]
    for step, loss in again["losses"].items():
        assert loss == pytest.approx(nodrop[step], rel=1e-5, abs=1e-6), f"2 -> 1 ranks, step {step}"
    last = train(load_recipe("tiny-cpu", w1("w1b")), resume=str(tmp_path / "w1" / "checkpoints" / "step_000004"))
    assert last["losses"] == {5: again["losses"][5]}

    # init_from: the weights of the 2-rank FSDP2 checkpoint, into a local run at step 0.
    init = Trainer(load_recipe("tiny-cpu", overrides(str(shards["train"]), tmp_path / "init", "local",
                                                     f"train.init_from={tmp_path / 'nodrop'}", "train.steps=1")))
    try:
        weights = load_model_weights(tmp_path / "nodrop")  # the run dir: its latest checkpoint (step 4)
        assert init.step == 0 and not init.optimizer.state
        for name, p in init.model.named_parameters():
            assert torch.equal(p.detach(), weights[name]), name
    finally:
        init.close()
    with pytest.raises(ValueError, match=r"image_proj\.net\.0\.weight has shape \(16, 32\), the model.s is \(8, 32\)"):
        Trainer(load_recipe("tiny-cpu", overrides(str(shards["train"]), tmp_path / "bad", "local",
                                                  f"train.init_from={step2}", "model.embed_dim=8")))


def _launch(args: list[str], log: Path, nproc: int = 2) -> None:
    from conftest import free_port

    env = {k: v for k, v in child_env(nproc).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if nproc == 1:
        cmd = [sys.executable, "-m", "vlscale.train", *args]
        env["MASTER_PORT"] = str(free_port())
    else:
        cmd = launch_command("deepspeed", nproc, free_port(), args)
    with log.open("w") as fh:  # own process group: a hung run is killed with its ranks, not orphaned
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    assert rc == 0, f"run failed ({rc}):\n{log.read_text()[-4000:]}"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_epoch_boundary_resume_world_size_change_and_zero_to_fp32(tmp_path: Path) -> None:
    # 23 rows, global batch 8 over 2 ranks: an epoch is 2 steps, so step 2 ends one (the case).
    shards = build_demo_dataset(tmp_path / "shards", n_train=23, n_eval=4, size=32)

    def args(run: Path, *extra: str, resume: str | None = None) -> list[str]:
        out = ["--recipe", "tiny-cpu", *overrides(str(shards["train"]), run, "deepspeed", "engine.zero_stage=2",
                                                  *extra, dropout=0.0)]
        return out + (["--resume", resume] if resume else [])

    full = tmp_path / "full"
    _launch(args(full, "train.ckpt_every=1"), tmp_path / "full.log")
    losses = {r["step"]: r["loss"] for r in _records(full) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]

    crashed = tmp_path / "crashed"  # died after logging step 4, before its checkpoint
    shutil.copytree(full, crashed)
    for name in ("step_000003", "step_000004"):
        shutil.rmtree(crashed / "checkpoints" / name)
    (crashed / "checkpoints" / "latest").write_text("step_000002\n")
    _launch(args(crashed, "train.ckpt_every=1", resume="auto"), tmp_path / "crashed.log")
    again = [r for r in _records(crashed) if "loss" in r]
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # each step once
    for r in again[2:]:
        assert r["loss"] == losses[r["step"]], f"step {r['step']} after the epoch-end resume"

    step1, step2 = full / "checkpoints" / "step_000001", full / "checkpoints" / "step_000002"
    out = tmp_path / "fp32"
    proc = subprocess.run([sys.executable, str(step2 / "zero_to_fp32.py"), str(step2), str(out)], env=child_env(1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    zero = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=False)
    ours = load_model_weights(step2)
    assert set(zero) <= set(ours)
    for name, value in zero.items():
        assert torch.equal(value.float(), ours[name]), name

    # One process resumes the 2-rank ZeRO-2 checkpoint of step 1 (mid-epoch): DeepSpeed's universal
    # checkpoint for the optimizer, the old split for the rest of the epoch: step 2's global batch.
    one = tmp_path / "one"
    _launch(args(one, "train.steps=2", resume=str(step1)), tmp_path / "one.log", nproc=1)
    assert (step1 / "engine_universal").is_dir()
    resumed = {r["step"]: r["loss"] for r in _records(one) if "loss" in r}
    assert sorted(resumed) == [2] and resumed[2] == pytest.approx(losses[2], rel=1e-5, abs=1e-6)
