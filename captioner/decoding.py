"""Caption decoding: batched greedy search, sampling and beam search.

Every strategy drives a :class:`StepDecoder` one token at a time, for the whole batch at once
(Python loops run over time steps only, never over images). Decoding starts by feeding
``<start>``; a caption ends when the decoder emits ``<end>`` or after ``max_len`` generated tokens
(``<end>`` included), in which case it is returned anyway with ``finished=False``.

``<start>`` and ``<pad>`` (and ``<unk>`` with ``suppress_unk``) are never emitted: their logits are
set to ``-inf`` before the log-softmax, so every score is a log-probability under that renormalised
distribution, comparable across strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.configs.decode import DecodeConfig

State = tuple[Tensor, ...]  # every tensor has the batch in dim 1, e.g. LSTM (h, c): [layers, B, H]
_NEG_INF = float("-inf")


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


def decode(
    decoder: StepDecoder,
    features: Tensor,
    config: DecodeConfig,
    *,
    start_id: int,
    end_id: int,
    unk_id: int | None = None,
    pad_id: int | None = None,
) -> list[list[Hypothesis]]:
    """Decode a batch of image features [B, F] with ``config.strategy``.

    Returns one list per image, best first: one hypothesis, or ``n_best`` for beam search.
    The caller is responsible for putting the decoder in ``eval()`` mode.
    """
    fn = {"greedy": greedy, "beam": beam_search, "sample": sample}[config.strategy]
    return fn(
        decoder, features, config, start_id=start_id, end_id=end_id, unk_id=unk_id, pad_id=pad_id
    )


# -- helpers -----------------------------------------------------------------------------------


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
    return logits.float().index_fill(-1, banned, _NEG_INF)


def _reorder(state: State | Tensor, index: Tensor) -> State | Tensor:
    """Select batch entries (dim 1) of every state tensor, e.g. to follow beam back-pointers."""
    if isinstance(state, Tensor):
        return state.index_select(1, index)
    return tuple(s.index_select(1, index) for s in state)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then nucleus filtering of [B, V] logits; removed entries become -inf.

    Nucleus keeps the smallest set of most likely tokens whose cumulative probability is
    ``>= top_p`` (always at least the most likely token).
    """
    V = logits.size(-1)
    if 0 < top_k < V:
        keep_idx = logits.topk(top_k, dim=-1).indices  # [B, k]
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, keep_idx, True)
        logits = logits.masked_fill(~keep, _NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, _NEG_INF)
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


# -- strategies --------------------------------------------------------------------------------


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


