"""The one atomic write: the old file or the new one, never half of one; nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from captioner.files import atomic_path, atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_path_replaces_content_only_on_exit(tmp_path: Path) -> None:
    target = tmp_path / "data.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".data.json.")
        assert tmp.name.endswith(".tmp") and tmp.is_file()
        tmp.write_text("new")
        assert target.read_text() == "old"  # a reader meanwhile sees the old file
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_atomic_write_text_bytes_and_parent_dir(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "vocab.json"
    assert atomic_write(target, "café") == target
    assert target.read_bytes() == "café".encode()
    atomic_write(target, "café", encoding="latin-1")
    assert target.read_bytes() == b"caf\xe9"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["vocab.json"]


def test_atomic_file_has_ordinary_permissions(tmp_path: Path, umask_022: None) -> None:
    target = atomic_write(tmp_path / "best.pt", b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    os.umask(0o077)
    atomic_write(target, b"y")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"complete checkpoint")
    with pytest.raises(type(exc)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a")
        raise exc
    assert target.read_bytes() == b"complete checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failure_after_the_temp_file_was_removed_still_propagates(tmp_path: Path) -> None:
    target = tmp_path / "features.npy"
    with pytest.raises(ValueError, match="no features"), atomic_path(target) as tmp:
        tmp.unlink()
        raise ValueError("no features")
    assert not list(tmp_path.iterdir())
