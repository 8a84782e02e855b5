"""Workers of ``test_techniques_dist.py``: the techniques across ranks and beneath every engine.

``two_rank_worker`` runs, in one 2-process gloo group, cases that each return a small dict of
worst-over-ranks errors; ``one_process_worker`` (run as a script: DeepSpeed cannot be set up again
in a process whose group was destroyed) covers DeepSpeed on one rank and the checkpoint round trips.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from helpers_techniques import max_rel, tiny_model_cfg

from vlscale.engines import build_engine
from vlscale.gradcache import GradCache

B = 6  # local batch per rank
CHUNKS = {"image": 4, "text": 3}
NO_BATCH = SimpleNamespace(concepts=None, captions=None, keys=None)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")


def _worst(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _spread(t: torch.Tensor) -> float:
    """Largest difference of ``t`` between ranks (0 = identical everywhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    ref = t.detach().clone().double()
    dist.broadcast(ref, src=0)
    return _worst(float((t.double() - ref).abs().max()))


def ds_config(stage: int, dtype: str | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
                           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                           "steps_per_print": 10**9, "gradient_clipping": 0.0}
    if dtype:
        cfg[dtype] = {"enabled": True}
    return cfg


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5)


def _config(**tech: Any) -> Any:
    from vlscale.config import Config, LossConfig, TechniquesConfig, TrainConfig

    return Config(model=tiny_model_cfg(hier_levels=1), techniques=TechniquesConfig(**tech),
                  loss=LossConfig(impl="chunked"), train=TrainConfig(precision="bf16"))


def _inputs(model: Any, rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    words = ["a red circle", "blue square left", "green sky", "a dog on grass", "red ball right", "sky"]
    enc = model.tokenizer([words[(i + step) % 6] for i in range(B)], padding="max_length", max_length=8,
                          return_tensors="pt")
    return {"pixels": torch.randn(B, 3, 32, 32, generator=g), "tokens": enc["input_ids"],
            "attention_mask": enc["attention_mask"]}


def ema_case(kind: str, rank: int, world: int) -> dict[str, Any]:
    """The momentum EMA under an engine, step by step, against a float64 EMA of ``master_params()``;
    and (half-precision DeepSpeed) how far an EMA of the working copy would be from it."""
    import deepspeed

    from vlscale.model import DualEncoder
    from vlscale.train.losses import Objective

    torch.manual_seed(0)
    model = DualEncoder(tiny_model_cfg(hier_levels=1, freeze_text_layers=1))
    if kind == "fsdp":
        engine = build_engine("fsdp", model, optimizer=_sgd, param_dtype=torch.bfloat16)
    else:
        stage = int(kind.split("-")[1])
        engine = build_engine("deepspeed", model, optimizer=_sgd, ds_config=ds_config(stage, "bf16"))
    pg = dist.group.WORLD if world > 1 else None
    obj = Objective(_config(momentum_queue=16, momentum=0.9, hier_weight=0.1), process_group=pg, engine=engine,
                    rank=rank, micro_batch=B, chunk_sizes=CHUNKS)
    ref = working_ref = None
    errs, spreads, working_errs = [], [], []
    gc = GradCache(engine, chunk_sizes=CHUNKS)
    for step in range(3):
        masters = {n: v.double().clone() for n, v in engine.master_params()}  # a collective
        if kind.startswith("zero"):
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=kind == "zero-3"):
                working = {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}
        ref = masters if ref is None else {n: 0.9 * ref[n] + 0.1 * masters[n] for n in ref}
        if kind.startswith("zero"):
            working_ref = working if working_ref is None else {n: 0.9 * working_ref[n] + 0.1 * working[n]
                                                               for n in working_ref}
        inputs = obj.prepare(step, NO_BATCH, _inputs(engine.module, rank, step))
        ema = {n: p.detach() for n, p in obj.momentum.ema.named_parameters()}
        assert all(p.dtype == torch.float32 for p in ema.values())
        errs.append(max_rel(ema, {n: ref[n] for n in ema}))
        if working_ref is not None:
            working_errs.append(max_rel({n: ref[n] for n in ema}, {n: working_ref[n] for n in ema}))
        spreads.append(max(_spread(p) for p in ema.values()))
        res = gc.step(inputs, obj)
        engine.optimizer_step()
        obj.finish()
    queue_spread = max(_spread(obj.momentum.image_queue), _spread(obj.momentum.text_queue))
    return {"ema_err": _worst(max(errs)), "ema_spread": max(spreads), "queue_spread": queue_spread,
            "working_vs_master": _worst(working_errs[-1]) if working_errs else None,
            "filled": int(obj.momentum.queue_filled), "loss": float(res.loss)}


