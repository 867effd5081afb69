"""Downloading and unpacking zip archives over HTTP(S), resumably and verifiably.

Each archive is streamed into ``DIR/NAME.part`` with a progress bar and resumed with an HTTP
``Range`` request when a ``.part`` is there (a server that ignores ``Range`` makes it start over
cleanly). The received size is checked against ``Content-Length``/``Content-Range`` and against a
size or SHA-256 given by the caller; where none is known, the integrity check is the CRC-32 of
every zip member, verified while unpacking, and the caller's check of what was unpacked (the
members a release must hold). The SHA-256 of each download is logged and kept in
``NAME.sha256`` beside it and in its stamp file. Unpacking goes to a hidden staging directory that
is moved into place only once every member has been read and verified; a stamp file
``NAME.done`` marks an archive as unpacked (:func:`fetch_archive`), so a re-run skips it and a
crash never leaves a partial directory that looks complete.

Torch-free and standard library only (plus tqdm for the progress bars).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner import __version__
from captioner.errors import UserError
from captioner.files import atomic_write

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One zip to download and unpack.

    ``select`` maps a member name to its path under the output directory (None: skip it);
    ``size``/``sha256`` are checked when given; ``check`` is called with the staging directory
    once every selected member is unpacked there, and returns what is wrong with them (the
    archive is then refused) or None.
    """

    url: str
    select: Callable[[str], str | None] | None = None
    size: int | None = None
    sha256: str | None = None
    check: Callable[[Path], str | None] | None = None

    @property
    def name(self) -> str:
        name = posixpath.basename(urllib.parse.urlparse(self.url).path)
        if not name:
            raise UserError(f"{self.url}: URL does not name a file")
        return name


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> (START, TOTAL); None where unknown."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _sha256_of(path: Path, h: Any = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h


