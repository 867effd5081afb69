"""Faults a run must survive: a full or read-only disk (one ``error:`` line naming the file, no
data lost), a write failing at any point of an epoch's end (a resume loses nothing), two runs
sharing one feature cache, and signals while the cache is built or an epoch runs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.errors import UserError
from captioner.training import runlog, trainer, validation
from captioner.training.runlog import read_metrics
from captioner.training.train import TrainingInterrupted, train

FULL = os.strerror(errno.ENOSPC)
SCHEDULE = ["scheduler=cosine", "scheduler.T_max=3"]  # not tied to trainer.max_epochs


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
        train(make_cfg(*SCHEDULE), tmp_path / "a")
    monkeypatch.undo()
    first = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["epoch"] for r in first] == [1]
    assert load_checkpoint(tmp_path / "a" / "last.pt")["epoch"] == 2  # the epoch is kept

    train(make_cfg(f"resume={tmp_path / 'a'}", "trainer.max_epochs=3", *SCHEDULE), tmp_path / "b")
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


# ---------------------------------------------------------------------------------------------
# two processes sharing one feature cache

CACHE_BUILDER = """
import json, sys, time
from pathlib import Path
import torch
from torch import nn
from captioner.configs.preprocessing import Preprocessing
from captioner.features import build_feature_cache
from captioner.models.encoders import Encoder

images, root, marker, ready, wait = Path(sys.argv[1]), sys.argv[2], *map(Path, sys.argv[3:])
ready.touch()  # imported
while not wait.exists():  # the first: until the second is ready; the second: the first computes
    time.sleep(0.02)
calls = []

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        calls.append(len(x))
        marker.touch()
        time.sleep(0.15)
        return self.conv(x).mean((2, 3))

paths = sorted(images.glob("*.png"))
cache = build_feature_cache(Encoder(Slow(), 4), Preprocessing(resize=8, crop=8), paths, root,
                            batch_size=1)
print(json.dumps({"calls": len(calls), "sum": float(torch.stack([cache[i] for i in range(len(cache))]).sum())}))
"""


def small_images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (20 * i % 256, 90, 200)).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.slow
def test_two_processes_share_a_feature_cache(tmp_path: Path) -> None:
    """The second builder waits for the first (which it must not disturb) and reuses its cache."""
    images, root = small_images(tmp_path / "images", 12), tmp_path / "cache"

    def builder(computing: str, ready: str, wait_for: str) -> subprocess.Popen:
        args = [sys.executable, "-c", CACHE_BUILDER, str(images), str(root)]
        args += [str(tmp_path / name) for name in (computing, ready, wait_for)]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = builder("first_computes", "first_ready", "second_ready")
    second = builder("second_computes", "second_ready", "first_computes")
    try:
        out = [p.communicate(timeout=60) for p in (first, second)]
    finally:
        first.kill()
        second.kill()
    assert [p.returncode for p in (first, second)] == [0, 0], out
    results = [json.loads(o.splitlines()[-1]) for o, _ in out]
    assert [r["calls"] for r in results] == [12, 0]  # the second one reused the first's work
    assert results[0]["sum"] == results[1]["sum"]
    (entry,) = [d for d in root.iterdir() if d.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == [
        ".lock", "features.npy", "meta.json", "valid.npy"
    ]  # fmt: skip


def test_a_dead_builder_s_temporary_files_are_removed(tmp_path: Path) -> None:
    """A temporary file nobody holds the lock for is stale: the next build removes it."""
    from torch import nn

    from captioner.configs.preprocessing import Preprocessing
    from captioner.features import build_feature_cache
    from captioner.models.encoders import Encoder

    images = sorted(small_images(tmp_path / "images", 2).glob("*.png"))
    encoder = Encoder(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1)), 4)
    pre = Preprocessing(resize=8, crop=8)
    cache = build_feature_cache(encoder, pre, images, tmp_path / "cache")
    (cache.directory / "meta.json").unlink()  # as if killed before it was complete
    for name in (".features.npy.dead1.tmp", ".valid.npy.dead2.tmp"):
        (cache.directory / name).write_bytes(b"half")
    build_feature_cache(encoder, pre, images, tmp_path / "cache")
    assert not list(cache.directory.glob("*.tmp")) and (cache.directory / "meta.json").is_file()


# ---------------------------------------------------------------------------------------------
# signals: a stop within a batch or two, wherever the run is; a second signal exits at once

SLOW_TRAIN = """
import sys, time
from pathlib import Path
from captioner.models.encoders import Encoder

marker, delay = Path(sys.argv[1]), float(sys.argv[2])
forward = Encoder.forward

def slow(self, images):  # each batch through the CNN takes `delay` seconds
    marker.touch()
    time.sleep(delay)
    return forward(self, images)

