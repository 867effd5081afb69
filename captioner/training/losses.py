"""The training losses: what teacher forcing minimises per batch
(:class:`captioner.training.objectives.TeacherForcing`), and what validation reports.

Shapes: B batch, T caption length (with <start>/<end>), P grid positions, V vocabulary size.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def caption_loss(
    logits: Tensor, captions: Tensor, pad_id: int = 0, label_smoothing: float = 0.0
) -> Tensor:
    """Mean cross-entropy over real target tokens only (padding never reaches the loss).

    logits [B, T-1, V], captions [B, T]; targets are captions[:, 1:].
    """
    targets = captions[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
    )


def attention_penalty(alpha: Tensor) -> Tensor:
    """The doubly stochastic regulariser of Xu et al. (2015, eq. 14) per caption, averaged over
    the batch: sum_p (1 - sum_t alpha_tp)^2, for alpha [B, T, P] whose padded steps are zero."""
    return ((1.0 - alpha.sum(dim=1)) ** 2).sum(dim=1).mean()


__all__ = ["attention_penalty", "caption_loss"]
