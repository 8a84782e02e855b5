"""Shards in object storage: a real S3 endpoint on localhost (moto's server) read and written by the
real ``pyarrow.fs.S3FileSystem`` client, behind a proxy that can inject 503s, dropped connections
and 403s and counts every request (see ``helpers_s3``).

* building to ``s3://`` writes the same bytes as building to a folder;
* training from ``s3://`` gives the losses of training from the local copy, through injected
  faults (only the retry counters change), and a resume from a checkpoint continues exactly;
* with a manifest, a loader starts with one object read (HEAD + GET of manifest.json), whatever
  the number of shards; then each record batch is one range GET;
* a deleted object or a refused one fails naming its URL (or is skipped and counted);
* the local cache serves a second epoch without a request; credentials in a URL are refused.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from helpers_s3 import ACCESS_KEY, SECRET_KEY, S3Server
from test_train_resume import LOCAL, overrides

from vlscale.cli import main as vlscale_main
from vlscale.config import load_recipe
from vlscale.data import build_loader, fs, retries
from vlscale.data.fs import IO_STATS, StorageError, StorageOptions
from vlscale.data.index import finalize
from vlscale.data.synthetic import write_synthetic_shards
from vlscale.demo_data import build_demo_dataset
from vlscale.train.trainer import train


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    server.make_bucket("bkt")
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _clean_proxy(s3: S3Server):
    s3.proxy.fault_rate, s3.proxy.deny = 0.0, set()
    s3.proxy.reset_counts()
    yield
    s3.proxy.fault_rate, s3.proxy.deny = 0.0, set()


def _shard_gets(s3: S3Server, prefix: str) -> int:
    return sum(n for (m, p), n in s3.proxy.requests.items() if m == "GET" and p.startswith(prefix)
               and p.endswith(".arrow"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=40, n_eval=4, size=32)


def test_build_to_s3_and_train_from_it_equal_local_through_faults_and_resume(s3, demo, tmp_path) -> None:
    torch.set_num_threads(1)
    table = pa.concat_tables(pa.ipc.open_file(p).read_all() for p in sorted(demo["train"].glob("*.arrow")))
    pq.write_table(table.select(["key", "image", "caption"]), tmp_path / "demo.parquet")
    build = ["shards", "build", "--table", "shapes", str(tmp_path / "demo.parquet"), "--rows-per-batch", "8",
             "--shard-size", "24KB", "--workers", "1", "--no-progress"]
    assert vlscale_main(["shards", "build", str(tmp_path / "local"), *build[2:]]) == 0
    assert vlscale_main(["shards", "build", "s3://bkt/train", *build[2:]]) == 0
    s3fs, _ = fs.filesystem("s3://bkt/train")
    local = sorted(p.name for p in (tmp_path / "local").iterdir() if p.suffix in (".arrow", ".json", ".jsonl"))
    assert len([n for n in local if n.endswith(".arrow")]) >= 3
    for name in local:  # shards, manifest, summary, rejected list: byte for byte
        with s3fs.open_input_stream(f"bkt/train/{name}") as f:
            assert f.read() == (tmp_path / "local" / name).read_bytes(), name
    assert vlscale_main(["shards", "verify", "s3://bkt/train"]) == 0  # checksums, read remotely

    def run(name: str, shards: str, *extra: str, resume: str | None = None) -> dict:
        cfg = load_recipe("tiny-cpu", overrides({"train": shards}, tmp_path / name, LOCAL, *extra))
        return train(cfg, resume=resume)

    full = run("local", str(tmp_path / "local"), "train.ckpt_every=2")
    s3.proxy.fault_rate = 0.3  # 503 SlowDown or a dropped connection on ~30 % of the requests
    remote = run("s3", "s3://bkt/train", "train.ckpt_every=2")
    assert sum(s3.proxy.faults.values()) > 0
    assert remote["losses"] == full["losses"], "object storage changed the training"
    metrics = [json.loads(line) for line in (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("data/io_retries", 0) for m in metrics) > 0
    assert metrics[-1]["data/io_requests"] > 0  # and nothing was lost to the faults:
    assert not any(metrics[-1].get(f"data/{k}", 0) for k in ("unreadable_batch", "unreadable_shard", "io_failures"))
    s3.proxy.fault_rate = 0.0
    resumed = run("s3-resumed", "s3://bkt/train", resume=str(tmp_path / "s3" / "checkpoints" / "step_000002"))
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if k > 2}
    # Nothing a run writes (checkpoints' JSON and torch files, config, engine.json, metrics, events)
    # holds the credentials or the endpoint: they come from the environment each time.
    secrets = [ACCESS_KEY.encode(), SECRET_KEY.encode(), s3.endpoint.split("://")[1].encode()]
    written = [p for run in ("s3", "s3-resumed") for p in (tmp_path / run).rglob("*") if p.is_file()]
    assert len(written) > 10 and any(p.suffix == ".pt" for p in written)
    leaks = [(p.relative_to(tmp_path), s) for p in written for s in secrets if s in _readable(p)]
    assert not leaks, leaks


def _readable(path: Path) -> bytes:
    """A file's bytes, with every member of a zip (torch.save) unpacked: strings hide in pickles."""
    import zipfile

    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            data += b"".join(z.read(n) for n in z.namelist())
    return data


