"""Config-time checks of a run, before any model is built: each finding names the field and the fix.

``Trainer.__init__`` calls :func:`preflight` right after the process group is up (the checks need
the world size) and before the model, the engine or a loader exists, so a run that cannot work
fails in seconds with one message instead of minutes later inside a data worker:

* **batch arithmetic** — ``train.global_batch_size`` must split evenly over the ranks, and
  ``data.part_size`` (the loader's unit) must divide the per-rank batch;
* **rows vs ranks × workers × batch** — the loader gives every (rank, worker) pair an equal share
  of each stream's rows and makes *full* batches inside each worker, so a shard set of N rows
  yields ``N // (ranks × workers) // micro_batch`` batches per worker; none at all is an error that
  names which knob fixes it (fewer workers, a smaller batch, more rows). Under ``data.debiased`` a
  step is one global batch of one source, so a source of N rows gives ``N // global_batch`` steps
  whatever the workers. With ``data.part_size`` a worker makes parts, and a rank's step is
  ``micro / part_size`` of them (its last one per epoch may be short). The row counts come from the shard index (record-batch metadata: nothing
  is decoded);
* **chunk size vs local batch** — a gradient-cache chunk at least as large as the per-rank batch
  means one chunk per step: the cache then only adds a second forward (a warning);
* **host memory** — the local batches of pixels a rank holds (the step's, the loader's prefetch)
  times the ranks on this machine, against its memory (:mod:`vlscale.memory.hostmem`): more than
  the total for one batch per rank is an error, more than what is available now a warning;
* **warmup vs steps** — a warmup as long as the run never reaches ``train.lr`` (a warning);
* **visual concepts** — ViCHA concepts (``techniques.concept_mode`` / ``concept_prob``) need a
  ``concepts`` column in the training shards, and in the evaluation shards of a concept-token model
  (else the first evaluation, hours in, would stop the run);
* **text** — a sample of the training captions is tokenized: a high rate of unknown tokens,
  words split into single characters or captions cut at ``model.context_length`` means the
  tokenizer is mangling real text (a warning naming the rates; see
  :func:`vlscale.model.tokenizer.audit_texts`).

Errors raise :class:`PreflightError` (a ``ValueError``) listing every error found; warnings are
returned (and logged by the caller on rank 0). In a multi-rank run :func:`preflight_all_ranks` runs
the checks on rank 0 only and broadcasts the outcome, so every rank raises the same error (a
transient failure seen by one rank alone would otherwise leave the others waiting in the next
collective) and the shards' index is read once, not once per rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vlscale.config import Config
from vlscale.divisors import divisors, nearest_divisors

Hosts = list[tuple[str, "tuple[int, int] | None", int]]
"""Every machine of a run: (host name, (MemTotal, MemAvailable) bytes or None, ranks on it)."""

log = logging.getLogger(__name__)
CAPTION_SAMPLE = 512  # captions read for the tokenizer audit
DROP_WARN = 0.10  # warn when partial batches leave this fraction of an epoch's rows unused


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class PreflightError(ValueError):
    """The config cannot run; the message lists each problem with its fix."""


@dataclass
class Findings:
    errors: list[str]
    warnings: list[str]


def preflight(cfg: Config, world_size: int, *, hosts: Hosts | None = None) -> list[str]:
    """Check ``cfg`` for ``world_size`` ranks; raise :class:`PreflightError` or return the warnings.
    ``hosts``: every machine of the run as ``(host, memory, ranks)`` (default: this one)."""
    found = Findings([], [])
    micro = _check_batch(cfg, world_size, found)
    if micro and _check_parts(cfg, micro, world_size, found):
        _check_chunks(cfg, micro, world_size, found)
        _check_host(cfg, world_size, found, hosts)
        _check_rows(cfg, micro, world_size, found)
    _check_schedule(cfg, found)
    if not found.errors:
        _check_text(cfg, found)
    if found.errors:
        raise PreflightError("config check failed before building the model:\n  - " + "\n  - ".join(found.errors))
    return found.warnings


def preflight_all_ranks(cfg: Config, world_size: int, *, rank: int, group: Any = None) -> list[str]:
    """:func:`preflight` on rank 0, its outcome broadcast: every rank returns the same warnings or
    raises the same error. Without an initialised process group (or one rank) it is ``preflight``.
    Every rank first reports its machine (host name, memory), so the host-memory check covers each
    machine of the run with the ranks it really runs."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return preflight(cfg, world_size)
    from vlscale.memory.hostmem import group_hosts, host_identity

    identities: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(identities, host_identity(), group=group)
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            outcome[0] = ("ok", preflight(cfg, world_size, hosts=group_hosts(identities)))
        except PreflightError as exc:
            outcome[0], error = ("config", str(exc)), exc
        except Exception as exc:  # any failure must reach every rank, not only this one
            outcome[0], error = ("crash", f"{type(exc).__name__}: {exc}"), exc
    dist.broadcast_object_list(outcome, src=0, group=group)
    kind, value = outcome[0]
    if error is not None:
        raise error  # rank 0 keeps its own traceback
    if kind == "config":
        raise PreflightError(value)
    if kind == "crash":
        raise RuntimeError(f"the config check failed on rank 0: {value}")
    return value


