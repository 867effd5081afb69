"""One token per step per image: greedy search and ancestral sampling (temperature, top-k,
nucleus), both through the same batched loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.configs.decode import DecodeConfig
from captioner.decoding.common import NEG_INF, Hypothesis, StepDecoder, banned_ids, mask_logits


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then nucleus filtering of [B, V] logits; removed entries become -inf.

    Nucleus keeps the smallest set of most likely tokens whose cumulative probability is
    ``>= top_p`` (always at least the most likely token).
    """
    V = logits.size(-1)
    if 0 < top_k < V:
        keep_idx = logits.topk(top_k, dim=-1).indices  # [B, k]
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, keep_idx, True)
        logits = logits.masked_fill(~keep, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def _sequential(
    decoder: StepDecoder,
    features: Tensor,
    config: DecodeConfig,
    choose: Callable[[Tensor], Tensor],
    *,
    start_id: int,
    end_id: int,
    unk_id: int | None,
    pad_id: int | None,
) -> list[list[Hypothesis]]:
    """One token per step per image, picked by ``choose(masked_logits [B, V]) -> [B]``."""
    B, device = features.size(0), features.device
    if B == 0:
        return []
    banned = banned_ids(config, start_id, end_id, unk_id, pad_id, device)
    feed_id = pad_id if pad_id is not None else end_id  # fed to sequences that already ended

    state = decoder.init_state(features)
    tokens = torch.full((B,), start_id, dtype=torch.long, device=device)  # [B]
    out = torch.full((B, config.max_len), feed_id, dtype=torch.long, device=device)  # [B, T]
    score = torch.zeros(B, device=device)  # [B]
    length = torch.zeros(B, dtype=torch.long, device=device)  # generated tokens, <end> included
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    for t in range(config.max_len):
        logits, state = decoder.step(tokens, state)  # [B, V]
        logits = mask_logits(logits, banned)
        logp = F.log_softmax(logits, dim=-1)  # [B, V]
        nxt = choose(logits)  # [B]
        chosen = logp.gather(1, nxt[:, None]).squeeze(1)  # [B]
        score += chosen.masked_fill(finished, 0.0)
        length += (~finished).long()
        nxt = nxt.masked_fill(finished, feed_id)
        out[:, t] = nxt
        finished |= nxt == end_id
        tokens = nxt
        if bool(finished.all()):
            break

    out_l, len_l, fin_l, score_l = out.tolist(), length.tolist(), finished.tolist(), score.tolist()
    return [
        [Hypothesis(row[: n - int(fin)], s, fin)]
        for row, n, fin, s in zip(out_l, len_l, fin_l, score_l, strict=True)
    ]


@torch.inference_mode()
def greedy(
    decoder: StepDecoder,
    features: Tensor,
    config: DecodeConfig | None = None,
    *,
    start_id: int,
    end_id: int,
    unk_id: int | None = None,
    pad_id: int | None = None,
) -> list[list[Hypothesis]]:
    """Greedy decoding: the most likely token at every step; stops per sequence at <end>."""
    config = config if config is not None else DecodeConfig(strategy="greedy")
    return _sequential(
        decoder,
        features,
        config,
        lambda logits: logits.argmax(dim=-1),
        start_id=start_id,
        end_id=end_id,
        unk_id=unk_id,
        pad_id=pad_id,
    )


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of probabilities [B, V], by inverting the cumulative distribution with
    one uniform number per row: the distribution of ``torch.multinomial(probs, 1)``, about 30x
    faster on a CPU for a vocabulary of thousands. Zero-probability ids are never drawn."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    # the first id whose cumulative mass exceeds u * total: never one with zero mass
    return (
        torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_max(probs.size(1) - 1)
    )


@torch.inference_mode()
def sample(
    decoder: StepDecoder,
    features: Tensor,
    config: DecodeConfig | None = None,
    *,
    start_id: int,
    end_id: int,
    unk_id: int | None = None,
    pad_id: int | None = None,
) -> list[list[Hypothesis]]:
    """Ancestral sampling with temperature, top-k and nucleus (top-p) filtering.

    Randomness comes from a local ``torch.Generator`` on the features' device seeded with
    ``config.seed`` (a fresh random seed when None). ``Hypothesis.score`` is the log-probability
    under the model (masked, temperature 1, unfiltered), so it is comparable with greedy/beam.
    """
    config = config if config is not None else DecodeConfig(strategy="sample")
    generator = torch.Generator(device=features.device)
    if config.seed is None:
        generator.seed()
    else:
        generator.manual_seed(config.seed)

    def choose(logits: Tensor) -> Tensor:  # [B, V] -> [B]
        logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
        return draw(logits.softmax(dim=-1), generator)

    return _sequential(
        decoder,
        features,
        config,
        choose,
        start_id=start_id,
        end_id=end_id,
        unk_id=unk_id,
        pad_id=pad_id,
    )
