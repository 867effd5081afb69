"""How sharp a trained model's attention maps are: for each checkpoint, the greedy captions of the
first N images of a split with their maps, and per word the map's entropy as a share of a
uniform map's (1: spread evenly over the grid, 0: all on one cell) and its largest weight as a
multiple of a uniform map's (``map_sharpness`` in captioner/evaluation/attention_maps.py).
Averaged over every word of every caption, and over the first words alone (where the models
here look at the subject). Used to choose ``model.decoder.attention_penalty``
(docs/results.md, "The attention penalty's weight").

    python benchmarks/attention_sharpness.py RUN_DIR [RUN_DIR ...] --labels 0.1 1.0 --images 100

Each argument is what ``captioner evaluate checkpoint=`` reads: a best.pt / last.pt or a run
directory (its best.pt); the images are the first ``--images`` of ``--split`` of the data the
model was trained on (``--data-root``: the same dataset elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from captioner.configs.data import SPLITS
from captioner.configs.decode import DecodeConfig
from captioner.datasets.captions import load_split
from captioner.errors import UserError
from captioner.evaluation.attention_maps import map_sharpness
from captioner.evaluation.evaluate import load_model, resolve_data_config
from captioner.inference import Captioner
from captioner.runtime import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints or run directories")
    p.add_argument("--labels", nargs="+", help="one name per checkpoint (default: its path)")
    p.add_argument("--split", default="val", choices=SPLITS)
    p.add_argument("--images", type=int, default=100, help="the first N images of the split")
    p.add_argument("--data-root", help="the dataset's root, if not the one the model trained on")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:1 | mps")
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.checkpoints):
        p.error("give one --labels entry per checkpoint")
    if args.images < 1:
        p.error("--images must be >= 1")
    return args


def measure(source: str, split: str, images: int, data_root: str | None, device) -> dict:
    """The sharpness figures of one checkpoint over the first ``images`` images of ``split``."""
    _, model, vocab, pre, trained = load_model(source, device)
    if not model.attends:
        raise UserError(f"{source}: the model does not attend (model.decoder.attention=none)")
    data = resolve_data_config(trained, {"root": data_root})
    paths = [r.path for r in load_split(data, split)[:images]]
    captioner = Captioner(model, vocab, pre, device)
    results = captioner.caption(paths, DecodeConfig(strategy="greedy"), attention=True)
    entropy, peak, first_entropy, first_peak, grid = [], [], [], [], None
    for res in results:
        if res.error is not None or res.attention is None or not len(res.attention):
            continue
        grid = [int(n) for n in res.attention.shape[-2:]]
        e, m = map_sharpness(res.attention)
        entropy.append(e)
        peak.append(m)
        first_entropy.append(e[0])
        first_peak.append(m[0])
    if not entropy:
        raise UserError(f"{source}: no image of the first {images} of {split} was captioned")
    words = torch.cat(entropy)
    return {
        "images": len(entropy),
        "words": len(words),
        "grid": grid,
        "entropy": float(words.mean()),
        "entropy_first_word": float(torch.stack(first_entropy).mean()),
        "peak": float(torch.cat(peak).mean()),
        "peak_first_word": float(torch.stack(first_peak).mean()),
        "mean_caption_words": len(words) / len(entropy),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = args.labels or args.checkpoints
    device = resolve_device(args.device)
    rows = {}
    try:
        for label, source in zip(labels, args.checkpoints, strict=True):
            rows[label] = measure(source, args.split, args.images, args.data_root, device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"greedy captions of the first {args.images} {args.split} images; entropy as a share "
        "of a uniform map's, peak as a multiple of a uniform map's weight"
    )
    print(f"{'model':<24} {'words':>6} {'entropy':>8} {'1st word':>9} {'peak':>6} {'1st word':>9}")
    for label, r in rows.items():
        print(
            f"{label:<24} {r['words']:>6} {r['entropy']:>8.3f} {r['entropy_first_word']:>9.3f}"
            f" {r['peak']:>6.2f} {r['peak_first_word']:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
