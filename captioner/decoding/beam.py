"""Beam search over all B images x K beams as one [B*K] batch.

:func:`beam_search` is a loop over time steps; each step is a chain of small pure functions on
[B, K] tensors: the best candidates (:func:`_candidates`), the ones that finish
(:func:`_record_finished`), the ones that continue (:func:`_continuations`, :func:`_advance`),
and whether an image can still improve (:func:`_cannot_improve`). The arithmetic is done in the
same order for one image as for a batch, so batched and per-image beams agree, and beam 1 is
greedy search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.configs.decode import DecodeConfig
from captioner.decoding.common import (
    NEG_INF,
    Hypothesis,
    StepDecoder,
    banned_ids,
    length_penalty,
    mask_logits,
    reorder,
)


@dataclass
class _Beams:
    """The K live beams of each image."""

    scores: Tensor  # [B, K] raw log-prob sums
    seqs: Tensor  # [B, K, T] their tokens so far, ``fill`` after
    length: Tensor  # [B] their length (the same for every beam of an image)

    @classmethod
    def start(cls, B: int, K: int, T: int, fill: int, device: torch.device) -> _Beams:
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = NEG_INF  # one live beam per image at first, not K identical ones
        return cls(
            scores,
            torch.full((B, K, T), fill, dtype=torch.long, device=device),
            torch.zeros(B, dtype=torch.long, device=device),
        )


@dataclass
class _Finished:
    """Finished hypotheses of each image: at most K per step, step t in slots t*K .. t*K+K-1."""

    seqs: Tensor  # [B, K*T, T]
    raw: Tensor  # [B, K*T] raw log-prob sums, -inf in unused slots
    norm: Tensor  # [B, K*T] raw / length penalty
    length: Tensor  # [B, K*T] words, <end> excluded

    @classmethod
    def empty(cls, B: int, K: int, T: int, fill: int, device: torch.device) -> _Finished:
        return cls(
            torch.full((B, K * T, T), fill, dtype=torch.long, device=device),
            torch.full((B, K * T), NEG_INF, device=device),
            torch.full((B, K * T), NEG_INF, device=device),
            torch.zeros(B, K * T, dtype=torch.long, device=device),
        )


class _Candidates(NamedTuple):
    """The best 2K (beam, token) extensions of each image, best first: [B, 2K] each."""

    scores: Tensor  # raw log-prob sums
    beam: Tensor  # which beam the candidate extends
    token: Tensor  # with which token
    is_end: Tensor  # the token is <end>


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
    state = reorder(state, torch.arange(B, device=device).repeat_interleave(K))  # batch B*K
    tokens = torch.full((B * K,), start_id, dtype=torch.long, device=device)  # [B*K]
    beams = _Beams.start(B, K, T, fill, device)
    finished = _Finished.empty(B, K, T, fill, device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B] image frozen
    beam_base = (torch.arange(B, device=device) * K)[:, None]  # [B, 1] offset into B*K

    for t in range(T):
        logits, state = decoder.step(tokens, state)  # [B*K, V]
        logp = F.log_softmax(mask_logits(logits, banned), dim=-1).view(B, K, logits.size(-1))
        cand = _candidates(beams.scores, logp, end_id)
        _record_finished(finished, cand, beams.seqs, done, t, alpha)
        new_scores, new_beam, new_tok, new_seqs = _continuations(cand, beams.seqs, t)
        # done images keep their beams; their decoder rows keep running but are ignored
        beams = _advance(beams, done, new_scores, new_seqs, t)
        state = reorder(state, (beam_base + new_beam).view(-1))
        tokens = new_tok.view(-1)
        if t + 1 < T:
            done |= _cannot_improve(beams.scores, finished.norm, t, T, alpha)
            if bool(done.all()):
                break

    return _collect(config.n_best, alpha, finished, beams)


def _candidates(beam_scores: Tensor, logp: Tensor, end_id: int) -> _Candidates:
    """The best 2K (beam, token) candidates per image from beam scores [B, K] and next-token
    log-probabilities [B, K, V], by ``topk`` over the flattened [K*V] scores."""
    B, K, V = logp.shape
    cand = (beam_scores[:, :, None] + logp).view(B, K * V)  # [B, K*V]
    n_cand = min(2 * K, K * V)  # at most K end with <end>, so >= K others remain
    top_scores, top_idx = cand.topk(n_cand, dim=1)  # [B, 2K], best first
    top_tok = top_idx % V
    return _Candidates(top_scores, top_idx // V, top_tok, top_tok == end_id)


def _record_finished(
    finished: _Finished, cand: _Candidates, seqs: Tensor, done: Tensor, t: int, alpha: float
) -> None:
    """Store the candidates of step ``t`` ending with <end> among the best K (of images not
    done) in ``finished``'s slots of that step; the other slots of the step get -inf."""
    K, T = seqs.size(1), seqs.size(2)
    new_fin = cand.is_end[:, :K] & torch.isfinite(cand.scores[:, :K]) & ~done[:, None]  # [B, K]
    slots = slice(t * K, (t + 1) * K)
    finished.seqs[:, slots] = seqs.gather(1, cand.beam[:, :K, None].expand(-1, -1, T))
    finished.raw[:, slots] = cand.scores[:, :K].masked_fill(~new_fin, NEG_INF)
    finished.norm[:, slots] = finished.raw[:, slots] / length_penalty(t + 1, alpha)
    finished.length[:, slots] = t


