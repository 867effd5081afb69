"""The converters of ``captioner prepare`` (no network): dataset releases -> COCO captions files.

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

Real-world data is cleaned, never silently: the inputs are read and cleaned by
:mod:`captioner.datasets.sources`; images in no split (or without captions, or missing on disk)
are skipped with a logged count, and an image in two splits is an error.

Downloading COCO is :mod:`captioner.datasets.coco_download`; the command line,
:mod:`captioner.cli.prepare`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from captioner.datasets.annotations import read_karpathy
from captioner.datasets.sources import (
    Captions,
    read_image_list,
    read_karpathy_splits,
    read_token_file,
)
from captioner.errors import UserError
from captioner.files import atomic_write

log = logging.getLogger(__name__)

FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


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
