"""``metrics.jsonl``: a torn last line (a crash mid-write) never breaks a resume or a report; the
lines a training run prints (issue 23: where it goes, epoch N/M and the time left, readable)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from captioner.cli.console import ConsoleFormatter
from captioner.configs.preprocessing import Preprocessing
from captioner.configs.training import TrainerConfig
from captioner.training.progress import Progress
from captioner.training.runlog import RunLog, _duration, read_metrics


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_torn_line_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    path = write_lines(
        tmp_path / "metrics.jsonl", json.dumps({"epoch": 1}), "", json.dumps({"epoch": 2})
    )
    with open(path, "a") as f:
        f.write('{"epoch": 3, "val_')
    with caplog.at_level(logging.WARNING):
        assert [r["epoch"] for r in read_metrics(path)] == [1, 2]
    assert "metrics.jsonl:4" in caplog.text
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_lines_that_are_not_epoch_records_are_skipped(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.jsonl", "[1, 2]", '{"no_epoch": 1}', '{"epoch": 5}', "\x00\x00"
    )
    assert read_metrics(path) == [{"epoch": 5}]


@pytest.mark.parametrize("same_dir", [False, True])
def test_continue_from_keeps_the_epochs_last_pt_holds(tmp_path: Path, same_dir: bool) -> None:
    old = tmp_path / "old"
    old.mkdir()
    write_lines(old / "metrics.jsonl", *(json.dumps({"epoch": e}) for e in (1, 2, 3)))
    with open(old / "metrics.jsonl", "a") as f:
        f.write('{"epo')
    (old / "best.pt").write_bytes(b"best")
    new = old if same_dir else tmp_path / "new"
    log = RunLog(new, enabled=True)
    log.continue_from(old, epochs_done=2)  # epoch 3 was recorded, then killed before last.pt
    assert [r["epoch"] for r in read_metrics(new / "metrics.jsonl")] == [1, 2]
    assert (new / "metrics.jsonl").read_text().endswith("}\n")  # appending starts a clean line
    assert (new / "best.pt").read_bytes() == b"best"


def test_progress_round_trips_every_counter() -> None:
    p = Progress()
    p.add_batch(2.0, 10, {"reward": 0.5})
    p.add_batch(1.0, 30, {"reward": 1.0})
    p.epoch_skipped.update({4, 2})
    assert p.record_score(0.3) and not p.record_score(0.2)
    q = Progress()
    q.load_state_dict(p.state_dict())
    assert q == p
    assert q.epoch_means() == {"train_loss": 1.25, "reward": 0.875}
    assert q.state_dict()["epoch_skipped"] == [2, 4]  # plain containers in a checkpoint
    q.next_epoch()
    assert (q.epoch, q.batch_in_epoch, q.epoch_tokens, q.epoch_skipped) == (1, 0, 0, set())
    assert (q.best_score, q.best_epoch, q.bad_epochs) == (0.3, 1, 1)


def test_a_log_missing_from_some_batches_is_their_mean_only() -> None:
    """``grad_norm`` skips steps with non-finite gradients: its mean is over the others."""
    p = Progress()
    p.add_batch(2.0, 10, {"grad_norm": 4.0, "grad_nonfinite": 0.0})
    p.add_batch(1.0, 30, {"grad_nonfinite": 1.0})
    assert p.epoch_means() == {"train_loss": 1.25, "grad_norm": 4.0, "grad_nonfinite": 0.75}
    # a last.pt from before per-log weights resumes with every log counted in every batch
    old = p.state_dict()
    del old["epoch_log_weights"]
    old["epoch_logs"] = {"reward": 0.5 * 10 + 1.0 * 30}
    q = Progress()
    q.load_state_dict(old)
    q.add_batch(1.0, 40, {"reward": 0.0})
    assert q.epoch_means()["reward"] == pytest.approx(35.0 / 80)


def epoch_row(epoch: int, seconds: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0,
        "val_loss": 2.0,
        "val_bleu4": 0.3,
        "seconds": seconds,
    }


def test_epoch_lines_count_to_max_epochs_and_say_the_time_left(tmp_path: Path, caplog) -> None:
    log = RunLog(tmp_path, enabled=True, tcfg=TrainerConfig(max_epochs=4, patience=None))
    with caplog.at_level(logging.INFO, logger="captioner.training.runlog"):
        log.start(0, cached=False)
        log.epoch(epoch_row(1, 20.0), True, [("val_1.png", "a cat")])
        log.epoch(epoch_row(2, 40.0), False, [])
        log.epoch(epoch_row(4, 30.0), False, [])
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"training into {tmp_path}: epochs 1 to 4 at most; features from")
    assert "no feature cache" in lines[0]
    # the mean epoch so far times the epochs to go: 20 s x 3, then 30 s x 2; none after the last
    assert lines[1] == "epoch 1/4: train_loss 1.0000 val_loss 2.0000 val_bleu4 0.3000 *best* " + (
        "(20s, about 1m00s left)"
    )
    assert lines[2].startswith("  val_1.png: a cat")
    assert lines[3].endswith("(40s, about 1m00s left)")
    assert lines[4].endswith("val_bleu4 0.3000 (30s)")


def test_start_line_names_the_cache_and_early_stopping(tmp_path: Path, caplog) -> None:
    tcfg = TrainerConfig(max_epochs=10, patience=3, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="captioner.training.runlog"):
        RunLog(tmp_path, enabled=True, tcfg=tcfg).start(4, cached=True)
    assert caplog.records[0].getMessage() == (
        f"training into {tmp_path}: epochs 5 to 10 at most (stopping early after 3 without a "
        f"better val_bleu4); features from the feature cache in {tmp_path / 'cache'}"
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(4.4, "4s"), (59.6, "1m00s"), (185, "3m05s"), (3725, "1h02m")]
)
def test_durations_read_as_a_person_writes_them(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_preprocessing_is_described_in_words() -> None:
    pre = Preprocessing(232, 224, interpolation="bicubic")
    assert pre.describe() == (
        "resize 232, crop 224 x 224, bicubic, mean 0.485 0.456 0.406, std 0.229 0.224 0.225"
    )


def test_the_console_prefix_is_the_time_and_a_warning_says_so() -> None:
    def line(level: int, message: str) -> str:
        record = logging.LogRecord("captioner.x", level, __file__, 1, message, None, None)
        return ConsoleFormatter().format(record)

    info, warning = line(logging.INFO, "epoch 1/4"), line(logging.WARNING, "skipped 2 images")
    assert info[0] == "[" and info[9:] == "] epoch 1/4" and len(info) == len("[12:34:56] epoch 1/4")
    assert warning.endswith("] warning: skipped 2 images")
