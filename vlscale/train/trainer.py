"""The training loop: model → engine → gradient cache → loss, with metrics, checks and checkpoints.

``Trainer(cfg).fit()`` runs one training run in this process (one rank of it under a launcher).
Build order (each step needs the previous one):

1. runtime: torch.distributed + device; the model seed is the same on every rank (identical
   initial replicas), the step seed differs per rank (dropout, mixup); then the config-time checks
   of :mod:`vlscale.train.preflight` (batch split, rows per rank × worker, chunk size, warmup,
   tokenization), before anything is built;
2. model (single-device code; under ZeRO-3 built partitioned, :mod:`vlscale.train.build`) → AdamW with weight-decay exclusions → cosine schedule → engine
   (DeepSpeed / FSDP2 / local), which wraps them from outside;
3. the resumable Arrow loader for this rank (its unit a part of the step with ``data.part_size``:
   :mod:`vlscale.train.assemble`), the gradient cache over the engine, the loss;
4. ``--resume``: engine state, data-stream position and RNG states from the checkpoint (at
   another world size through :mod:`vlscale.train.reshard`); or ``train.init_from``: only the
   weights of a checkpoint / export, loaded before the engine wraps the model (step 0).

One step = one contrastive batch of ``train.global_batch_size`` pairs over all ranks (fewer when
skipped samples leave a rank short: every rank then keeps the same rows, ``Trainer._even``): the
gradient cache embeds it chunk by chunk, the loss runs once over the gathered embeddings, the
chunks are re-forwarded to back-propagate, and the engine applies one optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlscale.config import Config, save_config
from vlscale.data import build_loader
from vlscale.data.fs import storage_options
from vlscale.engines import build_engine
from vlscale.gradcache import GradCache
from vlscale.gradcache.transfer import pinned
from vlscale.memory.phases import StepPhases
from vlscale.model.tokenizer import TokenStats, text_warning
from vlscale.train import checkpoint as ckpt
from vlscale.train.assemble import StepAssembler, rng_isolated
from vlscale.train.build import build_model, full_shapes, trainable
from vlscale.train.deepspeed_json import with_reduce_bucket
from vlscale.train.launchers import EngineSpec, resolve_batch, resolve_launch
from vlscale.train.losses import build_loss_fn
from vlscale.train.metrics import MetricsLogger, data_metrics, memory_stats
from vlscale.train.nonfinite import NonFiniteLossError as NonFiniteLossError  # re-exported
from vlscale.train.nonfinite import handle_nonfinite
from vlscale.train.optim import adamw_factory, build_adamw, build_scheduler
from vlscale.train.preflight import preflight_all_ranks
from vlscale.train.runtime import Runtime, even_rows, init_runtime, setup_logging, shutdown

log = logging.getLogger(__name__)
_HALF = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Trainer:
    """One training run (one rank of it). ``fit()`` returns a summary with the per-step losses."""

    def __init__(self, cfg: Config, *, resume: str | None = None, spec: EngineSpec | None = None) -> None:
        # The launcher's settings (accelerate, a user's ds_config) folded into the config first:
        # everything below builds from the resolved config (vlscale.train.launchers).
        self.spec = spec or resolve_launch(cfg)
        self.cfg = cfg = self.spec.config
        self.rt: Runtime = init_runtime(cfg)
        setup_logging(self.rt.rank)
        # raises before anything is built; rank 0 checks, every rank gets its outcome
        for warning in preflight_all_ranks(cfg, self.rt.world_size, rank=self.rt.rank,
                                           group=self.rt.process_group):
            if self.rt.is_main:
                log.warning("config: %s", warning)
        if self.rt.is_main:
            self.spec.log()  # engine, stage, offload, precision, launcher; one line per conflict
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.micro, _, self.global_batch = resolve_batch(cfg.train, self.rt.world_size)
        resume_from = ckpt.resolve_resume(resume, self.ckpt_dir) if resume else None  # fail before building
        if self.rt.world_size != self.spec.world_size:
            raise ValueError(f"the launch was resolved for {self.spec.world_size} ranks but torch.distributed has "
                             f"{self.rt.world_size}")
        self.ds_config = self.spec.ds_config
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        # Under ZeRO-3 the parameters are partitioned as they are created (see vlscale.train.build),
        # unless the launcher said zero3_init=false.
        self.model = build_model(cfg, self.rt.device, ds_config=self.ds_config if self.spec.zero3_init else None)
        if self.ds_config is not None:  # DeepSpeed's reduce bucket capped at the model's size (unless set)
            self.ds_config = self.spec.ds_config = with_reduce_bucket(self.ds_config, trainable(self.model))
        init_state = self._init_weights(resume_from)  # train.init_from: before the engine builds masters
        self.engine, self.optimizer, self.scheduler = self._build_engine()
        if init_state is not None:
            ckpt.set_masters(self.engine, init_state)  # exact fp32 masters under fp16 / bf16
            del init_state
        self.loader = self._build_loader()
        self.assembler = StepAssembler(self.micro, self.rt.device)  # parts -> steps (data.part_size)
        torch.manual_seed(cfg.train.seed + 1 + 1000 * self.rt.rank)  # per-rank dropout / mixup
        gc = cfg.gradcache
        sizes = {k: v for k, v in (("image", gc.image_chunk_size), ("text", gc.text_chunk_size)) if v}
        self.gradcache = GradCache(self.engine, chunk_size=gc.chunk_size if gc.enabled else None,
                                   chunk_sizes=sizes if gc.enabled else None)
        key_chunks = {t: sizes.get(t, gc.chunk_size) for t in ("image", "text")} if gc.enabled else None
        self.objective = build_loss_fn(cfg, process_group=self.rt.process_group, engine=self.engine,
                                       tokenizer=self.model.tokenizer, rank=self.rt.rank, micro_batch=self.micro,
                                       chunk_sizes=key_chunks, pixel_norm=self._pixel_norm())
        self.loss_fn = self.objective  # what the gradient cache calls (tests may wrap it)
        # Peak memory per phase of a few steps, for memory.json (vlscale memory report).
        self.phase_memory = StepPhases(self.rt.device, steps=cfg.train.memory_phase_steps,
                                       backend=cfg.train.memory_backend).attach(
            gradcache=self.gradcache, engine=self.engine)
        tok = self.model.tokenizer
        self.text_stats = TokenStats(tok) if tok is not None else None
        self._text_warned = False
        self.step = 0
        self.counters = {"nonfinite_skips": 0, "overflow_skips": 0, "samples": 0, "trimmed_samples": 0}
        self.losses: dict[int, float] = {}
        if resume_from is not None:
            self._resume(resume_from)
        elif resume:
            log.info("resume=%s: no checkpoint in %s yet, starting from scratch", resume, self.ckpt_dir)
        if self.rt.is_main:
            save_config(cfg, self.run_dir / "config.json")
        self.logger = MetricsLogger(self.run_dir, enabled=self.rt.is_main, tensorboard=cfg.train.tensorboard,
                                    progress=cfg.train.progress, total_steps=cfg.train.steps, start_step=self.step)

    # -- building ----------------------------------------------------------------------------
    def _build_engine(self) -> tuple[Any, torch.optim.Optimizer | None, Any]:
        if self.rt.is_main:  # engine.json + ds_config.json, also when building the engine fails
            self.spec.write(self.run_dir)
        engine, optimizer, scheduler = self._engine_of_spec()
        if self.rt.is_main:  # again, with what the live engine reports
            self.spec.write(self.run_dir, engine)
        return engine, optimizer, scheduler

    def _engine_of_spec(self) -> tuple[Any, torch.optim.Optimizer | None, Any]:
        cfg, t, spec = self.cfg, self.cfg.train, self.spec
        opt_kwargs = {"lr": t.lr, "weight_decay": t.weight_decay, "betas": (t.beta1, t.beta2), "eps": t.eps}
        sched_kwargs = {"warmup": t.warmup_steps, "total": t.steps, "min_ratio": t.min_lr_ratio}
        kind, half = cfg.engine.kind, _HALF[t.precision]
        if kind == "fsdp":  # shards first, then builds the optimizer on the sharded parameters
            engine = build_engine("fsdp", self.model, optimizer=adamw_factory(self.model, **opt_kwargs),
                                  process_group=self.rt.process_group, param_dtype=half,
                                  reshard_after_forward=spec.fsdp.reshard_after_forward,
                                  offload_params=spec.fsdp.offload_params, shard_modules=spec.fsdp.shard_modules)
            engine.lr_scheduler = build_scheduler(engine.optimizer, **sched_kwargs)
            return engine, engine.optimizer, engine.lr_scheduler
        with full_shapes(self.model):  # ZeRO-3 placeholders: the decay split needs the real ndim
            optimizer = build_adamw(self.model, **opt_kwargs)
        # A ds_config `scheduler` block is built by DeepSpeed itself (the user's file wins).
        scheduler = None if spec.ds_scheduler else build_scheduler(optimizer, **sched_kwargs)
        if kind == "deepspeed":
            engine = build_engine("deepspeed", self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                  ds_config=self.ds_config)
            # DeepSpeed wraps the optimizer and owns the scheduler; checkpoints go through it.
            return engine, None, engine.lr_scheduler
        engine = build_engine("local", self.model, optimizer=optimizer, lr_scheduler=scheduler,
                              process_group=self.rt.process_group, autocast_dtype=half)
        return engine, optimizer, scheduler

    def _build_loader(self) -> Any:
        return self._make_loader(self.rt.rank, self.rt.world_size, self.micro, self.cfg.data.num_workers)

    def _make_loader(self, rank: int, world_size: int, batch_size: int, num_workers: int,
                     part_size: int | None = None) -> Any:
        """This run's loader, or (re-split after a world-size change) an old rank's loader."""
        cfg, part = self.cfg, self.cfg.data.part_size if part_size is None else part_size
        if not cfg.data.train_shards:
            raise ValueError("data.train_shards is empty: point it at a folder of Arrow shards")
        return build_loader(
            cfg.data.train_shards, tokenizer=self.model.tokenizer, image_size=cfg.data.image_size or None,
            data_config=None if cfg.data.image_size else self.model.data_config(), train=True,
            batch_size=batch_size, rank=rank, world_size=world_size,
            num_workers=num_workers, seed=cfg.train.seed, debiased=cfg.data.debiased,
            max_length=cfg.model.context_length, on_error=cfg.data.on_error,
            scale=cfg.data.crop_scale if cfg.data.augment else (1.0, 1.0),
            auto_augment=cfg.data.auto_augment if cfg.data.augment else "",
            text_mask_prob=cfg.data.text_mask_prob, text_mask_split=cfg.data.text_mask_split,
            storage=storage_options(cfg.data), prefetch_factor=cfg.data.prefetch_factor,
            pixel_dtype=cfg.data.pixel_dtype, part_size=part,
            pin_memory=False if part and batch_size > part else None)  # parts are copied into a pinned step

    def _init_weights(self, resume_from: Path | None) -> dict[str, Any] | None:
        """``train.init_from``: the weights of a checkpoint or export, nothing else (a resume wins)."""
        source = self.cfg.train.init_from
        if not source:
            return None
        if resume_from is not None:
            log.info("train.init_from=%s ignored: resuming from %s", source, resume_from)
            return None
        state = ckpt.load_model_weights(source)
        ckpt.load_weights_into(self.model, state, source=f"train.init_from={source}")
        log.info("train.init_from: weights from %s (%d tensors); step 0, fresh optimizer and schedule",
                 ckpt.weights_file(source), len(state))
        return state

    def _resume(self, path: Path) -> None:
        from vlscale.train import reshard

        states = ckpt.rank_states(path)
        saved_world, world, rank = ckpt.saved_world_size(path), self.rt.world_size, self.rt.rank
        resplit = reshard.needs_resplit(states, self.cfg.data.part_size)  # or data.part_size changed
        if saved_world == world and not resplit:
            state = ckpt.load_checkpoint(path, engine=self.engine, optimizer=self.optimizer,
                                         scheduler=self.scheduler, loader=self.loader)
        else:
            if saved_world == world:
                ckpt.load_engine(path, engine=self.engine, optimizer=self.optimizer, scheduler=self.scheduler)
            else:
                log.warning("resuming a %d-rank checkpoint on %d ranks (see vlscale.train.reshard): same weights, "
                            "optimizer state and global batches; per-rank random draws are re-seeded", saved_world, world)
                reshard.load_engine_resharded(self.engine, self.optimizer, self.scheduler, path, states[0])
            old_world, old_states = reshard.old_stream_states(states, saved_world)
            self.loader = reshard.ResplitLoader(self._make_loader, old_states, old_world=old_world, rank=rank,
                                                world=world, micro=self.micro, next_loader=self.loader)
            own = states.get(rank) if saved_world == world else None
            if own is not None:
                ckpt.set_rng_state(own["rng"])
            else:
                torch.manual_seed(self.cfg.train.seed + 1 + 1000 * rank + 7919 * int(states[0]["step"]))
            state = {"step": int(states[0]["step"]), "trainer": states[0].get("trainer", {})}
        self.step = state["step"]
        self.counters.update(state["trainer"].get("counters", {}))
        self.objective.load_state_dict(state["trainer"].get("objective", {}))
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop ----------------------------------------------------------------------------
    def _batches(self) -> Iterator[Any]:
        """Endless stream of batches; each pass over the shards is one epoch of the loader.

        Fetching runs under a forked RNG: a new DataLoader iterator draws its base seed from the
        global torch RNG, which would shift dropout / mixup after a resume (the data pipeline
        seeds its own randomness per batch and keeps its position in ``loader.state_dict()``).

        A pass that starts mid-epoch may yield nothing: a checkpoint taken right after an epoch's
        last batch resumes at that epoch's end (the loader advances the epoch when the pass ends).
        Only a pass from an epoch's beginning that yields nothing means the data is too small.
        With ``data.part_size`` the loader yields parts, assembled into steps (``self.assembler``)."""
        while True:
            empty = True
            fresh = not self.loader.state_dict()["worker_states"]  # no position saved: epoch start
            for batch in self.assembler.steps(rng_isolated(self.loader), getattr(self.loader, "parts_per_step", 1)):
                empty = False
                batch = self._even(batch)
                if batch is not None:
                    yield batch
            if empty and fresh:
                raise ValueError(f"{self.cfg.data.train_shards}: no full batch of {self.micro} pairs for this rank")

    def _even(self, batch: Any) -> Any:
        """This rank's share of the step's batch, cut so every rank holds the same rows (None: the
        step is skipped by all): :func:`vlscale.train.runtime.even_rows`."""
        return even_rows(batch, self.rt, counters=self.counters, step=self.step + 1)

    def fit(self) -> dict[str, Any]:
        """Train until ``train.steps``; returns {"step", "losses", "counters", "eval"}."""
        t, last_eval = self.cfg.train, {}
        batches = self._batches()
        try:
            while self.step < t.steps:
                metrics = self._train_step(next(batches))
                self.logger.advance({"loss": metrics["loss"], "lr": metrics["lr"]})
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self.logger.log(self.step, {**metrics, **self._slow_metrics()})
                # Checkpoint first: an evaluation that fails (its data, its memory) must not cost
                # the steps since the last checkpoint, nor the final one.
                if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps:
                    self.save()
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    last_eval = self.evaluate()
            self._memory_report()
        finally:
            self.logger.close()
        return {"step": self.step, "losses": dict(self.losses), "counters": dict(self.counters), "eval": last_eval}

    def _train_step(self, batch: Any) -> dict[str, float]:
        if self.text_stats is not None and batch.tokens is not None:
            self.text_stats.update(batch.tokens, batch.attention_mask)  # the captions as the loader tokenized them
        start = time.perf_counter()
        inputs = self.objective.prepare(self.step, batch, self._step_inputs(batch))  # mixup / concepts / keys
        inputs = pinned(inputs)  # made after the loader pinned its batch: async per-chunk copies
        res = self.gradcache.step(inputs, self.loss_fn, chunk_loss=self.objective.chunk_loss,
                                  feed=self.objective.feed)  # uint8 pixels: normalised / mixed per chunk
        loss = float(res.loss)  # host sync: the NaN check needs the value (the loss is global)
        if not math.isfinite(loss) and not self._handle_nonfinite(loss):
            self.engine.zero_grad()  # skip: drop this step's gradients, do not advance
            return {"loss": loss, "lr": self._lr(), "skipped": 1.0}
        self._clip()
        lr = self._lr()  # the rate this step applies (the scheduler advances inside the step)
        applied = self.engine.optimizer_step()
        self.objective.finish()  # e.g. enqueue the momentum keys
        if not applied:  # an fp16 loss-scale overflow: DeepSpeed skipped it and lowered the scale
            self.counters["overflow_skips"] += 1
        elapsed = time.perf_counter() - start
        self.step += 1
        rows = len(batch) * self.rt.world_size  # every rank holds the same rows (_even)
        self.counters["samples"] += rows
        self.losses[self.step] = loss
        out = {"loss": loss, "lr": lr, "step_time_s": elapsed, "samples_per_s": rows / elapsed,
               **{k: float(v) for k, v in res.metrics.items()}}
        if self.engine.loss_scale is not None:
            out["loss_scale"] = float(self.engine.loss_scale)
        return out

    def _pixel_norm(self) -> tuple[Any, Any]:
        """The loader transform's (mean, std): uint8 pixels (data.pixel_dtype) are normalised with them."""
        transform = self.loader.dataset.transform
        return tuple(transform.mean), tuple(transform.std)

    def _step_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        """This step's model inputs. Under the gradient cache on an accelerator they stay in host
        memory: each chunk is copied to the device right before its forward (both passes, and the
        momentum keys' chunks), since at 1M pairs over 8 ranks one rank's pixels are ~20 GB as uint8
        (~79 GB as fp32). Without the gradient cache (one plain forward) or on the CPU the batch
        moves whole. uint8 pixels become float on the device (``Objective.feed``)."""
        if self.cfg.gradcache.enabled and self.rt.device.type != "cpu":
            return batch.model_inputs()
        return batch.to(self.rt.device).model_inputs()

    def _handle_nonfinite(self, loss: float) -> bool:
        """True to go on with the step anyway (fp16: the engine skips it), False to skip it; or raise."""
        return handle_nonfinite(loss, step=self.step + 1, train=self.cfg.train, engine_kind=self.engine.kind,
                                counters=self.counters)

    def _clip(self) -> None:
        # DeepSpeed clips inside step() (gradient_clipping in its config); the others clip here,
        # after the boundary backward has reduced the gradients over ranks.
        if self.cfg.train.grad_clip > 0 and self.engine.kind != "deepspeed":
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)

    def _lr(self) -> float:
        sched = self.scheduler
        return float(sched.get_last_lr()[0]) if sched is not None else float("nan")

    def _slow_metrics(self) -> dict[str, float]:
        """Metrics worth a little time, only on logged steps: skips, memory, temperature."""
        out = data_metrics(self.loader.stats)
        out.update({f"train/{k}": float(v) for k, v in self.counters.items()})
        out.update(memory_stats(self.rt.device))
        if self.text_stats is not None:  # since the last logged step, this rank's batches
            rates = self.text_stats.rates()
            out.update({f"text/{k}": v for k, v in rates.items()})
            self.text_stats.reset()
            warning = text_warning(rates, context_length=self.cfg.model.context_length,
                                   word_list=bool(self.cfg.model.tokenizer_words))
            if warning and not self._text_warned and self.rt.is_main:
                self._text_warned = True
                log.warning("text of the training batches (text/* metrics): %s", warning)
        return out

    # -- evaluation and checkpoints ---------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Zero-shot retrieval on data.eval_shards (all ranks take part; rank 0 logs)."""
        if not self.cfg.data.eval_shards:
            return {}
        from vlscale.train.evaluate import evaluate_retrieval

        results = evaluate_retrieval(self.engine, self.cfg, self.model.tokenizer, self.model.data_config(),
                                     self.cfg.data.eval_shards)
        self.logger.log(self.step, {f"eval/{k}": v for k, v in results.items()})
        if results:
            from vlscale.eval.retrieval import percent_table

            rows = [f"{label} " + " ".join(f"{k} {v:.2f}" for k, v in recalls.items())
                    for label, recalls in percent_table(results, "open_clip").items()]
            self.logger.message(f"step {self.step}: " + " | ".join(rows) + f" | rsum {results['rsum']:.1f}")
        return results

    def _memory_report(self) -> None:
        """Every rank's peak memory, gathered into <run_dir>/memory.json (the demo prints it)."""
        mine = self.phase_memory.merge_into(memory_stats(self.rt.device))
        reports = [mine]
        if self.rt.world_size > 1:
            reports = [None] * self.rt.world_size
            torch.distributed.all_gather_object(reports, mine)
        if self.rt.is_main:
            (self.run_dir / "memory.json").write_text(json.dumps({"ranks": reports}, indent=2) + "\n")

    def save(self) -> Path:
        trainer_state = {"counters": dict(self.counters), "objective": self.objective.state_dict()}
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, engine=self.engine, optimizer=self.optimizer,
                                    scheduler=self.scheduler, loader=self.loader, cfg=self.cfg,
                                    trainer_state=trainer_state, keep=self.cfg.train.keep_checkpoints)

    def close(self) -> None:
        self.assembler.close()
        shutdown(self.rt)


def train(cfg: Config, *, resume: str | None = None, spec: EngineSpec | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer`, run it, tear the process group down (also on errors)."""
    trainer = Trainer(cfg, resume=resume, spec=spec)
    try:
        return trainer.fit()
    finally:
        trainer.close()
