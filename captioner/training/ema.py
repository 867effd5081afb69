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
from captioner.models.decoders import rename_legacy_keys


class ModelEMA:
    """``avg = d * avg + (1 - d) * weights`` after every optimizer step, over every floating-point
    parameter and buffer of the model.

    Only the tensors that can change are folded in at each step: parameters that require grad,
    and buffers of modules in training mode (BatchNorm statistics). A frozen encoder's tensors are
    constant, so their average is their value and averaging them would only cost time (a third
    of the EMA's time with a frozen EfficientNet). :meth:`track` re-reads which tensors change;
    call it when that changes (fine-tuning unfreezes stages, ``train()``/``eval()``): a tensor
    that starts changing starts from its average, which is still its constant value, so the
    result is the same as averaging every tensor at every step.

    The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))`` at update ``t``, so the first
    averages do not drag the random initialisation along.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise UserError(f"trainer.ema_decay must be in (0, 1) or null, got {decay}")
        self.decay = float(decay)
        self.updates = 0
        # one average per tensor: a tied weight (one Parameter under two names) shares its average
        copies: dict[int, Tensor] = {}
        self.averages: dict[str, Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                self.averages[name] = copies.setdefault(id(t), t.detach().clone())

        self._live: tuple[list[Tensor], list[Tensor]] | None = None

    def track(self, model: nn.Module) -> None:
        """Read which of ``model``'s tensors change from now on (see the class docstring)."""
        changing: set[str] = set()
        for module_name, module in model.named_modules(remove_duplicate=False):
            prefix = f"{module_name}." if module_name else ""
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    changing.add(prefix + name)
            if module.training:
                changing.update(prefix + name for name, _ in module.named_buffers(recurse=False))
        tensors = model.state_dict(keep_vars=True)
        live: dict[int, tuple[Tensor, Tensor]] = {}  # by average: a tied weight is folded in once
        for name in (n for n in self.averages if n in changing):
            live.setdefault(id(self.averages[name]), (self.averages[name], tensors[name].detach()))
        self._live = ([a for a, _ in live.values()], [t for _, t in live.values()])

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after ``optimizer.step()``)."""
        if self._live is None:
            self.track(model)
        assert self._live is not None
        self.updates += 1
        averages, current = self._live
        if averages:
            torch._foreach_lerp_(averages, current, 1.0 - self.decay_at(self.updates))

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
        rename_legacy_keys(state["averages"])  # a last.pt from before configurable cells
        if state["averages"].keys() != self.averages.keys():
            raise UserError("resume: the checkpoint's weight average is for a different model")
        self.updates = int(state["updates"])
        for name, avg in self.averages.items():
            avg.copy_(state["averages"][name])


__all__ = ["ModelEMA"]
