"""Building shards: writer validation and atomicity, the CLI from a folder + captions, from
webdataset tars and from a Parquet table, ``info`` / ``verify``, and the round trip through
Hugging Face ``datasets`` and plain pyarrow."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlscale.cli import main as vlscale_main
from vlscale.data import SCHEMA_VERSION, ShardWriter, build_loader
from vlscale.data.schema import read_metadata
from vlscale.data.synthetic import synthetic_image


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_writer_rejects_and_counts_by_reason(tmp_path, rng) -> None:
    good = synthetic_image(rng)
    with ShardWriter(tmp_path, "src", rows_per_batch=3, target_shard_bytes=3 * len(good)) as w:
        assert w.add(image_bytes=good, caption="ok", key="1")
        assert not w.add(image_bytes=good, caption="  ", key="2")
        assert not w.add(image_bytes=good[:50], caption="truncated", key="3")
        assert not w.add(image_bytes=b"GIF89a junk", caption="junk", key="4")
        assert not w.add_file(tmp_path / "missing.jpg", caption="gone")
        buf = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (4, 4)).save(buf, format="BMP")
        assert not w.add(image_bytes=buf.getvalue(), caption="bmp", key="5")
        for i in range(6):
            w.add(image_bytes=synthetic_image(rng, fmt=("PNG", "WEBP", "JPEG")[i % 3]), caption=f"c{i}", key=f"k{i}")
    s = w.summary
    assert s.written == 7 and dict(s.rejected) == {"empty_caption": 1, "unreadable_image": 2,
                                                    "missing_file": 1, "unsupported_format": 1}
    assert len(s.shards) >= 2 and not list(tmp_path.glob(".*tmp*"))  # rolled over; no temp files left
    reader = pa.ipc.open_file(s.shards[0])
    meta = read_metadata(reader.schema)
    assert meta["schema_version"] == SCHEMA_VERSION and meta["counts"] == {"src": reader.read_all().num_rows}


def test_writer_never_overwrites_silently(tmp_path, rng) -> None:
    with ShardWriter(tmp_path, "s") as w:
        for i in range(3):
            w.add(image_bytes=synthetic_image(rng), caption="x", key=str(i))
    before = (tmp_path / "s-00000.arrow").read_bytes()
    with pytest.raises(FileExistsError, match=r"s-00000\.arrow.*overwrite"):
        ShardWriter(tmp_path, "s")
    assert (tmp_path / "s-00000.arrow").read_bytes() == before
    with ShardWriter(tmp_path, "s", overwrite=True) as w:
        w.add(image_bytes=synthetic_image(rng), caption="y", key="new")
    assert pa.ipc.open_file(tmp_path / "s-00000.arrow").read_all().column("key").to_pylist() == ["new"]


def test_failed_write_leaves_no_shard(tmp_path, rng) -> None:
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, "s") as w:
        w.add(image_bytes=synthetic_image(rng), caption="x", key="1")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _folder_source(root, rng, fmt: str) -> tuple:
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(7):
        (imgs / f"{i}.jpg").write_bytes(synthetic_image(rng))
    (imgs / "bad.jpg").write_bytes(b"broken")
    rows = [{"file": f"{i}.jpg", "caption": f"folder {i}", "concepts": "dog|cat"} for i in range(6)]
    rows += [{"file": "bad.jpg", "caption": "bad"}, {"file": "gone.jpg", "caption": "missing"},
             {"file": "6.jpg", "caption": ""}]
    if fmt == "jsonl":
        caps = root / "caps.jsonl"
        caps.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        caps = root / "caps.tsv"
        caps.write_text("file\tcaption\tconcepts\n" + "\n".join(f"{r['file']}\t{r['caption']}\t{r.get('concepts', '')}"
                                                               for r in rows))
    return imgs, caps


def _tar(path, rng, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("jpg", synthetic_image(rng)), ("txt", f"tar caption {i}".encode())):
                info = tarfile.TarInfo(f"{path.stem}-{i:04d}.{ext}")  # keys unique over the tars, as webdataset's
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(f"{path.stem}-orphan.txt")  # caption without an image
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_cli_build_from_folder_wds_and_parquet(tmp_path, rng, capsys, fmt: str) -> None:
    imgs, caps = _folder_source(tmp_path, rng, fmt)
    for t in range(2):
        _tar(tmp_path / f"part{t}.tar", rng, 4)
    pq.write_table(pa.table({"img": [synthetic_image(rng) for _ in range(5)] + [b"x"],
                             "text": [f"table {i}" for i in range(6)]}), tmp_path / "t.parquet")
    out = tmp_path / "shards"
    argv = ["shards", "build", str(out), "--folder", "photos", str(imgs), str(caps), "--wds", "web",
            str(tmp_path / "part*.tar"), "--shard-size", "2KB", "--no-progress", "--workers", "1", "--summary-json",
            str(tmp_path / "summary.json")]
    # column options apply to every --folder / --table of a command: the table, whose columns are
    # named differently, is built by a second command into the same folder
    table_argv = ["shards", "build", str(out), "--table", "tab", str(tmp_path / "t.parquet"), "--image-column", "img",
                  "--caption-column", "text", "--no-progress", "--summary-json", str(tmp_path / "summary_t.json")]
    assert vlscale_main(argv) == 0
    text = capsys.readouterr().out
    assert "photos: wrote 6 pairs" in text and "missing_file: 1" in text and "unreadable_image: 1" in text
    assert vlscale_main(table_argv) == 0
    summary = {s["source"]: s for s in json.loads((tmp_path / "summary.json").read_text())
               + json.loads((tmp_path / "summary_t.json").read_text())}
    assert summary["web"]["written"] == 8 and summary["web"]["rejected"] == {"missing_file": 2}  # one orphan caption per tar
    assert summary["tab"]["written"] == 5 and summary["tab"]["rejected"] == {"unreadable_image": 1}
    assert summary["photos"]["rejected"] == {"missing_file": 1, "unreadable_image": 1, "empty_caption": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"photos": 6, "tab": 5, "web": 8}  # the second build re-indexed the folder
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["source"], r["reason"]) for r in rejected) == sorted(
        [("photos", "missing_file"), ("photos", "unreadable_image"), ("photos", "empty_caption"),
         ("web", "missing_file"), ("web", "missing_file"), ("tab", "unreadable_image")])
    assert {r["path"] for r in rejected if r["reason"] == "missing_file" and r["source"] == "photos"} == {
        str(imgs / "gone.jpg")}

    assert vlscale_main(argv) == 0  # the same build again: every task is done, nothing is rewritten
    assert "already done" in capsys.readouterr().out
    assert vlscale_main([*argv[:5], str(imgs), str(caps), "--shard-size", "4KB", "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err  # other options for the same source: refused
    assert vlscale_main([*argv, "--overwrite"]) == 0
    capsys.readouterr()

    loader = build_loader(out, batch_size=4, image_size=8, train=False)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 19
    assert {s for b in batches for s in b.source} == {"photos", "web", "tab"}
    concepts = {tuple(c) for b in batches for c in b.concepts}
    assert ("dog", "cat") in concepts

    assert vlscale_main(["shards", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 19 and info["counts"] == {"photos": 6, "web": 8, "tab": 5}
    assert vlscale_main(["shards", "verify", str(out), "--decode"]) == 0


def test_verify_reports_a_truncated_shard(tmp_path, rng, capsys) -> None:
    with ShardWriter(tmp_path, "s") as w:
        for i in range(4):
            w.add(image_bytes=synthetic_image(rng), caption="x", key=str(i))
    path = tmp_path / "s-00000.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    assert vlscale_main(["shards", "verify", str(tmp_path)]) == 1
    assert "s-00000.arrow" in capsys.readouterr().err


def test_round_trip_through_datasets_and_pyarrow(tmp_path, rng) -> None:
    datasets = pytest.importorskip("datasets")
    images = [synthetic_image(rng) for _ in range(5)]
    with ShardWriter(tmp_path / "out", "hf", rows_per_batch=2) as w:
        for i, img in enumerate(images):
            w.add(image_bytes=img, caption=f"caption {i}", key=f"k{i}", concepts=["a", str(i)] if i % 2 else None)
    shard = w.summary.shards[0]
    ds = datasets.load_dataset("arrow", data_files=[shard], split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == 5 and ds.column_names == ["key", "image", "caption", "source", "concepts"]
    assert ds[3]["image"] == images[3] and ds[3]["concepts"] == ["a", "3"] and ds[0]["concepts"] is None
    assert ds["caption"] == [f"caption {i}" for i in range(5)] and set(ds["source"]) == {"hf"}
    # and back: a table exported by `datasets` builds into shards again
    ds.to_parquet(str(tmp_path / "exported.parquet"))
    assert vlscale_main(["shards", "build", str(tmp_path / "again"), "--table", "hf2", str(tmp_path / "exported.parquet"),
                         "--no-progress"]) == 0
    table = pa.ipc.open_file(tmp_path / "again" / "hf2-00000-00000.arrow").read_all()  # source-task-shard
    assert table.column("image").to_pylist() == images and table.column("key").to_pylist() == [f"k{i}" for i in range(5)]


def test_sources_colliding_on_file_prefix_are_refused(tmp_path) -> None:
    from vlscale.data.build import SourceSpec, build_shards

    specs = [SourceSpec("a b", "table", "x.parquet"), SourceSpec("a_b", "table", "y.parquet")]
    with pytest.raises(ValueError, match="unique as file prefixes"):
        build_shards(specs, tmp_path)
    assert list(tmp_path.iterdir()) == []