def _continuations(
    cand: _Candidates, seqs: Tensor, t: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The best K candidates that do not end (rank order kept): their scores, the beams they
    extend, their tokens ([B, K] each) and their sequences [B, K, T] with the token at ``t``."""
    (B, K, T), n_cand = seqs.shape, cand.scores.size(1)
    rank = torch.arange(n_cand, device=seqs.device).expand(B, -1).masked_fill(cand.is_end, n_cand)
    pos = rank.topk(K, dim=1, largest=False).indices  # [B, K]
    new_scores = cand.scores.gather(1, pos)  # [B, K]
    new_beam = cand.beam.gather(1, pos)  # [B, K]
    new_tok = cand.token.gather(1, pos)  # [B, K]
    new_seqs = seqs.gather(1, new_beam[:, :, None].expand(-1, -1, T))  # [B, K, T]
    new_seqs[:, :, t] = new_tok
    return new_scores, new_beam, new_tok, new_seqs


def _advance(beams: _Beams, done: Tensor, scores: Tensor, seqs: Tensor, t: int) -> _Beams:
    """The beams after step ``t``: the continuations, except for images already done."""
    return _Beams(
        torch.where(done[:, None], beams.scores, scores),
        torch.where(done[:, None, None], beams.seqs, seqs),
        beams.length.masked_fill(~done, t + 1),
    )


def _cannot_improve(beam_scores: Tensor, fin_norm: Tensor, t: int, T: int, alpha: float) -> Tensor:
    """[B] True where the K-th best finished hypothesis beats any continuation of the beams.

    The best reachable normalised score of a live beam: raw scores only decrease and the penalty
    is monotonic in length, so the bound is at the next or the last length.
    """
    K = beam_scores.size(1)
    lp_max = max(length_penalty(t + 2, alpha), length_penalty(T, alpha))
    bound = beam_scores.max(dim=1).values / lp_max  # [B]
    kth = fin_norm.topk(K, dim=1).values[:, -1]  # [B], -inf until K have finished
    return bound <= kth


def _collect(n: int, alpha: float, finished: _Finished, beams: _Beams) -> list[list[Hypothesis]]:
    """The n best hypotheses per image: finished ones first, then the best unfinished beams."""
    fin_top = finished.norm.topk(n, dim=1).indices  # [B, n]
    fin_ok = torch.isfinite(finished.norm.gather(1, fin_top))  # [B, n]
    fin_raw = finished.raw.gather(1, fin_top)
    fin_len = finished.length.gather(1, fin_top)
    fin_seqs = finished.seqs.gather(1, fin_top[:, :, None].expand(-1, -1, finished.seqs.size(-1)))
    alive_len = beams.length
    alive_norm = beams.scores / length_penalty(alive_len.float(), alpha)[:, None]  # [B, K]
    alive_top = alive_norm.topk(n, dim=1).indices  # [B, n]
    alive_raw = beams.scores.gather(1, alive_top)
    alive_seqs = beams.seqs.gather(1, alive_top[:, :, None].expand(-1, -1, beams.seqs.size(-1)))

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
