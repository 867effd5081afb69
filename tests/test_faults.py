"""Faults a run must survive: a full or read-only disk (one ``error:`` line naming the file, no
data lost), a write failing at any point of an epoch's end (a resume loses nothing), two runs
sharing one feature cache, and signals while the cache is built or an epoch runs."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.errors import UserError
from captioner.training import runlog, trainer
from captioner.training.runlog import read_metrics
from captioner.training.train import train

FULL = os.strerror(errno.ENOSPC)


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def full_disk_under(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk holding ``root`` is full: statvfs says so, and torch.save, whose writer reports
    a full disk as ``unexpected pos``, fails half way."""
    statvfs = os.statvfs

    def full_statvfs(path):
        real = statvfs(path)
        if not str(Path(path).resolve()).startswith(str(root.resolve())):
            return real
        return os.statvfs_result((*real[:3], 0, 0, *real[5:]))

    def short_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(os, "statvfs", full_statvfs)
    monkeypatch.setattr(torch, "save", short_save)


# ---------------------------------------------------------------------------------------------
# a full or read-only disk


@pytest.mark.slow
def test_training_onto_a_full_disk_is_one_error_line(
    tiny_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "run"
    full_disk_under(run, monkeypatch)
    overrides = tiny_overrides(tiny_demo, tmp_path / "cache", **{"trainer.max_epochs": 1})
    with pytest.raises(SystemExit) as code:
        main(["train", *overrides, f"hydra.run.dir={run}"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {run / 'best.pt'}: cannot write: no space left on device\n" in err
    assert "Traceback" not in err
    assert not list(run.glob("*.pt")) and not list(run.glob(".*.tmp"))


def test_export_onto_a_full_or_read_only_disk_is_one_error_line(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import safetensors.torch

    out = tmp_path / "exported"

    def refuse(*args, **kwargs):  # what safetensors raises on a full disk
        raise safetensors.SafetensorError(f"Error while serializing: {FULL} (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    with pytest.raises(SystemExit) as code:
        main(["export", str(tiny_checkpoint), str(out)])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {out / 'model.safetensors'}: cannot write: no space left on device\n"
    assert not list(out.iterdir())
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro"))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(SystemExit) as code:
        main(["export", str(tiny_checkpoint), str(tmp_path / "ro" / "out")])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'ro' / 'out'}/")
    assert err.endswith(": cannot write: read-only file system\n")


# ---------------------------------------------------------------------------------------------
# a write failing at the end of an epoch loses nothing a resume cannot redo


@pytest.mark.slow
def test_a_failed_metrics_append_keeps_the_epoch(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """last.pt is saved before the epoch's row is appended, and holds the row: the resumed run
    writes it instead of training the epoch again."""
    lost: list[dict] = []
    append = runlog.append_line

    def append_fails_at_epoch_2(path: Path, line: str) -> None:
        if json.loads(line)["epoch"] == 2:
            lost.append(json.loads(line))
            raise UserError(f"{path}: cannot write: {FULL}")
        append(path, line)

    monkeypatch.setattr(runlog, "append_line", append_fails_at_epoch_2)
    with pytest.raises(UserError, match="metrics.jsonl: cannot write"):
        train(make_cfg(), tmp_path / "a")
    monkeypatch.undo()
    first = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["epoch"] for r in first] == [1]
    assert load_checkpoint(tmp_path / "a" / "last.pt")["epoch"] == 2  # the epoch is kept

    train(make_cfg(f"resume={tmp_path / 'a'}", "trainer.max_epochs=3"), tmp_path / "b")
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[:2] == [*first, *lost]
    assert load_checkpoint(tmp_path / "b" / "last.pt")["global_step"] == 9  # epoch 2 not redone


@pytest.mark.slow
def test_a_failed_last_pt_save_is_redone_by_the_resume(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """best.pt was written, last.pt not: the resume redoes the epoch (and best.pt with it) and
    ends as an uninterrupted run."""
    save = trainer.save_checkpoint

    def last_pt_fails_at_epoch_2(payload: dict, path: Path) -> Path:
        if Path(path).name == "last.pt" and payload["epoch"] == 2:
            raise UserError(f"{path}: cannot write: {FULL}")
        return save(payload, path)

    monkeypatch.setattr(trainer, "save_checkpoint", last_pt_fails_at_epoch_2)
    with pytest.raises(UserError, match="last.pt: cannot write"):
        train(make_cfg(), tmp_path / "a")
    monkeypatch.undo()
    assert [r["epoch"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")] == [1]
    train(make_cfg(f"resume={tmp_path / 'a'}"), tmp_path / "b")
    train(make_cfg(), tmp_path / "ref")
    got, want = (load_checkpoint(tmp_path / d / "last.pt") for d in ("b", "ref"))
    assert got["global_step"] == want["global_step"] == 6
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    rows = [without_time(read_metrics(tmp_path / d / "metrics.jsonl")) for d in ("b", "ref")]
    assert rows[0] == rows[1]
