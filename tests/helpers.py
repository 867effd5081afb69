"""Helpers the test modules share (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from collections.abc import Callable
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
