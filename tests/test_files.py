"""The one atomic write: the old file or the new one, never half of one; nothing left behind."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from captioner.errors import UserError
from captioner.files import append_line, atomic_path, atomic_write


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


# ---------------------------------------------------------------------------------------------
# a full or read-only disk: one line naming the file and why, the old file kept


def fake_statvfs(free_blocks: int, read_only: bool = False):
    flag = os.ST_RDONLY if read_only else 0
    return lambda _: os.statvfs_result(
        (4096, 4096, 1000, free_blocks, free_blocks, 10, 5, 5, flag, 255)
    )


@pytest.mark.parametrize(
    ("err", "words"),
    [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system")],
)
def test_a_full_or_read_only_disk_is_one_line_naming_the_file(
    tmp_path: Path, err: int, words: str
) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"complete checkpoint")
    with pytest.raises(UserError) as info, atomic_path(target) as tmp:
        tmp.write_bytes(b"half a")
        raise OSError(err, os.strerror(err))
    assert str(info.value).startswith(f"{target}: cannot write: {words}")
    assert "last.pt is unchanged" in str(info.value)
    assert target.read_bytes() == b"complete checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_read_only_mount_refuses_the_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match=r"model\.safetensors: cannot write: read-only"):
        atomic_write(tmp_path / "model.safetensors", b"x")


def test_torch_running_out_of_room_is_named_from_the_disk_s_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save reports a full disk as ``unexpected pos``, safetensors in its own words: the
    disk itself is asked why the write failed."""
    target = tmp_path / "last.pt"
    unexpected = RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    )

    def fails(exc: Exception) -> None:
        with atomic_path(target):
            raise exc

    monkeypatch.setattr(os, "statvfs", fake_statvfs(free_blocks=0))
    with pytest.raises(UserError, match="last.pt: cannot write: no space left on device"):
        fails(unexpected)
    monkeypatch.setattr(os, "statvfs", fake_statvfs(free_blocks=10**6, read_only=True))
    with pytest.raises(UserError, match="last.pt: cannot write: read-only file system"):
        fails(unexpected)
    monkeypatch.setattr(os, "statvfs", fake_statvfs(free_blocks=10**6))
    with pytest.raises(UserError, match="cannot write: no space left on device"):
        # safetensors' SafetensorError quotes the OS's words
        fails(ValueError("Error while serializing: No space left on device (os error 28)"))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room left: not the disk's fault
        fails(unexpected)
    assert not list(tmp_path.iterdir())


def test_append_line_is_durable_and_names_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"epoch": 1}')
    append_line(path, '{"epoch": 2}')
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="metrics.jsonl: cannot write: no space left on device"):
        append_line(path, '{"epoch": 3}')
