"""The embedded demo dataset: simple coloured shapes with generated captions, no download.

``captioner train`` with no data arguments trains on this dataset so that a fresh machine (no
network, no GPU) can run the whole pipeline end to end in minutes. Every picture holds one or two
filled shapes on a light background; every caption word is determined by what is visible:

* shape: ``circle``, ``square``, ``triangle``; colour: ``red``, ``green``, ``blue``, ``yellow``,
  ``purple``, ``black``; size: ``small`` (~20 % of the image side) or ``large`` (~41 %);
* one shape: the cell of a 3x3 grid that holds its centre names its place ("in the top left
  corner", "at the top", "on the left", "in the middle", ..., "in the bottom right corner");
* two shapes: one in the left half, one in the right half; captions name them left to right
  (or say explicitly which one is on which side).

Each image gets five distinct captions drawn from ten templates of varied wording (mixed case and
a trailing "." or " ." on some, like real caption data). The templates share little filler, so
a captioner has to read the picture: the best single caption for every image scores about 0.2
BLEU-4, while naming the true attributes in the most common wording scores above 0.9.

The dataset is written in the COCO captions format that :mod:`captioner.datasets.captions` reads::

    root/demo.json                           manifest (seed, image size, split sizes, version)
    root/images/{split}/{split}_{i:05d}.png
    root/annotations/captions_{split}.json
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioner.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "COLORS",
    "DEMO_SPLITS",
    "FORMAT_VERSION",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "Shape",
    "describe_scene",
    "ensure_demo_dataset",
    "generate_scene",
    "render_scene",
    "sample_scene",
]

DEMO_SPLITS: dict[str, int] = {"train": 3000, "val": 300, "test": 300}
FORMAT_VERSION = 1
MANIFEST = "demo.json"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Strong, well separated colours (any two differ by >= 95 in some channel).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 200, 20),
    "purple": (135, 40, 170),
    "black": (30, 30, 30),
}
# Where a lone shape is: the cell of a 3x3 grid that holds its centre -> (column, row, phrase).
_GRID: dict[str, tuple[int, int, str]] = {
    "top left": (0, 0, "in the top left corner"),
    "top": (1, 0, "at the top"),
    "top right": (2, 0, "in the top right corner"),
    "left": (0, 1, "on the left"),
    "middle": (1, 1, "in the middle"),
    "right": (2, 1, "on the right"),
    "bottom left": (0, 2, "in the bottom left corner"),
    "bottom": (1, 2, "at the bottom"),
    "bottom right": (2, 2, "in the bottom right corner"),
}
POSITIONS: tuple[str, ...] = tuple(_GRID)
# Side length of a shape's bounding box as a fraction of the image side.
_SIZE_FRACTION: dict[str, tuple[float, float]] = {"small": (0.18, 0.22), "large": (0.38, 0.44)}
# Centre of a lone shape along either axis, as a fraction of the side (always inside its third).
_CELL_CENTRE: tuple[float, float, float] = (0.25, 0.5, 0.75)
_CAPTIONS_PER_IMAGE = 5

# Templates; {s}/{c}/{sh}/{p} are size, colour, shape and position phrase of a lone shape,
# {s1}.. / {s2}.. those of the left / right shape of a pair. Wording varies, but no filler
# phrase is shared by many captions: otherwise one constant caption would score well in BLEU.
_ONE_SHAPE_TEMPLATES: tuple[str, ...] = (
    "a {s} {c} {sh} {p}",
    "there is a {s} {c} {sh} {p}",
    "a {c} {sh} {p} of the picture",
    "a {s} {c} {sh}",
    "one {s} {sh} coloured {c}",
    "{p}, a {s} {c} {sh}",
    "a {s} {sh} in {c} {p}",
    "a single {c} {sh} {p}",
    "a {c} {sh}, {s}, {p}",
    "{s} {c} {sh} {p}",
)
_TWO_SHAPE_TEMPLATES: tuple[str, ...] = (
    "a {s1} {c1} {sh1} and a {s2} {c2} {sh2}",
    "a {s1} {c1} {sh1} to the left of a {s2} {c2} {sh2}",
    "a {s2} {c2} {sh2} to the right of a {s1} {c1} {sh1}",
    "two shapes: a {c1} {sh1} and a {c2} {sh2}",
    "a {c1} {sh1} on the left and a {c2} {sh2} on the right",
    "a {s1} {c1} {sh1} next to a {s2} {c2} {sh2}",
    "a {s1} {sh1} coloured {c1} beside a {s2} {sh2} coloured {c2}",
    "{s1} {c1} {sh1} and {s2} {c2} {sh2}",
    "a {c1} {sh1} and a {c2} {sh2} side by side",
    "a {s2} {c2} {sh2} with a {s1} {c1} {sh1} on its left",
)


@dataclass(frozen=True)
class Shape:
    """One filled shape: its words and its bounding box centre/side in pixels."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    side: float


