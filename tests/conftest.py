"""Shared fixtures: a tiny demo dataset and the overrides of a tiny, fast training run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from captioner.configs.hydra import compose
from captioner.datasets.synthetic import ensure_demo_dataset
from captioner.models.encoders import Encoder
from captioner.training.train import train

TINY_SPLITS = {"train": 24, "val": 8, "test": 8}


@pytest.fixture(autouse=True, scope="session")
def _user_cache(tmp_path_factory: pytest.TempPathFactory):
    """The default feature cache ($XDG_CACHE_HOME/captioner) goes to a temporary folder, for this
    process and the CLI subprocesses the tests start: a test never writes to ~/.cache."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(autouse=True)
def _root_logging():
    """Each test leaves the root logger as it found it. A command run in-process configures
    logging (Hydra's dictConfig, the CLI's basicConfig) with handlers bound to that test's
    captured stderr, which pytest closes when the test ends: a later test's log line would then
    print '--- Logging error ---' into whatever it captures."""
    root = logging.getLogger()

    def ours(handler: logging.Handler) -> bool:  # pytest's capture handlers come and go per phase
        return not type(handler).__module__.startswith("_pytest")

    for handler in list(root.handlers):  # left by a session fixture's run, its stream closed since
        if ours(handler) and getattr(getattr(handler, "stream", None), "closed", False):
            root.removeHandler(handler)
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers and ours(handler):
            root.removeHandler(handler)
    root.setLevel(level)


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


@pytest.fixture(scope="module")
def make_cfg(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory):
    """Compose a tiny run's config (2 epochs of 3 batches, dropout 0.2, constant lr), one feature
    cache per test module."""
    cache = tmp_path_factory.mktemp("cache")

    def make(*extra: str):
        return compose("train", [*tiny_overrides(tiny_demo, cache), *extra])

    return make


@pytest.fixture
def tiny_cfg(tiny_demo: Path, tmp_path: Path):
    """Compose the training config of a tiny run; call with extra overrides as keyword-free
    strings, e.g. ``tiny_cfg("model.encoder.freeze=true")``."""

    def make(*overrides: str):
        return compose("train", [*tiny_overrides(tiny_demo, tmp_path / "cache"), *overrides])

    return make


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of one 1-epoch tiny run, trained once per session (caption and evaluate tests)."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = [*tiny_overrides(tiny_demo, run_dir / "cache"), "trainer.max_epochs=1"]
        train(compose("train", overrides), run_dir)
    finally:
        torch.set_num_threads(threads)
    assert (run_dir / "best.pt").is_file()
    return run_dir / "best.pt"


@pytest.fixture
def encoder_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts ``Encoder.forward`` calls in ``["n"]`` (reset it to 0 between phases): a run or
    an evaluation that reads the feature cache must not run the encoder."""
    calls = {"n": 0}
    forward = Encoder.forward

    def counting_forward(self: Encoder, images: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return forward(self, images)

    monkeypatch.setattr(Encoder, "forward", counting_forward)
    return calls


@pytest.fixture
def keep_logging():
    """Hydra reconfigures logging onto the captured streams; put the root logger back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
