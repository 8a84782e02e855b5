"""Gradient cache beneath torch FSDP2 and the local engine's multi-rank modes, 2 gloo processes.

Each rank holds a different local batch; the global CLIP loss is computed on every rank from
all-gathered embeddings. The cached step's gradients (averaged over ranks by the engine) and
parameters after an SGD step must equal those of the plain reference within 1e-5 relative.
Kinds: ``fsdp`` (fully_shard, reduction only on the last chunk), ``allreduce`` (plain model,
local engine averages once after the last chunk), ``ddp`` (DDP with no_sync on all but the last);
``fsdp-bf16`` (bf16 mixed-precision policy: cached vs plain step within bf16 tolerance).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from helpers_gradcache_dist import fsdp_worker

TOL = 1e-5


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp2_and_local_multirank_equal_big_batch_step(port: int, tmp_path: Path) -> None:
    out = tmp_path / "fsdp.json"
    kinds = ["fsdp", "allreduce", "ddp"]
    mp.spawn(fsdp_worker, args=(2, port, [*kinds, "fsdp-bf16"], str(out)), nprocs=2, join=True)
    results = json.loads(out.read_text())
    assert "error" not in results, results.get("error")
    bf16 = results["fsdp-bf16"]
    assert bf16["n_grads"] > 0 and bf16["grad"] < 5e-2, f"fsdp bf16 cached vs plain: {bf16['grad']:.2e}"
    for kind in kinds:
        r = results[kind]
        assert r["n_grads"] > 0
        assert r["grad"] < TOL, f"{kind}: grad rel err {r['grad']:.2e} at {r['grad_at']}"
        assert r["param"] < TOL, f"{kind}: param rel err {r['param']:.2e} at {r['param_at']}"
        assert r["master"] < TOL, f"{kind}: master_params rel err {r['master']:.2e}"
