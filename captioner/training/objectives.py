"""Per-batch training objectives: what one optimizer step minimises.

The training loop (:class:`captioner.training.trainer.Trainer`) owns everything around a step (device
placement, autocast, backward, clipping, the optimizer, the weight average, counters); an
objective only turns a batch into a loss. Any callable with :class:`Objective`'s signature can
replace teacher forcing without touching the loop. An objective with a ``chunks`` method (teacher
forcing with truncated BPTT) gives a batch's loss in parts, each back-propagated before the next
is computed, for one optimizer step (:func:`loss_parts`).

Batches are those of :func:`captioner.datasets.captions.collate_captions`: ``inputs`` [B, 3, H, W] images or
[B, F] cached features ([B, P, F] grids for a decoder that attends), ``captions`` [N, T],
``lengths`` [N] (CPU), ``image_of_caption`` [N].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
    tbptt_steps: int | None = None  # truncated BPTT in chunks of this many steps (:meth:`chunks`)

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

    def chunks(
        self, model: nn.Module, batch: dict[str, Any], *, features: bool
    ) -> Iterator[StepLoss]:
        """The batch's loss in chunks of ``tbptt_steps`` time steps (truncated BPTT; one chunk,
        this objective's full loss, when ``tbptt_steps`` is None or covers the batch's longest
        caption). Each chunk starts from the state the previous one ended in, detached once the
        chunk's loss has been back-propagated (the caller back-propagates each part before
        asking for the next), so no gradient crosses a chunk boundary and the graph held at a
        time is one chunk's. The parts' losses add up to the batch's mean loss: a chunk's
        cross-entropy is weighted by its share of the batch's target tokens. The attention
        penalty of a chunk counts the attention of the chunks before it as a constant (its
        gradient cannot reach them), and a chunk adds only what it changes to the penalty's
        value. With images in the loop, the encoder runs once per chunk.

        Under DDP, gradients are synchronised on the last chunk's backward only."""
        steps = batch["captions"].shape[1] - 1  # the batch's input steps
        k = steps if self.tbptt_steps is None else self.tbptt_steps
        captions, lengths = batch["captions"], batch["lengths"]
        total = target_tokens(lengths)
        state, mass, penalty_before = None, None, 0.0
        for start in range(0, steps, k):
            end = min(start + k, steps)
            chunk = captions[:, start : end + 1]  # inputs start..end-1, targets start+1..end
            chunk_lengths = lengths - start  # the captions' lengths as the chunk sees them
            tokens = int((chunk_lengths - 1).clamp(0, end - start).sum())
            if tokens == 0:  # every caption ended before this chunk (a batch padded longer)
                return
            sync = model.no_sync() if end < steps and hasattr(model, "no_sync") else None
            with sync or contextlib.nullcontext():
                logits, *alpha, state = model(
                    batch["inputs"],
                    chunk,
                    chunk_lengths,
                    batch["image_of_caption"],
                    features=features,
                    return_attention=self.attention_penalty > 0,
                    state=state,
                    return_state=True,
                )
            loss = caption_loss(logits, chunk, self.pad_id, self.label_smoothing)
            loss = loss * (tokens / total)  # exactly the full loss for a single chunk
            logs = {}
            if alpha and alpha[0] is not None:
                penalty, mass = chunk_attention_penalty(alpha[0].float(), mass)
                logs["xe_loss"] = float(loss.detach())
                logs["attention_penalty"] = float(penalty.detach()) - penalty_before
                loss = loss + self.attention_penalty * (penalty - penalty_before)
                penalty_before = float(penalty.detach())
            yield StepLoss(loss, tokens, logs)
            del logits, alpha, loss
            state = tuple(t.detach() for t in state)


def chunk_attention_penalty(alpha: Tensor, mass_before: Tensor | None) -> tuple[Tensor, Tensor]:
    """The attention penalty after a chunk of attention weights alpha [B, k, P], the chunks
    before it having put ``mass_before`` [B, P] (None: none) on each position, which counts as
    a constant -> (the penalty, the mass up to this chunk, detached)."""
    if mass_before is None:
        return attention_penalty(alpha), alpha.sum(dim=1).detach()
    mass = mass_before + alpha.sum(dim=1)
    return ((1.0 - mass) ** 2).sum(dim=1).mean(), mass.detach()


def backpropagate(
    parts: Iterator[StepLoss],
    backward: Callable[[Tensor], None],
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]],
) -> StepLoss:
    """``backward`` each of one batch's loss ``parts`` (:func:`loss_parts`) before the next is
    computed, its forward run under ``forward_context()`` (autocast) -> the batch's
    :class:`StepLoss`: the parts' losses (detached), weights and logged figures summed."""
    loss, weight, logs = torch.zeros(()), 0, {}
    while True:
        with forward_context():
            part = next(parts, None)
        if part is None:
            return StepLoss(loss, weight, logs)
        backward(part.loss)
        loss, weight = loss + part.loss.detach().float().cpu(), weight + part.weight
        for name, value in part.logs.items():
            logs[name] = logs.get(name, 0.0) + value


def loss_parts(
    objective: Objective, model: nn.Module, batch: dict[str, Any], *, features: bool
) -> Iterator[StepLoss]:
    """What one optimizer step back-propagates, part by part: the objective's ``chunks`` where
    it has them (truncated BPTT), else its one loss."""
    chunks = getattr(objective, "chunks", None)
    if chunks is None:
        yield objective(model, batch, features=features)
    else:
        yield from chunks(model, batch, features=features)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (``lengths`` stays on the CPU, as packing needs it)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) and k != "lengths" else v
        for k, v in batch.items()
    }


__all__ = [
    "Objective",
    "StepLoss",
    "TeacherForcing",
    "backpropagate",
    "chunk_attention_penalty",
    "loss_parts",
    "target_tokens",
    "to_device",
]
