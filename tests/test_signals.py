"""Stopping with loader workers, and resuming after a stop: no process outlives its run, and a
resume right after an epoch's last batch raises no scheduler warning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import tiny_overrides

from captioner.checkpoint import load_checkpoint
from captioner.training import validation
from captioner.training.train import TrainingInterrupted, train

# A run that stops with its loader's workers still referenced (a kept traceback, a script's
# global): the interpreter's exit must not wait for workers that ignore SIGTERM.
HELD_WORKERS = """
import sys
from pathlib import Path
from captioner.configs.hydra import compose
from captioner.configs.training import parse_train_config
from captioner.runtime import setup_runtime
from captioner.training.trainer import Trainer

config = parse_train_config(compose("train", sys.argv[2:]))
trainer = Trainer(config, Path(sys.argv[1]), setup_runtime("cpu"))
module, loader, cached = trainer.start_epoch(0)
batches = iter(loader)
trainer.train_batch(module, next(batches), cached)
print("ready", flush=True)
"""


def test_exit_with_live_loader_workers_does_not_hang(tiny_demo: Path, tmp_path: Path) -> None:
    """multiprocessing ends daemonic workers at exit with SIGTERM, which they ignore (a Ctrl-C
    or a scheduler's SIGTERM to the group is the main process's): before the fix the exit
    waited on them for ever."""
    extra = {"trainer.cache_features": "false", "data.num_workers": 2, "data.batch_size": 2}
    overrides = tiny_overrides(tiny_demo, tmp_path / "cache", **extra)
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_WORKERS, str(tmp_path / "run"), *overrides],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the first step is taken
    start = time.monotonic()
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        seconds = time.monotonic() - start
        with_workers = subprocess.run(
            ["pgrep", "-s", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        if with_workers:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read() if proc.stderr is not None and code is not None else ""
    assert line == "ready\n", stderr[-2000:]
    assert code == 0 and seconds < 10, (code, seconds)
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-2000:]
    assert with_workers == []  # no worker left behind either


def test_resume_after_an_epoch_s_last_batch_warns_nothing(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while validating: last.pt holds the epoch's last batch and a scheduler never
    stepped. The resume takes no optimizer step before stepping the scheduler, which PyTorch
    took for the wrong order ("lr_scheduler.step() before optimizer.step()")."""
    loss, calls = validation.caption_loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        return loss(*args, **kwargs)

    monkeypatch.setattr(validation, "caption_loss", interrupted_loss)
    cfg = ("data.batch_size=4", "trainer.max_epochs=2", "scheduler=step", "scheduler.step_size=1")
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(*cfg), tmp_path / "a")
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "a" / "last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (0, 6)
    lr0 = ckpt["optimizer"]["param_groups"][0]["lr"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(make_cfg(*cfg, f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    # the schedule is the uninterrupted run's: two decays (gamma 0.8) after two epochs
    last = load_checkpoint(tmp_path / "b" / "last.pt")
    assert last["scheduler"]["last_epoch"] == 2
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr0 * 0.8**2)
