"""Data at scale on CPU: build throughput, streaming from object storage, start-up with a manifest.

Three sections, each provider timed in samples (pairs) per CPU-second of the measured process and
its children (the S3 server runs in a separate process and is not counted), plus wall-clock rates:

* **build** — ``vlscale shards build`` (the CLI, in its own process, as users run it) over
  webdataset tars of JPEGs: ``build_w1`` (``--workers 1``), ``build_w2`` (``--workers 2``, both
  ``--validate full``: every image decoded) and ``build_w2_fast`` (``--validate fast``); the
  1- and 2-worker shards must be byte-identical (else the run FAILS);
* **stream** — one pass over every sample's bytes (the reader layer: key, image bytes, caption; no
  decode): ``vlscale_disk``, ``vlscale_s3`` (a local S3 endpoint — moto's server, the real
  ``pyarrow.fs.S3FileSystem`` client), against ``mds_s3`` (mosaicml-streaming) and ``litdata_s3``
  reading the same samples from the same endpoint, each in its own format as its writer writes it
  and each downloading whole shards / chunks into a fresh local cache, which is how both work; and
  ``pipeline_disk`` / ``pipeline_s3``: vlscale's training pipeline (decode, crop, tokenize, collate);
* **startup** — the loader's index over ``--startup-shards`` small shards: ``startup_disk``,
  ``startup_disk_manifest``, ``startup_s3``, ``startup_s3_manifest`` (without / with ``manifest.json``).

A reader that yields the wrong number of samples FAILS the run (exit status 1). The peers are
benchmark-only and optional (skipped with a note when absent): ``pip install --no-deps
mosaicml-streaming litdata`` (+ their import-time needs: brotli, python-snappy, cramjam, zstd,
catalogue, lightning-utilities). litdata's obstore client refuses a plain-http endpoint, so litdata
runs on its boto3 download path here.

    .venv/bin/python benchmarks/bench_data_io.py --sizes 500,1000 --reps 3 --startup-shards 500

``--sizes`` are numbers of JPEGs (``--image-side`` px short side), ``--reps`` the repeats of every
measurement (interleaved, so a shared machine's load hits every provider alike). The record (one
row per measurement, the machine's load average, versions) goes through the shared harness into
``results/data_io.{jsonl,json,md}`` with plots of samples per CPU-second vs size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # sibling script (benchmarks/ is no package)

harness.ensure_vlscale_importable()
from bench_data_pipeline import _cpu_seconds, load_tokenizer, make_images, time_epoch, write_inputs  # noqa: E402

from vlscale.data import build_loader, fs  # noqa: E402
from vlscale.data.index import finalize  # noqa: E402
from vlscale.data.stream import RowStream, ShardIndex, Span  # noqa: E402
from vlscale.data.writer import ShardWriter  # noqa: E402

SECTIONS = {
    "build": {"build_w1": "workers=1", "build_w2": "workers=2", "build_w2_fast": "workers=2 fast"},
    "stream": {"vlscale_disk": "vlscale local disk", "vlscale_s3": "vlscale S3", "mds_s3": "mosaicml-streaming S3",
               "litdata_s3": "litdata S3", "pipeline_disk": "vlscale full pipeline, local disk",
               "pipeline_s3": "vlscale full pipeline, S3"},
    "startup": {"startup_disk": "local disk, no manifest", "startup_disk_manifest": "local disk, manifest",
                "startup_s3": "S3, no manifest", "startup_s3_manifest": "S3, manifest"},
}
PROVIDERS = [p for names in SECTIONS.values() for p in names]
SECTION_OF = {p: s for s, names in SECTIONS.items() for p in names}
LABEL = {p: label for names in SECTIONS.values() for p, label in names.items()}
PEERS = {"mds_s3": "streaming", "litdata_s3": "litdata"}  # provider -> the module it needs


def start_s3() -> tuple[subprocess.Popen, str]:  # (server process, endpoint URL)
    """moto's S3 server in its own process (its CPU time is not the reader's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import logging, time\nlogging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
            "from moto.server import ThreadedMotoServer\n"
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\ntime.sleep(1e9)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return proc, endpoint


def upload(local: Path, url: str) -> None:
    import pyarrow.fs as pafs

    s3fs, path = fs.filesystem(url)
    pafs.copy_files(str(local), path, destination_filesystem=s3fs, use_threads=True)


def measure(fn: Callable[[], int]) -> tuple[int, float, float]:
    """(count, wall s, CPU s of this process and its finished children)."""
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0, _cpu_seconds() - cpu0


