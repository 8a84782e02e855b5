"""``build_shards``: parallel, splittable, resumable shard builds (``vlscale shards build``).

Each source is cut into deterministic tasks (:mod:`vlscale.data.sources`); each task writes its
own shards, ``<source>-<task:05d>-<n:05d>.arrow``, so the output depends only on the inputs:
``--workers 1`` and ``--workers 8`` write byte-identical files, and ``--part K/N`` (task ``t`` goes
to part ``t mod N``) lets N machines build one data set into one folder or bucket.

State lives beside the shards in ``.build/<source>/``: ``plan.json`` (the inputs and options; a
rerun with other ones is refused without ``--overwrite``) and one record per finished task (its
shards' manifest entries, counts and rejected rows), written after the task's shards. A rerun
skips finished tasks and redoes the rest, so an interrupted build resumes where it stopped.
When every task is done, :func:`vlscale.data.index.finalize` writes ``manifest.json``,
``build_summary.json`` and ``rejected.jsonl`` (``vlscale shards index`` does it after a
multi-part build).

Duplicate keys (``duplicates="reject"``, the default): before writing, a cheap pass reads every
task's keys (captions, a table's key column, tar headers); a key's first occurrence in input
order is kept and every later one is rejected as ``duplicate_key`` — the same decision on every
machine of a multi-part build.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import queue
import re
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from vlscale.data import fs
from vlscale.data.manifest import entries_from_json, manifest_json, relative_entries
from vlscale.data.schema import SHARD_SUFFIX
from vlscale.data.sources import SourceSpec, Task, plan_tasks, task_keys, task_pairs
from vlscale.data.writer import VALIDATE_MODES, ShardWriter, safe_prefix

STATE_DIR = ".build"
PLAN_VERSION = 1


@dataclass(frozen=True)
class BuildOptions:
    """What shapes the output (all but ``workers``/``progress`` are part of the plan)."""

    target_shard_bytes: int = 256 << 20
    rows_per_batch: int = 128
    task_rows: int = 8192
    validate: str = "full"
    duplicates: str = "reject"

    def __post_init__(self) -> None:
        if self.validate not in VALIDATE_MODES:
            raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {self.validate!r}")
        if self.duplicates not in ("reject", "keep"):
            raise ValueError(f"duplicates must be 'reject' or 'keep', got {self.duplicates!r}")
        if min(self.target_shard_bytes, self.rows_per_batch, self.task_rows) <= 0:
            raise ValueError("shard size, rows per batch and task rows must be positive")


@dataclass
class SourceReport:
    """What this run (or part) did for one source."""

    source: str
    tasks: int = 0
    resumed: int = 0  # tasks already finished by an earlier run
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    shards: int = 0
    bytes: int = 0
    truncated_inputs: list[str] = field(default_factory=list)
    failed_inputs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["rejected"] = dict(self.rejected)
        return out


def state_dir(out: str, source: str) -> str:
    return fs.join(out, STATE_DIR, safe_prefix(source))


def task_record_path(out: str, source: str, index: int) -> str:
    return fs.join(state_dir(out, source), f"task-{index:05d}.json")


def _plan_doc(spec: SourceSpec, opts: BuildOptions, tasks: list[Task]) -> dict:
    return {"version": PLAN_VERSION, "source": asdict(spec), "options": asdict(opts), "tasks": len(tasks),
            "inputs": sorted({t.input for t in tasks})}


def _read_json(location: str) -> dict | None:
    try:
        return json.loads(fs.read_bytes(location))
    except fs.StorageError:
        return None


def _prepare(out: str, spec: SourceSpec, opts: BuildOptions, tasks: list[Task], part: tuple[int, int],
             overwrite: bool) -> None:
    """Check (or, with ``overwrite``, clear) what an earlier build left; write the plan."""
    prefix = safe_prefix(spec.name)
    plan = _plan_doc(spec, opts, tasks)
    plan_at = fs.join(state_dir(out, spec.name), "plan.json")
    old = _read_json(plan_at)
    shards = [loc for loc, _ in fs.list_files(fs.join(out, f"{prefix}-*{SHARD_SUFFIX}"), SHARD_SUFFIX)]
    if overwrite:
        mine = {t.index for t in tasks if t.index % part[1] == part[0]}
        pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+{re.escape(SHARD_SUFFIX)}$")
        for loc in shards:
            m = pattern.match(fs.basename(loc))
            task = int(m.group(1)) if m else None
            if task in mine or (part[0] == 0 and (task is None or task >= len(tasks))):
                fs.delete(loc)
        for index in mine:
            fs.delete(task_record_path(out, spec.name, index))
    elif old is not None and old != plan:
        raise FileExistsError(f"{out}: holds a build of source {spec.name!r} with other inputs or options "
                              f"({plan_at}); pass --overwrite to rebuild it")
    elif old is None and shards:
        raise FileExistsError(f"{out}: {len(shards)} shard(s) named {prefix}-*{SHARD_SUFFIX} already exist "
                              f"(e.g. {fs.basename(shards[0])}); pass overwrite=True (CLI: --overwrite) to "
                              "replace them")
    if old != plan:
        fs.write_bytes(plan_at, json.dumps(plan, indent=1).encode())


def _key_digests(task: Task, spec: SourceSpec) -> bytes:
    return b"".join(hashlib.blake2b(k.encode(), digest_size=16).digest() for k in task_keys(task, spec))


def duplicate_rows(digests: list[bytes]) -> list[set[int]]:
    """Per task, the positions whose key occurred earlier (in this or an earlier task).

    Keys are compared by 128-bit BLAKE2 digests: 16 bytes per pair, no collision in practice."""
    sizes = [len(d) // 16 for d in digests]
    arr = np.frombuffer(b"".join(digests), dtype="V16")
    if arr.size == 0:
        return [set() for _ in digests]
    _, first = np.unique(arr, return_index=True)  # stable: the first occurrence's index
    dup = np.ones(arr.size, dtype=bool)
    dup[first] = False
    starts = np.cumsum([0, *sizes])
    return [set((np.flatnonzero(dup[a:b])).tolist()) for a, b in itertools.pairwise(starts)]


# --------------------------------------------------------------------------- one task
_PROGRESS: mp.Queue | None = None


def _init_worker(progress: mp.Queue | None) -> None:
    global _PROGRESS
    _PROGRESS = progress


def run_task(task: Task, spec: SourceSpec, out: str, opts: BuildOptions, dups: set[int],
             storage: fs.StorageOptions | None = None, progress: queue.Queue | mp.Queue | None = None) -> dict:
    """Build one task: write its shards, then its record (the resume marker). Returns the record."""
    progress = progress if progress is not None else _PROGRESS
    # a rerun rewrites the same names (the output is deterministic), so no listing is needed
    writer = ShardWriter(out, spec.name, prefix=f"{safe_prefix(spec.name)}-{task.index:05d}", overwrite=True,
                         target_shard_bytes=opts.target_shard_bytes, rows_per_batch=opts.rows_per_batch,
                         validate=opts.validate, storage=storage, scan_existing=False)
    rejected_rows: list[dict] = []
    current: dict = {}
    writer.on_reject = lambda reason, key: rejected_rows.append(
        {"source": spec.name, "input": task.input, "key": key, "reason": reason, **current})
    truncated: list[str] = []
    done = bad = 0
    for i, pair in enumerate(task_pairs(task, spec)):
        current.clear()
        if pair.detail:
            current["detail"] = pair.detail
        if pair.path:
            current["path"] = pair.path
        if pair.problem == "truncated_input":
            truncated.append(task.input)
            rejected_rows.append({"source": spec.name, "input": task.input, "reason": "truncated_input", **current})
            continue
        ok = False
        if i in dups:
            writer.reject("duplicate_key", pair.key)
        elif pair.problem:
            writer.reject(pair.problem, pair.key)
        elif pair.image is None:
            try:
                data = fs.read_bytes(pair.path or "")
            except (fs.StorageError, OSError) as e:
                current["detail"] = str(e)
                writer.reject("missing_file", pair.key)
            else:
                ok = writer.add(image_bytes=data, caption=pair.caption, key=pair.key, concepts=pair.concepts)
        else:
            ok = writer.add(image_bytes=pair.image, caption=pair.caption, key=pair.key, concepts=pair.concepts)
        done, bad = done + 1, bad + (not ok)
        if progress is not None and done % 64 == 0:
            progress.put((64, bad))
            bad = 0
    summary = writer.close()
    if progress is not None:
        progress.put((done % 64, bad))
    record = {"task": task.index, "source": spec.name, "input": task.input, "written": summary.written,
              "rejected": dict(summary.rejected), "truncated_inputs": truncated, "bytes": summary.bytes,
              "manifest": manifest_json(relative_entries(summary.entries, out)), "rejected_rows": rejected_rows}
    fs.write_bytes(task_record_path(out, spec.name, task.index), json.dumps(record).encode(), storage)
    return record


# --------------------------------------------------------------------------- the build
def _pool(workers: int, progress: mp.Queue | None) -> ProcessPoolExecutor:
    # spawn: forking a process that has started pyarrow / tqdm threads can deadlock
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(progress,))


def build_shards(specs: list[SourceSpec], out: str, *, options: BuildOptions | None = None, workers: int = 0,
                 part: tuple[int, int] = (0, 1), overwrite: bool = False, progress: bool = True,
                 storage: fs.StorageOptions | None = None) -> list[SourceReport]:
    """Build this part's tasks of every source into ``out`` (a folder or URL); one report per source.

    ``workers`` processes (0 = the CPU count; 1 = in this process). After a whole build
    (``part=(0, 1)``) the folder's manifest, summary and rejected list are written."""
    from vlscale.data.index import finalize  # index imports this module's state helpers

    opts = options or BuildOptions()
    k, n = part
    if not 0 <= k < n:
        raise ValueError(f"part {k}/{n}: need 0 <= K < N")
    prefixes = [safe_prefix(s.name) for s in specs]
    if len(set(prefixes)) != len(prefixes):  # two sources must never write the same file names
        raise ValueError(f"source names must be unique as file prefixes, got {[s.name for s in specs]}")
    out = str(out)
    plans = [(spec, plan_tasks(spec, opts.task_rows)) for spec in specs]
    for spec, tasks in plans:  # every check before anything is written
        _prepare(out, spec, opts, tasks, part, overwrite)
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    reports = [SourceReport(spec.name, tasks=sum(1 for t in tasks if t.index % n == k)) for spec, tasks in plans]
    todo: list[tuple[int, Task]] = []
    for s, (spec, tasks) in enumerate(plans):
        for t in tasks:
            if t.index % n != k:
                continue
            record = _read_json(task_record_path(out, spec.name, t.index))
            if record is not None:
                _add(reports[s], record)
                reports[s].resumed += 1
            else:
                todo.append((s, t))
    if todo:
        _run(plans, todo, out, opts, workers, reports, progress, storage)
    if part == (0, 1) and all(not r.failed_inputs for r in reports):
        finalize(out, storage=storage)
    return reports