def mixup_case(rank: int, world: int) -> dict[str, Any]:
    """Coin-flip mixup with hierarchical + momentum terms on 2 ranks: every rank draws the same
    decision and lam, and the cached step's gradient equals the plain big-batch step's."""
    from vlscale.model import DualEncoder
    from vlscale.train.losses import Objective

    torch.manual_seed(0)
    model = DualEncoder(tiny_model_cfg(hier_levels=1))
    engine = build_engine("local", model, optimizer=_sgd, process_group=dist.group.WORLD)
    obj = Objective(_config(mixup=True, momentum_queue=16, hier_weight=0.2), process_group=dist.group.WORLD,
                    engine=engine, rank=rank, micro_batch=B, chunk_sizes=CHUNKS)
    modes, out = set(), {"grad": 0.0, "plan_spread": 0.0, "loss_diff": 0.0}
    for step in range(40):
        plan = obj.mixup.plan(step, B)
        if plan.mode in modes:
            continue
        modes.add(plan.mode)
        inputs = obj.prepare(step, NO_BATCH, _inputs(model, rank, step))
        drawn = torch.tensor([float(obj.plan.mode == "image"), obj.plan.lam, float(obj.plan.offset == rank * B)])
        out["plan_spread"] = max(out["plan_spread"], _spread(drawn[:2]), float(1 - drawn[2]))
        grads, losses = {}, {}
        for name, chunks in (("cached", CHUNKS), ("plain", None)):
            res = GradCache(engine, chunk_size=None, chunk_sizes=chunks).step(inputs, obj)
            grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            losses[name] = float(res.loss)
            engine.zero_grad()
        out["grad"] = max(out["grad"], _worst(max_rel(grads["cached"], grads["plain"])))
        out["loss_diff"] = max(out["loss_diff"], _worst(abs(losses["cached"] - losses["plain"])))
        obj.finish()
    out["modes"] = sorted(modes)
    return out


def positive_queue_case(rank: int, world: int) -> dict[str, Any]:
    """BriVL's 1 + K over uneven ranks: the global mean, and gradients the engines' average turns
    into the single-process ones (rows: W × their share; logit_scale: the rank mean)."""
    from helpers_techniques import unit

    from vlscale.techniques import positive_queue_nce

    sizes = [3, 4]
    q_all, k_all, queue = unit(7, 8, 1), unit(7, 8, 2), unit(5, 8, 3)
    lo = sum(sizes[:rank])
    q = q_all[lo : lo + sizes[rank]].clone().requires_grad_()
    s = torch.tensor([6.0], dtype=torch.float64, requires_grad=True)
    loss = positive_queue_nce(q, k_all[lo : lo + sizes[rank]], queue, s, impl="reference",
                              process_group=dist.group.WORLD)
    gq, gs = torch.autograd.grad(loss, (q, s))
    q_ref, s_ref = q_all.clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = positive_queue_nce(q_ref, k_all, queue, s_ref, impl="reference")
    rq, rs = torch.autograd.grad(ref, (q_ref, s_ref))
    gs_mean = gs.clone()
    dist.all_reduce(gs_mean)
    return {"value": _worst(abs(float(loss.detach()) - float(ref.detach()))),
            "rows": _worst(float((gq - world * rq[lo : lo + sizes[rank]]).abs().max())),
            "scale": _worst(float((gs_mean / world - rs).abs().max()))}