# -- readers (one pass, raw bytes) --------------------------------------------------------------------
def read_vlscale(location: str) -> int:
    index = ShardIndex(location)
    spans = [Span(u, 0, unit.rows) for u, unit in enumerate(index.units)]
    n = 0
    for _, row in RowStream(index, spans, buffer=1024, seed=0, epoch=0, stream_id=(0,), shuffle=False).rows():
        n += len(row["image"]) > 0 and len(row["caption"]) > 0
    return n


def write_mds(items: list, out: Path) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"key": "str", "image": "bytes", "caption": "str"},
                   size_limit=8 << 20) as w:
        for key, data, caption in items:
            w.write({"key": key, "image": data, "caption": caption})


def read_mds(url: str, cache: str) -> int:
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=url, local=cache, shuffle=False, batch_size=64)
    return sum(len(s["image"]) > 0 and len(s["caption"]) > 0 for s in ds)


def _lit_item(item: tuple) -> dict:
    key, data, caption = item
    return {"key": key, "image": data, "caption": caption}


def write_litdata(items: list, out: Path) -> None:
    import litdata

    litdata.optimize(fn=_lit_item, inputs=items, output_dir=str(out), chunk_bytes="8MB", num_workers=1,
                     mode="overwrite")


def read_litdata(url: str, cache: str) -> int:
    import litdata
    import litdata.streaming.downloader as downloader

    downloader._OBSTORE_AVAILABLE = False  # obstore refuses http endpoints; litdata falls back to boto3
    ds = litdata.StreamingDataset(url, cache_dir=cache)
    return sum(len(s["image"]) > 0 and len(s["caption"]) > 0 for s in ds)


# -- the sections ---------------------------------------------------------------------------------------
class Run:
    """One size's measurements: rows into the recorder, wrong counts into its failures."""

    def __init__(self, rec: harness.Recorder, providers: list[str], images: int, tmp: Path) -> None:
        self.rec, self.providers, self.images, self.tmp = rec, providers, images, tmp

    def row(self, provider: str, rep: int, **values: Any) -> None:
        self.rec.add({"section": SECTION_OF[provider], "provider": provider, "label": LABEL[provider],
                      "images": self.images, "repeat": rep, "status": "ok", **values})

    def counted(self, provider: str, rep: int, fn: Callable[[], int], *, expect: int) -> None:
        n, wall, cpu = measure(fn)
        if n != expect:
            self.rec.failures.append(f"{provider} ({self.images} images): {n} samples, expected {expect}")
        self.row(provider, rep, samples=n, wall_s=wall, cpu_s=cpu, samples_per_s=n / wall, samples_per_cpu_s=n / cpu)

    def build(self, items: list, rep: int) -> None:
        configs = {"build_w1": (1, "full"), "build_w2": (2, "full"), "build_w2_fast": (2, "fast")}
        for provider, (workers, validate) in configs.items():
            if provider not in self.providers:
                continue
            dest = self.tmp / f"{provider}-{rep}"
            cmd = [sys.executable, "-m", "vlscale.cli", "shards", "build", str(dest), "--wds", "bench",
                   str(self.tmp / "inputs" / "wds-*.tar"), "--shard-size", "8MB", "--workers", str(workers),
                   "--validate", validate, "--no-progress"]

            def run(cmd: list[str] = cmd, dest: Path = dest) -> int:
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                return json.loads((dest / "build_summary.json").read_text())["rows"]

            self.counted(provider, rep, run, expect=len(items))

    def stream(self, shards: Path, tokenizer: Any, rep: int) -> None:
        readers = {
            "vlscale_disk": lambda: read_vlscale(str(shards)),
            "vlscale_s3": lambda: read_vlscale("s3://bench/vlscale"),
            "mds_s3": lambda: read_mds("s3://bench/mds", tempfile.mkdtemp(dir=self.tmp)),
            "litdata_s3": lambda: read_litdata("s3://bench/lit", tempfile.mkdtemp(dir=self.tmp)),
        }
        for provider, fn in readers.items():  # interleaved: the machine's load hits every reader alike
            if provider in self.providers:
                self.counted(provider, rep, fn, expect=self.images)
        for provider, loc in (("pipeline_disk", str(shards)), ("pipeline_s3", "s3://bench/vlscale")):
            if provider not in self.providers:
                continue
            loader = build_loader(loc, tokenizer=tokenizer, image_size=224, train=True, batch_size=64,
                                  num_workers=0, seed=rep, drop_last=False, max_length=32, rank=0, world_size=1)
            rate, cpu_rate, n = time_epoch(loader)
            if n != self.images:
                self.rec.failures.append(f"{provider} ({self.images} images): {n} samples")
            self.row(provider, rep, samples=n, samples_per_s=rate, samples_per_cpu_s=cpu_rate)


