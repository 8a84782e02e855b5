"""The techniques across ranks and beneath every engine (gloo on CPU).

* 2 processes: the momentum EMA in fp32 against a float64 EMA of ``master_params()`` under FSDP2 and
  DeepSpeed ZeRO-3 (bf16: an EMA of the working copy would be far off), identical EMA and queues
  on every rank, keys from all ranks; coin-flip mixup with hierarchical + momentum terms (same
  decision and lam on every rank, cached step == plain step); BriVL's 1 + K across uneven ranks; keys
  of uneven local batches gathered into every rank's queue in rank order.
* 1 process (a subprocess: DeepSpeed cannot be set up twice in one process): the EMA under
  DeepSpeed ZeRO-2 bf16, and exact resume of the EMA and queues (local engine and DeepSpeed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from helpers_process import one_process

pytest.importorskip("deepspeed")


def _check_ema(r: dict, name: str) -> None:
    assert r["ema_err"] < 1e-6, f"{name}: EMA off the fp32-master reference by {r['ema_err']:.2e}"
    assert r["ema_spread"] == 0.0 and r["queue_spread"] == 0.0, f"{name}: ranks disagree {r}"
    if r["working_vs_master"] is not None:  # the test could tell a working-copy EMA apart
        assert r["working_vs_master"] > 100 * max(r["ema_err"], 1e-8), r


@pytest.mark.dist
@pytest.mark.slow
def test_techniques_on_two_ranks_fsdp2_zero3(port: int, tmp_path: Path) -> None:
    from helpers_techniques_dist import two_rank_worker

    out = tmp_path / "two.json"
    mp.spawn(two_rank_worker, args=(2, port, str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    assert "error" not in res, res.get("error")
    for kind in ("fsdp", "zero-3"):
        _check_ema(res[kind], kind)
        assert res[kind]["filled"] == 16  # 3 steps × 2 ranks × 6 keys, queue of 16
    mix = res["mixup"]
    assert mix["modes"] == ["image", "none", "text"] or mix["modes"] == ["image", "text"], mix
    assert mix["plan_spread"] == 0.0, "ranks drew different mixup decisions"
    assert mix["grad"] < 1e-4 and mix["loss_diff"] < 1e-5, mix  # fp32 sums in another order; wrong targets are O(1)
    pq = res["positive_queue"]
    assert pq["value"] < 1e-9 and pq["rows"] < 1e-9 and pq["scale"] < 1e-9, pq
    assert res["enqueue"]["ok"], "keys of uneven local batches must be gathered in rank order"


@pytest.mark.dist
@pytest.mark.slow
def test_momentum_deepspeed_one_process_and_exact_resume(port: int, tmp_path: Path) -> None:
    from vlscale.demo_data import build_demo_dataset

    shards = build_demo_dataset(tmp_path / "data", n_train=40, n_eval=2, size=32)["train"]
    res = one_process("helpers_techniques_dist", "one_process_worker", [str(shards), str(tmp_path)],
                      tmp_path / "one.json", port)
    _check_ema(res["zero-2"], "zero-2")
    for name in ("resume-local", "resume-deepspeed"):
        r = res[name]
        assert r["resumed"] == r["full"], f"{name}: resumed losses {r['resumed']} != uninterrupted {r['full']}"
        assert r["state_mismatch"] == [] and r["n_state"] > 20 and r["filled"] == 20, r