def enqueue_case(rank: int, world: int) -> dict[str, Any]:
    """Uneven local key batches are gathered into every rank's queue in rank order."""
    from helpers_techniques import TinyDual

    from vlscale.techniques import MomentumContrast

    mc = MomentumContrast.copy_of(TinyDual(), queue_size=16, embed_dim=8)
    n = 3 + rank
    mc.enqueue({"image": torch.full((n, 8), float(rank)), "text": torch.full((n, 8), 10.0 + rank)},
               process_group=dist.group.WORLD)
    expected = torch.cat([torch.full((3, 8), 0.0), torch.full((4, 8), 1.0)])
    ok = (int(mc.queue_filled) == 7 and int(mc.queue_ptr) == 7 and torch.equal(mc.image_queue[:7], expected)
          and torch.equal(mc.text_queue[:7], expected + 10.0))
    return {"ok": _worst(0.0 if ok else 1.0) == 0.0}


def two_rank_worker(rank: int, world: int, port: int, out_path: str) -> None:
    _init(rank, world, port)
    results: dict[str, Any] = {}
    try:
        import time

        for name, case in (("fsdp", lambda: ema_case("fsdp", rank, world)),
                           ("zero-3", lambda: ema_case("zero-3", rank, world)),
                           ("mixup", lambda: mixup_case(rank, world)),
                           ("positive_queue", lambda: positive_queue_case(rank, world)),
                           ("enqueue", lambda: enqueue_case(rank, world))):
            start = time.perf_counter()
            results[name] = case()
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        if rank == 0 or "error" in results:
            Path(out_path if rank == 0 else f"{out_path}.rank{rank}").write_text(json.dumps(results, default=str))
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- one process


def _run_losses(shards: str, run: Path, engine: list[str], *extra: str,
                resume: str | None = None) -> tuple[dict[int, float], dict]:
    from vlscale.config import load_recipe
    from vlscale.train.trainer import train

    over = [*engine, f"train.run_dir={run}", f"data.train_shards={shards}", "data.eval_shards=", "data.num_workers=0",
            "model.vision_kwargs={\"patch_size\": 8, \"embed_dim\": 32, \"depth\": 2, \"num_heads\": 2}",
            "model.text_config={\"num_hidden_layers\": 2, \"hidden_size\": 32, \"num_attention_heads\": 2, "
            "\"intermediate_size\": 64, \"hidden_dropout_prob\": 0.2}",
            "model.drop_path_rate=0.2", "model.embed_dim=16", "model.hier_levels=1", "train.global_batch_size=8",
            "gradcache.chunk_size=3", "train.warmup_steps=1", "train.lr=3e-3", "train.log_every=1",
            "train.progress=false", "train.tensorboard=false", "train.steps=4", "train.keep_checkpoints=3",
            "techniques.momentum_queue=20", "techniques.mixup=true", "techniques.hier_weight=0.1", *extra]
    summary = train(load_recipe("tiny-cpu", over), resume=resume)
    final = torch.load(run / "checkpoints" / "step_000004" / "rank00000.pt", weights_only=False)
    return summary["losses"], final["trainer"]["objective"]["momentum"]


def resume_case(shards: str, tmp: Path, name: str, engine: list[str], *extra: str) -> dict[str, Any]:
    """4 steps with a checkpoint at 2, then a run resumed from 2: the same losses at steps 3 and 4 and
    bit-identical momentum EMA and queues at the end."""
    full_losses, full_state = _run_losses(shards, tmp / f"{name}-full", engine, "train.ckpt_every=2", *extra)
    ckpt = tmp / f"{name}-full" / "checkpoints" / "step_000002"
    res_losses, res_state = _run_losses(shards, tmp / f"{name}-resumed", engine, *extra, resume=str(ckpt))
    mismatch = [k for k, v in full_state.items() if not torch.equal(v, res_state[k])]
    return {"full": {k: full_losses[k] for k in (3, 4)}, "resumed": {k: res_losses[k] for k in (3, 4)},
            "state_mismatch": mismatch, "n_state": len(full_state), "filled": int(full_state["queue_filled"])}


def one_process_worker(shards: str, tmp: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    try:
        results["zero-2"] = ema_case("zero-2", 0, 1)
        results["resume-local"] = resume_case(shards, Path(tmp), "local", ["engine.kind=local", "engine.zero_stage=0"])
        results["resume-deepspeed"] = resume_case(shards, Path(tmp), "ds", ["engine.kind=deepspeed",
                                                                            "engine.zero_stage=2"])
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        Path(out_path).write_text(json.dumps(results, default=str))
        dist.barrier()
        dist.destroy_process_group()
