"""Gradient-norm bookkeeping: each optimizer step's L2 norm of the gradients (clipped to
``trainer.grad_clip`` when set), as the per-batch logs that ``metrics.jsonl`` averages per epoch,
so it shows exploding gradients with or without clipping."""

from __future__ import annotations

import math

import torch


def gradient_norm(params: list[torch.nn.Parameter]) -> float:
    """The L2 norm of all gradients together (what ``clip_grad_norm_`` compares with its
    limit). inf or nan when a gradient is."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def clip_and_measure(params: list[torch.nn.Parameter], clip: float | None) -> dict[str, float]:
    """Clip the (unscaled) gradients of ``params`` to norm ``clip`` (falsy: no clipping) and
    return the step's logs: ``grad_nonfinite`` (1.0 when the norm before clipping is inf or nan:
    a float16 scaler skips that step; in float32 it is what explodes) and, when finite,
    ``grad_norm``, so the epoch's mean norm is over the steps with finite gradients."""
    # the norm before clipping
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if clip else gradient_norm(params)
    logs = {"grad_nonfinite": float(not math.isfinite(norm))}
    if math.isfinite(norm):
        logs["grad_norm"] = norm
    return logs


__all__ = ["clip_and_measure", "gradient_norm"]
