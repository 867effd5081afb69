"""Text handling: the one tokenizer and the vocabulary.

``tokenize`` is used for everything that touches words: building the vocabulary, encoding
training targets, BLEU references and hypotheses, and what is printed. It follows the Penn
Treebank conventions that the official COCO caption evaluation uses (lower case, clitics such as
``'s`` and ``n't`` split off, punctuation dropped) and needs no NLTK data download.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioner.errors import UserError
from captioner.files import atomic_write

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, START, END, UNK)

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "`": "'"})
_NEGATION = re.compile(r"n't\b")
# A word is a run of letters/digits, optionally joined by inner hyphens, dots or ampersands
# ("t-shirt", "3.5", "u.s", "at&t"); clitics are tokens of their own; everything else
# (punctuation) is dropped, as coco-caption's PTBTokenizer does.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-.&][^\W_]+)*")
# Lower-case letters, digits, spaces and commas, then at most a full stop and spaces: no
# quote (so no clitic), no joiner between two word characters (the one stop has none after
# it), so its tokens are its runs of letters and digits, which str.split finds far faster.
_PLAIN = re.compile(r"[a-z0-9 ,]*\.?[ ]*")


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case PTB-style word tokens without punctuation.

    >>> tokenize("A dog's ball, isn't it?")
    ['a', 'dog', "'s", 'ball', 'is', "n't", 'it']
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize() expects a str, got {type(text).__name__}")
    text = text.lower()
    if _PLAIN.fullmatch(text):  # most captions: the same tokens, about twice as fast
        return text.replace(",", " ").replace(".", " ").split()
    return _pattern_tokens(text)


def _pattern_tokens(lowered: str) -> list[str]:
    """:func:`tokenize` of a lower-case text, by the token pattern."""
    return _TOKEN.findall(_NEGATION.sub(" n't", lowered.translate(_QUOTES)))


_WORD_CHAR = re.compile(r"[^\W_]")


def has_words(text: str) -> bool:
    """Whether ``tokenize(text)`` is non-empty, without tokenizing: every token holds a letter
    or digit and every letter or digit is in a token (a check of every caption read, ten times
    cheaper than tokenizing it).

    >>> has_words(" ... !"), has_words("a.")
    (False, True)
    """
    return _WORD_CHAR.search(text.lower()) is not None


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens for display, re-attaching clitics ("dog 's" -> "dog's")."""
    out: list[str] = []
    for tok in tokens:
        if out and (tok == "n't" or (tok.startswith("'") and len(tok) > 1)):
            out[-1] += tok
        else:
            out.append(tok)
    return " ".join(out)


class Vocab:
    """Index <-> word mapping with the specials ``<pad>=0, <start>=1, <end>=2, <unk>=3``.

    Stored as a plain list of strings (JSON in files, a list inside checkpoints), never pickled.
    """

    def __init__(self, itos: Sequence[str]):
        itos = list(itos)
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise UserError(f"vocabulary must start with {list(SPECIALS)}, got {itos[:4]}")
        if len(set(itos)) != len(itos):
            dup = next(w for w, c in Counter(itos).items() if c > 1)
            raise UserError(f"vocabulary has a duplicated word: {dup!r}")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(itos)}

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    @classmethod
    def build(
        cls, captions: Iterable[str | Sequence[str]], min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Build from TRAINING captions: a word is kept iff it occurs ``>= min_freq`` times.

        Words are ordered by frequency (descending), ties alphabetically, so the result is
        deterministic. ``max_size`` (if given) caps the number of non-special words.
        """
        if min_freq < 1:
            raise UserError(f"min_freq must be >= 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for cap in captions:
            counts.update(tokenize(cap) if isinstance(cap, str) else cap)
        for special in SPECIALS:
            counts.pop(special, None)
        words = sorted(
            (w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w)
        )
        if max_size is not None:
            words = words[:max_size]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"

    def encode(self, caption: str | Sequence[str], add_specials: bool = True) -> list[int]:
        """Caption (text or tokens) -> ids, ``<start> w1 .. wn <end>`` when ``add_specials``."""
        tokens = tokenize(caption) if isinstance(caption, str) else caption
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return [self.start_id, *ids, self.end_id] if add_specials else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> tokens: stops at ``<end>``, drops ``<start>``/``<pad>``; ``<unk>`` is kept."""
        words: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i])
        return words

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        if not isinstance(data, dict) or not isinstance(data.get("itos"), list):
            raise UserError("vocabulary JSON must be an object with an 'itos' list of words")
        return cls(data["itos"])

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read vocabulary JSON ({exc})") from exc
        try:
            return cls.from_dict(data)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from exc