def prepare_stream(run: Run, items: list, shards: Path) -> None:
    """The same samples in every reader's own format, uploaded to the endpoint."""
    upload(shards, "s3://bench/vlscale")
    if "mds_s3" in run.providers:
        write_mds(items, run.tmp / "mds")
        upload(run.tmp / "mds", "s3://bench/mds")
    if "litdata_s3" in run.providers:
        write_litdata(items, run.tmp / "lit")
        upload(run.tmp / "lit", "s3://bench/lit")


def bench_startup(rec: harness.Recorder, providers: list[str], tmp: Path, n_shards: int, reps: int) -> None:
    small, bare = tmp / "small", tmp / "small-bare"
    image = make_images(1, side=32)[0][1]
    with ShardWriter(small, "tiny", target_shard_bytes=1, rows_per_batch=2) as w:  # one row per shard
        for i in range(n_shards):
            w.add(image_bytes=image, caption=f"tiny {i}", key=str(i))
    bare.mkdir()
    for f in small.glob("*.arrow"):
        os.link(f, bare / f.name)
    upload(bare, "s3://bench/small-bare")
    finalize(str(small))  # manifest.json
    upload(small, "s3://bench/small")
    places = {"startup_disk": str(bare), "startup_disk_manifest": str(small), "startup_s3": "s3://bench/small-bare",
              "startup_s3_manifest": "s3://bench/small"}
    for rep in range(reps):
        for provider, loc in places.items():
            if provider not in providers:
                continue
            t0 = time.perf_counter()
            found = len(ShardIndex(loc).paths)
            took = time.perf_counter() - t0
            if found != n_shards:
                rec.failures.append(f"{provider}: {found} shards indexed, expected {n_shards}")
            rec.add({"section": "startup", "provider": provider, "label": LABEL[provider], "shards": n_shards,
                     "repeat": rep, "status": "ok", "seconds": took})


def available(providers: list[str], rec: harness.Recorder) -> list[str]:
    """The providers that can run here; a missing peer is recorded as skipped with the reason."""
    out = []
    for p in providers:
        module = PEERS.get(p)
        if module is not None:
            try:
                __import__(module)
            except Exception as exc:  # any import failure means "not installed here"
                rec.add({"section": SECTION_OF[p], "provider": p, "label": LABEL[p], "status": "skipped",
                         "note": f"{module} not importable ({type(exc).__name__}: {exc})"[:200]})
                continue
        out.append(p)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_arguments(p, sizes="1000", providers=",".join(PROVIDERS), reps=3)
    p.add_argument("--image-side", type=int, default=256, help="JPEGs' short side in px")
    p.add_argument("--startup-shards", type=int, default=500, help="small shards of the start-up section")
    args = p.parse_args(argv)
    if harness.parse_modes(args.modes) != ["full"]:
        p.error("a pass over the data is the only mode: --modes full")
    unknown = set(harness.parse_list(args.providers)) - set(PROVIDERS)
    if unknown:
        p.error(f"unknown provider(s) {sorted(unknown)}: choose among {', '.join(PROVIDERS)}")
    if args.smoke:
        args.sizes, args.reps, args.image_side, args.startup_shards = "24", 1, 64, 12
    args.memory = "off"  # what this measures is time per sample; memory is the loaders' own business
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rec = harness.Recorder("data_io", args, torch.device("cpu"), stem="data_io_smoke" if args.smoke else "data_io")
    providers = available(harness.parse_list(args.providers), rec)
    rec.summary["peer_versions"] = _peer_versions()
    server, _ = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            root = Path(tmp_name)
            tokenizer = load_tokenizer()
            for size in harness.parse_list(args.sizes, int):
                tmp = root / f"n{size}"
                run = Run(rec, providers, size, tmp)
                items = make_images(size, side=args.image_side)
                shards, _ = write_inputs(items, tmp / "inputs", num_tars=8)
                prepare_stream(run, items, shards)
                rec.summary.setdefault("mean_jpeg_bytes", {})[str(size)] = sum(len(x[1]) for x in items) / size
                for rep in range(args.reps):
                    run.build(items, rep)
                    run.stream(shards, tokenizer, rep)
                if {"build_w1", "build_w2"} <= set(providers):
                    identical = all((tmp / "build_w1-0" / f.name).read_bytes() == f.read_bytes()
                                    for f in (tmp / "build_w2-0").glob("*.arrow"))
                    rec.summary.setdefault("build_w1_w2_identical", {})[str(size)] = identical
                    if not identical:
                        rec.failures.append(f"{size} images: --workers 1 and 2 wrote different shards")
            if any(SECTION_OF[p] == "startup" for p in providers):
                bench_startup(rec, providers, root, args.startup_shards, args.reps)
    finally:
        server.kill()
        server.wait()
    plots = [dict(name="cpu", x="images", y="samples_per_cpu_s", series=("provider",), ylabel="samples / CPU-s",
                  title="work per sample vs size (build, stream)")]
    rec.write(to_markdown, plots)
    return rec.exit_code


