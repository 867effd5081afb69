"""``captioner prepare``: get datasets into the COCO captions format the pipeline reads.

Converters (no network):

- ``flickr8k``: the official Flickr8k text release (``Flickr8k.token.txt`` and
  ``Flickr_8k.{train,dev,test}Images.txt``) -> ``OUT/annotations/captions_{train,val,test}.json``
  (dev becomes val);
- ``flickr30k``: ``results_20130124.token`` (+ Karpathy's ``dataset_flickr30k.json`` for the
  splits; without it everything goes to ``captions_all.json``: Flickr30k has no official split);
- ``karpathy``: Karpathy's ``dataset_{coco,flickr8k,flickr30k}.json`` -> one file per split.

Every converter writes ``{"images": [{"id", "file_name"}], "annotations": [{"id", "image_id",
"caption"}]}`` with integer image ids that are the same in every split file of one dataset
(the 1-based rank of the file name among all images of all splits, or Karpathy's
``cocoid``/``imgid``). ``file_name`` is relative to an images directory; the converters make that
directory reachable from ``OUT`` as ``OUT/images`` (a symlink, unless the images already live
under ``OUT``) and print the Hydra overrides that point a run at the result.

Real-world data is cleaned, never silently: whitespace runs are collapsed (case is kept: the
tokenizer lower-cases later), captions that tokenize identically for one image are kept once,
an image listed twice in one split counts once, images in no split (or without captions, or
missing on disk) are skipped with a logged count, and an image in two splits is an error.

Downloads (``coco``): the official archives from ``http://images.cocodataset.org`` and, with
``--karpathy``, Karpathy's ``caption_datasets.zip``, fetched into ``OUT/downloads/`` and unpacked
into ``OUT`` by :mod:`captioner.datasets.download` (resumable, verified, stamped once unpacked). COCO
publishes no checksums (and no sizes), so none is hard-coded here: the integrity check is the
CRC-32 of every zip member, verified while unpacking.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from captioner.datasets.annotations import read_karpathy
from captioner.datasets.download import Archive, fetch_archive
from captioner.errors import UserError
from captioner.files import atomic_write, read_text
from captioner.vocab import tokenize

log = logging.getLogger(__name__)

COCO_BASE_URL = "http://images.cocodataset.org"
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


# ---------------------------------------------------------------------------------------------
# reading inputs


def normalize_caption(text: str) -> str:
    """Collapse every run of whitespace (tabs, newlines, NBSP ...) to one space; keep case."""
    return " ".join(text.split())


@dataclass
class Captions:
    """Captions per image file name, cleaned and deduplicated as they are added."""

    by_image: dict[str, list[str]] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    _seen: dict[str, set[tuple[str, ...]]] = field(default_factory=dict, repr=False)

    def add(self, image: str, caption: str) -> None:
        caption = normalize_caption(caption)
        key = tuple(tokenize(caption))  # what the model and BLEU see: case and punctuation go
        if not key:
            self.stats["empty captions"] += 1
            return
        seen = self._seen.setdefault(image, set())
        if key in seen:
            self.stats["duplicate captions"] += 1
            return
        seen.add(key)
        self.by_image.setdefault(image, []).append(caption)


def read_token_file(path: str | Path) -> Captions:
    """Read a Flickr token file: ``IMAGE#N<TAB>caption`` per line (``#N`` optional)."""
    path = Path(path)
    captions = Captions()
    for lineno, line in enumerate(read_text(path, "token file").splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name = key.strip()
        name = name.rpartition("#")[0] if re.search(r"#\d+$", name) else name
        if not tab or not name:
            raise UserError(f"{path}:{lineno}: expected 'IMAGE#N<TAB>caption', got {line[:60]!r}")
        captions.add(name, caption)
    if not captions.by_image:
        raise UserError(f"{path}: token file holds no captions")
    return captions


def read_image_list(path: str | Path, stats: Counter | None = None) -> list[str]:
    """One image file name per line (blank lines skipped); a name listed twice counts once."""
    path = Path(path)
    names: dict[str, None] = {}
    for line in read_text(path, "image list").splitlines():
        name = line.strip()
        if not name:
            continue
        if name in names and stats is not None:
            stats["images listed twice in a split file"] += 1
        names[name] = None
    return list(names)


def read_karpathy_splits(path: str | Path, restval: str = "train") -> dict[str, list[str]]:
    """File names per split of a Karpathy split file (``restval`` joins ``restval``'s value)."""
    splits: dict[str, dict[str, None]] = {}
    for entry in read_karpathy(path, restval):
        splits.setdefault(entry.split, {})[entry.filename] = None
    return {split: list(names) for split, names in splits.items()}


# ---------------------------------------------------------------------------------------------
# writing COCO captions files


def write_coco_captions(
    path: Path,
    images: Sequence[tuple[int, str]],
    captions: Mapping[str, Sequence[str]],
    first_ann_id: int = 1,
    description: str = "",
) -> int:
    """Write one COCO captions file atomically; returns the next free annotation id."""
    anns, ann_id = [], first_ann_id
    for image_id, file_name in images:
        for caption in captions[file_name]:
            anns.append({"id": ann_id, "image_id": image_id, "caption": caption})
            ann_id += 1
    data = {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "images": [{"id": image_id, "file_name": file_name} for image_id, file_name in images],
        "annotations": anns,
    }
    atomic_write(path, json.dumps(data, ensure_ascii=False))
    return ann_id


def link_images(images_dir: Path, out: Path, link: bool = True) -> str:
    """The value for ``data.*_images`` (relative to ``out``) that reaches ``images_dir``.

    Inside ``out`` already: its relative path. Otherwise ``out/images``, a symlink to it (made
    unless ``link`` is false or ``out/images`` is something else); failing that, its absolute path.
    """
    target, out_abs = images_dir.resolve(), out.resolve()
    if target == out_abs or out_abs in target.parents:
        return target.relative_to(out_abs).as_posix() or "."
    path = out / "images"
    if path.is_symlink() and path.resolve() == target:
        return "images"
    if link and not path.exists() and not path.is_symlink():
        try:
            out.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target, target_is_directory=True)
            return "images"
        except OSError as exc:
            log.warning("cannot link %s -> %s (%s); using the absolute path", path, target, exc)
    elif link:
        log.warning("%s exists and is not a link to %s; using the absolute path", path, target)
    return str(target)


