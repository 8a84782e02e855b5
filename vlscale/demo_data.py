"""A small, real, learnable image–caption dataset: rendered two-object scenes with compositional captions.

Each image shows two shapes (circle / square / triangle in one of six colours) on a noisy,
randomly tinted background, at random sizes and positions, one either above or beside the other.
Its captions say exactly what is where — "a red circle above a blue square", "a blue square
below a red circle", "a red circle on top of a blue square" … — so they are learnable, and
retrieval means something: telling a *red circle above a blue square* from a *blue circle above a
red square*, or from the same pair side by side, needs colour, shape and spatial relation.

There are 18 distinct objects and 18 · 17 · 2 = 612 scene layouts up to caption paraphrase, far
more than a retrieval set of a few hundred images needs, so chance R@1 is about 1 / n_images.

``build_demo_dataset`` renders a train and a held-out split into Arrow shards through
:class:`vlscale.data.ShardWriter`: train rows are one (image, caption) pair each, a fresh template
and fresh image per row; eval rows carry ``captions_per_image`` captions of the same image under one
key (rows sharing a key share an image — that is how multi-caption retrieval knows its positives).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 185, 60),
    "blue": (50, 90, 235),
    "yellow": (245, 220, 40),
    "purple": (155, 60, 205),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")

# (first-mentioned object, relation, second object): "A is <relation> B".
VERTICAL = ("{a} above a {b}", "{b} below a {a}", "{a} on top of a {b}", "{b} under a {a}", "{a} over a {b}")
HORIZONTAL = ("{a} to the left of a {b}", "{b} to the right of a {a}", "{a} left of a {b}",
              "{b} right of a {a}", "{a} beside and left of a {b}")
PREFIXES = ("a {x}", "a picture of a {x}", "an image showing a {x}", "a {x}", "a drawing of a {x}")


@dataclass(frozen=True)
class Scene:
    """Two objects and how they are arranged: ``a`` is above (vertical) or left of (horizontal) ``b``."""

    a: tuple[str, str]  # (color, shape)
    b: tuple[str, str]
    vertical: bool

    def captions(self, rng: random.Random, n: int) -> list[str]:
        """``n`` different paraphrases of the scene (templates sampled without replacement)."""
        a, b = " ".join(self.a), " ".join(self.b)
        templates = rng.sample(VERTICAL if self.vertical else HORIZONTAL, k=min(n, 5))
        out = []
        for t in templates:
            body = t.format(a=a, b=b)
            out.append(rng.choice(PREFIXES).format(x=body))
        return out


def random_scene(rng: random.Random) -> Scene:
    objects = [(c, s) for c in COLORS for s in SHAPES]
    a, b = rng.sample(objects, 2)
    return Scene(a=a, b=b, vertical=rng.random() < 0.5)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """The scene at ``size`` px: random background tint and noise, random sizes and placements."""
    base = [rng.randint(40, 110) for _ in range(3)]
    noise = Image.effect_noise((size, size), rng.uniform(8, 24)).convert("RGB")
    img = Image.blend(Image.new("RGB", (size, size), tuple(base)), noise, 0.25)
    draw = ImageDraw.Draw(img)
    half, margin = size // 2, size // 12  # the margin survives the loader's center crop
    for idx, (color, shape) in enumerate((scene.a, scene.b)):
        side = rng.randint(size * 11 // 64, size * 20 // 64)
        # a goes in the top (left) half, b in the bottom (right) half; the other axis is free.
        lo_main, hi_main = (margin, half - side) if idx == 0 else (half, size - margin - side)
        main = rng.randint(lo_main, max(hi_main, lo_main))
        cross = rng.randint(margin, size - margin - side)
        x, y = (cross, main) if scene.vertical else (main, cross)
        jitter = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLORS[color])
        _draw_shape(draw, shape, (x, y, x + side - 1, y + side - 1), jitter)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_split(out_dir: Path, source: str, n_images: int, captions_per_image: int, seed: int,
                 size: int) -> dict[str, Any]:
    from vlscale.data import ShardWriter  # the data part owns the shard format

    rng = random.Random(seed)
    with ShardWriter(out_dir, source=source, target_shard_bytes=2 << 20, overwrite=True) as writer:
        for i in range(n_images):
            scene = random_scene(rng)
            image = png_bytes(render(scene, rng, size))
            for caption in scene.captions(rng, captions_per_image):
                writer.add(image_bytes=image, caption=caption, key=f"{source}-{i:06d}",
                           concepts=[" ".join(scene.a), " ".join(scene.b)])
    return writer.summary.as_dict()


def build_demo_dataset(root: str | Path, *, n_train: int = 4000, n_eval: int = 300,
                       captions_per_image: int = 5, seed: int = 0, size: int = 64) -> dict[str, Path]:
    """Render the train and eval splits under ``root`` (``train/``, ``eval/``); returns their dirs.

    Train images each get one caption (a fresh scene per row is worth more than a repeated one);
    eval images get ``captions_per_image`` paraphrases under one key.
    """
    root = Path(root)
    dirs = {"train": root / "train", "eval": root / "eval"}
    _write_split(dirs["train"], "shapes-train", n_train, 1, seed, size)
    _write_split(dirs["eval"], "shapes-eval", n_eval, captions_per_image, seed + 1_000_003, size)
    return dirs


def main(argv: list[str] | None = None) -> int:
    """``python -m vlscale.demo_data OUT [--n-train N] [--n-eval N]``: build and print a JSON summary."""
    import argparse
    import json
    import time

    from vlscale.train.metrics import peak_rss_mib

    p = argparse.ArgumentParser(prog="python -m vlscale.demo_data", description="render the demo shards")
    p.add_argument("out", help="output folder (gets train/ and eval/)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    dirs = build_demo_dataset(args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    print(json.dumps({"dirs": {k: str(v) for k, v in dirs.items()}, "n_train": args.n_train, "n_eval": args.n_eval,
                      "seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
