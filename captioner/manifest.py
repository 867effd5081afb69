"""An exported folder's ``config.json`` (its manifest), read with every field checked:
:func:`read_manifest` -> :class:`Manifest`.

Folders come from other people (the Hugging Face Hub), so nothing in the file is trusted: a wrong
type, a value out of range or an unknown name is one :class:`~captioner.errors.UserError` naming
the file and the field, before any weights are read, never a traceback at load time or a 500 for
every request a server answers. The model, preprocessing and decoding fields are checked by their
own configs (:class:`~captioner.configs.model.ModelConfig`,
:class:`~captioner.configs.preprocessing.Preprocessing`,
:class:`~captioner.configs.decode.DecodeConfig`); the rest here.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.configs.decode import DecodeConfig
from captioner.configs.model import ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.errors import UserError, first_line
from captioner.files import read_json

FORMAT_NAME = "captioner-pretrained"
FORMAT_VERSION = 1
CONFIG = "config.json"
DTYPES = ("float32", "float16")
# the finest attention grid a folder may ask for, per side (those in use are 7 to 14): the grid is
# no weight's shape, and one of 10^4 would make every image's features gigabytes
MAX_GRID = 64
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Manifest:
    """A checked ``config.json``."""

    vocab_size: int
    model: ModelConfig
    preprocessing: Preprocessing
    decoding: DecodeConfig
    dtype: str = "float32"
    vocab_sha256: str | None = None  # absent in a hand-made folder: then unchecked
    scores: dict[str, float] = field(default_factory=dict)
    trained_on: dict[str, Scalar] = field(default_factory=dict)


def read_manifest(folder: Path) -> Manifest:
    """``folder/config.json``, checked for the format this captioner reads and field by field."""
    path = folder / CONFIG
    raw = read_json(path, "exported model config")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise UserError(f'{path}: not a captioner model config (no "format": "{FORMAT_NAME}")')
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = (
            "written by a newer captioner: upgrade captioner"
            if newer
            else "re-export it with this captioner's `captioner export`"
        )
        raise UserError(
            f"{path}: format version {version!r}, this captioner reads version "
            f"{FORMAT_VERSION} ({hint})"
        )
    for key in ("vocab_size", "model", "preprocessing", "decoding"):
        if key not in raw:
            raise UserError(f"{path}: missing '{key}'")
    try:
        return _checked(raw)
    except UserError as exc:
        raise UserError(f"{path}: {first_line(exc)}") from exc


def _checked(raw: dict[str, Any]) -> Manifest:
    """The fields of ``raw``, each checked (a UserError naming the field)."""
    _check(raw.get("captioner_version"), "captioner_version", "a version string", str, None)
    size = raw["vocab_size"]
    if not _is_int(size) or size < 1:  # vocab.json's own check names the missing specials
        raise UserError(f"vocab_size must be an integer >= 1, got {_shown(size)}")
    digest = raw.get("vocab_sha256")
    if digest is not None and not (isinstance(digest, str) and _SHA256.match(digest)):
        raise UserError(f"vocab_sha256 must be 64 lowercase hex digits, got {_shown(digest)}")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {_shown(dtype)}")
    for key in ("model", "preprocessing", "decoding"):
        _check(raw[key], key, "an object", dict)
    try:
        model = ModelConfig.from_dict(raw["model"])
        preprocessing = Preprocessing.from_dict(raw["preprocessing"])
    except (TypeError, ValueError, AttributeError) as exc:  # a wrong type deep inside
        raise UserError(first_line(exc)) from exc
    decoding = DecodeConfig.from_dict(raw["decoding"], "decoding")
    grid = model.encoder.grid
    if grid is not None and grid > MAX_GRID:  # not a weight's shape: the build cannot check it
        raise UserError(
            f"model.encoder.grid must be at most {MAX_GRID} (an attention grid of {MAX_GRID} x "
            f"{MAX_GRID} positions), got {grid}"
        )
    return Manifest(
        vocab_size=size,
        model=model,
        preprocessing=preprocessing,
        decoding=decoding,
        dtype=dtype,
        vocab_sha256=digest,
        scores=_scores(raw.get("scores")),
        trained_on=_trained_on(raw.get("trained_on")),
    )


def sized_fields(model: ModelConfig, want: tuple[int, ...], got: tuple[int, ...]) -> str:
    """The decoder's size fields whose value (or a small multiple: a gated cell's stacked
    gates) is a dimension of the shape ``want`` where the weights' ``got`` differs, as an error
    names them: " (model.decoder.hidden_size=1000000)", or "" when none is."""
    differing = [w for w, g in itertools.zip_longest(want, got) if w is not None and w != g]
    dec = model.decoder
    named = [
        f"model.decoder.{name}={value}"
        for name, value in [
            (n, getattr(dec, n)) for n in ("hidden_size", "embed_dim", "attention_dim")
        ]
        if any(d in (value, 2 * value, 3 * value, 4 * value) for d in differing)
    ]
    return f" ({', '.join(named)})" if named else ""


def _scores(node: Any) -> dict[str, float]:
    """``scores``: metric name -> a finite number."""
    _check(node, "scores", "an object of metric: number", dict, None)
    out = {}
    for name, value in (node or {}).items():
        if not _is_number(value):
            raise UserError(f"scores.{name} must be a finite number, got {_shown(value)}")
        out[name] = float(value)
    return out


def _trained_on(node: Any) -> dict[str, Scalar]:
    """``trained_on``: a name -> a string, number, true/false or null (dataset, epoch ...)."""
    _check(node, "trained_on", "an object", dict, None)
    for name, value in (node or {}).items():
        if not (value is None or isinstance(value, str | bool) or _is_number(value)):
            raise UserError(
                f"trained_on.{name} must be a string, number, true/false or null, got {_shown(value)}"
            )
    return dict(node or {})


def _check(value: Any, name: str, what: str, *kinds: type | None) -> None:
    """``value`` is of one of ``kinds`` (None: null or absent is fine), else a UserError."""
    if value is None and None in kinds:
        return
    if not isinstance(value, tuple(k for k in kinds if k is not None)):
        raise UserError(f"{name} must be {what}, got {_shown(value)}")


def _shown(value: Any) -> str:
    """``value`` as an error quotes it: its repr, cut short (a field may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if _is_int(value):
        return abs(value) <= 2**53  # as a float exactly (a longer integer would overflow it)
    return isinstance(value, float) and math.isfinite(value)