def _hydra_overrides(out: Path, files: Mapping[str, Path], images: str) -> str:
    parts = [f"data.root={out}"]
    for split in ("train", "val", "test"):
        if split in files:
            parts.append(f"data.{split}_annotations=annotations/{files[split].name}")
            parts.append(f"data.{split}_images={images}")
        elif split == "test":
            parts += ["data.test_annotations=null", "data.test_images=null"]
    return " ".join(parts)


def _log_stats(stats: Counter, source: Path) -> None:
    for what, n in sorted(stats.items()):
        if n:
            log.info("%s: %d %s", source, n, what)


def convert_to_coco(
    captions: Captions,
    splits: Mapping[str, Sequence[str]] | None,
    images_dir: str | Path,
    out: str | Path,
    source: str | Path,
) -> dict[str, Path]:
    """Write ``out/annotations/captions_{split}.json`` for the captions of file-named images.

    ``splits=None`` puts every captioned image into ``captions_all.json``. Image ids are the
    1-based rank of the file name among the images of all splits, so they agree across files.
    Returns the written file per split.
    """
    images_dir, out, source = Path(images_dir), Path(out), Path(source)
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: images directory not found")
    stats = captions.stats
    if splits is None:
        splits = {"all": sorted(captions.by_image)}
    owner: dict[str, str] = {}
    for split, names in splits.items():
        for name in names:
            if owner.setdefault(name, split) != split:
                raise UserError(
                    f"{source}: image {name} is listed in both the {owner[name]!r} and the "
                    f"{split!r} split"
                )
    stats["captioned images in no split (skipped)"] += len(set(captions.by_image) - set(owner))
    ids = {name: i for i, name in enumerate(sorted(owner), 1)}

    kept: dict[str, list[tuple[int, str]]] = {}
    missing: list[Path] = []
    for split, names in splits.items():
        rows = []
        for name in sorted(names, key=ids.__getitem__):
            if name not in captions.by_image:
                stats["split images without captions (skipped)"] += 1
            elif not (images_dir / name).is_file():
                missing.append(images_dir / name)
            else:
                rows.append((ids[name], name))
        kept[split] = rows
    if missing:
        log.warning(
            "%d listed images are not in %s (skipped), e.g. %s",
            len(missing),
            images_dir,
            missing[0],
        )
    _log_stats(stats, source)
    if not any(kept.values()):
        raise UserError(f"{images_dir}: none of the captioned images of {source} is there")

    files, ann_id = {}, 1
    for split, rows in kept.items():
        if not rows:
            log.warning("split %r has no images; no file written", split)
            continue
        path = out / "annotations" / f"captions_{split}.json"
        ann_id = write_coco_captions(
            path, rows, captions.by_image, ann_id, f"{source.name} {split}"
        )
        log.info(
            "%s: %d images, %d captions",
            path,
            len(rows),
            sum(len(captions.by_image[n]) for _, n in rows),
        )
        files[split] = path
    return files