def test_build_from_tars_in_a_bucket_equals_build_from_local_tars(s3, tmp_path) -> None:
    import tarfile

    from vlscale.data.synthetic import synthetic_image

    rng = np.random.default_rng(1)
    (tmp_path / "tars").mkdir()
    for t in range(2):
        with tarfile.open(tmp_path / "tars" / f"p{t}.tar", "w") as tar:
            for i in range(5):
                for ext, data in (("jpg", synthetic_image(rng, (8, 8))), ("txt", f"cap {t} {i}".encode())):
                    info = tarfile.TarInfo(f"p{t}-{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    s3fs, _ = fs.filesystem("s3://bkt/tars")
    pafs.copy_files(str(tmp_path / "tars"), "bkt/tars", destination_filesystem=s3fs)
    args = ["--rows-per-batch", "4", "--workers", "1", "--no-progress"]
    assert vlscale_main(["shards", "build", str(tmp_path / "a"), "--wds", "w", "s3://bkt/tars/*.tar", *args]) == 0
    assert vlscale_main(["shards", "build", str(tmp_path / "b"), "--wds", "w", str(tmp_path / "tars" / "*.tar"),
                         *args]) == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.arrow"))
    assert len(shards) == 2 and shards == sorted(p.name for p in (tmp_path / "b").glob("*.arrow"))
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in shards)


def test_startup_with_manifest_is_one_object_read_and_each_batch_one_get(s3, tmp_path) -> None:
    write_synthetic_shards(tmp_path, {"a": 60, "b": 36}, rows_per_batch=6, target_shard_bytes=4 << 10,
                           image_size=(8, 8))
    n_shards = len(list(tmp_path.glob("*.arrow")))
    assert n_shards >= 10
    s3fs, _ = fs.filesystem("s3://bkt/many")
    pafs.copy_files(str(tmp_path), "bkt/many", destination_filesystem=s3fs)
    s3.proxy.reset_counts()
    no_manifest = build_loader("s3://bkt/many", batch_size=4, image_size=8, train=False)
    assert sum(s3.proxy.requests.values()) >= 2 * n_shards  # a listing, then every footer
    assert vlscale_main(["shards", "index", "s3://bkt/many"]) == 0
    s3.proxy.reset_counts()
    loader = build_loader("s3://bkt/many", batch_size=4, image_size=8, train=False,
                          storage=StorageOptions(readahead=3))
    assert dict(s3.proxy.requests) == {("HEAD", "/bkt/many/manifest.json"): 1, ("GET", "/bkt/many/manifest.json"): 1}
    keys = [k for b in loader for k in b.keys]
    n_batches = sum(len(e.batches) for e in loader.dataset.index.entries)
    assert _shard_gets(s3, "/bkt/many/") == n_batches  # one range GET per record batch, read-ahead included
    assert keys == [k for b in no_manifest for k in b.keys] == [k for b in build_loader(
        tmp_path, batch_size=4, image_size=8, train=False) for k in b.keys]

    def debiased(location: object) -> list[tuple[str, list[str]]]:  # shuffled, one source per batch, 2 ranks
        return [(b.source[0], b.keys) for rank in (0, 1) for b in build_loader(
            location, batch_size=4, image_size=8, train=True, debiased=True, seed=5, rank=rank, world_size=2)]

    assert debiased("s3://bkt/many") == debiased(tmp_path)


