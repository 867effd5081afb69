"""``captioner evaluate``'s settings (``conf/evaluate.yaml``), typed (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from captioner.configs.checks import at_least, one_of
from captioner.configs.data import SPLITS, DataConfig
from captioner.configs.decode import DecodeConfig
from captioner.configs.training import default_cache_dir
from captioner.errors import UserError


@dataclass
class EvaluateConfig:
    """``captioner evaluate``'s settings (``conf/evaluate.yaml``)."""

    checkpoint: str | None = (
        None  # a best.pt/last.pt; null: the newest best.pt under outputs/train/
    )
    split: str = "test"  # val | test (train works too)
    device: str = "auto"
    batch_size: int = 32
    num_workers: int = 0
    max_images: int | None = None  # evaluate on the first N images only
    coco_metrics: bool = (
        True  # also the official coco-caption scores when pycocoevalcap is installed
    )
    # also write report.html (thumbnails, captions, references, sentence BLEU, worst first)
    report: bool = False
    # read the encoder's features from the feature cache (keyed by its weights), building the
    # entry on first use; false: encode every image every time
    cache_features: bool = True
    # null: the checkpoint's training trainer.cache_dir, else $XDG_CACHE_HOME/captioner/features
    cache_dir: str | None = None
    # more checkpoints decoded with `checkpoint` as one model, the mean of their word
    # probabilities at every step (captioner.models.ensemble): one vocabulary, one frozen encoder
    ensemble: list[str] = field(default_factory=list)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    data: dict | None = None  # overrides of the checkpoint's training data config

    def __post_init__(self) -> None:
        one_of(self, "", split=SPLITS)
        at_least(self, "", batch_size=1, num_workers=0)
        if self.max_images is not None:
            at_least(self, "", max_images=1)
        self.data = {k: v for k, v in (self.data or {}).items() if v is not None}
        known = {f.name for f in fields(DataConfig)}
        unknown = sorted(set(self.data) - known)
        if unknown:
            raise UserError(
                f"data.{unknown[0]}: unknown option (known: {', '.join(sorted(known))})"
            )

    def feature_cache_dir(self, train_config: dict[str, Any] | None) -> Path:
        """Where to look for (and put) the features: ``cache_dir``; else the folder the training
        run cached in, when it exists here; else the default user cache."""
        if self.cache_dir:
            return Path(self.cache_dir)
        trained = ((train_config or {}).get("trainer") or {}).get("cache_dir")
        return Path(trained) if trained and Path(trained).is_dir() else default_cache_dir()
