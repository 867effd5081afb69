"""Files: reading the user's text and JSON (every failure is a one-line :class:`UserError`) and
the ONE atomic write (a temporary file beside the target, fsync, ``os.replace``).

Torch-free on purpose, so that ``captioner prepare`` starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on a clean exit it replaces ``path``.

    The temporary file (``.NAME.XXXX.tmp``, created empty) is fsynced, given ordinary
    permissions (``0o666 & ~umask``: mkstemp's 0600 is wrong for a checkpoint or a dataset file)
    and moved onto ``path`` with ``os.replace``, so a reader sees the old file or the new one,
    never half of one. On an exception it is removed and the exception propagates. The parent
    directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text in ``encoding``, or bytes) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
    return path


def _umask() -> int:
    umask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(umask)
    return umask