def _add(report: SourceReport, record: dict) -> None:
    report.written += record["written"]
    report.rejected.update(record["rejected"])
    report.bytes += record["bytes"]
    report.shards += len(entries_from_json(record["manifest"], "task record"))
    report.truncated_inputs += record["truncated_inputs"]


def _run(plans: list[tuple[SourceSpec, list[Task]]], todo: list[tuple[int, Task]], out: str, opts: BuildOptions,
         workers: int, reports: list[SourceReport], progress: bool, storage: fs.StorageOptions | None) -> None:
    sources = {s for s, _ in todo}
    inline = workers <= 1 or len(todo) == 1
    updates: queue.Queue | mp.Queue = queue.Queue() if inline else mp.get_context("spawn").Queue()
    pool = None if inline else _pool(min(workers, len(todo)), updates)
    dups: dict[tuple[int, int], set[int]] = {}
    if opts.duplicates == "reject":  # every task of the source, not just this part's: same decision everywhere
        for s in sorted(sources):
            spec, tasks = plans[s]
            digests = (list(pool.map(_key_digests, tasks, [spec] * len(tasks))) if pool
                       else [_key_digests(t, spec) for t in tasks])
            for t, rows in zip(tasks, duplicate_rows(digests)):
                dups[(s, t.index)] = rows
    known = [sum(len(t.rows) for t in plans[s][1]) if plans[s][0].kind == "folder" else 0 for s in sources]
    bar = tqdm(total=sum(known) or None, desc="shards build", unit=" pairs", disable=not progress, smoothing=0.1)
    rejected = 0

    def drain() -> None:
        nonlocal rejected
        while True:
            try:
                n_pairs, n_bad = updates.get_nowait()
            except queue.Empty:
                return
            rejected += n_bad
            bar.update(n_pairs)
            bar.set_postfix(rejected=rejected, refresh=False)

    try:
        if pool is None:
            for s, task in todo:
                spec = plans[s][0]
                try:
                    _add(reports[s], run_task(task, spec, out, opts, dups.get((s, task.index), set()), storage,
                                              updates))
                except ValueError as e:
                    reports[s].failed_inputs[task.input] = str(e)
                drain()
        else:
            futures: dict[Future, int] = {
                pool.submit(run_task, task, plans[s][0], out, opts, dups.get((s, task.index), set()), storage): s
                for s, task in todo}
            inputs = {f: task.input for f, (_, task) in zip(futures, todo)}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                drain()
                for f in finished:
                    try:
                        _add(reports[futures[f]], f.result())
                    except ValueError as e:
                        reports[futures[f]].failed_inputs[inputs[f]] = str(e)
    finally:
        drain()
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


__all__ = ["BuildOptions", "SourceReport", "SourceSpec", "build_shards", "duplicate_rows", "run_task"]
