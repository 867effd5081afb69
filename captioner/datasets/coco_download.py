"""``captioner prepare coco``: download MS-COCO 2014/2017 into the layout the ``coco`` and
``karpathy`` data configs read.

The official archives from ``http://images.cocodataset.org`` and, with ``--karpathy``,
Karpathy's ``caption_datasets.zip`` are fetched into ``OUT/downloads/`` and unpacked into ``OUT``
by :mod:`captioner.datasets.download` (resumable, verified, stamped once unpacked). COCO
publishes no checksums (and no sizes), so none is hard-coded here: the integrity check is the
CRC-32 of every zip member, verified while unpacking.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterable
from pathlib import Path

from captioner.datasets.download import Archive, fetch_archive
from captioner.errors import UserError

log = logging.getLogger(__name__)

COCO_BASE_URL = "http://images.cocodataset.org"
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


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