def _open(url: str, offset: int, timeout: float) -> Any:
    headers = {"User-Agent": f"captioner/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return exc  # the caller looks at Content-Range
        raise UserError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise UserError(f"{url}: cannot download ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise UserError(f"{url}: cannot download ({exc})") from None


def download(
    archive: Archive,
    dest_dir: str | Path,
    timeout: float = 60.0,
    progress: bool = True,
) -> tuple[Path, str]:
    """Download ``archive`` into ``dest_dir`` (resuming ``NAME.part``); returns (path, sha256).

    An interrupted transfer keeps the ``.part`` (run again to resume); a size or checksum
    mismatch deletes it. A finished ``dest_dir/NAME`` is reused as it is.
    """
    dest_dir, url = Path(dest_dir), archive.url
    final = dest_dir / archive.name
    digest_file = final.with_name(final.name + ".sha256")
    if final.is_file():
        log.info("%s: already downloaded", final)
        if digest_file.is_file():
            return final, digest_file.read_text().split()[0]
        return final, _sha256_of(final).hexdigest()
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0

    resp = _open(url, offset, timeout)
    with resp:
        offset, total = _resume_point(resp, url, offset)
        # 416: the .part is complete already, or longer than the file
        if resp.status == 416 and total != offset:
            log.warning("%s: does not match %s; downloading it again", part, url)
            part.unlink()
            return download(archive, dest_dir, timeout, progress)
        h = _sha256_of(part) if offset else hashlib.sha256()
        received = offset
        if resp.status != 416:
            received = _receive(resp, part, offset, total, h, archive.name, progress, url)

    sha256 = h.hexdigest()
    _verify(archive, part, received, total, sha256)
    os.replace(part, final)
    atomic_write(digest_file, f"{sha256}  {final.name}\n")
    log.info("%s: %d bytes, SHA-256 %s", final, received, sha256)
    return final, sha256


def _resume_point(resp: Any, url: str, offset: int) -> tuple[int, int | None]:
    """(where the response's bytes start, the file's total size or None) for a request of the
    bytes from ``offset``: a 206 must start there, any other answer restarts from 0 (a 416 means
    the ``.part`` is complete when its size is the total: the caller checks)."""
    if resp.status == 416:
        return offset, _content_range(resp.headers.get("Content-Range"))[1]
    if resp.status == 206:
        start, total = _content_range(resp.headers.get("Content-Range"))
        if start != offset:
            raise UserError(f"{url}: server answered bytes from {start}, asked from {offset}")
        log.info("%s: resuming at byte %d", url, offset)
        return offset, total
    if offset:
        log.warning("%s: the server ignored the resume request; starting over", url)
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _receive(
    resp: Any,
    part: Path,
    offset: int,
    total: int | None,
    h: Any,
    desc: str,
    progress: bool,
    url: str,
) -> int:
    """Append the response's bytes to ``part`` (rewritten when ``offset`` is 0) and to the hash
    ``h``, with a progress bar; returns the size of ``part``. A broken transfer keeps it."""
    from tqdm import tqdm

    received = offset
    bar = tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=None if progress else True,
    )
    try:
        with bar, open(part, "ab" if offset else "wb") as f:
            while block := resp.read(CHUNK):
                f.write(block)
                h.update(block)
                received += len(block)
                bar.update(len(block))
    except (OSError, http.client.HTTPException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UserError(
            f"{url}: download interrupted at byte {received} of {total or '?'} ({reason}); "
            f"run the same command again to resume from {part}"
        ) from None
    return received


def _verify(archive: Archive, part: Path, received: int, total: int | None, sha256: str) -> None:
    """Check the received size against the server's and the archive's size, and the SHA-256:
    a short file is kept to resume; any other mismatch deletes it."""
    url = archive.url

    def reject(why: str) -> UserError:
        part.unlink(missing_ok=True)
        return UserError(f"{url}: {why}; the download was deleted, run again to fetch it afresh")

    if total is not None and received < total:
        raise UserError(
            f"{url}: download interrupted at byte {received} of {total} (connection closed); "
            f"run the same command again to resume from {part}"
        )
    if total is not None and received > total:
        raise reject(f"received {received} bytes, the server announced {total}")
    if archive.size is not None and received != archive.size:
        raise reject(f"size is {received} bytes, expected {archive.size}")
    if archive.sha256 is not None and sha256 != archive.sha256.lower():
        raise reject(f"SHA-256 is {sha256}, expected {archive.sha256.lower()}")


class _Refused(Exception):
    """Why an archive is not unpacked (it is deleted: a re-run fetches it again)."""


def _safe_relpath(member: str) -> Path:
    parts = Path(member.replace("\\", "/")).parts
    if not parts or Path(member).is_absolute() or ".." in parts or member.startswith("/"):
        raise _Refused(f"refusing to unpack the unsafe member name {member!r}")
    return Path(*parts)


def _extract(
    archive_file: Path,
    staging: Path,
    select: Callable[[str], str | None] | None,
    progress: bool,
) -> None:
    """Write the selected members into ``staging``, checking each one's CRC as it is read."""
    from tqdm import tqdm

    with zipfile.ZipFile(archive_file) as zf:
        chosen = []
        for info in zf.infolist():
            dest = select(info.filename) if select else info.filename
            if dest is not None and not info.is_dir():
                chosen.append((info, _safe_relpath(dest)))
        if not chosen:
            raise _Refused("holds none of the expected files")
        for info, dest in tqdm(
            chosen,
            unit="file",
            desc=f"unpacking {archive_file.name}",
            disable=None if progress else True,
        ):
            target = staging / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)


def unpack(
    archive_file: str | Path,
    out: str | Path,
    select: Callable[[str], str | None] | None = None,
    progress: bool = True,
    check: Callable[[Path], str | None] | None = None,
) -> list[Path]:
    """Unpack the (selected) members of a zip into ``out``; returns the top-level paths.

    Members go to a staging directory first (every CRC is checked as it is read, then ``check``
    looks at what was unpacked) and are moved into ``out`` only when all of them are there. An
    archive that is corrupt, unsafe or refused by ``check`` is deleted, ``out`` untouched.
    """
    archive_file, out = Path(archive_file), Path(out)
    staging = out / f".{archive_file.name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    why = None
    try:
        _extract(archive_file, staging, select, progress)
        problem = check(staging) if check is not None else None
        if problem:
            why = f"not the expected archive: {problem}; deleted it"
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        why = f"corrupt zip archive ({exc}); deleted it, run again to download it afresh"
    except _Refused as exc:
        why = f"{exc}; deleted it"
    if why is not None:
        shutil.rmtree(staging, ignore_errors=True)
        archive_file.unlink(missing_ok=True)
        archive_file.with_name(archive_file.name + ".sha256").unlink(missing_ok=True)
        raise UserError(f"{archive_file}: {why}")
    tops = sorted(staging.iterdir())
    for top in tops:
        _move_into(top, out / top.name)
    shutil.rmtree(staging)
    return [out / top.name for top in tops]


def _move_into(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``: one rename when ``dst`` is absent, else merge file by file."""
    if not dst.exists():
        os.replace(src, dst)
    elif src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _move_into(child, dst / child.name)
    else:
        if dst.is_dir():
            raise UserError(f"{dst}: is a directory, the archive has a file of that name")
        os.replace(src, dst)


def fetch_archive(
    archive: Archive,
    out: str | Path,
    downloads: str | Path,
    *,
    keep_archive: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``archive`` into ``downloads`` and unpack it into ``out``, once; returns its
    stamp ``downloads/NAME.done`` (url, bytes, SHA-256, unpacked top-level names).

    An archive whose stamp exists is skipped, unless what it unpacked is gone from ``out``. The
    zip is deleted after unpacking unless ``keep_archive``.
    """
    out, downloads = Path(out), Path(downloads)
    stamp = downloads / f"{archive.name}.done"
    if stamp.is_file() and _unpacked_still_there(stamp, out):
        log.info("%s: already unpacked (%s)", archive.name, stamp)
        return stamp
    path, sha256 = download(archive, downloads, timeout, progress)
    tops = unpack(path, out, archive.select, progress, archive.check)
    record = {
        "url": archive.url,
        "bytes": path.stat().st_size,
        "sha256": sha256,
        "unpacked": [p.name for p in tops],
    }
    atomic_write(stamp, json.dumps(record, indent=1) + "\n")
    if not keep_archive:
        path.unlink()
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    log.info("%s: unpacked into %s", archive.name, out)
    return stamp


def _unpacked_still_there(stamp: Path, out: Path) -> bool:
    """Whether the top-level paths a stamp records are all in ``out`` (else: fetch again)."""
    try:
        unpacked = json.loads(stamp.read_text(encoding="utf-8"))["unpacked"]
        missing = [name for name in unpacked if not (out / name).exists()]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: unreadable stamp; fetching the archive again", stamp)
        return False
    if missing:
        log.warning("%s: %s is gone; fetching the archive again", stamp, out / missing[0])
    return not missing
