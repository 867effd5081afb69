"""How to decode a caption: :class:`DecodeConfig`, shared by training's validation, ``evaluate``,
``caption`` and ``serve`` (torch-free; the strategies are in :mod:`captioner.decoding`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from captioner.configs.checks import at_least, one_of
from captioner.errors import UserError
from captioner.typed import from_dict

STRATEGIES: tuple[str, ...] = ("greedy", "beam", "sample")


@dataclass
class DecodeConfig:
    """How to decode; validated on construction (a bad field raises ``UserError`` naming it)."""

    strategy: str = "greedy"  # "greedy" | "beam" | "sample"
    max_len: int = 20  # max generated tokens per caption, counting <end>
    beam_size: int = 3
    length_penalty: float = 0.0  # GNMT alpha: rank by logprob / ((5 + len) / 6) ** alpha
    suppress_unk: bool = False  # never emit <unk>
    n_best: int = 1  # beam only: hypotheses returned per image (<= beam_size)
    temperature: float = 1.0  # sample
    top_k: int = 0  # sample; 0 = off
    top_p: float = 1.0  # sample (nucleus); 1.0 = off
    seed: int | None = None  # sample; a local generator is used, never the global RNG

    def __post_init__(self) -> None:
        # messages name the field alone: they serve a config node (from_dict puts its key in
        # front: ``trainer.val_decode: beam_size must be >= 1``), the CLI and the server alike
        one_of(self, "", strategy=STRATEGIES)
        at_least(self, "", max_len=1, beam_size=1)
        if not 1 <= self.n_best <= self.beam_size:
            raise UserError(
                f"n_best must be between 1 and beam_size={self.beam_size}, got {self.n_best}"
            )
        if not 1e-3 <= self.temperature <= 1e3:  # also refuses nan: logits / t must stay finite
            raise UserError(f"temperature must be in [0.001, 1000], got {self.temperature}")
        if not -10 <= self.length_penalty <= 10:  # ((5 + len) / 6) ** alpha must stay finite
            raise UserError(f"length_penalty must be in [-10, 10], got {self.length_penalty}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise UserError(f"seed must fit in 64 bits, got {self.seed}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "decode") -> DecodeConfig:
        """Build from a config node; a bad or unknown field is a ``UserError`` naming ``where``."""
        return from_dict(cls, data, where)
