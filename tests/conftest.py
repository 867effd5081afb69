"""Shared fixtures: a tiny demo dataset and the overrides of a tiny, fast training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioner.config import compose
from captioner.synthetic import ensure_demo_dataset

TINY_SPLITS = {"train": 24, "val": 8, "test": 8}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 px demo dataset (24 train / 8 val / 8 test images), generated once per session."""
    root = tmp_path_factory.mktemp("demo")
    ensure_demo_dataset(root, seed=0, image_size=32, splits=TINY_SPLITS)
    return root


def tiny_overrides(root: Path, cache_dir: Path, **extra: object) -> list[str]:
    """Hydra overrides for a run that takes seconds on a CPU: tiny images, tiny model."""
    base = {
        "data.root": str(root),
        "data.demo.image_size": 32,
        "data.demo.splits": "{train: 24, val: 8, test: 8}",
        "data.batch_size": 8,
        "model.encoder.resize": 32,
        "model.encoder.crop": 32,
        "model.decoder.embed_dim": 16,
        "model.decoder.hidden_size": 32,
        "trainer.max_epochs": 2,
        "trainer.cache_dir": str(cache_dir),
        "device": "cpu",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_cfg(tiny_demo: Path, tmp_path: Path):
    """Compose the training config of a tiny run; call with extra overrides as keyword-free
    strings, e.g. ``tiny_cfg("model.encoder.freeze=true")``."""

    def make(*overrides: str):
        return compose("train", [*tiny_overrides(tiny_demo, tmp_path / "cache"), *overrides])

    return make
