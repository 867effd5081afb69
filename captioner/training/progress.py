"""Where a training run stands: the counters that ``last.pt`` saves and a resume restores.

One dataclass, saved and restored in one place (``state_dict`` / ``load_state_dict``), so that a
new counter cannot be forgotten by one of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Progress:
    epoch: int = 0  # 0-based epoch being trained (== epochs completed)
    batch_in_epoch: int = 0  # batches of this epoch already trained
    global_step: int = 0
    best_score: float = -1.0  # best value of trainer.monitor so far (val BLEU-4 by default)
    best_epoch: int = 0  # 1-based epoch of best.pt
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    # the running sums of this epoch's objective, weighted (teacher forcing: per target token)
    epoch_loss_sum: float = 0.0
    epoch_tokens: int = 0
    epoch_logs: dict[str, float] = field(default_factory=dict)
    epoch_log_weights: dict[str, int] = field(default_factory=dict)  # a log may skip batches
    epoch_skipped: set[int] = field(default_factory=set)  # unreadable record indices
    # the metrics.jsonl row of the last completed epoch: last.pt is saved before the row is
    # appended, so that a resume can write the row when the append failed
    last_record: dict[str, Any] | None = None

    def add_batch(self, loss: float, weight: int, logs: dict[str, float]) -> None:
        self.epoch_loss_sum += loss * weight
        self.epoch_tokens += weight
        for key, value in logs.items():
            self.epoch_logs[key] = self.epoch_logs.get(key, 0.0) + value * weight
            self.epoch_log_weights[key] = self.epoch_log_weights.get(key, 0) + weight

    def epoch_means(self) -> dict[str, float]:
        """This epoch's weighted means: ``train_loss`` and every extra log of the objective."""
        n = max(self.epoch_tokens, 1)
        weights = self.epoch_log_weights
        return {
            "train_loss": self.epoch_loss_sum / n,
            **{k: v / max(weights.get(k, n), 1) for k, v in self.epoch_logs.items()},
        }

    def record_score(self, score: float) -> bool:
        """Count a validation score; True when it is a new best."""
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch + 1, 0
            return True
        self.bad_epochs += 1
        return False

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch, self.epoch_loss_sum, self.epoch_tokens = 0, 0.0, 0
        self.epoch_logs, self.epoch_log_weights, self.epoch_skipped = {}, {}, set()

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["epoch_skipped"] = sorted(self.epoch_skipped)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
        self.epoch_skipped = set(self.epoch_skipped)
        self.epoch_logs = dict(self.epoch_logs)
        self.last_record = dict(self.last_record) if self.last_record is not None else None
        # a last.pt from before per-log weights: every log had been counted with every batch
        saved = state.get("epoch_log_weights")
        self.epoch_log_weights = (
            dict(saved) if saved is not None else dict.fromkeys(self.epoch_logs, self.epoch_tokens)
        )


__all__ = ["Progress"]
