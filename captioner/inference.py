"""Running a trained model over many images: the one code path shared by training validation,
``captioner evaluate`` and ``captioner caption``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from captioner.decoding import DecodeConfig, Hypothesis, decode
from captioner.model import CaptionModel
from captioner.vocab import Vocab, detokenize


@torch.inference_mode()
def decode_features(
    model: CaptionModel, features: torch.Tensor, vocab: Vocab, config: DecodeConfig
) -> list[list[Hypothesis]]:
    """features [B, F] -> per image, its hypotheses (best first)."""
    return decode(
        model.decoder,
        features.float(),
        config,
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        unk_id=vocab.unk_id,
        pad_id=vocab.pad_id,
    )


@torch.inference_mode()
def generate(
    model: CaptionModel,
    batches: Iterable[dict[str, Any]],
    vocab: Vocab,
    config: DecodeConfig,
    device: torch.device | str,
    features: bool = False,
) -> dict[int, list[Hypothesis]]:
    """Decode every batch (``inputs`` images, or encoder features when ``features``) ->
    {dataset index: hypotheses}. The model must be in eval mode."""
    out: dict[int, list[Hypothesis]] = {}
    for batch in batches:
        if not len(batch["index"]):
            continue
        inputs = batch["inputs"].to(device, non_blocking=True)
        feats = inputs if features else model.encode(inputs)
        hyps = decode_features(model, feats, vocab, config)
        out.update(zip(batch["index"].tolist(), hyps, strict=True))
    return out


def hypothesis_text(hyp: Hypothesis, vocab: Vocab) -> str:
    """A hypothesis as display text (no specials, clitics re-attached)."""
    return detokenize(vocab.decode(hyp.tokens))
