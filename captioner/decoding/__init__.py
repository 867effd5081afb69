"""Caption decoding: batched greedy search, sampling and beam search.

Every strategy drives a :class:`StepDecoder` one token at a time, for the whole batch at once
(Python loops run over time steps only, never over images). Decoding starts by feeding
``<start>``; a caption ends when the decoder emits ``<end>`` or after ``max_len`` generated tokens
(``<end>`` included), in which case it is returned anyway with ``finished=False``.

``<start>`` and ``<pad>`` (and ``<unk>`` with ``suppress_unk``) are never emitted: their logits are
set to ``-inf`` before the log-softmax, so every score is a log-probability under that renormalised
distribution, comparable across strategies.

| module | holds |
|---|---|
| :mod:`~captioner.decoding.common` | the :class:`StepDecoder` protocol, :class:`Hypothesis`, masking, the length penalty |
| :mod:`~captioner.decoding.sampling` | one token per step: :func:`greedy` and :func:`sample` (top-k, nucleus) |
| :mod:`~captioner.decoding.beam` | :func:`beam_search` |
"""

from __future__ import annotations

from torch import Tensor

from captioner.configs.decode import DecodeConfig
from captioner.decoding.beam import beam_search
from captioner.decoding.common import (
    Hypothesis,
    State,
    StepDecoder,
    banned_ids,
    length_penalty,
    mask_logits,
)
from captioner.decoding.sampling import draw, filter_logits, greedy, sample

__all__ = [
    "Hypothesis",
    "State",
    "StepDecoder",
    "banned_ids",
    "beam_search",
    "decode",
    "draw",
    "filter_logits",
    "greedy",
    "length_penalty",
    "mask_logits",
    "sample",
]


def decode(
    decoder: StepDecoder,
    features: Tensor,
    config: DecodeConfig,
    *,
    start_id: int,
    end_id: int,
    unk_id: int | None = None,
    pad_id: int | None = None,
) -> list[list[Hypothesis]]:
    """Decode a batch of image features [B, F] with ``config.strategy``.

    Returns one list per image, best first: one hypothesis, or ``n_best`` for beam search.
    The caller is responsible for putting the decoder in ``eval()`` mode.
    """
    fn = {"greedy": greedy, "beam": beam_search, "sample": sample}[config.strategy]
    return fn(
        decoder, features, config, start_id=start_id, end_id=end_id, unk_id=unk_id, pad_id=pad_id
    )
