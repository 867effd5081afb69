"""``captioner prepare SOURCE ...``: the command line of the dataset converters
(:mod:`captioner.datasets.prepare`) and of the COCO download
(:mod:`captioner.datasets.coco_download`). Torch-free, so it starts fast."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from captioner.datasets.coco_download import COCO_BASE_URL, KARPATHY_URL, prepare_coco
from captioner.datasets.prepare import prepare_flickr8k, prepare_flickr30k, prepare_karpathy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner prepare",
        description="Convert Flickr8k/Flickr30k/Karpathy files to COCO captions JSON, or "
        "download MS-COCO.",
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    link = {
        "action": argparse.BooleanOptionalAction,
        "default": True,
        "help": "make OUT/images a symlink to the images directory (default: yes)",
    }

    p = sub.add_parser("flickr8k", help="Flickr8k text release -> captions_{train,val,test}.json")
    p.add_argument("--token-file", required=True, type=Path, help="Flickr8k.token.txt")
    p.add_argument(
        "--splits-dir",
        required=True,
        type=Path,
        help="directory holding Flickr_8k.{train,dev,test}Images.txt",
    )
    p.add_argument("--images", required=True, type=Path, help="the Flicker8k_Dataset directory")
    p.add_argument("--out", type=Path, default=Path("data/flickr8k"), help="(default: %(default)s)")
    p.add_argument("--link", **link)

    p = sub.add_parser("flickr30k", help="results_20130124.token -> COCO captions JSON")
    p.add_argument("--token-file", required=True, type=Path, help="results_20130124.token")
    p.add_argument(
        "--karpathy",
        type=Path,
        default=None,
        help="dataset_flickr30k.json for the train/val/test split (else captions_all.json)",
    )
    p.add_argument("--images", required=True, type=Path, help="the flickr30k-images directory")
    p.add_argument(
        "--out", type=Path, default=Path("data/flickr30k"), help="(default: %(default)s)"
    )
    p.add_argument("--link", **link)

    p = sub.add_parser(
        "karpathy", help="Karpathy's dataset_*.json -> captions_{train,val,test}.json"
    )
    p.add_argument(
        "--split-file", required=True, type=Path, help="dataset_{coco,flickr8k,flickr30k}.json"
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--images-root",
        type=Path,
        default=None,
        help="directory holding <filepath>/<filename> (checked, then linked)",
    )
    p.add_argument(
        "--separate-restval",
        action="store_true",
        help="write restval to captions_restval.json instead of adding it to train",
    )
    p.add_argument("--link", **link)

    p = sub.add_parser("coco", help="download and unpack MS-COCO 2014/2017 captions and images")
    p.add_argument("--year", required=True, choices=["2014", "2017"])
    p.add_argument("--out", type=Path, default=Path("data/coco"), help="(default: %(default)s)")
    p.add_argument(
        "--images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the train/val images, 13 GB (2014) / 19 GB (2017) (default: yes)",
    )
    p.add_argument("--karpathy", action="store_true", help="also Karpathy's dataset_coco.json")
    p.add_argument("--base-url", default=COCO_BASE_URL, help="mirror of %(default)s")
    p.add_argument("--karpathy-url", default=KARPATHY_URL, help="(default: %(default)s)")
    p.add_argument("--keep-archives", action="store_true", help="keep the zips after unpacking")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network read")
    return parser


def main(argv: Sequence[str]) -> int:
    """``captioner prepare SOURCE ...``; raises :class:`UserError` on a user's mistake."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.source == "coco":
        try:
            paths = prepare_coco(
                args.year,
                args.out,
                args.images,
                args.karpathy,
                args.base_url,
                args.karpathy_url,
                args.keep_archives,
                args.timeout,
            )
        except KeyboardInterrupt:
            print(
                f"interrupted; run the same command again to resume ({args.out / 'downloads'})",
                file=sys.stderr,
            )
            return 130
        for path in paths:
            print(path)
        fmt = (
            "data=karpathy"
            if args.karpathy and args.year == "2014"
            else f"data=coco data.year={args.year}"
        )
        print(f"use: {fmt} data.root={args.out}")
        return 0
    if args.source == "flickr8k":
        files, overrides = prepare_flickr8k(
            args.token_file, args.splits_dir, args.images, args.out, args.link
        )
    elif args.source == "flickr30k":
        files, overrides = prepare_flickr30k(
            args.token_file, args.images, args.out, args.karpathy, args.link
        )
    else:
        files, overrides = prepare_karpathy(
            args.split_file, args.out, args.images_root, args.separate_restval, args.link
        )
    for path in files.values():
        print(path)
    print(f"use: data=coco {overrides}")
    return 0