def test_deleted_or_refused_object_is_named_or_skipped(s3, tmp_path) -> None:
    write_synthetic_shards("s3://bkt/gone", {"s": 24}, rows_per_batch=4, target_shard_bytes=2 << 10,
                           image_size=(8, 8))
    finalize("s3://bkt/gone")
    s3fs, _ = fs.filesystem("s3://bkt/gone")
    s3fs.delete_file("bkt/gone/s-00001.arrow")
    loader = build_loader("s3://bkt/gone", batch_size=4, image_size=8, train=False, on_error="raise")
    with pytest.raises(ValueError, match=r"s3://bkt/gone/s-00001\.arrow.*does not exist \(404\)"):
        list(loader)
    skipping = build_loader("s3://bkt/gone", batch_size=4, image_size=8, train=False, on_error="skip")
    rows = sum(len(b) for b in skipping)
    assert 0 < rows < 24 and skipping.stats["unreadable_batch"] == 24 - rows
    s3.proxy.deny = {"/bkt/gone/manifest.json"}  # 403 AccessDenied, never retried
    before = IO_STATS.snapshot().get("io_retries", 0)
    with pytest.raises(StorageError, match=r"s3://bkt/gone/manifest\.json: access denied \(403\)"):
        build_loader("s3://bkt/gone", batch_size=4, image_size=8)
    assert IO_STATS.snapshot().get("io_retries", 0) == before


