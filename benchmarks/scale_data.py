"""The COCO-shaped dataset ``scale.py`` measures: N train images (+ val) in the COCO captions
format, five captions each drawn from a real captions file with Zipf-ranked rare words added, and
tiny PNG images written without Pillow (see benchmarks/README.md, "scale.py")."""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

CAPTIONS_PER_IMAGE = 5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _png(rgb: tuple[int, int, int], size: int) -> bytes:
    """A ``size`` x ``size`` PNG of one colour with a diagonal, written without Pillow."""
    rows = []
    for y in range(size):
        row = bytearray(rgb * size)
        row[3 * y : 3 * y + 3] = bytes(255 - c for c in rgb)
        rows.append(b"\0" + bytes(row))
    raw = zlib.compress(b"".join(rows))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = size.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def rare_word(k: int) -> str:
    """The k-th invented word: letters only, so ``tokenize`` keeps it whole."""
    letters = ""
    while True:
        k, r = divmod(k, 26)
        letters += chr(ord("a") + r)
        if not k:
            return "zq" + letters


def make_captions(source: list[str], count: int, rng: np.random.Generator, p: float) -> list[str]:
    """``count`` captions drawn from ``source``; a fraction ``p`` get one invented word whose
    rank follows Zipf's law (1/k over a million words), so a word reaches ``min_freq`` as the
    corpus grows, as new words do in COCO."""
    picks = rng.integers(0, len(source), count)
    ranks = np.floor(np.exp(rng.uniform(0, np.log(1e6), count))).astype(np.int64)
    add = rng.random(count) < p
    out = []
    for i, j in enumerate(picks):
        text = source[j]
        if add[i]:
            words = text.split()
            words.insert(len(words) // 2, rare_word(int(ranks[i])))
            text = " ".join(words)
        out.append(text)
    return out


def make_dataset(args: argparse.Namespace) -> None:
    """``root/images/*.png`` for max(N) + val images and ``root/captions_{train_N,val}.json``."""
    root = args.root
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    total = max(args.sizes) + args.val
    rng = np.random.default_rng(0)
    pool = [
        _png(tuple(int(c) for c in rng.integers(0, 256, 3)), args.image_size) for _ in range(64)
    ]
    start = time.perf_counter()
    for i in range(1, total + 1):
        path = images / f"{i:012d}.png"
        if not path.exists():
            path.write_bytes(pool[i % len(pool)])
    log(f"{total} images in {images} ({time.perf_counter() - start:.0f} s)")
    source = [a["caption"] for a in json.loads(args.captions.read_text())["annotations"]]
    captions = make_captions(source, total * CAPTIONS_PER_IMAGE, rng, args.rare_fraction)
    val_ids = range(max(args.sizes) + 1, total + 1)
    write_split(root / "captions_val.json", val_ids, captions)
    for n in args.sizes:
        write_split(root / f"captions_train_{n}.json", range(1, n + 1), captions)
    log(f"annotations written ({len(captions)} captions)")


def write_split(path: Path, ids: range, captions: list[str]) -> None:
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": 32, "height": 32} for i in ids]
    anns = [
        {"id": (i - 1) * CAPTIONS_PER_IMAGE + k + 1, "image_id": i, "caption": captions[cid]}
        for i in ids
        for k, cid in enumerate(range((i - 1) * CAPTIONS_PER_IMAGE, i * CAPTIONS_PER_IMAGE))
    ]
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