@dataclass(frozen=True)
class Scene:
    """What a picture shows: one shape with a ``position`` or two shapes ordered left to right."""

    shapes: tuple[Shape, ...]
    position: str | None  # one of POSITIONS for a lone shape, None for two
    background: tuple[int, int, int]


# -- scenes ------------------------------------------------------------------------------------
def _jitter_color(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def sample_scene(rng: random.Random, image_size: int) -> Scene:
    """Draw the content of one picture (attributes and geometry) from ``rng``."""
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    n = image_size
    background = tuple(rng.randint(228, 250) for _ in range(3))
    margin = 0.03 * n

    def place(centre: float, lo: float, hi: float) -> float:
        return min(max(centre + rng.uniform(-0.04, 0.04) * n, lo), hi)

    def make(x_lo: float, x_hi: float, cell: tuple[int, int] | None) -> Shape:
        size = rng.choice(SIZES)
        side = n * rng.uniform(*_SIZE_FRACTION[size])
        half = side / 2
        lo, hi = max(x_lo, margin) + half, min(x_hi, n - margin) - half
        if cell is None:  # one of a pair: anywhere in its half, vertically anywhere
            cx = place((lo + hi) / 2, lo, hi)
            cy = rng.uniform(margin + half, n - margin - half)
        else:
            cx = place(_CELL_CENTRE[cell[0]] * n, lo, hi)
            cy = place(_CELL_CENTRE[cell[1]] * n, margin + half, n - margin - half)
        return Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), size, cx, cy, side)

    if rng.random() < 0.5:
        position = rng.choice(POSITIONS)
        column, row, _ = _GRID[position]
        return Scene((make(0.0, float(n), (column, row)),), position, background)
    gap = 0.02 * n  # keeps the two shapes apart
    left = make(0.0, n / 2 - gap, None)
    right = make(n / 2 + gap, float(n), None)
    return Scene((left, right), None, background)


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene`` as an RGB image (shape colours and background shading jittered by ``rng``)."""
    img = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = _jitter_color(COLORS[s.color], rng, 12)
        h = s.side / 2
        x0, y0, x1, y1 = s.cx - h, s.cy - h, s.cx + h, s.cy + h
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # pragma: no cover - guarded by SHAPES
            raise ValueError(f"unknown shape {s.shape!r}")
    # A gentle vertical shading of the background (rows stay constant, so PNGs stay small).
    shade = np.linspace(-rng.uniform(0, 10), rng.uniform(0, 10), image_size)[:, None, None]
    pixels = np.asarray(img, dtype=np.float32)
    is_background = (pixels == np.asarray(scene.background, np.float32)).all(-1, keepdims=True)
    pixels = np.where(is_background, pixels + shade, pixels)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _style(caption: str, rng: random.Random) -> str:
    """Vary the surface form the way real caption data does (the tokenizer undoes it)."""
    r = rng.random()
    if r < 0.4:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.3:
        caption += rng.choice((" .", "."))
    return caption


def describe_scene(scene: Scene, rng: random.Random, k: int = _CAPTIONS_PER_IMAGE) -> list[str]:
    """``k`` distinct captions of ``scene``, each from a different template."""
    if len(scene.shapes) == 1:
        (s,) = scene.shapes
        words = {"s": s.size, "c": s.color, "sh": s.shape, "p": _GRID[scene.position][2]}
        templates = _ONE_SHAPE_TEMPLATES
    else:
        a, b = scene.shapes
        words = {"s1": a.size, "c1": a.color, "sh1": a.shape}
        words |= {"s2": b.size, "c2": b.color, "sh2": b.shape}
        templates = _TWO_SHAPE_TEMPLATES
    return [_style(t.format(**words), rng) for t in rng.sample(templates, k)]


def generate_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, list[str]]:
    """One random picture and its five distinct captions."""
    scene = sample_scene(rng, image_size)
    image = render_scene(scene, image_size, rng)
    return image, describe_scene(scene, rng)


# -- dataset on disk ---------------------------------------------------------------------------
def _manifest(seed: int, image_size: int, splits: dict[str, int]) -> dict:
    return {
        "format": "captioner-demo",
        "version": FORMAT_VERSION,
        "seed": seed,
        "image_size": image_size,
        "splits": dict(splits),
    }


def _is_complete(root: Path, manifest: dict) -> bool:
    try:
        found = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if found != manifest:
        return False
    return all((root / "annotations" / f"captions_{s}.json").is_file() for s in manifest["splits"])


def _write_split(root: Path, split: str, count: int, seed: int, image_size: int) -> None:
    rng = random.Random(f"captioner-demo:{seed}:{split}")  # str seeds are stable across runs
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        image, captions = generate_scene(rng, image_size)
        file_name = f"{split}_{i:05d}.png"
        image.save(image_dir / file_name, format="PNG")
        image_id = i + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for caption in captions:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "caption": caption}
            )
    coco = {
        "info": {
            "description": f"captioner demo dataset ({split} split): coloured shapes",
            "version": str(FORMAT_VERSION),
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps(coco) + "\n", encoding="utf-8"
    )


_OWN_ENTRIES = {"images", "annotations", MANIFEST}


def ensure_demo_dataset(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 64,
    splits: dict[str, int] | None = None,
) -> Path:
    """Make sure the demo dataset exists in ``root`` and return ``root`` as a ``Path``.

    Returns at once when ``root/demo.json`` records the same seed, image size and split sizes.
    Otherwise the dataset is generated in a temporary directory beside ``root`` and moved into
    place only when complete, so an interrupted run never leaves a dataset that looks finished.
    An existing ``root`` is replaced only if it holds nothing but a (stale) demo dataset.
    """
    root = Path(root)
    splits = dict(DEMO_SPLITS if splits is None else splits)
    for name, count in splits.items():
        if (
            not re.fullmatch(r"[A-Za-z0-9_-]+", str(name))
            or not isinstance(count, int)
            or count < 0
        ):
            raise UserError(
                f"demo dataset: bad split {name!r}: {count!r} (want a name and a count >= 0)"
            )
    if not isinstance(image_size, int) or image_size < 32:
        raise UserError(f"demo dataset: image_size must be an integer >= 32, got {image_size!r}")
    manifest = _manifest(seed, image_size, splits)
    if _is_complete(root, manifest):
        return root

    if root.exists():
        if not root.is_dir():
            raise UserError(f"{root}: exists and is not a directory; cannot write the demo dataset")
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES)
        if foreign:
            raise UserError(
                f"{root}: not an (outdated) demo dataset, refusing to overwrite it "
                f"(it contains {', '.join(foreign[:3])}); choose another directory"
            )
    log.info(
        "generating demo dataset in %s (%s images of %dx%d, seed %d)",
        root,
        ", ".join(f"{n} {s}" for s, n in splits.items()),
        image_size,
        image_size,
        seed,
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "annotations").mkdir()
        for split, count in splits.items():
            _write_split(tmp, split, count, seed, image_size)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp creates it private
        if _is_complete(root, manifest):  # another process finished first
            return root
        if root.exists():
            old = root.with_name(f".{root.name}.old-{os.getpid()}")
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
