"""Training: a recurrent decoder on CNN features, a replaceable per-batch objective (teacher forcing
by default), validated by free-running BLEU-4.

``train(cfg, out_dir)`` is what ``captioner train`` runs (and what tests call): it parses the
composed config into :class:`~captioner.configs.training.TrainConfig` first, so a bad value fails before
any work. One process, or one per GPU under ``torchrun`` (PyTorch DDP): rank 0 logs and writes.
The loop is :class:`~captioner.training.trainer.Trainer`'s (see there for what lives where).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from captioner.configs.training import TrainConfig, parse_train_config
from captioner.runtime import setup_runtime, teardown_runtime
from captioner.training.objectives import Objective
from captioner.training.trainer import Trainer, TrainingInterrupted


def train(
    cfg: DictConfig | TrainConfig,
    out_dir: str | Path,
    make_objective: Callable[[Trainer], Objective] | None = None,
) -> dict[str, Any]:
    """Train as configured, writing the run to ``out_dir``; returns the final metrics."""
    config = cfg if isinstance(cfg, TrainConfig) else parse_train_config(cfg)
    rt = setup_runtime(config.device)
    try:
        return Trainer(config, Path(out_dir), rt, make_objective).fit()
    finally:
        teardown_runtime(rt)


__all__ = ["Trainer", "TrainingInterrupted", "train"]
