"""A training run's record: ``metrics.jsonl`` (one JSON object per epoch), the log lines, and
TensorBoard scalars when asked for. Only rank 0 writes.

``metrics.jsonl`` is appended to once per epoch, after ``last.pt`` is saved (which holds the row
too, so a resume writes it when the append failed). A process killed mid-write (``kill -9``,
power loss) or a full disk can leave a torn last line; :func:`read_metrics` skips it with a
warning, so a resume or a report never fails on it, and a resume rewrites the file without it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioner.configs.training import TrainerConfig
from captioner.errors import UserError
from captioner.files import append_line, atomic_write

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The epochs recorded in a ``metrics.jsonl``; a line that is not a JSON object (a torn
    write) is skipped with a warning. A missing file has no epochs."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(
        path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
    ):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "epoch" not in row:
            log.warning("%s:%d: skipping a line that is not a complete record", path, number)
            continue
        rows.append(row)
    return rows


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool, tcfg: TrainerConfig | None = None):
        self.out_dir, self.enabled, self.tcfg = out_dir, enabled, tcfg or TrainerConfig()
        self.metrics_file = out_dir / METRICS_FILE
        tensorboard = enabled and self.tcfg.tensorboard
        self._tensorboard = _open_tensorboard(out_dir) if tensorboard else None
        self._seconds: list[float] = []  # this process's epochs (a resumed run's own)

    def continue_from(
        self, old_dir: Path, epochs_done: int, last_record: dict[str, Any] | None = None
    ) -> None:
        """On resume: keep the old run's records of the epochs ``last.pt`` holds (dropping a torn
        line, and any epoch recorded after ``last.pt`` was written), and its ``best.pt``.
        ``last_record``, the row of the last epoch ``last.pt`` holds, is written when its append
        failed."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(old_dir / METRICS_FILE) if r["epoch"] <= epochs_done]
        if last_record is not None and last_record["epoch"] not in {r["epoch"] for r in kept}:
            kept.append(last_record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))
        same = old_dir.resolve() == self.out_dir.resolve()
        if not same and (old_dir / "best.pt").is_file():
            shutil.copy2(old_dir / "best.pt", self.out_dir / "best.pt")

    def epoch(
        self, metrics: dict[str, Any], improved: bool, samples: Sequence[tuple[str, str]]
    ) -> None:
        """Record one epoch: a line in ``metrics.jsonl`` (flushed to disk), a log line with a few
        sample captions, and the TensorBoard scalars."""
        if not self.enabled:
            return
        append_line(self.metrics_file, json.dumps(metrics))
        self._seconds.append(float(metrics["seconds"]))
        log.info(
            "epoch %d/%d: train_loss %.4f val_loss %.4f val_bleu4 %.4f%s (%s)",
            metrics["epoch"],
            self.tcfg.max_epochs,
            metrics["train_loss"],
            metrics["val_loss"],
            metrics["val_bleu4"],
            " *best*" if improved else "",
            self._timing(metrics["epoch"]),
        )
        for name, text in samples:
            log.info("  %s: %s", name, text)
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if key != "epoch" and isinstance(value, float | int) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, metrics["epoch"])

    def start(self, epoch: int, cached: bool) -> None:
        """One line before the first epoch (0-based ``epoch``): where the run goes, how long it
        may last, and where the encoder's features come from."""
        if not self.enabled:
            return
        tcfg = self.tcfg
        log.info(
            "training into %s: epochs %d to %d at most%s; features from %s",
            self.out_dir,
            epoch + 1,
            tcfg.max_epochs,
            f" (stopping early after {tcfg.patience} without a better {tcfg.monitor})"
            if tcfg.patience
            else "",
            f"the feature cache in {tcfg.feature_cache_dir}"
            if cached
            else "the encoder, image by image (it trains or augments: no feature cache)",
        )

    def _timing(self, epoch: int) -> str:
        """``15s`` for the last epoch, and while epochs remain ``about 1m45s left`` (this run's
        mean epoch times the epochs to ``max_epochs``; early stopping may end it sooner)."""
        text = _duration(self._seconds[-1])
        left = self.tcfg.max_epochs - epoch
        if left > 0:
            mean = sum(self._seconds) / len(self._seconds)
            text += f", about {_duration(mean * left)} left"
        return text

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _open_tensorboard(out_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError(
            "trainer.tensorboard=true needs tensorboard: pip install 'captioner[tensorboard]'"
        ) from exc
    return SummaryWriter(str(out_dir / "tensorboard"))


__all__ = ["METRICS_FILE", "RunLog", "read_metrics"]