Encoder.forward = slow
from captioner.cli import main
main(sys.argv[3:])
"""


def start_slow_run(tmp_path: Path, tiny_demo: Path, delay: float, **extra: object):
    """``captioner train`` in its own session, each encoder batch taking ``delay`` seconds;
    returns once the encoder runs (-> the process, its run directory, its stderr file)."""
    run, marker = tmp_path / "run", tmp_path / "encoding"
    overrides = tiny_overrides(tiny_demo, tmp_path / "cache", **extra)
    err = open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115 - the caller reads it
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, str(marker), str(delay), "train", *overrides,
         "trainer.max_epochs=1", f"hydra.run.dir={run}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err.seek(0)
            pytest.fail(f"the run did not start: {err.read()[-2000:]}")
        time.sleep(0.05)
    return proc, run, err


def wait_exit(proc: subprocess.Popen, within: float) -> tuple[int, float]:
    start = time.monotonic()
    try:
        code = proc.wait(timeout=within)
    finally:
        proc.kill()
    return code, time.monotonic() - start


@pytest.mark.slow
def test_sigint_while_caching_features_stops_at_the_next_batch(
    tiny_demo: Path, tmp_path: Path
) -> None:
    """Not after the whole cache: the partial cache is discarded, last.pt saved."""
    frozen = {"model.encoder.freeze": "true", "trainer.cache_features": "true"}
    proc, run, err = start_slow_run(tmp_path, tiny_demo, 0.3, **frozen, **{"data.batch_size": 1})
    proc.send_signal(signal.SIGINT)
    code, seconds = wait_exit(proc, within=30)
    err.seek(0)
    stderr = err.read()
    assert code == 130 and seconds < 5, (code, seconds, stderr[-2000:])
    assert "Traceback" not in stderr and f"resume={run / 'last.pt'}" in stderr
    assert load_checkpoint(run / "last.pt")["global_step"] == 0
    (entry,) = (tmp_path / "cache").iterdir()  # nothing of the cache kept, nothing left behind
    assert [p.name for p in entry.iterdir()] == [".lock"]


@pytest.mark.slow
def test_a_second_signal_exits_at_once_in_one_line(tiny_demo: Path, tmp_path: Path) -> None:
    proc, run, err = start_slow_run(tmp_path, tiny_demo, 60.0)  # one batch: a minute
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code, seconds = wait_exit(proc, within=30)
    err.seek(0)
    stderr = err.read()
    assert code == 128 + signal.SIGTERM and seconds < 5, (code, seconds, stderr[-2000:])
    assert stderr.splitlines()[-1] == "error: got SIGTERM again: stopped at once, without saving"
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_sigint_to_the_process_group_with_loader_workers(tiny_demo: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the workers too: they neither die noisily nor speak; the main process
    stops after the batch it is on."""
    proc, run, err = start_slow_run(
        tmp_path, tiny_demo, 0.3,
        **{"trainer.cache_features": "false", "data.num_workers": 2, "data.batch_size": 2},
    )  # fmt: skip
    os.killpg(proc.pid, signal.SIGINT)
    code, seconds = wait_exit(proc, within=30)
    err.seek(0)
    stderr = err.read()
    assert code == 130 and seconds < 5, (code, seconds, stderr[-2000:])
    assert stderr.count("got SIGINT") == 1, stderr[-2000:]  # the main process's, only
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert load_checkpoint(run / "last.pt")["global_step"] >= 1


@pytest.mark.slow
def test_sigint_while_validating_stops_at_the_next_batch(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation is dropped, last.pt saved after the epoch's last batch: the resume
    validates that epoch."""
    loss, calls = validation.caption_loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # during the first val batch (of two)
            signal.raise_signal(signal.SIGINT)
        return loss(*args, **kwargs)

    monkeypatch.setattr(validation, "caption_loss", interrupted_loss)
    cfg = ("data.batch_size=4", "trainer.max_epochs=1")
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(*cfg), tmp_path / "a")
    monkeypatch.undo()
    assert len(calls) == 1  # the second val batch was not decoded
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["global_step"]) == (0, 6, 6)
    assert read_metrics(tmp_path / "a" / "metrics.jsonl") == []
    train(make_cfg(*cfg, f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert [r["epoch"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1]


def test_ctrl_c_before_training_starts_is_one_line(
    tiny_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Before the trainer handles signals (loading the data, building the model), or in any
    other command: no traceback either."""
    from captioner.training import train as train_module

    def setting_up(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", setting_up)
    with pytest.raises(SystemExit) as code:
        main(["train", *tiny_overrides(tiny_demo, tmp_path / "cache"), f"hydra.run.dir={tmp_path}"])
    assert code.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_stop_on_a_nearly_full_disk_is_still_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while a file is written is not a write the disk refused."""
    from torch import nn

    from captioner.configs.preprocessing import Preprocessing
    from captioner.features import CacheInterrupted, build_feature_cache
    from captioner.models.encoders import Encoder

    images = sorted(small_images(tmp_path / "images", 2).glob("*.png"))
    encoder = Encoder(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1)), 4)
    full_disk_under(tmp_path, monkeypatch)
    with pytest.raises(CacheInterrupted):
        build_feature_cache(
            encoder, Preprocessing(resize=8, crop=8), images, tmp_path / "cache",
            should_stop=lambda: True,
        )  # fmt: skip
    (entry,) = (tmp_path / "cache").iterdir()
    assert [p.name for p in entry.iterdir()] == [".lock"]
