"""``metrics.jsonl``: a torn last line (a crash mid-write) never breaks a resume or a report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from captioner.training.progress import Progress
from captioner.training.runlog import RunLog, read_metrics


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
