"""Reading the caption releases that ``captioner prepare`` converts: Flickr token files
(``IMAGE#N<TAB>caption``), image lists (one file name per line) and Karpathy's split files.

Captions are cleaned as they are read, never silently: whitespace runs are collapsed (case is
kept: the tokenizer lower-cases later), captions that tokenize identically for one image are kept
once, an image listed twice in one split counts once; :attr:`Captions.stats` counts what went.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from captioner.datasets.annotations import read_karpathy
from captioner.errors import UserError
from captioner.files import read_text
from captioner.vocab import tokenize


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
