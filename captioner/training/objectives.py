"""Per-batch training objectives: what one optimizer step minimises.

The training loop (:class:`captioner.training.trainer.Trainer`) owns everything around a step (device
placement, autocast, backward, clipping, the optimizer, the weight average, counters); an
objective only turns a batch into a loss. Any callable with :class:`Objective`'s signature can
replace teacher forcing without touching the loop.

Batches are those of :func:`captioner.datasets.captions.collate_captions`: ``inputs`` [B, 3, H, W] images or
[B, F] cached features ([B, P, F] grids for a decoder that attends), ``captions`` [N, T],
``lengths`` [N] (CPU), ``image_of_caption`` [N].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from captioner.training.losses import attention_penalty, caption_loss


@dataclass
class StepLoss:
    """What an objective returns for one batch.

    ``loss`` is what is back-propagated; ``weight`` is how much the batch counts in the epoch's
    logged mean of ``loss`` (target tokens for teacher forcing); ``logs`` are extra per-batch
    figures, averaged over the epoch with the same weights.
    """

    loss: Tensor
    weight: int
    logs: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """``objective(model, batch, features=...)`` -> :class:`StepLoss`.

    ``model`` is the module to call (DDP-wrapped under torchrun): ``model(inputs, captions,
    lengths, image_of_caption, features=features)`` gives teacher-forced logits.
    ``features`` says whether ``batch["inputs"]`` holds encoder features (the cache) or images.
    Tensors in ``batch`` are already on the model's device, except ``lengths`` (CPU).
    """

    def __call__(self, model: nn.Module, batch: dict[str, Any], *, features: bool) -> StepLoss: ...


def target_tokens(lengths: Tensor) -> int:
    """How many tokens a batch predicts: every caption's length minus its ``<start>``."""
    return int((lengths - 1).sum())


@dataclass
class TeacherForcing:
    """Cross-entropy of the ground-truth next token given the ground-truth prefix (the XE
    objective of Show and Tell), optionally label-smoothed. For a decoder that attends,
    ``attention_penalty`` > 0 adds lambda times the doubly stochastic regulariser of Show, Attend
    and Tell (:func:`captioner.training.losses.attention_penalty`), logged as ``attention_penalty``, and
    the cross-entropy alone as ``xe_loss`` (``train_loss`` is their sum, what is minimised)."""

    pad_id: int = 0
    label_smoothing: float = 0.0
    attention_penalty: float = 0.0

    def __call__(self, model: nn.Module, batch: dict[str, Any], *, features: bool) -> StepLoss:
        captions = batch["captions"]
        out = model(
            batch["inputs"],
            captions,
            batch["lengths"],
            batch["image_of_caption"],
            features=features,
            return_attention=self.attention_penalty > 0,
        )
        logits, alpha = out if isinstance(out, tuple) else (out, None)  # [N, T-1, V]
        loss = caption_loss(logits, captions, self.pad_id, self.label_smoothing)
        logs = {}
        if alpha is not None:
            penalty = attention_penalty(alpha.float())
            logs["xe_loss"] = float(loss.detach())
            logs["attention_penalty"] = float(penalty.detach())
            loss = loss + self.attention_penalty * penalty
        return StepLoss(loss, target_tokens(batch["lengths"]), logs)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (``lengths`` stays on the CPU, as packing needs it)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) and k != "lengths" else v
        for k, v in batch.items()
    }


__all__ = ["Objective", "StepLoss", "TeacherForcing", "target_tokens", "to_device"]
