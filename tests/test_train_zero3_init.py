"""ZeRO-3 construction: the trainer's model is partitioned as it is built and trains like a whole one.

One DeepSpeed process (gloo) in a subprocess — DeepSpeed cannot be set up again in a process whose
group was destroyed — runs this file as a script. It checks, on the tiny-cpu model shrunk further:

* right after ``build_model`` (before any optimizer / engine) every parameter is a partitioned
  ZeRO-3 parameter (``ds_id``, status NOT_AVAILABLE, empty placeholder);
* the init is the whole build's: the vision tower bit for bit (same seed); the HF text tower
  (built by transformers' zero.Init path, whose RNG draws differ) with the same constants and
  the same per-tensor spread; the weight-decay groups are the whole build's;
* ``vision_weights`` from a local file land in the partitioned tower;
* two training steps of the ZeRO-3-init trainer give the losses of a trainer whose model was
  built whole with the same initial weights and partitioned by ``deepspeed.initialize``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

SIZES = [
    "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 1, \"num_heads\": 2}",
    "model.text_config={\"num_hidden_layers\": 1, \"hidden_size\": 32, \"num_attention_heads\": 2, "
    "\"intermediate_size\": 64}",
    "model.embed_dim=16",
]


def _overrides(shards: str, run_dir: str) -> list[str]:
    return ["engine.kind=deepspeed", "engine.zero_stage=3", f"train.run_dir={run_dir}",
            f"data.train_shards={shards}/train", "data.eval_shards=", "data.num_workers=0", *SIZES,
            "train.global_batch_size=16", "gradcache.chunk_size=6", "train.warmup_steps=1", "train.steps=2",
            "train.lr=3e-3", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
            "train.ckpt_every=0"]


# --------------------------------------------------------------------------------------------
# worker (runs in the subprocess)
# --------------------------------------------------------------------------------------------
def _gathered_state(model):
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _group_names(model, wd: float) -> list[list[str]]:
    from vlscale.model import param_groups

    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, wd)]


def _check_init(z3_state: dict, whole) -> dict:
    """Vision tower exactly equal; text tower: constants equal, random tensors of similar spread."""
    import torch

    out = {"vision_mismatch": [], "text_const_mismatch": [], "text_std_ratio": {}}
    for name, ref in whole.state_dict().items():
        got = z3_state[name]
        if name.startswith("visual."):
            if not torch.equal(got, ref):
                out["vision_mismatch"].append(name)
        elif name.startswith("textual.") and ref.is_floating_point():
            if float(ref.std()) == 0.0 or ref.numel() == 1:
                if not torch.equal(got, ref):
                    out["text_const_mismatch"].append(name)
            elif ref.numel() >= 1000:
                out["text_std_ratio"][name] = float(got.std() / ref.std())
    return out


def _worker(shards: str, tmp: str, result_path: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    import vlscale.train.trainer as trainer_mod
    from vlscale.config import load_recipe
    from vlscale.model import DualEncoder
    from vlscale.train.build import build_model, build_zero3, full_shapes, is_partitioned
    from vlscale.train.dsconfig import to_deepspeed_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    res: dict = {}
    try:
        cfg = load_recipe("tiny-cpu", _overrides(shards, f"{tmp}/z3"))
        seen: dict = {}

        def recording_build(c, device, *, ds_config=None):
            model = build_model(c, device, ds_config=ds_config)
            seen["partitioned"] = is_partitioned(model.parameters())
            seen["n_params"] = sum(1 for _ in model.parameters())
            seen["state"] = _gathered_state(model)
            with full_shapes(model):
                seen["groups"] = _group_names(model, 0.1)
            # Placeholders back: still partitioned, and the ndim split alone would decay nothing.
            seen["restored"] = is_partitioned(model.parameters())
            seen["groups_without"] = len(_group_names(model, 0.1))
            return model

        trainer_mod.build_model = recording_build
        summary = trainer_mod.train(cfg)
        res["z3_losses"] = [summary["losses"][s] for s in (1, 2)]
        res["partitioned"] = seen["partitioned"]
        res["n_params"] = seen["n_params"]

        torch.manual_seed(cfg.train.seed)
        whole = DualEncoder(cfg.model)
        res["init"] = _check_init(seen["state"], whole)
        res["groups_equal"] = seen["groups"] == _group_names(whole, 0.1)
        res["restored"], res["groups_without"] = seen["restored"], seen["groups_without"]

        # Reference: the same initial weights, built whole, partitioned by deepspeed.initialize.
        def whole_build(c, device, *, ds_config=None):
            model = DualEncoder(c.model)
            model.load_state_dict(seen["state"])
            seen["ref_partitioned_at_build"] = any(hasattr(p, "ds_id") for p in model.parameters())
            return model

        trainer_mod.build_model = whole_build
        ref_cfg = load_recipe("tiny-cpu", _overrides(shards, f"{tmp}/ref"))
        ref = trainer_mod.train(ref_cfg)
        res["ref_losses"] = [ref["losses"][s] for s in (1, 2)]
        res["ref_partitioned_at_build"] = seen["ref_partitioned_at_build"]

        # vision_weights from a local file, loaded into the whole tower before it is partitioned.
        torch.manual_seed(123)
        donor = DualEncoder(cfg.model).visual.trunk.state_dict()
        torch.save(donor, f"{tmp}/vit.pth")
        vcfg = load_recipe("tiny-cpu", [*_overrides(shards, f"{tmp}/vw"), f"model.vision_weights={tmp}/vit.pth"])
        torch.manual_seed(0)
        vmodel = build_zero3(vcfg, to_deepspeed_config(vcfg, 1))
        res["vw_partitioned"] = is_partitioned(vmodel.parameters())
        with deepspeed.zero.GatheredParameters(list(vmodel.visual.trunk.parameters())):
            got = vmodel.visual.trunk.state_dict()
            res["vw_equal"] = all(torch.equal(got[k], v) for k, v in donor.items())
    except Exception as exc:  # report, do not hang: the parent asserts on it
        import traceback

        res["error"] = f"{exc!r}\n{traceback.format_exc()}"
    finally:
        Path(result_path).write_text(json.dumps(res))
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.slow
def test_zero3_builds_partitioned_and_trains_like_whole(port: int, tmp_path: Path) -> None:
    from vlscale.demo_data import build_demo_dataset

    build_demo_dataset(tmp_path / "shards", n_train=32, n_eval=2, size=32)
    out = tmp_path / "result.json"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "shards"), str(tmp_path), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert out.exists(), f"worker died (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert "error" not in res, res["error"]
    assert proc.returncode == 0, proc.stderr[-4000:]

    assert res["partitioned"] and res["n_params"] > 20, "parameters were not partitioned at construction"
    assert res["ref_partitioned_at_build"] is False  # the reference really was built whole
    init = res["init"]
    assert init["vision_mismatch"] == [], init["vision_mismatch"]
    assert init["text_const_mismatch"] == [], init["text_const_mismatch"]
    assert len(init["text_std_ratio"]) >= 5
    for name, ratio in init["text_std_ratio"].items():  # HF init (std 0.02), not PyTorch's default
        assert 0.8 < ratio < 1.25, f"{name}: init spread ratio {ratio:.3f} vs the whole build"
    assert res["groups_equal"], "weight-decay groups differ from the whole build's"
    assert res["restored"] and res["groups_without"] == 1  # full_shapes is needed, and undone
    assert res["vw_partitioned"] and res["vw_equal"]

    z3, ref = res["z3_losses"], res["ref_losses"]
    for a, b in zip(z3, ref):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"ZeRO-3-init losses {z3} != whole-built {ref}"


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
