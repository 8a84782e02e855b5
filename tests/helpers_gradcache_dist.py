"""Spawned workers for the engine tests (DeepSpeed ZeRO 0–3, FSDP2, local all-reduce / DDP).

Each worker runs several cases in one process group (DeepSpeed start-up costs seconds on this
machine) and writes, from rank 0, one JSON of per-case results — worst relative errors taken
over all ranks — for the test to assert on. Every case compares the engine's gradient-cached
step with :func:`helpers_gradcache.reference_step` on a plain fp32 copy of the model (same seed,
same chunks, hence the same dropout masks), gradients averaged over ranks as the engines do.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
from helpers_gradcache import (
    TinyDualEncoder,
    average_grads,
    clip_loss,
    make_batch,
    max_rel_err,
    reference_step,
)

from vlscale.engines import build_engine
from vlscale.gradcache import GradCache

SIZES = {"image": 4, "text": 3}
LOCAL_BATCH = 10  # chunks 4,4,2 (image) and 3,3,3,1 (text)
LR = 0.1


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")


def _finish() -> None:
    dist.barrier()
    dist.destroy_process_group()


def _worst(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def ds_config(stage: int, *, dtype: str | None = None, extra: dict | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": LOCAL_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 by default
    }
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 1000}
    elif dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    cfg.update(extra or {})
    return cfg


def _full_grads(engine: Any) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}


def _full_params(engine: Any) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[n] = (full if full is not None else p).detach().clone()
    return out


def _present(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def ds_case(stage: int, rank: int, coalesce: bool | None = None, model_kw: dict | None = None,
            gas: int = 1) -> dict:
    """Cached ZeRO step vs the plain reference: gradients, then parameters after SGD.

    ``gas`` > 1 in the ds_config must not change anything (backward never divides by it)."""
    torch.manual_seed(0)
    model = TinyDualEncoder(**(model_kw or {}))
    ref = copy.deepcopy(model)
    engine = build_engine("deepspeed", model, optimizer=_sgd, coalesce=coalesce,
                          ds_config=ds_config(stage, extra={"gradient_accumulation_steps": gas}))
    inputs = make_batch(LOCAL_BATCH, seed=10 + rank)
    torch.manual_seed(100 + rank)
    res = GradCache(engine, chunk_sizes=SIZES).step(inputs, clip_loss)
    grads = _full_grads(engine)
    torch.manual_seed(100 + rank)
    ref_loss = reference_step(ref, inputs, SIZES)
    average_grads(ref)
    grad_err, grad_at = max_rel_err(grads, _present(ref))
    applied = engine.optimizer_step()
    torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9).step()
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    param_err, param_at = max_rel_err(_full_params(engine), ref_params)
    master = dict(engine.master_params())
    assert list(master) == list(ref_params), "master_params must follow named_parameters order"
    return {"grad": _worst(grad_err), "grad_at": grad_at, "param": _worst(param_err), "param_at": param_at,
            "master": _worst(max_rel_err(master, ref_params)[0]),
            "loss_err": _worst(abs(float(res.loss) - float(ref_loss))), "applied": applied,
            "coalescing": engine.coalescing}


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _native_accumulation_run(batches: list[dict], mults: list[float]) -> dict:
    """DeepSpeed's own accumulation: gas micro-batches, engine.backward + engine.step each."""
    torch.manual_seed(0)
    gas = 3
    engine = build_engine("deepspeed", TinyDualEncoder(drop=0.0, drop_path=0.0), optimizer=_sgd,
                          ds_config=ds_config(2, dtype="fp16", extra={"gradient_accumulation_steps": gas}))
    eng = engine.raw
    scales, applied = [engine.loss_scale], []
    for batch, mult in zip(batches, mults):
        for part in torch.arange(LOCAL_BATCH).tensor_split(gas):
            out = engine.forward(**{k: v[part] for k, v in batch.items()})
            loss, _ = clip_loss({k: v.float() for k, v in out.items()}, mult)
            eng.backward(loss)
            eng.step()
        applied.append(bool(eng.was_step_applied()))
        scales.append(engine.loss_scale)
    return {"scales": scales, "applied": applied}