@torch.inference_mode()
def beam_search(
    decoder: StepDecoder,
    features: Tensor,
    config: DecodeConfig | None = None,
    *,
    start_id: int,
    end_id: int,
    unk_id: int | None = None,
    pad_id: int | None = None,
) -> list[list[Hypothesis]]:
    """Beam search over all B images x K beams as one [B*K] batch.

    Each step takes the best 2K (beam, token) candidates per image with ``topk`` over the
    flattened [K*V] scores. Candidates ending in <end> that rank in the top K become finished
    hypotheses (scored logprob / length_penalty); the best K others continue as beams. An image
    is done (and frozen) once its K-th best finished hypothesis cannot be beaten by any
    continuation of its live beams; decoding stops when all images are done or at ``max_len``.
    Images with fewer than ``n_best`` finished hypotheses are topped up with their best
    unfinished beams (``finished=False``), ranked after the finished ones.
    """
    config = config if config is not None else DecodeConfig(strategy="beam")
    B, K, T, device = features.size(0), config.beam_size, config.max_len, features.device
    if B == 0:
        return []
    alpha = config.length_penalty
    banned = banned_ids(config, start_id, end_id, unk_id, pad_id, device)
    fill = pad_id if pad_id is not None else end_id

    state = decoder.init_state(features)
    state = _reorder(state, torch.arange(B, device=device).repeat_interleave(K))  # batch B*K
    tokens = torch.full((B * K,), start_id, dtype=torch.long, device=device)  # [B*K]
    beam_scores = torch.zeros(B, K, device=device)  # [B, K] raw log-prob sums
    beam_scores[:, 1:] = _NEG_INF  # one live beam per image at first, not K identical ones
    seqs = torch.full((B, K, T), fill, dtype=torch.long, device=device)  # tokens of live beams
    alive_len = torch.zeros(B, dtype=torch.long, device=device)  # [B] length of live beams
    # finished hypotheses: at most K per image per step, slot t*K + j
    fin_seqs = torch.full((B, K * T, T), fill, dtype=torch.long, device=device)
    fin_raw = torch.full((B, K * T), _NEG_INF, device=device)
    fin_norm = torch.full((B, K * T), _NEG_INF, device=device)
    fin_len = torch.zeros(B, K * T, dtype=torch.long, device=device)  # words, <end> excluded
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B] image frozen
    beam_base = (torch.arange(B, device=device) * K)[:, None]  # [B, 1] offset into B*K

    for t in range(T):
        logits, state = decoder.step(tokens, state)  # [B*K, V]
        V = logits.size(-1)
        logp = F.log_softmax(mask_logits(logits, banned), dim=-1).view(B, K, V)
        cand = (beam_scores[:, :, None] + logp).view(B, K * V)  # [B, K*V]
        n_cand = min(2 * K, K * V)  # at most K end with <end>, so >= K others remain
        top_scores, top_idx = cand.topk(n_cand, dim=1)  # [B, 2K], best first
        top_beam = top_idx // V  # [B, 2K] which beam the candidate extends
        top_tok = top_idx % V  # [B, 2K] with which token
        is_end = top_tok == end_id

        # candidates ending with <end> among the best K are finished hypotheses
        new_fin = is_end[:, :K] & torch.isfinite(top_scores[:, :K]) & ~done[:, None]  # [B, K]
        slots = slice(t * K, (t + 1) * K)
        fin_seqs[:, slots] = seqs.gather(1, top_beam[:, :K, None].expand(-1, -1, T))
        fin_raw[:, slots] = top_scores[:, :K].masked_fill(~new_fin, _NEG_INF)
        fin_norm[:, slots] = fin_raw[:, slots] / length_penalty(t + 1, alpha)
        fin_len[:, slots] = t

        # the best K candidates that do not end continue as beams (rank order kept)
        rank = torch.arange(n_cand, device=device).expand(B, -1).masked_fill(is_end, n_cand)
        pos = rank.topk(K, dim=1, largest=False).indices  # [B, K]
        new_scores = top_scores.gather(1, pos)  # [B, K]
        new_beam = top_beam.gather(1, pos)  # [B, K]
        new_tok = top_tok.gather(1, pos)  # [B, K]
        new_seqs = seqs.gather(1, new_beam[:, :, None].expand(-1, -1, T))  # [B, K, T]
        new_seqs[:, :, t] = new_tok

        # done images keep their beams; their decoder rows keep running but are ignored
        beam_scores = torch.where(done[:, None], beam_scores, new_scores)
        seqs = torch.where(done[:, None, None], seqs, new_seqs)
        alive_len = alive_len.masked_fill(~done, t + 1)
        state = _reorder(state, (beam_base + new_beam).view(-1))
        tokens = new_tok.view(-1)

        if t + 1 < T:
            # best reachable normalised score of a live beam: raw scores only decrease and the
            # penalty is monotonic in length, so the bound is at the next or the last length
            lp_max = max(length_penalty(t + 2, alpha), length_penalty(T, alpha))
            bound = beam_scores.max(dim=1).values / lp_max  # [B]
            kth = fin_norm.topk(K, dim=1).values[:, -1]  # [B], -inf until K have finished
            done |= bound <= kth
            if bool(done.all()):
                break

    return _collect(
        config.n_best, alpha, fin_seqs, fin_raw, fin_norm, fin_len, seqs, beam_scores, alive_len
    )


def _collect(
    n: int,
    alpha: float,
    fin_seqs: Tensor,
    fin_raw: Tensor,
    fin_norm: Tensor,
    fin_len: Tensor,
    seqs: Tensor,
    beam_scores: Tensor,
    alive_len: Tensor,
) -> list[list[Hypothesis]]:
    """The n best hypotheses per image: finished ones first, then the best unfinished beams."""
    fin_top = fin_norm.topk(n, dim=1).indices  # [B, n]
    fin_ok = torch.isfinite(fin_norm.gather(1, fin_top))  # [B, n]
    fin_raw = fin_raw.gather(1, fin_top)
    fin_len = fin_len.gather(1, fin_top)
    fin_seqs = fin_seqs.gather(1, fin_top[:, :, None].expand(-1, -1, fin_seqs.size(-1)))
    alive_norm = beam_scores / length_penalty(alive_len.float(), alpha)[:, None]  # [B, K]
    alive_top = alive_norm.topk(n, dim=1).indices  # [B, n]
    alive_raw = beam_scores.gather(1, alive_top)
    alive_seqs = seqs.gather(1, alive_top[:, :, None].expand(-1, -1, seqs.size(-1)))

    # one transfer to Python lists; building the objects is the only per-image loop
    fin_rows = zip(
        fin_ok.tolist(), fin_raw.tolist(), fin_len.tolist(), fin_seqs.tolist(), strict=True
    )
    alive_rows = zip(alive_raw.tolist(), alive_len.tolist(), alive_seqs.tolist(), strict=True)
    results: list[list[Hypothesis]] = []
    for (ok, f_raw, f_len, f_seq), (a_raw, a_len, a_seq) in zip(fin_rows, alive_rows, strict=True):
        hyps = [Hypothesis(f_seq[i][: f_len[i]], f_raw[i], True) for i in range(n) if ok[i]]
        hyps += [Hypothesis(a_seq[i][:a_len], a_raw[i], False) for i in range(n - len(hyps))]
        results.append(hyps)
    return results