def test_retries_back_off_with_jitter_and_give_up(monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(retries.time, "sleep", sleeps.append)
    calls = iter([OSError("AWS Error SLOW_DOWN: Please reduce your request rate."),
                  OSError("curlCode: 52, Empty reply from server"), "data"])

    def flaky() -> str:
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    before = IO_STATS.snapshot().get("io_retries", 0)
    opts = StorageOptions(retries=5, backoff_s=1.0, backoff_max_s=1.5)
    assert fs.retry(flaky, "s3://b/k", opts) == "data"
    assert IO_STATS.snapshot()["io_retries"] - before == 2
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 1.0 and 0 <= sleeps[1] <= 1.5  # full jitter, capped
    with pytest.raises(StorageError, match=r"s3://b/k: .*503.*gave up after 3 attempts"):
        fs.retry(lambda: (_ for _ in ()).throw(OSError("HTTP 503")), "s3://b/k", StorageOptions(retries=2))
    with pytest.raises(StorageError, match="does not exist"):
        fs.retry(lambda: (_ for _ in ()).throw(FileNotFoundError("nope")), "s3://b/k", opts)
    assert len(sleeps) == 4  # the permanent error was not retried


def test_local_cache_serves_later_epochs_within_its_bound(s3, tmp_path) -> None:
    write_synthetic_shards("s3://bkt/cached", {"s": 40}, rows_per_batch=5, target_shard_bytes=3 << 10,
                           image_size=(8, 8))
    finalize("s3://bkt/cached")
    cache = tmp_path / "cache"
    opts = StorageOptions(cache_dir=str(cache), cache_bytes=1 << 30)
    loader = build_loader("s3://bkt/cached", batch_size=5, image_size=8, train=True, storage=opts)
    s3.proxy.reset_counts()
    first = [b.keys for b in loader]
    n_batches = _shard_gets(s3, "/bkt/cached/")
    assert n_batches == 8
    s3.proxy.reset_counts()
    second = [b.keys for b in loader]
    assert _shard_gets(s3, "/bkt/cached/") == 0 and first != second  # epoch 2: reshuffled, read from disk
    blocks = sorted(cache.glob("*/*.blk"))
    blocks[0].write_bytes(b"damaged" + blocks[0].read_bytes()[7:])  # a damaged entry is dropped and re-read
    s3.proxy.reset_counts()
    assert sum(len(b) for b in loader) == 40 and _shard_gets(s3, "/bkt/cached/") == 1
    size = sum(p.stat().st_size for p in blocks) // 2  # a bound of half the data: LRU eviction keeps to it
    small = build_loader("s3://bkt/cached", batch_size=5, image_size=8, train=True,
                         storage=StorageOptions(cache_dir=str(tmp_path / "small"), cache_bytes=size))
    for _ in range(2):
        assert sum(len(b) for b in small) == 40
        assert sum(p.stat().st_size for p in (tmp_path / "small").glob("*/*.blk")) <= size


def test_fsspec_scheme_and_locations(tmp_path) -> None:
    write_synthetic_shards("memory://vl/a", {"m": 12}, rows_per_batch=4, image_size=(8, 8))
    write_synthetic_shards(tmp_path / "x", {"x": 10}, rows_per_batch=4, image_size=(8, 8))
    write_synthetic_shards(tmp_path / "y", {"y": 6}, rows_per_batch=4, image_size=(8, 8))
    assert sum(len(b) for b in build_loader("memory://vl/a", batch_size=4, image_size=8, train=False)) == 12

    def keys(spec: object) -> list[str]:
        return sorted(k for b in build_loader(spec, batch_size=4, image_size=8, train=False) for k in b.keys)

    both = keys([tmp_path / "x", tmp_path / "y"])
    assert len(both) == 16
    assert keys(f"{tmp_path / 'x'},{tmp_path / 'y'}") == both == keys(str(tmp_path / "[xy]" / "*.arrow"))
    assert keys(json.dumps([str(tmp_path / "x"), str(tmp_path / "y")])) == both
    cfg = load_recipe("tiny-cpu", [f"data.train_shards=[\"{tmp_path / 'x'}\", \"{tmp_path / 'y'}\"]"])
    assert keys(cfg.data.train_shards) == both
    gcs, path = fs.filesystem("gs://bucket/prefix/a.arrow")  # native client; nothing contacted yet
    assert isinstance(gcs, pafs.GcsFileSystem) and path == "bucket/prefix/a.arrow"
    assert load_recipe("tiny-cpu", ["data.on_error=raise"]).data.on_error == "raise"
    with pytest.raises(ValueError, match=r"data.on_error.*not one of \['raise', 'skip'\]"):
        load_recipe("tiny-cpu", ["data.on_error=ignore"])
    with pytest.raises(ValueError, match="nosuchscheme:// locations need an fsspec implementation"):
        build_loader("nosuchscheme://x/y", batch_size=2)
    with pytest.raises(ValueError, match="credentials in a URL") as err:
        build_loader("s3://AKIAXXXX:hunter2@bkt/x", batch_size=2)
    assert "hunter2" not in str(err.value)


def test_block_cache_is_lru_and_bounded_across_readers(tmp_path) -> None:
    from vlscale.data.cache import BlockCache

    bound = 20_000
    cache = BlockCache.shared(tmp_path, bound)
    assert BlockCache.shared(tmp_path, bound) is cache  # one per process: every reader's bytes count
    blob = bytes(range(256)) * 4  # 1 KiB
    crc = zlib.crc32(blob)
    for i in range(60):
        cache.put(f"s3://b/{i}.arrow", 0, len(blob), crc, blob)
        assert cache.get("s3://b/0.arrow", 0, len(blob), crc) == blob  # kept warm: never the LRU victim
        assert cache.size() <= bound * 1.05
    assert cache.get("s3://b/1.arrow", 0, len(blob), crc) is None  # cold and old: evicted
    assert cache.get("s3://b/59.arrow", 0, len(blob), crc) == blob
