"""Helpers the test modules share (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from captioner.configs.model import DecoderConfig, EncoderConfig, ModelConfig
from captioner.models.captioning import CaptionModel
from captioner.models.decoders import build_decoder
from captioner.models.encoders import Encoder


def tiny_model(
    backbone: Callable[[], nn.Module],
    feature_dim: int,
    vocab_size: int,
    encoder: dict[str, Any] | None = None,
    **decoder: Any,
) -> CaptionModel:
    """A small captioner, the same on every call: the seed is 0 before ``backbone()`` (a class or
    factory of a module giving ``feature_dim`` features) and the decoder are built.

    ``encoder``: fields of its :class:`EncoderConfig` (defaults without); the encoder keeps the
    image grid (``grid`` x ``grid`` when set) when the decoder attends. ``decoder``: fields of
    its :class:`DecoderConfig`, by default a 6-d embedding, 10 hidden units and no dropout.
    """
    torch.manual_seed(0)
    cfg = ModelConfig(
        EncoderConfig(**(encoder or {})),
        DecoderConfig(**{"embed_dim": 6, "hidden_size": 10, "dropout": 0.0, **decoder}),
    )
    spatial = cfg.decoder.attention != "none"
    enc = Encoder(backbone(), feature_dim, spatial=spatial, grid=cfg.encoder.grid)
    return CaptionModel(enc, build_decoder(cfg.decoder, feature_dim, vocab_size), cfg)


def chromium_driver(window: str) -> Iterator[Any]:
    """A headless Chromium driven through chromedriver (selenium), ``window`` as "W,H"; skipped
    where Debian's chromium and chromium-driver are missing, and failed instead under CI, which
    installs them (.ci/run). Yields the driver and quits it after."""
    import pytest

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium/chromedriver are missing: .ci/run installs them")
        pytest.skip("needs Debian's chromium and chromium-driver (CI installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", f"--window-size={window}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
