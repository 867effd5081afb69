"""``captioner prepare SOURCE ...``: the command line of the dataset converters
(:mod:`captioner.datasets.prepare`) and of the COCO and Flickr8k downloads
(:mod:`captioner.datasets.coco_download`, :mod:`captioner.datasets.flickr8k_download`).
Torch-free, so it starts fast."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from captioner.datasets.coco_download import COCO_BASE_URL, KARPATHY_URL, prepare_coco
from captioner.datasets.flickr8k_download import (
    FLICKR8K_BASE_URL,
    IMAGES_ZIP,
    TEXT_ZIP,
    download_flickr8k,
)
from captioner.datasets.prepare import prepare_flickr8k, prepare_flickr30k, prepare_karpathy
from captioner.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner prepare",
        description="Convert Flickr8k/Flickr30k/Karpathy files to COCO captions JSON, or "
        "download Flickr8k or MS-COCO.",
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    link = {
        "action": argparse.BooleanOptionalAction,
        "default": True,
        "help": "make OUT/images a symlink to the images directory (default: yes)",
    }

    _add_flickr8k(sub, link)
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

    _add_coco(sub)
    return parser


def _add_flickr8k(sub: Any, link: dict[str, Any]) -> None:
    p = sub.add_parser(
        "flickr8k",
        help="download Flickr8k (--download), or convert its text release, to COCO captions JSON",
        description="With --download: fetch Flickr8k's images and text release from a mirror "
        "(resumable, checked) into OUT, the layout data=flickr8k reads. Without it: convert "
        "the text release you have (--token-file, --splits-dir, --images).",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help=f"download {IMAGES_ZIP} (1 GB) and {TEXT_ZIP} from --base-url",
    )
    p.add_argument("--base-url", default=FLICKR8K_BASE_URL, help="mirror of %(default)s")
    p.add_argument("--token-file", type=Path, help="Flickr8k.token.txt")
    p.add_argument(
        "--splits-dir",
        type=Path,
        help="directory holding Flickr_8k.{train,dev,test}Images.txt",
    )
    p.add_argument("--images", type=Path, help="the Flicker8k_Dataset directory")
    p.add_argument(
        "--out",
        "--root",
        type=Path,
        default=Path("data/flickr8k"),
        help="(default: %(default)s; the data.root of training)",
    )
    p.add_argument("--link", **link)
    p.add_argument("--keep-archives", action="store_true", help="keep the zips after unpacking")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network read")


def _add_coco(sub: Any) -> None:
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


def main(argv: Sequence[str]) -> int:
    """``captioner prepare SOURCE ...``; raises :class:`UserError` on a user's mistake."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.source == "coco":
        return _download(args, _coco)
    if args.source == "flickr8k":
        if args.download:
            return _download(args, _flickr8k_download)
        files, overrides = prepare_flickr8k(*_flickr8k_inputs(args), args.out, args.link)
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


def _download(args: argparse.Namespace, fetch: Callable[[argparse.Namespace], None]) -> int:
    """Run a download; Ctrl-C says how to resume it (exit 130)."""
    try:
        fetch(args)
    except KeyboardInterrupt:
        print(
            f"interrupted; run the same command again to resume ({args.out / 'downloads'})",
            file=sys.stderr,
        )
        return 130
    return 0


def _coco(args: argparse.Namespace) -> None:
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
    for path in paths:
        print(path)
    fmt = (
        "data=karpathy"
        if args.karpathy and args.year == "2014"
        else f"data=coco data.year={args.year}"
    )
    print(f"use: {fmt} data.root={args.out}")


def _flickr8k_inputs(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """--token-file, --splits-dir and --images: all three are needed without --download."""
    given = {"--token-file": args.token_file, "--splits-dir": args.splits_dir}
    given["--images"] = args.images
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise UserError(
            f"prepare flickr8k: {', '.join(missing)} missing: pass --download to fetch "
            "Flickr8k, or all of --token-file, --splits-dir and --images to convert your copy"
        )
    return args.token_file, args.splits_dir, args.images


def _flickr8k_download(args: argparse.Namespace) -> None:
    given = [f for f in ("token_file", "splits_dir", "images") if getattr(args, f) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"prepare flickr8k: {flag} is for converting your own copy, not --download")
    files, _ = download_flickr8k(args.out, args.base_url, args.keep_archives, args.timeout)
    for path in files.values():
        print(path)
    print(f"use: data=flickr8k data.root={args.out}")
    print(f"e.g. captioner train experiment=flickr8k data.root={args.out}")