def _peer_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("pyarrow", "mosaicml-streaming", "litdata", "moto", "boto3"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _medians(rows: list[dict], key: str) -> dict[tuple[str, Any], float]:
    groups: dict[tuple[str, Any], list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            groups.setdefault((r["provider"], r.get("images", r.get("shards"))), []).append(r[key])
    return {k: statistics.median(v) for k, v in groups.items()}


def to_markdown(rec: dict[str, Any]) -> str:
    cfg, s, rows = rec["config"], rec["summary"], rec["rows"]
    lines = harness.md_header(rec, "Data at scale: build, stream from object storage, start-up (CPU)")
    peers = ", ".join(f"{k} {v}" for k, v in s.get("peer_versions", {}).items() if v)
    lines += [f"**The machine is a shared {rec['cpu_count']}-core CPU** (other sessions' jobs ran beside these measurements: see the "
              "load average above): samples per CPU-second — the work per sample — is the contention-robust "
              "measure; wall-clock rates are noisy.", "",
              f"{peers}. JPEGs at {cfg['image_side']} px short side (mean "
              + ", ".join(f"{float(v) / 1024:.0f} KiB at {k}" for k, v in s.get("mean_jpeg_bytes", {}).items())
              + f"); medians of {cfg['reps']} repeats, providers interleaved.", ""]
    cpu, wall = _medians(rows, "samples_per_cpu_s"), _medians(rows, "samples_per_s")
    sizes = sorted({r["images"] for r in rows if "images" in r and r.get("status") == "ok"})
    for section, title in (("build", "Build (`vlscale shards build`, 8 webdataset tars; pairs)"),
                           ("stream", "Streaming (one pass; S3 = moto's server on localhost, in another process)")):
        names = [p for p in SECTIONS[section] if any(k[0] == p for k in cpu)]
        if not names:
            continue
        lines += [f"## {title}", "", "| provider | " + " | ".join(f"{n:,} images: per CPU-s / per s" for n in sizes)
                  + " |", "|---|" + "---:|" * len(sizes)]
        for p in names:
            cells = [f"{cpu[(p, n)]:,.0f} / " + (f"{wall[(p, n)]:,.0f}" if wall.get((p, n)) else "–")
                     if (p, n) in cpu else "–" for n in sizes]
            lines.append(f"| {LABEL[p]} (`{p}`) | " + " | ".join(cells) + " |")
        lines.append("")
    if "build_w1_w2_identical" in s:
        same = ", ".join(f"{'yes' if v else 'NO'} at {int(k):,} images" for k, v in s["build_w1_w2_identical"].items())
        lines += [f"`--workers 1` and `--workers 2` shards byte-identical: {same}. Build "
                  "CPU-seconds: the CLI process and its spawned workers (each pays its imports and start-up once per "
                  "build); on 2 shared cores 2 workers cannot double the wall-clock rate.", ""]
    lines += ["Stream rows: key + image bytes + caption of every sample, no decode. mosaicml-streaming and litdata "
              "download whole shards / chunks into a fresh local cache (their design); vlscale reads each record batch "
              "with one range GET (read-ahead 8). Full pipeline: vlscale's decode + crop to 224 + tokenize + collate, "
              "batch 64, in-process (CPU-seconds of the whole epoch; samples / s after the first batch).", ""]
    secs = _medians(rows, "seconds")
    if secs:
        shards = next(r["shards"] for r in rows if "shards" in r)
        lines += [f"## Start-up: the loader's index over {shards:,} small shards", "", "| where | seconds |", "|---|---:|"]
        lines += [f"| {LABEL[p]} | {v:.2f} |" for (p, _), v in secs.items()] + [""]
    skipped = [f"- `{r['provider']}`: {r['note']}" for r in rows if r.get("status") == "skipped"]
    if skipped:
        lines += ["Skipped:", "", *skipped, ""]
    lines += [f"![{p}]({p})" for p in rec.get("plots", [])] + ["", *rec["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
