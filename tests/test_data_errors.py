"""Bad data: corrupt / truncated images and empty captions are skipped and counted; a missing
column or an unreadable shard fails naming the file (or is skipped and counted on request)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vlscale.data import build_loader
from vlscale.data.schema import schema_with_metadata
from vlscale.data.synthetic import synthetic_image, write_synthetic_shards


def _write(path, rows: dict, schema: pa.Schema | None = None, chunk: int = 4) -> None:
    table = pa.Table.from_pydict(rows, schema=schema)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=chunk)


def _rows(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"key": [f"k{i}" for i in range(n)], "image": [synthetic_image(rng, (10, 10)) for _ in range(n)],
            "caption": [f"caption {i}" for i in range(n)], "source": ["s"] * n, "concepts": [None] * n}


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(tmp_path) -> None:
    rows = _rows(12)
    rows["image"][1] = b"not an image at all"
    rows["image"][4] = rows["image"][4][: len(rows["image"][4]) // 2]  # truncated JPEG
    rows["image"][6] = b""
    rows["caption"][8] = "   "
    rows["caption"][9] = None
    _write(tmp_path / "s-0.arrow", rows, schema_with_metadata({"s": 12}))
    for workers in (0, 2):
        loader = build_loader(tmp_path, image_size=8, batch_size=3, num_workers=workers, train=False)
        keys = [k for b in loader for k in b.keys]
        assert sorted(keys) == sorted(f"k{i}" for i in (0, 2, 3, 5, 7, 10, 11))
        stats = loader.stats
        assert stats["unreadable_image"] == 3 and stats["empty_caption"] == 2 and stats["samples"] == 7


def test_missing_column_names_file_and_column(tmp_path) -> None:
    rows = _rows(3)
    del rows["caption"]
    _write(tmp_path / "nocap.arrow", rows)
    with pytest.raises(ValueError, match=r"nocap\.arrow.*missing column.*caption"):
        build_loader(tmp_path, batch_size=2)


def test_wrong_column_type_is_named(tmp_path) -> None:
    rows = _rows(3)
    rows["image"] = ["text, not bytes"] * 3
    _write(tmp_path / "bad.arrow", rows)
    with pytest.raises(ValueError, match=r"bad\.arrow.*'image' has type string"):
        build_loader(tmp_path, batch_size=2)


def test_truncated_shard_fails_naming_the_file_or_is_skipped(tmp_path) -> None:
    write_synthetic_shards(tmp_path, {"good": 10, "cut": 10}, image_size=(8, 8))
    path = tmp_path / "cut-00000.arrow"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut-00000\.arrow.*unreadable shard"):
        build_loader(tmp_path, batch_size=2)
    loader = build_loader(tmp_path, batch_size=2, image_size=8, on_error="skip", train=False)
    keys = [k for b in loader for k in b.keys]
    assert sorted(keys) == sorted(f"good-{i}" for i in range(10))
    assert loader.stats["unreadable_shard"] == 1


def test_missing_shard_file_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"nope\.arrow.*does not exist"):
        build_loader([tmp_path / "nope.arrow"], batch_size=2)
    with pytest.raises(ValueError, match=r"no .*arrow shards"):
        build_loader(tmp_path, batch_size=2)


def test_all_bad_batch_stream_ends_cleanly(tmp_path) -> None:
    rows = _rows(5)
    rows["image"] = [b"xx"] * 5
    _write(tmp_path / "s.arrow", rows)
    loader = build_loader(tmp_path, batch_size=2, image_size=8)
    assert list(loader) == [] and loader.stats["unreadable_image"] == 5


def test_null_image_in_foreign_table_is_counted(tmp_path) -> None:
    rows = _rows(6)
    rows["image"][3] = None  # another tool's table may hold nulls in a nullable binary column
    rows["concepts"] = [["x"]] * 6
    _write(tmp_path / "foreign.arrow", rows, chunk=4)
    loader = build_loader(tmp_path, batch_size=2, image_size=8, train=False)
    keys = [k for b in loader for k in b.keys]
    assert sorted(keys) == ["k0", "k1", "k2", "k4", "k5"] and loader.stats["unreadable_image"] == 1


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_unreadable_record_batch(tmp_path, monkeypatch, on_error: str) -> None:
    """A record batch that fails to read (I/O error) raises naming the file, or is skipped and counted."""
    import vlscale.data.stream as stream

    write_synthetic_shards(tmp_path, {"s": 12}, rows_per_batch=4, image_size=(8, 8))
    loader = build_loader(tmp_path, batch_size=3, image_size=8, train=False, on_error=on_error)
    real_open = stream.open_shard

    class Flaky:
        def __init__(self, path: str) -> None:
            self.reader = real_open(path)

        def get_batch(self, i: int) -> pa.RecordBatch:
            if i == 1:
                raise OSError("simulated read error")
            return self.reader.get_batch(i)

    monkeypatch.setattr(stream, "open_shard", Flaky)
    if on_error == "raise":
        with pytest.raises(ValueError, match=r"s-00000\.arrow: record batch 1 unreadable"):
            list(loader)
        return
    keys = sorted(k for b in loader for k in b.keys)
    assert keys == sorted(f"s-{i}" for i in (0, 1, 2, 3, 8, 9, 10, 11))
    assert loader.stats["unreadable_batch"] == 4