def prepare_flickr8k(
    token_file: str | Path,
    splits_dir: str | Path,
    images: str | Path,
    out: str | Path,
    link: bool = True,
) -> tuple[dict[str, Path], str]:
    """Flickr8k's text release -> COCO captions files; returns them and the Hydra overrides."""
    captions = read_token_file(token_file)
    splits = {
        split: read_image_list(Path(splits_dir) / name, captions.stats)
        for split, name in FLICKR8K_SPLIT_FILES.items()
    }
    files = convert_to_coco(captions, splits, images, out, token_file)
    return files, _hydra_overrides(Path(out), files, link_images(Path(images), Path(out), link))


def prepare_flickr30k(
    token_file: str | Path,
    images: str | Path,
    out: str | Path,
    karpathy: str | Path | None = None,
    link: bool = True,
) -> tuple[dict[str, Path], str]:
    """Flickr30k's ``results_20130124.token`` -> COCO captions files (Karpathy's splits if given,
    else one ``captions_all.json``); returns them and the Hydra overrides."""
    captions = read_token_file(token_file)
    splits = read_karpathy_splits(karpathy) if karpathy is not None else None
    if splits is None:
        log.warning(
            "Flickr30k has no official split: every image goes to captions_all.json "
            "(pass --karpathy dataset_flickr30k.json for the usual train/val/test)"
        )
    files = convert_to_coco(captions, splits, images, out, token_file)
    images_value = link_images(Path(images), Path(out), link)
    if "all" in files:
        return (
            files,
            f"data.root={out} data.train_annotations=annotations/captions_all.json "
            f"data.train_images={images_value} (no val/test split: pass --karpathy)",
        )
    return files, _hydra_overrides(Path(out), files, images_value)


def prepare_karpathy(
    split_file: str | Path,
    out: str | Path,
    images_root: str | Path | None = None,
    separate_restval: bool = False,
    link: bool = True,
) -> tuple[dict[str, Path], str]:
    """Karpathy's ``dataset_*.json`` -> ``captions_{train,val,test}.json`` (``restval`` joins
    train unless ``separate_restval``); ``file_name`` is ``filepath/filename``, the image id is
    ``cocoid`` (COCO) or ``imgid`` (Flickr)."""
    split_file, out = Path(split_file), Path(out)
    restval = "restval" if separate_restval else "train"
    captions = Captions()
    splits: dict[str, dict[str, None]] = {}
    ids: dict[str, int] = {}
    names_of_id: dict[int, str] = {}
    for entry in read_karpathy(split_file, restval):
        where, name = f"{split_file}: images[{entry.index}]", entry.file_name
        if name in ids:
            captions.stats["images referenced twice (captions merged)"] += 1
        elif names_of_id.setdefault(entry.image_id, name) != name:
            raise UserError(
                f"{where} ({name}) has the id {entry.image_id} of {names_of_id[entry.image_id]}"
            )
        ids.setdefault(name, entry.image_id)
        for raw in entry.sentences:
            captions.add(name, raw)
        for other, names in splits.items():
            if other != entry.split and name in names:
                raise UserError(
                    f"{where}: image {name} is in both the {other!r} and {entry.split!r} split"
                )
        splits.setdefault(entry.split, {})[name] = None

    files, ann_id = {}, 1
    order = ("train", "restval", "val", "test")
    missing = 0
    for split in sorted(splits, key=order.index):
        rows = []
        for name in sorted(splits[split], key=ids.__getitem__):
            if name not in captions.by_image:
                captions.stats["images without captions"] += 1
            elif images_root is not None and not (Path(images_root) / name).is_file():
                missing += 1
            else:
                rows.append((ids[name], name))
        if not rows:
            continue
        path = out / "annotations" / f"captions_{split}.json"
        ann_id = write_coco_captions(
            path, rows, captions.by_image, ann_id, f"{split_file.name} {split}"
        )
        files[split] = path
    _log_stats(captions.stats, split_file)
    if missing:
        log.warning("%d images of %s are not under %s (skipped)", missing, split_file, images_root)
    if not files:
        where = f" under {images_root}" if missing else ""
        raise UserError(f"{split_file}: no captioned image{where} to write")
    images_value = "<DIR holding filepath/filename>"
    if images_root is not None:
        images_value = link_images(Path(images_root), out, link)
    return files, _hydra_overrides(out, files, images_value)