def fp16_overflow_case(rank: int) -> dict:
    """An fp16 overflow (injected by a huge loss multiplier) is skipped, and the loss scale drops,
    exactly as in a plain DeepSpeed step and in DeepSpeed's own gradient accumulation; the next,
    normal step is applied by all alike."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True  # CPU fp16 kernels exist; DS is just cautious
    batches = [make_batch(LOCAL_BATCH, seed=10 + rank), make_batch(LOCAL_BATCH, seed=20 + rank)]
    mults = [1e6, 1.0]
    runs = {}
    for name, chunk in (("cached", SIZES), ("plain", None)):
        torch.manual_seed(0)
        model = TinyDualEncoder(drop=0.0, drop_path=0.0)  # same function for both step kinds
        engine = build_engine("deepspeed", model, optimizer=_sgd, ds_config=ds_config(2, dtype="fp16"))
        gc = GradCache(engine, chunk_size=None, chunk_sizes=chunk)
        scales, applied, unchanged = [engine.loss_scale], [], []
        for batch, mult in zip(batches, mults):
            before = _full_params(engine)
            gc.step(batch, lambda e, m=mult: clip_loss(e, m))
            applied.append(engine.optimizer_step())
            unchanged.append(max_rel_err(_full_params(engine), before)[0] == 0.0)
            scales.append(engine.loss_scale)
        runs[name] = {"scales": scales, "applied": applied, "unchanged": unchanged,
                      "params": _full_params(engine)}
    result: dict[str, Any] = {k: {n: v for n, v in r.items() if n != "params"} for k, r in runs.items()}
    result["native"] = _native_accumulation_run(batches, mults)
    result["param_err"] = _worst(max_rel_err(runs["cached"]["params"], runs["plain"]["params"])[0])
    return result


def bf16_case(stage: int, rank: int) -> dict:
    """bf16 engine: cached vs plain step (no dropout) agree within bf16 tolerance."""
    grads = {}
    for name, chunk in (("cached", SIZES), ("plain", None)):
        torch.manual_seed(0)
        model = TinyDualEncoder(drop=0.0, drop_path=0.0)
        engine = build_engine("deepspeed", model, optimizer=_sgd,
                              ds_config=ds_config(stage, dtype="bf16"))
        GradCache(engine, chunk_size=None, chunk_sizes=chunk).step(make_batch(LOCAL_BATCH, seed=10 + rank), clip_loss)
        grads[name] = {n: g.float().clone() for n, g in _full_grads(engine).items() if g is not None}
        engine.optimizer_step()
    return {"grad": _worst(max_rel_err(grads["cached"], grads["plain"])[0]), "n": len(grads["plain"])}


def master_case(stage: int, dtype: str, rank: int) -> dict:
    """``engine.master_params()`` under a half-precision engine is the optimizer's fp32 master,
    whole: fp32, full shapes, identical on every rank, rounding to exactly the module's working
    copy, yet finer than it (after a few steps of a small learning rate the masters hold bits the
    half copy lacks). A frozen parameter comes back too (from the module)."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True
    torch.manual_seed(0)
    model = TinyDualEncoder(drop=0.0, drop_path=0.0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    frozen = next(n for n in shapes if n.endswith("bias"))
    model.get_parameter(frozen).requires_grad_(False)
    half = torch.float16 if dtype == "fp16" else torch.bfloat16
    engine = build_engine("deepspeed", model, ds_config=ds_config(stage, dtype=dtype),
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3))
    gc = GradCache(engine, chunk_size=None, chunk_sizes=SIZES)
    for step in range(3):
        gc.step(make_batch(LOCAL_BATCH, seed=10 + 7 * step + rank), clip_loss)
        engine.optimizer_step()
    import deepspeed

    master = dict(engine.master_params())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        working = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {n: m.tolist() for n, m in master.items()})
    finer = sum(int((m != working[n].float()).sum()) for n, m in master.items() if n != frozen)
    total = sum(m.numel() for n, m in master.items() if n != frozen)
    return {
        "names": list(master) == list(shapes),
        "fp32": all(m.dtype == torch.float32 for m in master.values()),
        "shapes": all(tuple(m.shape) == shapes[n] for n, m in master.items()),
        "same_on_ranks": all(g == gathered[0] for g in gathered),
        "rounds_to_working": all(torch.equal(m.to(half), working[n].to(half)) for n, m in master.items()),
        "finer_fraction": finer / total,
        "frozen_equal": torch.equal(master[frozen], working[frozen].float()),
    }


