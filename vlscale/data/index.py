"""``finalize``: the manifest, build summary and rejected list of a shard folder (``vlscale shards index``).

Called at the end of a whole build, and by hand after the parts of a multi-machine build (or for
shards built elsewhere). It lists the folder once; each shard's manifest entry comes from the
task record a build left in ``.build/`` (no shard is opened) or, for shards without one, from
the shard's footer. Then it writes, atomically:

* ``manifest.json`` — every shard, in name order (the loader's order);
* ``build_summary.json`` — per source: pairs written, rejections by reason, truncated inputs;
* ``rejected.jsonl`` — one line per rejected pair (source, input, key or path, reason, detail).

A build whose plan has tasks without a record (a part still running or not started) is refused,
naming the missing tasks and the part that owns them, so a half-built set is never indexed.
"""

from __future__ import annotations

import json
from collections import Counter

from vlscale.data import fs
from vlscale.data.build import STATE_DIR
from vlscale.data.manifest import MANIFEST_NAME, ShardEntry, entries_from_json, index_folder, write_manifest
from vlscale.data.schema import SHARD_SUFFIX

SUMMARY_NAME = "build_summary.json"
REJECTED_NAME = "rejected.jsonl"


def _records(out: str, storage: fs.StorageOptions | None) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Plans by source prefix folder, and task records per source (in task order)."""
    plans: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    for loc, _ in fs.list_files(fs.join(out, STATE_DIR, "*", "*.json"), ".json"):
        doc = json.loads(fs.read_bytes(loc, storage))
        folder = fs.basename(fs.parent(loc))
        if fs.basename(loc) == "plan.json":
            plans[folder] = doc
        else:
            records.setdefault(folder, []).append(doc)
    for recs in records.values():
        recs.sort(key=lambda r: r["task"])
    return plans, records


def finalize(out: str, *, checksums: bool = False, storage: fs.StorageOptions | None = None) -> dict:
    """Write ``manifest.json``, ``build_summary.json`` and ``rejected.jsonl`` for folder ``out``."""
    out = str(out).rstrip("/") if fs.is_url(str(out)) else str(out)
    plans, records = _records(out, storage)
    missing = {}
    for folder, plan in plans.items():
        done = {r["task"] for r in records.get(folder, [])}
        lacking = [t for t in range(plan["tasks"]) if t not in done]
        if lacking:
            missing[plan["source"]["name"]] = lacking
    if missing:
        detail = "; ".join(f"source {s!r}: {len(t)} task(s), e.g. {t[:5]}" for s, t in missing.items())
        raise ValueError(f"{out}: the build is not finished ({detail}); run the missing parts (task t belongs to "
                         "part t mod N) or rerun `vlscale shards build` with the same arguments to resume")
    known: dict[str, ShardEntry] = {}
    for recs in records.values():
        for r in recs:
            for e in entries_from_json(r["manifest"], "task record"):
                e.path = fs.join(out, e.path)
                known[e.path] = e
    entries = index_folder(out, checksums=checksums, options=storage, known=known)
    listed = {e.path for e in entries}
    lost = sorted(set(known) - listed)
    if lost:
        raise ValueError(f"{out}: {len(lost)} shard(s) the build wrote are gone (e.g. {lost[0]}); rebuild with "
                         "--overwrite or restore them")
    if not entries and not records:
        raise ValueError(f"{out}: no *{SHARD_SUFFIX} shards to index")
    if entries:  # a build that wrote nothing still gets its summary and rejected list
        write_manifest(fs.join(out, MANIFEST_NAME), [_relative(e, out) for e in sorted(entries, key=lambda e: e.path)])
    sources = {}
    rejected_lines = []
    for folder in sorted(records):
        recs = records[folder]
        name = recs[0]["source"]
        rejected: Counter = Counter()
        for r in recs:
            rejected.update(r["rejected"])
            rejected_lines += [json.dumps(row) for row in r["rejected_rows"]]
        sources[name] = {"written": sum(r["written"] for r in recs), "rejected": dict(sorted(rejected.items())),
                         "truncated_inputs": [i for r in recs for i in r["truncated_inputs"]],
                         "tasks": len(recs), "bytes": sum(r["bytes"] for r in recs)}
    counts: Counter = Counter()
    for e in entries:
        counts.update(e.counts)
    summary = {"shards": len(entries), "rows": sum(e.rows for e in entries), "counts": dict(sorted(counts.items())),
               "sources": sources, "shards_without_build_record": len(listed - set(known))}
    if records:
        fs.write_bytes(fs.join(out, SUMMARY_NAME), (json.dumps(summary, indent=1) + "\n").encode(), storage)
        fs.write_bytes(fs.join(out, REJECTED_NAME), "".join(line + "\n" for line in rejected_lines).encode(), storage)
    return summary


def _relative(entry: ShardEntry, out: str) -> ShardEntry:
    prefix = out.rstrip("/") + "/"
    if entry.path.startswith(prefix):
        entry = ShardEntry(**{**entry.__dict__, "path": entry.path[len(prefix):]})
    return entry
