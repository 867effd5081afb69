"""What every decoding strategy shares: the :class:`StepDecoder` protocol it drives, the
:class:`Hypothesis` it returns, the ids it never emits, and the GNMT length penalty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from captioner.configs.decode import DecodeConfig

State = tuple[Tensor, ...]  # every tensor has the batch in dim 1, e.g. LSTM (h, c): [layers, B, H]
NEG_INF = float("-inf")


@runtime_checkable
class StepDecoder(Protocol):
    """What decoding needs from a decoder: an initial state and one step at a time."""

    def init_state(self, features: Tensor) -> State:
        """Image features [B, F] -> recurrent state (tensors with the batch in dim 1)."""
        ...

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Feed one token per sequence (LongTensor [B]) -> (next-token logits [B, V], new state)."""
        ...


@dataclass
class Hypothesis:
    """One decoded caption."""

    tokens: list[int]  # generated ids, without <start>, <end> and <pad>
    score: float  # total log-probability of the generated tokens (<end> included if produced)
    finished: bool  # True if <end> was produced
    # where a decoder that attends looked for each token, [len(tokens), h, w]; filled on request
    # by captioner.inference.generate(..., attention=True)
    attention: Tensor | None = None


def length_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
    """GNMT length penalty ``((5 + length) / 6) ** alpha``; ``length`` counts ``<end>``."""
    return ((5 + length) / 6) ** alpha


def banned_ids(
    config: DecodeConfig,
    start_id: int,
    end_id: int,
    unk_id: int | None,
    pad_id: int | None,
    device: torch.device,
) -> Tensor:
    """Ids that must never be emitted: <start>, <pad>, and <unk> when suppressed."""
    if config.suppress_unk and unk_id is None:
        raise ValueError("suppress_unk=True needs unk_id")
    banned = {start_id}
    if pad_id is not None:
        banned.add(pad_id)
    if config.suppress_unk:
        banned.add(unk_id)
    banned.discard(end_id)
    return torch.tensor(sorted(banned), dtype=torch.long, device=device)


def mask_logits(logits: Tensor, banned: Tensor) -> Tensor:
    """[B, V] logits (any float dtype) -> float32 logits with banned ids at -inf."""
    return logits.float().index_fill(-1, banned, NEG_INF)


def reorder(state: State | Tensor, index: Tensor) -> State | Tensor:
    """Select batch entries (dim 1) of every state tensor, e.g. to follow beam back-pointers."""
    if isinstance(state, Tensor):
        return state.index_select(1, index)
    return tuple(s.index_select(1, index) for s in state)
