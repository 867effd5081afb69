"""Monitoring: which validation score selects ``best.pt`` (``trainer.monitor``) and when a run
stops early (``trainer.patience`` epochs without a gain). The counters it reads and writes are
those of :class:`~captioner.training.progress.Progress`, which ``last.pt`` saves."""

from __future__ import annotations

import logging
from typing import Any

from captioner.training.progress import Progress

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, name: str, patience: int | None, progress: Progress):
        self.name, self.patience, self.progress = name, patience, progress

    def record(self, metrics: dict[str, Any]) -> bool:
        """Count an epoch's metrics; True when its monitored score is a new best."""
        return self.progress.record_score(metrics[self.name])

    def restart(self) -> None:
        """Count the epochs without a gain afresh (a new objective starts)."""
        self.progress.bad_epochs = 0

    def stop_early(self, hold: bool = False) -> bool:
        """Whether the run ends before its next epoch: ``patience`` epochs without a gain, unless
        ``hold`` (an objective is still to come:
        :meth:`captioner.training.scst.ScstSwitch.ahead`)."""
        p = self.progress
        if self.patience is None or p.bad_epochs < self.patience or hold:
            return False
        log.info("early stopping: no %s gain in %d epochs", self.name, p.bad_epochs)
        return True

    def summary(self) -> dict[str, Any]:
        """The run's result: the monitored metric, its best score and the (1-based) epoch."""
        p = self.progress
        return {"monitor": self.name, "best_score": p.best_score, "best_epoch": p.best_epoch}


__all__ = ["Monitor"]