# ---------------------------------------------------------------------------------------------
# downloading COCO (the downloader itself: captioner.datasets.download)


def _annotation_captions(member: str) -> str | None:
    base = posixpath.basename(member)
    return (
        f"annotations/{base}" if base.startswith("captions_") and base.endswith(".json") else None
    )


def _only(filename: str) -> Callable[[str], str | None]:
    return lambda member: filename if posixpath.basename(member) == filename else None


def coco_archives(
    year: str | int,
    images: bool = True,
    karpathy: bool = False,
    base_url: str = COCO_BASE_URL,
    karpathy_url: str = KARPATHY_URL,
) -> list[Archive]:
    """The archives of COCO ``year`` (2014 or 2017): caption annotations (only the
    ``captions_*.json`` of ``annotations_trainval{year}.zip`` are unpacked), then the val and
    train images, then Karpathy's ``dataset_coco.json`` when ``karpathy``."""
    year = str(year)
    if year not in ("2014", "2017"):
        raise UserError(f"COCO year must be 2014 or 2017, got {year!r}")
    base = base_url.rstrip("/")
    archives = [Archive(f"{base}/annotations/annotations_trainval{year}.zip", _annotation_captions)]
    if images:
        archives += [Archive(f"{base}/zips/{split}{year}.zip") for split in ("val", "train")]
    if karpathy:
        archives.append(Archive(karpathy_url, _only("dataset_coco.json")))
    return archives


def prepare_coco(
    year: str | int,
    out: str | Path = "data/coco",
    images: bool = True,
    karpathy: bool = False,
    base_url: str = COCO_BASE_URL,
    karpathy_url: str = KARPATHY_URL,
    keep_archives: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
    archives: Iterable[Archive] | None = None,
) -> list[Path]:
    """Download and unpack COCO ``year`` into ``out``; returns the paths the configs read.

    Archives whose stamp ``out/downloads/NAME.done`` exists are skipped. ``archives`` overrides
    the list (for mirrors with other names, or sizes/checksums you trust).
    """
    out = Path(out)
    downloads = out / "downloads"
    if karpathy and str(year) != "2014":
        log.warning(
            "Karpathy's split names the 2014 images (train2014/, val2014/): "
            "data=karpathy needs --year 2014"
        )
    todo = (
        list(archives)
        if archives is not None
        else coco_archives(year, images, karpathy, base_url, karpathy_url)
    )
    for archive in todo:
        fetch_archive(
            archive, out, downloads, keep_archive=keep_archives, timeout=timeout, progress=progress
        )
    year = str(year)
    expected = [out / "annotations" / f"captions_{s}{year}.json" for s in ("train", "val")]
    if images:
        expected += [out / f"{s}{year}" for s in ("train", "val")]
    if karpathy:
        expected.append(out / "dataset_coco.json")
    if archives is None:
        for path in expected:
            if not path.exists():
                raise UserError(f"{path}: expected after unpacking, but it is not there")
    return [p for p in expected if p.exists()]


# ---------------------------------------------------------------------------------------------
# command line


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
