"""Files: reading the user's text and JSON (every failure is a one-line :class:`UserError`) and
the ONE atomic write (a temporary file beside the target, fsync, ``os.replace``), and the one
durable append. A write the disk refuses (full, over quota, read-only) is a one-line
:class:`UserError` naming the file and why, whichever library did the writing.

Torch-free on purpose, so that ``captioner prepare`` starts fast.
"""

from __future__ import annotations

import contextlib
import errno
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
    never half of one. On an exception it is removed and the exception propagates, as a
    :class:`UserError` when the disk refused the write (:func:`write_fault`). The parent
    directory is created if needed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_fault(path, exc) or exc from exc
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
    except Exception as exc:
        fault = write_fault(path, exc)  # asked before the temporary file frees its room
        tmp.unlink(missing_ok=True)
        if fault is not None:
            raise fault from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text in ``encoding``, or bytes) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
    return path


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` and fsync it (a record a crash must not lose);
    a refused write is a :class:`UserError` (:func:`write_fault`)."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise write_fault(path, exc) or exc from exc


# what the disk answers when it refuses a write; os.strerror's words are searched for in the
# messages of libraries that report it in their own (safetensors quotes them)
_REFUSALS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
_ROOM = 1 << 20  # bytes: a disk with less free than this is full for any file worth writing


def write_fault(path: Path, exc: BaseException) -> UserError | None:
    """The one-line error for a write to ``path`` that the disk refused, or None when ``exc``
    is something else (a bug keeps its traceback; a :class:`UserError` is already its own line).

    The cause is found in ``exc`` or what it chains: an ``OSError``'s errno, else the OS's
    words in a message; else the disk is asked (no room left, mounted read-only), since torch's
    writer reports a full disk as ``unexpected pos`` only."""
    if isinstance(exc, UserError):
        return None
    reason = None
    seen: BaseException | None = exc
    while seen is not None and reason is None:
        if isinstance(seen, OSError) and seen.errno in _REFUSALS:
            reason = _REFUSALS[seen.errno]
        else:
            text = str(seen).lower()
            reason = next((r for e, r in _REFUSALS.items() if os.strerror(e).lower() in text), None)
        seen = seen.__cause__ or seen.__context__
    if reason is None:
        reason = _disk_refusal(path.parent)
    if reason is None:
        return None
    kept = f"; the existing {path.name} is unchanged" if path.is_file() else ""
    return UserError(f"{path}: cannot write: {reason}{kept}")


def _disk_refusal(directory: Path) -> str | None:
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    try:
        disk = os.statvfs(directory)
    except OSError:
        return None
    if disk.f_flag & os.ST_RDONLY:
        return _REFUSALS[errno.EROFS]
    if disk.f_bavail * disk.f_frsize < _ROOM:
        return _REFUSALS[errno.ENOSPC]
    return None


def _umask() -> int:
    umask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(umask)
    return umask
