"""Reading the user's text and JSON files: every failure is a one-line :class:`UserError`.

Torch-free on purpose, so that ``captioner prepare`` starts fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captioner.errors import UserError


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file (a BOM is dropped); ``what`` names the file's role in messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:  # e.g. permission denied
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what} is not valid UTF-8 text (byte {exc.start})") from exc


def read_json(path: str | Path, what: str = "annotation file") -> Any:
    """A UTF-8 JSON file, parsed."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
