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


# --------------------------------------------------------------------------- honest builds (issue 12)
def _build(out, *args: str) -> int:
    return vlscale_main(["shards", "build", str(out), *args, "--workers", "1", "--no-progress"])


def _rejected(out) -> list[dict]:
    return [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cut", ["half", "member_boundary"])
def test_truncated_tar_fails_the_build_after_writing_what_it_could(tmp_path, rng, capsys, cut: str) -> None:
    _tar(tmp_path / "whole.tar", rng, 6)
    data = (tmp_path / "whole.tar").read_bytes()
    if cut == "half":
        data = data[: len(data) // 2]
    else:  # right after a member's data: tarfile itself reads this as a complete archive
        with tarfile.open(tmp_path / "whole.tar") as tar:
            member = tar.getmembers()[5]
        data = data[: member.offset_data + ((member.size + 511) // 512) * 512]
    (tmp_path / "cut.tar").write_bytes(data)
    assert _build(tmp_path / "out", "--wds", "web", str(tmp_path / "cut.tar")) == 1
    err = capsys.readouterr().err
    assert "truncated input" in err and "cut.tar" in err
    summary = json.loads((tmp_path / "out" / "build_summary.json").read_text())["sources"]["web"]
    assert summary["truncated_inputs"] == [str(tmp_path / "cut.tar")] and 0 < summary["written"] < 6
    assert [r["reason"] for r in _rejected(tmp_path / "out")] == ["truncated_input"]


def test_duplicate_keys_are_rejected_and_counted_or_kept_on_request(tmp_path, rng) -> None:
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:  # "a" twice in a row: once silently merged
        for key in ("a", "a", "b"):
            for ext, data in (("jpg", synthetic_image(rng)), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(synthetic_image(rng))
    (tmp_path / "caps.csv").write_text("key,file,caption\nx,0.jpg,one\nx,1.jpg,two\ny,2.jpg,three\n")
    sources = ["--wds", "web", str(tmp_path / "dup.tar"), "--folder", "pics", str(tmp_path / "imgs"),
               str(tmp_path / "caps.csv")]
    assert _build(tmp_path / "out", *sources) == 0
    summary = json.loads((tmp_path / "out" / "build_summary.json").read_text())["sources"]
    assert summary["web"]["written"] == 2 and summary["web"]["rejected"] == {"duplicate_key": 1}
    assert summary["pics"]["written"] == 2 and summary["pics"]["rejected"] == {"duplicate_key": 1}
    assert sorted((r["source"], r["key"]) for r in _rejected(tmp_path / "out")) == [("pics", "x"), ("web", "a")]
    captions = pa.ipc.open_file(next((tmp_path / "out").glob("pics-*.arrow"))).read_all()["caption"].to_pylist()
    assert captions == ["one", "three"]  # the first occurrence is kept
    assert _build(tmp_path / "keep", *sources, "--duplicates", "keep") == 0
    kept = json.loads((tmp_path / "keep" / "build_summary.json").read_text())["sources"]
    assert kept["web"]["written"] == 3 and kept["pics"]["written"] == 3


def test_path_only_hf_parquet_reads_the_files_and_names_the_missing(tmp_path, rng, capsys) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(synthetic_image(rng))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    paths = ["img/0.jpg", "img/1.jpg", "img/2.jpg", "img/gone.jpg"]
    table = pa.table({"image": pa.array([{"bytes": None, "path": p} for p in paths], type=image),
                      "caption": [f"c{i}" for i in range(4)]})
    pq.write_table(table, tmp_path / "paths.parquet")
    assert _build(tmp_path / "out", "--table", "hf", str(tmp_path / "paths.parquet")) == 0
    assert "hf: wrote 3 pairs" in capsys.readouterr().out
    (missing,) = _rejected(tmp_path / "out")
    assert missing["reason"] == "missing_file" and missing["path"] == str(tmp_path / "img" / "gone.jpg")
    # every path missing: nothing written, exit 1 with the real reason (no longer "0 pairs, exit 0")
    assert _build(tmp_path / "none", "--table", "hf", str(tmp_path / "paths.parquet"), "--image-root",
                  str(tmp_path / "elsewhere")) == 1
    assert "hf: error: no pair written (missing_file: 4)" in capsys.readouterr().err


def test_folder_honours_column_options(tmp_path, rng, capsys) -> None:
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(synthetic_image(rng))
    (tmp_path / "caps.tsv").write_text("img_path\tdesc\tid\n0.jpg\tfirst\tk0\n1.jpg\tsecond\tk1\n")
    folder = ["--folder", "f", str(tmp_path / "imgs"), str(tmp_path / "caps.tsv")]
    assert _build(tmp_path / "out", *folder) == 1
    assert "no image path column" in capsys.readouterr().err
    assert _build(tmp_path / "out", *folder, "--image-column", "img_path", "--caption-column", "desc",
                  "--key-column", "id") == 0
    table = pa.ipc.open_file(next((tmp_path / "out").glob("f-*.arrow"))).read_all()
    assert table["key"].to_pylist() == ["k0", "k1"] and table["caption"].to_pylist() == ["first", "second"]


def test_fast_validation_still_rejects_truncated_images(tmp_path, rng) -> None:
    good = synthetic_image(rng)
    png = synthetic_image(rng, fmt="PNG")
    with ShardWriter(tmp_path, "s", validate="fast") as w:
        assert w.add(image_bytes=good, caption="ok", key="1") and w.add(image_bytes=png, caption="ok", key="2")
        assert not w.add(image_bytes=good[: len(good) * 2 // 3], caption="cut", key="3")
        assert not w.add(image_bytes=png[:-20], caption="cut", key="4")
    assert dict(w.summary.rejected) == {"unreadable_image": 2}


def test_verify_checks_checksums_and_names_shard_batch_and_key(tmp_path, rng, capsys) -> None:
    with ShardWriter(tmp_path, "s", rows_per_batch=4) as w:
        for i in range(12):
            w.add(image_bytes=synthetic_image(rng), caption=f"c{i}", key=f"key{i}")
    assert vlscale_main(["shards", "verify", str(tmp_path)]) == 0
    capsys.readouterr()
    path = tmp_path / "s-00000.arrow"
    data = bytearray(path.read_bytes())
    reader = pa.ipc.open_file(pa.py_buffer(bytes(data)))
    target = reader.get_batch(1).column("image")[2].as_py()  # key6's JPEG: flip 64 bytes inside it
    at = bytes(data).index(target) + len(target) // 2
    data[at: at + 64] = bytes(b ^ 0xFF for b in data[at: at + 64])
    path.write_bytes(bytes(data))
    assert vlscale_main(["shards", "verify", str(tmp_path)]) == 1  # no --decode needed
    err = capsys.readouterr().err
    assert "s-00000.arrow: record batch 1 (rows 4-7): checksum mismatch" in err and "['key6']" in err
