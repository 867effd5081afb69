"""Annotation files: COCO captions JSON and Karpathy's split JSON, read and checked once.

Every reader here turns a malformed file into a one-line :class:`UserError` that names the file
and the entry. Torch-free on purpose: ``captioner prepare`` and the data pipeline share it.

- :func:`load_coco_captions`: a ``captions_*.json`` -> :class:`CaptionRecord` per captioned image;
- :func:`read_karpathy`: the ONE reader of Karpathy's ``dataset_{coco,flickr8k,flickr30k}.json``
  -> :class:`KarpathyImage` per entry (the split file's structure, checked);
- :func:`load_karpathy_split`: one split of it as :class:`CaptionRecord` (training, evaluation).
- :class:`PathTable`: image paths packed for loader workers to share (not copy).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, overload

from captioner.configs.data import SPLITS
from captioner.errors import UserError
from captioner.files import read_json
from captioner.vocab import has_words

log = logging.getLogger(__name__)


@dataclass
class CaptionRecord:
    """One image and all of its reference captions."""

    image_id: int
    path: Path
    captions: list[str] = field(default_factory=list)


class PathTable(Sequence[Path]):
    """Paths packed into one bytes buffer (their file-system encoding) with an array of offsets:
    ``table[i]`` is a new :class:`~pathlib.Path`.

    A list of a hundred thousand ``Path`` objects is copied page by page into every forked
    loader worker that reads it (reading an object writes its reference count); this is two
    objects whatever the length, and pickles as two buffers for a spawned worker."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]]):
        encoded = [os.fsencode(p) for p in paths]
        self.data = b"".join(encoded)
        self.offsets = array("q", accumulate(map(len, encoded), initial=0))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, index: int) -> Path: ...
    @overload
    def __getitem__(self, index: slice) -> list[Path]: ...
    def __getitem__(self, index: int | slice) -> Path | list[Path]:
        n = len(self)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(n))]
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"path index {index} out of range for {n} paths")
        return Path(os.fsdecode(self.data[self.offsets[i] : self.offsets[i + 1]]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_caption(path: Path, where: str, caption: Any) -> str:
    if not isinstance(caption, str):
        raise UserError(f"{path}: {where} has no 'caption' string")
    if not has_words(caption):
        raise UserError(f"{path}: {where} has an empty caption {caption!r}")
    return caption


def _few(ids: Sequence[int], n: int = 5) -> str:
    """``"3, 7, 9 (and 12 more)"``: the first ``n`` ids of a list, for a message."""
    more = f" (and {len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(map(str, ids[:n])) + more


def _unique_by_id(
    source: Path, entries: Sequence[Any], key: Any, what: Any, label: Any
) -> list[Any]:
    """``entries`` with each image id once, in first-listed order.

    A second entry with the same id is either an exact repeat (``what`` equal: dropped, and the
    ids named in one warning) or another image under a taken id (refused: it would be scored
    against the first one's references). ``key(entry)`` is the id, ``what(entry)`` what must
    agree, ``label(entry)`` the image's file, quoted in the error."""
    first: dict[int, Any] = {}
    repeated: dict[int, None] = {}  # an ordered set
    clashes: list[tuple[int, Any, Any]] = []
    for entry in entries:
        seen = first.setdefault(key(entry), entry)
        if seen is not entry:
            same = what(seen) == what(entry)
            if same:
                repeated[key(entry)] = None
            else:
                clashes.append((key(entry), label(seen), label(entry)))
    if clashes:
        image_id, a, b = clashes[0]
        ids = sorted({c[0] for c in clashes})
        raise UserError(
            f"{source}: image id {image_id} is listed twice with different entries ({a!r} and "
            f"{b!r}); an id names one image (clashing ids: {_few(ids)})"
        )
    if repeated:
        log.warning(
            "%s: image ids listed more than once, counted once: %s", source, _few(list(repeated))
        )
    return list(first.values())


def _check_images_exist(records: Sequence[CaptionRecord], source: Path) -> None:
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{source}: image {missing[0]} is referenced but missing{more}")


# ---------------------------------------------------------------------------------------------
# COCO captions


def load_coco_captions(
    annotation_file: str | Path, image_dir: str | Path, check_images: bool = True
) -> list[CaptionRecord]:
    """Load a COCO captions file (``captions_*.json``) through pycocotools.

    Images without a caption are left out with a warning (COCO test-style files may have none);
    an ``images`` entry repeated exactly is counted once (a warning), an id given to two files
    is refused. The order of the records follows the ``images`` list, so it is stable across
    runs.
    """
    from pycocotools.coco import COCO

    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    data = read_json(annotation_file)
    if not isinstance(data, dict):
        raise UserError(f"{annotation_file}: not a COCO captions file (top level is not an object)")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{annotation_file}: not a COCO captions file (no '{key}' list)")
    for i, img in enumerate(data["images"]):
        if (
            not isinstance(img, dict)
            or "id" not in img
            or not isinstance(img.get("file_name"), str)
        ):
            raise UserError(f"{annotation_file}: images[{i}] needs an 'id' and a 'file_name'")
        if not _is_int(img["id"]):
            raise UserError(f"{annotation_file}: images[{i}] has a non-integer 'id' {img['id']!r}")
    image_ids = {img["id"] for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise UserError(f"{annotation_file}: {where} has no 'image_id'")
        _check_caption(annotation_file, f"{where} (image {ann['image_id']})", ann.get("caption"))
        if not _is_int(ann["image_id"]) or ann["image_id"] not in image_ids:
            raise UserError(
                f"{annotation_file}: {where} refers to image_id {ann['image_id']!r} not in 'images'"
            )
        ann.setdefault("id", i + 1)

    coco = COCO()  # build the index from the validated dict; pycocotools prints to stdout
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    file_name = itemgetter("file_name")  # what a repeat must agree on, and what is quoted
    images = _unique_by_id(annotation_file, data["images"], itemgetter("id"), file_name, file_name)
    records, uncaptioned = [], []
    for img in images:
        anns = coco.imgToAnns.get(img["id"], [])
        if anns:
            captions = [a["caption"] for a in anns]
            records.append(CaptionRecord(int(img["id"]), image_dir / img["file_name"], captions))
        else:
            uncaptioned.append(img["id"])
    if uncaptioned and records:
        log.warning(
            "%s: %d image%s without a caption left out: %s",
            annotation_file,
            len(uncaptioned),
            "" if len(uncaptioned) == 1 else "s",
            _few(uncaptioned),
        )
    if not records:
        raise UserError(f"{annotation_file}: contains no captioned images")
    if check_images:
        _check_images_exist(records, annotation_file)
    return records


# ---------------------------------------------------------------------------------------------
# Karpathy's split files


@dataclass(frozen=True)
class KarpathyImage:
    """One entry of a Karpathy split file, checked.

    ``split`` is train/val/test, or restval mapped by :func:`read_karpathy`'s ``restval``;
    ``sentences`` holds each sentence's ``raw`` text (its ``tokens`` joined where it has none),
    as written: it may be empty, and a sentence may tokenize to nothing.
    """

    index: int  # position in the file's 'images' list, for messages
    image_id: int  # 'cocoid' (COCO), else 'imgid' (Flickr), else the index
    split: str
    filepath: str  # '' for Flickr, e.g. 'val2014' for COCO
    filename: str
    sentences: list[str]

    @property
    def file_name(self) -> str:
        """``filepath/filename``: the image's path relative to the images root."""
        return posixpath.join(self.filepath, self.filename) if self.filepath else self.filename


def read_karpathy(path: str | Path, restval: str = "restval") -> list[KarpathyImage]:
    """Every entry of Karpathy's ``dataset_*.json``, in file order; ``restval`` entries get the
    split ``restval`` (``"train"``: they join the training split)."""
    path = Path(path)
    data = read_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: not a Karpathy split file (no 'images' list)")
    entries = []
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str):
            raise UserError(f"{where} has no 'filename'")
        split = img.get("split")
        if split not in (*SPLITS, "restval"):
            raise UserError(f"{where} has split {split!r}, not train/val/test/restval")
        filepath = img.get("filepath")
        filepath = "" if filepath is None else filepath
        image_id = img.get("cocoid", img.get("imgid", i))
        if not isinstance(filepath, str) or not _is_int(image_id):
            raise UserError(f"{where} needs an integer 'cocoid'/'imgid' and a string 'filepath'")
        entry = KarpathyImage(
            i, image_id, restval if split == "restval" else split, filepath, img["filename"], []
        )
        sentences = img.get("sentences")
        if not isinstance(sentences, list):
            raise UserError(f"{where} ({entry.file_name}) has no 'sentences' list")
        for sent in sentences:
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if raw is None and isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                raw = " ".join(map(str, sent["tokens"]))
            if not isinstance(raw, str):
                raise UserError(
                    f"{where} ({entry.file_name}) has a sentence without 'raw' or 'tokens'"
                )
            entry.sentences.append(raw)
        entries.append(entry)
    return entries


def load_karpathy_split(
    split_file: str | Path,
    image_root: str | Path,
    split: str,
    restval_in_train: bool = True,
    check_images: bool = True,
) -> list[CaptionRecord]:
    """Load one split of Karpathy's ``dataset_{coco,flickr8k,flickr30k}.json``.

    Image paths are ``image_root / filepath / filename`` (Flickr files have no ``filepath``).
    ``restval`` images (COCO) join the training split when ``restval_in_train``. An entry
    repeated exactly in the split is counted once (a warning); an id given to two different
    entries is refused.
    """
    split_file, image_root = Path(split_file), Path(image_root)
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    entries = read_karpathy(split_file, restval="train" if restval_in_train else "restval")
    entries = [e for e in entries if e.split == split]
    records = []
    for entry in _unique_by_id(
        split_file,
        entries,
        attrgetter("image_id"),
        attrgetter("file_name", "sentences"),
        attrgetter("file_name"),
    ):
        where = f"images[{entry.index}]"
        if not entry.sentences:
            raise UserError(f"{split_file}: {where} ({entry.filename}) has no 'sentences'")
        captions = [
            _check_caption(split_file, f"{where}.sentences[{j}]", raw)
            for j, raw in enumerate(entry.sentences)
        ]
        records.append(CaptionRecord(entry.image_id, image_root / entry.file_name, captions))
    if not records:
        raise UserError(f"{split_file}: no images in split {split!r}")
    if check_images:
        _check_images_exist(records, split_file)
    return records