def _check_batch(cfg: Config, world: int, found: Findings) -> int:
    glob = cfg.train.global_batch_size
    micro = cfg.train.micro_batch_size or glob // world
    if micro >= 1 and micro * world == glob:
        return micro
    lo, hi = (glob // world) * world, (glob // world + 1) * world
    sizes = " or ".join(str(s) for s in (lo, hi) if s >= world)
    small = [d for d in divisors(glob) if d <= 64] if glob >= 1 else []
    found.errors.append(
        f"train.global_batch_size={glob} does not split over {_n(world, 'rank')}"
        + (f" with train.micro_batch_size={cfg.train.micro_batch_size}" if cfg.train.micro_batch_size else "")
        + f"; fix: train.global_batch_size={sizes} (a multiple of the world size), or run on a world size "
        f"dividing {glob} ({', '.join(map(str, small[-4:]))}, …)"
        + (", or train.micro_batch_size=0 (derived)" if cfg.train.micro_batch_size else ""))
    return 0


def _check_parts(cfg: Config, micro: int, world: int, found: Findings) -> bool:
    """False (and an error) when data.part_size does not divide the per-rank batch."""
    part = cfg.data.part_size
    if not part or micro % part == 0:
        return True
    near = nearest_divisors(micro, part, 2)
    found.errors.append(
        f"data.part_size={part} does not divide the per-rank batch of {micro} pairs (train.global_batch_size="
        f"{cfg.train.global_batch_size} / {_n(world, 'rank')}); fix: data.part_size="
        + " or ".join(map(str, near)) + " (a divisor of the per-rank batch), or data.part_size=0 (whole batches)")
    return False


def _check_chunks(cfg: Config, micro: int, world: int, found: Findings) -> None:
    gc = cfg.gradcache
    if not gc.enabled:
        return
    for name, value in (("chunk_size", gc.chunk_size), ("image_chunk_size", gc.image_chunk_size),
                        ("text_chunk_size", gc.text_chunk_size)):
        if value and value >= micro:
            found.warnings.append(
                f"gradcache.{name}={value} >= the per-rank batch of {micro} pairs (train.global_batch_size="
                f"{cfg.train.global_batch_size} / {_n(world, 'rank')}): each step is one chunk, so the gradient cache "
                f"bounds no memory and only adds a second forward; fix: gradcache.{name}={max(1, micro // 2)} "
                "(or below), or gradcache.enabled=false")


def _check_host(cfg: Config, world: int, found: Findings, hosts: Hosts | None) -> None:
    from vlscale.memory.hostmem import check_host_memory

    if hosts is None:
        results = [check_host_memory(cfg, world)]
    else:
        results = [check_host_memory(cfg, world, memory=mem, local_ranks=n, host=name if len(hosts) > 1 else None)
                   for name, mem, n in hosts]
    for error, warning in results:
        if error and error not in found.errors:
            found.errors.append(error)
        if warning and warning not in found.warnings:
            found.warnings.append(warning)


def _check_schedule(cfg: Config, found: Findings) -> None:
    t = cfg.train
    if t.warmup_steps >= t.steps > 1:
        found.warnings.append(
            f"train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: the learning rate never gets past "
            f"warmup (it would peak at step {t.warmup_steps}) and the cosine decay never starts; fix: "
            f"train.warmup_steps={max(1, t.steps // 10)} (about a tenth of the run) or more train.steps")


def shard_index(shards: Any) -> Any:
    """The :class:`~vlscale.data.stream.ShardIndex` of a shard location (metadata only), unreadable
    shards logged and skipped as the loader will."""
    from vlscale.data.stream import ShardIndex

    index = ShardIndex(shards, on_error="skip")
    for path, why in index.skipped.items():
        log.warning("preflight: shard %s is unreadable and will be skipped: %s", path, why)
    return index


def stream_rows(index: Any, *, debiased: bool) -> dict[str, int]:
    """Rows of each sampling stream (each source under debiased sampling, else all) of a shard index."""
    return index.source_counts() if debiased else {"all": index.num_rows}


def _check_concepts(cfg: Config, found: Findings) -> None:
    """ViCHA concepts must be in the data: in the training shards when any are sampled, and in the
    evaluation shards of a model that takes them as image tokens (it evaluates with them). vlscale's
    shards always have the column, so the first record batches are read for a non-empty list."""
    t = cfg.techniques
    mine = "fix: mine them with `vlscale concepts SHARDS --checkpoint RUN --out DIR` and point {field} at DIR"
    if (t.concept_mode == "image_tokens" or t.concept_prob > 0) and not sample_column(
            cfg.data.train_shards, "concepts", 1):
        found.errors.append(
            f"techniques.concept_mode={t.concept_mode!r} (concept_prob={t.concept_prob}) uses each image's visual "
            f"concepts, but the first rows of data.train_shards={cfg.data.train_shards} have none; "
            + mine.format(field="data.train_shards")
            + (", or techniques.concept_prob=0" if t.concept_mode == "caption" else ""))
    if t.concept_mode == "image_tokens" and cfg.data.eval_shards and cfg.train.eval_every and not sample_column(
            cfg.data.eval_shards, "concepts", 1):
        found.errors.append(
            f"data.eval_shards={cfg.data.eval_shards}: the model takes visual concepts as image tokens "
            f"(model.concept_tokens={cfg.model.concept_tokens}) and is evaluated with them, but the first rows "
            "have none; " + mine.format(field="data.eval_shards") + ", or data.eval_shards='' (no evaluation "
            "during training)")


def units_per_rank(rows: dict[str, int], *, unit: int, world: int, workers: int) -> int:
    """Full units (batches, or parts) one rank's workers make per epoch under mixed sampling:
    every (rank, worker) gets ``rows // (world × workers)`` rows of the stream (drop_last)."""
    workers = max(1, workers)
    return sum(workers * ((n // (world * workers)) // unit) for n in rows.values())


def batches_per_rank(rows: dict[str, int], *, micro: int, world: int, workers: int, debiased: bool = False,
                     part_size: int = 0) -> int:
    """Steps one rank makes per epoch. Mixed sampling: the (rank, worker) streams' full units
    (:func:`units_per_rank`), grouped ``micro / part_size`` parts to a step, the last group
    possibly short. Debiased: one step per global step, ``rows_s // (world × micro)`` per source,
    whatever the workers and parts (the global schedule of :mod:`vlscale.data.sampling`)."""
    if debiased:
        return sum(n // (world * micro) for n in rows.values())
    part = part_size or micro
    return -(-units_per_rank(rows, unit=part, world=world, workers=workers) // (micro // part))


def _check_rows(cfg: Config, micro: int, world: int, found: Findings) -> None:
    if not cfg.data.train_shards:
        found.errors.append("data.train_shards is empty; fix: point it at a folder of Arrow shards "
                            "(`vlscale shards build` writes them)")
        return
    try:
        index = shard_index(cfg.data.train_shards)
    except ValueError as exc:
        found.errors.append(f"data.train_shards={cfg.data.train_shards}: {exc}")
        return
    _check_concepts(cfg, found)
    rows = stream_rows(index, debiased=cfg.data.debiased)
    workers = max(1, cfg.data.num_workers)
    total = sum(rows.values())
    debiased = cfg.data.debiased
    part = cfg.data.part_size or micro
    per_rank = batches_per_rank(rows, micro=micro, world=world, workers=workers, debiased=debiased,
                                part_size=part)
    streams = world * workers
    if per_rank == 0 and debiased:  # one global batch per step from one source: workers do not matter
        biggest = max(rows.values(), default=0) // world
        fixes = ([f"train.global_batch_size={biggest * world} (or less)"] if biggest >= 1 else []) + [
            f"at least {micro * world} rows in one source"]
        found.errors.append(
            f"data.train_shards={cfg.data.train_shards}: under data.debiased every global batch of "
            f"{cfg.train.global_batch_size} pairs comes from one source, and no source has that many rows "
            f"({rows}); fix: " + ", or ".join(fixes))
        return
    if per_rank == 0:
        fixes = []
        for nw in range(cfg.data.num_workers - 1, -1, -1):
            if batches_per_rank(rows, micro=micro, world=world, workers=nw, part_size=part):
                fixes.append(f"data.num_workers={nw}")
                break
        biggest = max(rows.values()) // streams
        if biggest >= 1:
            fit = max(d for d in divisors(micro) if d <= biggest)
            fixes.append(f"data.part_size={fit} (or a smaller divisor of {micro})" if part < micro else
                         f"train.global_batch_size={biggest * world} (or less)")
        fixes.append(f"at least {part * streams} rows")
        found.errors.append(
            f"data.train_shards={cfg.data.train_shards}: {total} rows split over {_n(world, 'rank')} × "
            f"{_n(workers, 'loader worker')} = {_n(streams, 'stream')} of ~{total // streams} rows"
            + (f", fewer than one part of {part} pairs (data.part_size) per stream" if part < micro else
               f", fewer than one full batch of {micro} pairs per stream (train.global_batch_size="
               f"{cfg.train.global_batch_size} / {_n(world, 'rank')})") + "; fix: " + ", or ".join(fixes))
        return
    used = (per_rank * micro if debiased else units_per_rank(rows, unit=part, world=world, workers=workers) * part) * world
    if total and (total - used) / total > DROP_WARN:
        split = ("each source's last partial global batch" if debiased else
                 f"partial batches of {_n(streams, 'stream')} = {_n(world, 'rank')} × {_n(workers, 'worker')}")
        found.warnings.append(
            f"data: each epoch uses {used} of {total} rows ({total - used} left in {split}); "
            + ("a smaller global batch wastes less" if debiased else "fewer data.num_workers or a smaller batch "
               "wastes less"))
    if debiased:
        for name, n in rows.items():
            if n < micro * world:
                found.warnings.append(f"data.debiased: source {name!r} has {n} rows, fewer than one global batch "
                                      f"of {micro * world}: it is never sampled")
    log.info("preflight: %d rows, %d batches of %d per rank per epoch (%.2f epochs in %d steps)",
             total, per_rank, micro, cfg.train.steps / per_rank, cfg.train.steps)


def _check_text(cfg: Config, found: Findings) -> None:
    from vlscale.model.tokenizer import audit_texts, build_tokenizer, text_warning

    try:
        tokenizer = build_tokenizer(cfg.model)
    except ValueError:
        return  # no tokenizer of its own: the model build reports it
    if cfg.data.text_mask_prob > 0:  # the loader would refuse it only once the model is built
        from vlscale.data.collate import CaptionMasker

        try:
            CaptionMasker.from_tokenizer(tokenizer, cfg.data.text_mask_prob, cfg.data.text_mask_split)
        except ValueError as exc:
            found.errors.append(f"data.text_mask_prob={cfg.data.text_mask_prob} with model.tokenizer="
                                f"{cfg.model.tokenizer or cfg.model.text_model}: {exc}")
    captions = sample_captions(cfg.data.train_shards, CAPTION_SAMPLE)
    if not captions:
        return
    stats = audit_texts(tokenizer, captions, max_length=cfg.model.context_length)
    warning = text_warning(stats, context_length=cfg.model.context_length,
                           word_list=bool(cfg.model.tokenizer_words))
    if warning:
        found.warnings.append(f"data.train_shards: in {len(captions)} sampled captions, {warning}")


def sample_captions(shards: Any, limit: int) -> list[str]:
    """Up to ``limit`` captions from the first record batches of the shards (no image is decoded)."""
    return sample_column(shards, "caption", limit)


def sample_column(shards: Any, column: str, limit: int, *, max_batches: int = 16) -> list[Any]:
    """Up to ``limit`` non-empty values of ``column`` from the first ``max_batches`` record batches
    of the shards (no image is decoded; unreadable shards and a missing column give nothing)."""
    from vlscale.data.stream import list_shards, open_shard

    out: list[Any] = []
    try:
        paths = list_shards(shards)
    except ValueError:
        return out
    for path in paths:
        try:
            reader = open_shard(path)
            for i in range(reader.num_record_batches):
                out += [c for c in reader.get_batch(i).column(column).to_pylist() if c]
                max_batches -= 1
                if len(out) >= limit or max_batches <= 0:
                    return out[:limit]
        except (ValueError, KeyError, OSError):
            continue
    return out