def deepspeed_worker(rank: int, world: int, port: int, cases: list[list], out_path: str) -> None:
    _init(rank, world, port)
    results: dict[str, Any] = {}
    try:
        for case in cases:
            kind, *args = case
            key = "-".join(str(a) for a in case)
            start = time.perf_counter()
            if kind == "zero":
                results[key] = ds_case(args[0], rank, *args[1:])
            elif kind == "fp16":
                results[key] = fp16_overflow_case(rank)
            elif kind == "bf16":
                results[key] = bf16_case(args[0], rank)
            elif kind == "master":
                results[key] = master_case(args[0], args[1], rank)
            results[key]["secs"] = round(time.perf_counter() - start, 2)
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0 or "error" in results:
            with open(out_path if rank == 0 else f"{out_path}.rank{rank}", "w") as f:
                json.dump(results, f, default=str)
    _finish()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fsdp_bf16_case(rank: int) -> dict:
    """FSDP2 with a bf16 mixed-precision policy: cached vs plain step (no dropout), bf16 tolerance."""
    grads = {}
    for name, sizes in (("cached", SIZES), ("plain", None)):
        torch.manual_seed(0)
        engine = build_engine("fsdp", TinyDualEncoder(drop=0.0, drop_path=0.0), optimizer=_sgd,
                              param_dtype=torch.bfloat16)
        GradCache(engine, chunk_size=None, chunk_sizes=sizes).step(make_batch(LOCAL_BATCH, seed=10 + rank), clip_loss)
        grads[name] = {n: _full(p.grad).float() for n, p in engine.module.named_parameters() if p.grad is not None}
    return {"grad": _worst(max_rel_err(grads["cached"], grads["plain"])[0]), "n_grads": len(grads["plain"])}


def fsdp_case(rank: int, kind: str) -> dict:
    """FSDP2 / local all-reduce / DDP cached step vs the reference (grads, params after SGD)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = TinyDualEncoder(hier=True, checkpointing=True)
    ref = copy.deepcopy(model)
    wrapped = DDP(model, find_unused_parameters=True) if kind == "ddp" else model
    engine = build_engine("fsdp" if kind == "fsdp" else "local", wrapped, optimizer=_sgd)
    inputs = make_batch(LOCAL_BATCH, seed=10 + rank)
    torch.manual_seed(100 + rank)
    GradCache(engine, chunk_sizes=SIZES).step(inputs, clip_loss)

    grads = {n: _full(p.grad) for n, p in engine.module.named_parameters() if p.grad is not None}
    torch.manual_seed(100 + rank)
    reference_step(ref, inputs, SIZES)
    average_grads(ref)
    grad_err, grad_at = max_rel_err(grads, _present(ref))
    engine.optimizer_step()
    torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9).step()
    params = {n: _full(p.detach()) for n, p in engine.module.named_parameters()}
    ref_params = {n: p.detach() for n, p in ref.named_parameters()}
    param_err, param_at = max_rel_err(params, ref_params)
    master = dict(engine.master_params())
    assert list(master) == list(ref_params) and all(m.dtype == torch.float32 for m in master.values())
    return {"grad": _worst(grad_err), "grad_at": grad_at, "param": _worst(param_err), "param_at": param_at,
            "master": _worst(max_rel_err(master, ref_params)[0]), "n_grads": len(grads)}


def fsdp_worker(rank: int, world: int, port: int, kinds: list[str], out_path: str) -> None:
    _init(rank, world, port)
    results: dict[str, Any] = {}
    try:
        for kind in kinds:
            results[kind] = fsdp_bf16_case(rank) if kind == "fsdp-bf16" else fsdp_case(rank, kind)
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0 or "error" in results:
            with open(out_path if rank == 0 else f"{out_path}.rank{rank}", "w") as f:
                json.dump(results, f, default=str)
    _finish()


def shm_probe_worker(out_path: str) -> None:
    """Rank 0 of 1 (launcher variables set): a ZeRO-2 engine on CPU, one cached step; writes whether
    DeepSpeed's comm backend holds its shm-comm op (run by :func:`helpers_process.one_process`)."""
    res: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo")
        torch.manual_seed(0)
        engine = build_engine("deepspeed", TinyDualEncoder(), ds_config=ds_config(2), optimizer=_sgd)
        GradCache(engine, chunk_size=None, chunk_sizes=SIZES).step(make_batch(LOCAL_BATCH, seed=1), clip_loss)
        engine.optimizer_step()
        from deepspeed.comm import comm as ds_comm

        res = {"backend": type(ds_comm.cdb).__name__, "shm_op": ds_comm.cdb.shm_comm_op is not None}
    except Exception:
        res = {"error": traceback.format_exc()}
    with open(out_path, "w") as fh:
        json.dump(res, fh)
    _finish()
