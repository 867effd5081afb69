"""An exponential moving average (EMA) of a model's weights, for validation and ``best.pt``.

On a small dataset such as Flickr8k, val BLEU jumps by a point or more from one epoch to the next
while the loss falls smoothly: the weights after the last batch are a noisy sample. Averaging them
over the last few hundred optimizer steps gives a model that scores better and more steadily, at
the cost of one copy of the weights. ``trainer.ema_decay`` turns it on (``null``: off).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from captioner.errors import UserError


class ModelEMA:
    """``avg = d * avg + (1 - d) * weights`` after every optimizer step, over every floating-point
    parameter and buffer of the model (a frozen encoder's are constant, so they stay exact).

    The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))`` at update ``t``, so the first
    averages do not drag the random initialisation along.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise UserError(f"trainer.ema_decay must be in (0, 1) or null, got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.averages: dict[str, Tensor] = {
            name: t.detach().clone()
            for name, t in model.state_dict().items()
            if t.is_floating_point()
        }

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after ``optimizer.step()``)."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        current = model.state_dict()
        for name, avg in self.averages.items():
            avg.lerp_(current[name].detach().to(avg.dtype), weight)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; its own come back afterwards."""
        own = {
            name: t.detach().clone()
            for name, t in model.state_dict().items()
            if name in self.averages
        }
        model.load_state_dict(self.averages, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(own, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "averages": dict(self.averages)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["averages"].keys() != self.averages.keys():
            raise UserError("resume: the checkpoint's weight average is for a different model")
        self.updates = int(state["updates"])
        for name, avg in self.averages.items():
            avg.copy_(state["averages"][name])


__all__ = ["ModelEMA"]
