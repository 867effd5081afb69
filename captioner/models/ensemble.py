"""Several trained captioners of one vocabulary and one encoder, decoded as one model.

At every step the ensemble's word distribution is the mean of its members' probabilities (as
ruotianluo's ``AttEnsemble``); every decoding strategy drives it like any decoder, so batched
beam search, sampling and greedy decoding need nothing of their own. The members read the same
encoder features: they must share the encoder (its weights, grid and preprocessing), as models
trained from one frozen encoder (seeds, decoder variants of one grid) do. ``captioner evaluate
checkpoint=A 'ensemble=[B,C]'``, ``captioner caption -c A --ensemble B --ensemble C`` and
``Captioner.ensemble`` build one with :func:`ensemble_model`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from captioner.configs.preprocessing import Preprocessing
from captioner.decoding.common import State
from captioner.errors import UserError
from captioner.models.captioning import CaptionModel
from captioner.vocab import Vocab


def at_least_float32(logits: Tensor) -> Tensor:
    """Half-precision logits (autocast) as float32; float32 and float64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def mean_probability(logits: Sequence[Tensor]) -> Tensor:
    """Members' logits (or log-probabilities) [..., V] each -> the log of the mean of their
    probabilities [..., V]; half-precision logits are read as float32."""
    log_probs = [torch.log_softmax(at_least_float32(x), dim=-1) for x in logits]
    return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))


class EnsembleDecoder(nn.Module):
    """The members' decoders as one ``StepDecoder``: :meth:`step` returns the log of the mean of
    their next-word probabilities (a log-softmax leaves it unchanged, so the decoding's masking and
    scores read it as logits); :meth:`forward` teacher-forces the same mean, with the members'
    mean attention weights (the ensemble's maps). The state is the members' states one after
    another, every tensor with the batch in dim 1, so beam search reorders it as any state."""

    def __init__(self, decoders: Sequence[nn.Module]):
        super().__init__()
        if not decoders:
            raise UserError("ensemble: no member to decode")
        if len({bool(d.attends) for d in decoders}) != 1:
            raise UserError("ensemble: its members all attend over the grid, or none does")
        self.members = nn.ModuleList(decoders)
        self.attends = bool(decoders[0].attends)
        self._sizes: list[int] = []  # how many tensors each member's state has (set from a state)

    def _join(self, states: Sequence[State]) -> State:
        self._sizes = [len(s) for s in states]
        return tuple(t for s in states for t in s)

    def _split(self, state: State) -> list[State]:
        if sum(self._sizes) != len(state):
            raise ValueError("not an ensemble state: start from init_state")
        ends = [sum(self._sizes[: i + 1]) for i in range(len(self._sizes))]
        return [state[end - n : end] for n, end in zip(self._sizes, ends, strict=True)]

    def init_state(self, features: Tensor) -> State:
        return self._join([m.init_state(features) for m in self.members])

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        logits, states = [], []
        for member, s in zip(self.members, self._split(state), strict=True):
            out, s = member.step(tokens, s)
            logits.append(out)
            states.append(s)
        return mean_probability(logits), self._join(states)

    def forward(
        self,
        features: Tensor,
        captions: Tensor,
        lengths: Tensor,
        return_attention: bool = False,
        state: State | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """Teacher forcing as :meth:`Decoder.forward`: the log of the members' mean probability
        [B, T-1, V] ((, their mean attention [B, T-1, P] or None), (, the state))."""
        parts = [None] * len(self.members) if state is None else self._split(state)
        outs = [
            m(features, captions, lengths, return_attention=True, state=p, return_state=True)
            for m, p in zip(self.members, parts, strict=True)
        ]
        log_probs = mean_probability([o[0] for o in outs])
        returned: tuple[Tensor | None, ...] = (log_probs,)
        if return_attention:
            alpha = torch.stack([o[1] for o in outs]).mean(0) if self.attends else None
            returned = (*returned, alpha)
        if return_state:
            returned = (*returned, self._join([o[2] for o in outs]))
        return returned if len(returned) > 1 else log_probs


Member = tuple[str, CaptionModel, Vocab, Preprocessing]  # (where it was read, model, vocab, pre)


def ensemble_model(members: Sequence[Member]) -> CaptionModel:
    """One model from ``members`` (the first's encoder; every decoder), in the first model's
    mode (train or eval): one-line errors naming the member whose vocabulary, preprocessing or
    encoder differs from the first's."""
    if not members:
        raise UserError("ensemble: no member to decode")
    first, model, vocab, pre = members[0]
    for name, other, other_vocab, other_pre in members[1:]:
        if other_vocab != vocab:
            raise UserError(
                f"ensemble: {name} has another vocabulary than {first} ({len(other_vocab)} vs "
                f"{len(vocab)} words): members must come from one dataset and data.min_freq"
            )
        if other_pre != pre:
            raise UserError(f"ensemble: {name} preprocesses images unlike {first}")
        if not same_encoder(model, other):
            raise UserError(
                f"ensemble: {name}'s encoder differs from {first}'s (weights, grid or "
                "flip_average): its members read one encoder's features, so they must share "
                "one frozen encoder"
            )
    mode = model.training
    decoder = EnsembleDecoder([m.decoder for _, m, _, _ in members])
    # CaptionModel's constructor puts the (shared) modules in train mode: back to the first's
    return CaptionModel(model.encoder, decoder, model.config).train(mode)  # type: ignore[arg-type]


def same_encoder(a: CaptionModel, b: CaptionModel) -> bool:
    """Whether two models' encoders compute the same features: one architecture, grid and
    mirror averaging, and equal weights and buffers."""
    ea, eb = a.encoder, b.encoder
    if (type(ea.backbone), ea.spatial, ea.grid, ea.flip_average) != (
        type(eb.backbone),
        eb.spatial,
        eb.grid,
        eb.flip_average,
    ):
        return False
    sa, sb = ea.state_dict(), eb.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )


__all__ = [
    "EnsembleDecoder",
    "at_least_float32",
    "ensemble_model",
    "mean_probability",
    "same_encoder",
]
