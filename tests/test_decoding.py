"""Tests for captioner.decoding with two fake decoders (a seeded tiny LSTM and a scripted chain)
and with every variant of the product's decoder."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from captioner.configs.decode import DecodeConfig
from captioner.configs.model import DecoderConfig
from captioner.decoding import (
    Hypothesis,
    StepDecoder,
    beam_search,
    decode,
    filter_logits,
    greedy,
    length_penalty,
    sample,
)
from captioner.errors import UserError
from captioner.models.decoders import Decoder, build_decoder
from captioner.models.ensemble import EnsembleDecoder

PAD, START, END, UNK, A, B, C, D = range(8)  # scripted vocabulary (same specials as Vocab)
IDS = {"start_id": START, "end_id": END, "unk_id": UNK, "pad_id": PAD}


class TinyLSTMDecoder(nn.Module):
    """Seeded random 2-layer LSTM decoder; ``<end>`` grows likelier with every step.

    ``<start>`` and ``<pad>`` get a large logit bias, so only masking keeps them out of outputs.
    State is (h, c, step): three tensors with the batch in dim 1, to exercise reordering.
    """

    def __init__(self, vocab: int = 12, feat: int = 6, hidden: int = 16, seed: int = 0):
        super().__init__()
        self.layers, self.hidden = 2, hidden
        self.embed = nn.Embedding(vocab, hidden)
        self.init_h = nn.Linear(feat, 2 * self.layers * hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=self.layers)
        self.out = nn.Linear(hidden, vocab)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            self.out.bias[[PAD, START]] += 4.0
        self.eval()

    def init_state(self, features: Tensor) -> tuple[Tensor, ...]:
        hc = torch.tanh(self.init_h(features))  # [B, 2*L*H]
        hc = hc.view(features.size(0), 2 * self.layers, self.hidden).transpose(0, 1)
        h, c = hc.contiguous().chunk(2, dim=0)  # [L, B, H] each
        step = torch.zeros(1, features.size(0), 1)  # [1, B, 1]
        return h, c, step

    def step(self, tokens: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        h, c, step = state
        x = self.embed(tokens)[None]  # [1, B, H]
        y, (h, c) = self.lstm(x, (h, c))
        logits = self.out(y[0])  # [B, V]
        logits[:, END] += step[0, :, 0] - 3.0
        return logits, (h, c, step + 1)


class ChainDecoder:
    """Markov chain per image: P(next | image, previous token) from a hand-written table.

    ``features[:, 0]`` is the image's index into ``chains``; unlisted rows emit ``D`` with
    probability 1, so anything leaking after ``<end>`` (when ``<pad>`` is fed) shows up as ``D``.
    """

    def __init__(self, *chains: dict[int, dict[int, float]]):
        table = torch.zeros(len(chains), 8, 8)
        table[:, :, D] = 1.0
        for i, chain in enumerate(chains):
            for prev, nxt in chain.items():
                table[i, prev] = 0.0
                for tok, p in nxt.items():
                    table[i, prev, tok] = p
        self.logits = table.log()  # probability 0 -> -inf

    def features(self) -> Tensor:
        return torch.arange(self.logits.size(0), dtype=torch.float32)[:, None]  # [B, 1]

    def init_state(self, features: Tensor) -> tuple[Tensor, ...]:
        return (features[:, 0].long()[None],)  # [1, B] image index

    def step(self, tokens: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.logits[state[0][0], tokens], state


def lp(*probs: float) -> float:
    return sum(math.log(p) for p in probs)


def teacher_forced_score(decoder: StepDecoder, feats: Tensor, hyp: Hypothesis, **cfg) -> float:
    """Log-probability of ``hyp`` (plus <end> when finished) under the same masking rules."""
    banned = [START, PAD] + ([UNK] if cfg.get("suppress_unk") else [])
    seq = [START, *hyp.tokens] + ([END] if hyp.finished else [])
    state, total = decoder.init_state(feats[None]), 0.0
    with torch.no_grad():
        for prev, nxt in zip(seq[:-1], seq[1:], strict=True):
            logits, state = decoder.step(torch.tensor([prev]), state)
            logits[:, banned] = float("-inf")
            total += logits.log_softmax(-1)[0, nxt].item()
    return total


EPS = torch.finfo(torch.float32).eps


def rounding(decoder: StepDecoder, feats: Tensor, hyp: Hypothesis, **cfg) -> tuple[float, float]:
    """(tolerance, margin) for comparing ``hyp`` across two float32 computations of it that
    differ only in the order of their arithmetic (batch shape, kernels: AVX-512, AVX2, scalar).

    tolerance = 2 * eps * S, S = sum over every value a step stores (state entries, logits, the
    initial state) of |v * d score / d v|, in float64: the first-order change of the score when
    each value is off by one float32 rounding (relative eps); two runs round independently. S is
    the score's condition number: with N(0, 1) weights some paths amplify a rounding at step t
    over the steps after it, and their tolerance is larger (up to ~1e-2 for the top-down RNN,
    ~1e-3 for the others, against ~1e-6 for the tame ones) because the computation itself is that sensitive, on any machine. Every comparison
    below uses at most 0.28 of its tolerance (the top-down RNN; the others <= 0.24) under the
    default (scalar), AVX2 and AVX-512 kernels.

    margin = the smallest gap, along the path, between the chosen token's log-prob and the best
    other one's, so callers can check that a greedy choice cannot flip within the tolerance."""
    dec = copy.deepcopy(decoder).double()
    feats = feats.double()
    banned = [START, PAD] + ([UNK] if cfg.get("suppress_unk") else [])
    seq = [START, *hyp.tokens] + ([END] if hyp.finished else [])
    deltas: list[Tensor] = []

    def perturb(x: Tensor) -> Tensor:  # x * (1 + delta), delta = 0: d score / d delta = v * ds/dv
        if not x.is_floating_point():
            return x
        delta = torch.zeros_like(x, requires_grad=True)
        deltas.append(delta)
        return x * (1 + delta)

    state = tuple(perturb(s) for s in dec.init_state(feats[None]))
    total, margin = torch.zeros((), dtype=torch.float64), math.inf
    for prev, nxt in zip(seq[:-1], seq[1:], strict=True):
        logits, new = dec.step(torch.tensor([prev]), state)
        # memory the step passes through unchanged (the attended grid) is one value, not T
        state = tuple(s if s is old else perturb(s) for s, old in zip(new, state, strict=True))
        logits = perturb(logits).clone()
        logits[:, banned] = float("-inf")
        logp = logits.log_softmax(-1)[0]
        total = total + logp[nxt]
        others = torch.cat([logp[:nxt], logp[nxt + 1 :]])
        margin = min(margin, (logp[nxt] - others.max()).item())
    grads = torch.autograd.grad(total, deltas, allow_unused=True)
    sensitivity = sum(g.abs().sum().item() for g in grads if g is not None)
    return 2 * EPS * sensitivity, margin


# seeds with which every variant's greedy captions end at varied lengths and its greedy choices
# are clear of its rounding tolerance, as the tests need (with seed 1 the top-down LSTM's captions
# all run to max_len; two stacked cells of N(0, 1) weights make the top-down RNN's scores the
# most sensitive, up to ~1e-2, and with seed 7 its greedy margins are >= 4.9x that)
SEEDS = {"none": 1, "soft": 1, "topdown": 7}


def product_decoder(cell: str, attention: str, vocab: int = 12, feat: int = 6) -> Decoder:
    """The product's decoder, 2 layers, with seeded N(0, 1) weights (peaked distributions, so
    captions end at varied lengths) and the same bias towards <start>/<pad> as the fake."""
    cfg = DecoderConfig(
        embed_dim=8, hidden_size=16, num_layers=2, dropout=0.0, cell=cell, attention=attention
    )
    cfg.attention_dim = 8
    decoder = build_decoder(cfg, feat, vocab, pad_id=PAD)
    gen = torch.Generator().manual_seed(SEEDS[attention])
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        decoder.out.bias[[PAD, START]] += 4.0
    return decoder.eval()


VARIANTS = [
    "fake",
    *(f"{c}-{a}" for a in ("none", "soft", "topdown") for c in ("lstm", "gru", "rnn")),
    "ensemble-none",  # captioner.models.ensemble: two decoders' mean probabilities, their states
    "ensemble-grid",  # side by side (and a soft and a top-down decoder's grids) for beams to reorder
]
ENSEMBLES = {
    "none": (("lstm", "none"), ("gru", "none")),
    "grid": (("lstm", "soft"), ("gru", "topdown")),
}


@pytest.fixture(scope="module", params=VARIANTS)
def lstm(request: pytest.FixtureRequest) -> nn.Module:
    """The tests below run on the fake LSTM and on every variant of the product's decoder
    (cell x attention; with attention the features are grids, which beams reorder)."""
    if request.param == "fake":
        return TinyLSTMDecoder()
    kind, attention = request.param.split("-")
    if kind == "ensemble":
        return EnsembleDecoder([product_decoder(*m) for m in ENSEMBLES[attention]]).eval()
    return product_decoder(kind, attention)


@pytest.fixture(scope="module")
def feats(lstm: nn.Module) -> Tensor:
    shape = (7, 4, 6) if getattr(lstm, "attends", False) else (7, 6)  # a grid of 4 positions
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def tokens_of(result: list[list[Hypothesis]]) -> list[list[list[int]]]:
    return [[h.tokens for h in hyps] for hyps in result]


# -- greedy ------------------------------------------------------------------------------------

FAST_END = {START: {A: 0.7, B: 0.3}, A: {END: 0.8, C: 0.2}}
SLOW_END = {START: {B: 0.9, A: 0.1}, B: {C: 0.6, END: 0.4}, C: {END: 1.0}}
NEVER_END: dict[int, dict[int, float]] = {}  # D forever


def test_greedy_stops_per_sequence_without_leaks():
    dec = ChainDecoder(FAST_END, SLOW_END, NEVER_END)
    out = greedy(dec, dec.features(), DecodeConfig(max_len=5), **IDS)
    assert [len(h) for h in out] == [1, 1, 1]
    (h0,), (h1,), (h2,) = out
    assert (h0.tokens, h0.finished) == ([A], True)
    assert h0.score == pytest.approx(lp(0.7, 0.8))
    assert (h1.tokens, h1.finished) == ([B, C], True)
    assert h1.score == pytest.approx(lp(0.9, 0.6, 1.0))
    assert (h2.tokens, h2.finished, h2.score) == ([D] * 5, False, 0.0)


def test_greedy_max_len_counts_end():
    dec = ChainDecoder(SLOW_END)
    ((h,),) = greedy(dec, dec.features(), DecodeConfig(max_len=3), **IDS)
    assert (h.tokens, h.finished) == ([B, C], True)  # <end> is the 3rd generated token
    ((h,),) = greedy(dec, dec.features(), DecodeConfig(max_len=2), **IDS)
    assert (h.tokens, h.finished) == ([B, C], False)
    assert h.score == pytest.approx(lp(0.9, 0.6))
    ((h,),) = greedy(dec, dec.features(), DecodeConfig(max_len=1), **IDS)
    assert (h.tokens, h.finished) == ([B], False)


def test_greedy_without_pad_id_feeds_end():
    dec = ChainDecoder(FAST_END, SLOW_END)
    with_pad = greedy(dec, dec.features(), DecodeConfig(max_len=5), **IDS)
    no_pad = greedy(dec, dec.features(), DecodeConfig(max_len=5), start_id=START, end_id=END)
    assert no_pad == with_pad


def test_greedy_batched_equals_single_and_scores(lstm, feats):
    cfg = DecodeConfig(max_len=12)
    batched = greedy(lstm, feats, cfg, **IDS)
    assert any(len(h.tokens) != len(batched[0][0].tokens) for (h,) in batched)  # varied lengths
    for i, (h,) in enumerate(batched):
        tol, margin = rounding(lstm, feats[i], h)
        assert margin > tol  # every argmax is clear of rounding: the tokens cannot flip
        (single,) = greedy(lstm, feats[i : i + 1], cfg, **IDS)[0]
        assert single.tokens == h.tokens
        assert h.score == pytest.approx(teacher_forced_score(lstm, feats[i], h), abs=tol)


# -- beam search -------------------------------------------------------------------------------

# greedy takes A (0.5) and ends with A C <end> (0.2); beam finds B <end> (0.396)
MYOPIC = {
    START: {A: 0.5, B: 0.4, C: 0.1},
    A: {END: 0.25, C: 0.4, D: 0.35},
    B: {END: 0.99, C: 0.01},
    C: {END: 1.0},
    D: {END: 1.0},
}


def test_beam_beats_myopic_greedy():
    dec = ChainDecoder(MYOPIC)
    ((g,),) = greedy(dec, dec.features(), DecodeConfig(), **IDS)
    assert (g.tokens, g.score) == ([A, C], pytest.approx(lp(0.5, 0.4, 1.0)))
    cfg = DecodeConfig(strategy="beam", beam_size=2, n_best=2)
    (hyps,) = beam_search(dec, dec.features(), cfg, **IDS)
    assert [h.tokens for h in hyps] == [[B], [A, C]]
    assert [h.score for h in hyps] == pytest.approx([lp(0.4, 0.99), lp(0.5, 0.4, 1.0)])
    assert all(h.finished for h in hyps)


def test_beam_keeps_searching_while_a_live_beam_can_win():
    """K hypotheses finished at step 2, but the live beam B D (0.108) can still beat B D <end>."""
    chain = {
        START: {A: 0.5, B: 0.3, C: 0.2},
        A: {END: 0.9, D: 0.1},
        B: {D: 0.6, END: 0.4},
        D: {C: 0.6, END: 0.4},
        C: {END: 1.0},
    }
    dec = ChainDecoder(chain)
    cfg = DecodeConfig("beam", beam_size=2, n_best=2)
    (hyps,) = beam_search(dec, dec.features(), cfg, **IDS)
    assert [h.tokens for h in hyps] == [[A], [B, D, C]]
    assert [h.score for h in hyps] == pytest.approx([lp(0.5, 0.9), lp(0.3, 0.6, 0.6, 1.0)])


def test_beam_size_one_equals_greedy(lstm, feats):
    g = greedy(lstm, feats, DecodeConfig(max_len=12), **IDS)
    b = beam_search(lstm, feats, DecodeConfig("beam", max_len=12, beam_size=1), **IDS)
    assert tokens_of(b) == tokens_of(g)
    for i, ((hb,), (hg,)) in enumerate(zip(b, g, strict=True)):
        tol, margin = rounding(lstm, feats[i], hg)
        assert margin > tol  # the data's argmax choices are clear of rounding
        assert hb.score == pytest.approx(hg.score, abs=tol)  # [B] vs [B*1] arithmetic
    assert [h.finished for (h,) in b] == [h.finished for (h,) in g]


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_beam_batched_equals_single(lstm, feats, alpha):
    cfg = DecodeConfig("beam", max_len=10, beam_size=4, n_best=3, length_penalty=alpha)
    batched = beam_search(lstm, feats, cfg, **IDS)
    for i, hyps in enumerate(batched):
        single = beam_search(lstm, feats[i : i + 1], cfg, **IDS)[0]
        tols = [rounding(lstm, feats[i], h)[0] for h in hyps]
        # the n-best ranking of the data is clear of rounding, so the order cannot flip
        norm = [h.score / length_penalty(len(h.tokens) + h.finished, alpha) for h in hyps]
        for j in range(len(hyps) - 1):
            if hyps[j].finished == hyps[j + 1].finished:
                assert norm[j] - norm[j + 1] > tols[j] + tols[j + 1]
        assert [h.tokens for h in single] == [h.tokens for h in hyps]
        assert [h.finished for h in single] == [h.finished for h in hyps]
        for s, h, tol in zip(single, hyps, tols, strict=True):
            assert s.score == pytest.approx(h.score, abs=tol)  # [1*K] vs [B*K] arithmetic


def test_beam_scores_match_teacher_forcing(lstm, feats):
    """Scores are raw log-prob sums of the returned tokens: checks the state reordering."""
    cfg = DecodeConfig("beam", max_len=10, beam_size=4, n_best=4, length_penalty=0.5)
    for i, hyps in enumerate(beam_search(lstm, feats, cfg, **IDS)):
        for h in hyps:
            tol = rounding(lstm, feats[i], h)[0]
            assert h.score == pytest.approx(teacher_forced_score(lstm, feats[i], h), abs=tol)


def test_beam_n_best_sorted_and_distinct(lstm, feats):
    alpha = 0.7
    cfg = DecodeConfig("beam", max_len=10, beam_size=5, n_best=5, length_penalty=alpha)
    for hyps in beam_search(lstm, feats, cfg, **IDS):
        assert len(hyps) == 5
        assert len({tuple(h.tokens) for h in hyps}) == 5
        fin = [h for h in hyps if h.finished]
        assert hyps[: len(fin)] == fin  # finished first
        norm = [h.score / length_penalty(len(h.tokens) + 1, alpha) for h in fin]
        assert norm == sorted(norm, reverse=True)


def test_beam_no_end_falls_back_to_unfinished():
    never = {START: {A: 0.6, B: 0.4}, A: {A: 0.4, C: 0.6}, B: {B: 1.0}, C: {A: 1.0}}
    dec = ChainDecoder(never, MYOPIC)
    cfg = DecodeConfig("beam", max_len=3, beam_size=2, n_best=2)
    fallback, ok = beam_search(dec, dec.features(), cfg, **IDS)
    assert [(h.tokens, h.finished) for h in fallback] == [([B, B, B], False), ([A, C, A], False)]
    assert [h.score for h in fallback] == pytest.approx([lp(0.4), lp(0.6, 0.6, 1.0)])
    assert [h.tokens for h in ok] == [[B], [A, C]]  # the other image is unaffected


def test_beam_tops_up_with_unfinished():
    """Fewer finished than n_best: unfinished beams fill the list, ranked after finished ones."""
    dec = ChainDecoder(MYOPIC)
    cfg = DecodeConfig("beam", max_len=2, beam_size=3, n_best=3)
    (hyps,) = beam_search(dec, dec.features(), cfg, **IDS)
    assert [(h.tokens, h.finished) for h in hyps] == [([B], True), ([A, C], False), ([A, D], False)]
    assert [h.score for h in hyps] == pytest.approx([lp(0.4, 0.99), lp(0.5, 0.4), lp(0.5, 0.35)])


def test_length_penalty_changes_ranking():
    chain = {
        START: {A: 0.6, B: 0.4},
        A: {END: 0.55, C: 0.45},
        B: {C: 0.8, END: 0.2},
        C: {D: 0.9, END: 0.1},
        D: {END: 1.0},
    }
    dec = ChainDecoder(chain)
    (plain,) = beam_search(dec, dec.features(), DecodeConfig("beam", beam_size=3, n_best=3), **IDS)
    assert plain[0].tokens == [A]
    assert plain[0].score == pytest.approx(lp(0.6, 0.55))
    cfg = DecodeConfig("beam", beam_size=3, n_best=3, length_penalty=1.0)
    (pen,) = beam_search(dec, dec.features(), cfg, **IDS)
    assert [h.tokens for h in pen] == [[B, C, D], [A, C, D], [A]]
    assert pen[0].score == pytest.approx(lp(0.4, 0.8, 0.9, 1.0))  # raw, not normalised


# -- masking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_suppress_unk(strategy):
    dec = ChainDecoder({START: {UNK: 0.9, A: 0.1}, UNK: {END: 1.0}, A: {END: 1.0}})
    kw = {"strategy": strategy, "beam_size": 2, "seed": 0}
    ((h, *_),) = decode(dec, dec.features(), DecodeConfig(**kw, top_k=1), **IDS)
    assert h.tokens == [UNK]
    ((h, *_),) = decode(dec, dec.features(), DecodeConfig(**kw, suppress_unk=True), **IDS)
    assert (h.tokens, h.finished) == ([A], True)
    assert h.score == pytest.approx(0.0, abs=1e-6)  # A is certain once <unk> is masked


def test_suppress_unk_needs_unk_id(lstm, feats):
    with pytest.raises(ValueError, match="unk_id"):
        decode(lstm, feats, DecodeConfig(suppress_unk=True), start_id=START, end_id=END)


@pytest.mark.parametrize(
    "cfg",
    [
        DecodeConfig("greedy", max_len=15),
        DecodeConfig("beam", max_len=15, beam_size=4, n_best=4, length_penalty=0.6),
        DecodeConfig("sample", max_len=15, seed=3),
        DecodeConfig("sample", max_len=15, seed=4, temperature=3.0, suppress_unk=True),
    ],
)
def test_outputs_never_contain_specials(lstm, feats, cfg):
    """<start>/<pad> carry a large logit bias in the fake decoder; masking must win."""
    banned = {START, END, PAD} | ({UNK} if cfg.suppress_unk else set())
    for hyps in decode(lstm, feats, cfg, **IDS):
        assert len(hyps) == (cfg.n_best if cfg.strategy == "beam" else 1)
        for h in hyps:
            assert not banned & set(h.tokens)
            assert 0 < len(h.tokens) + h.finished <= cfg.max_len
            assert math.isfinite(h.score) and h.score <= 0


# -- sampling ----------------------------------------------------------------------------------


def test_sample_reproducible_and_seed_dependent(lstm, feats):
    rng = torch.get_rng_state()
    a = sample(lstm, feats, DecodeConfig("sample", max_len=12, seed=0), **IDS)
    b = sample(lstm, feats, DecodeConfig("sample", max_len=12, seed=0), **IDS)
    c = sample(lstm, feats, DecodeConfig("sample", max_len=12, seed=1), **IDS)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is never touched
    assert tokens_of(a) == tokens_of(b)
    assert [h.score for (h,) in a] == [h.score for (h,) in b]
    assert tokens_of(a) != tokens_of(c)
    for i, (h,) in enumerate(a):  # scores are model log-probs of what was sampled
        tol = rounding(lstm, feats[i], h)[0]
        assert h.score == pytest.approx(teacher_forced_score(lstm, feats[i], h), abs=tol)


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "temperature": 5.0}])
def test_sample_degenerate_filters_equal_greedy(lstm, feats, kw):
    g = greedy(lstm, feats, DecodeConfig(max_len=12), **IDS)
    s = sample(lstm, feats, DecodeConfig("sample", max_len=12, seed=7, **kw), **IDS)
    assert tokens_of(s) == tokens_of(g)
    for i, ((hs,), (hg,)) in enumerate(zip(s, g, strict=True)):
        tol, margin = rounding(lstm, feats[i], hg)
        assert margin > tol  # the data's argmax choices are clear of rounding
        assert hs.score == pytest.approx(hg.score, abs=tol)


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.75)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.85)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_p=1e-9)) == [0]
    assert kept(filter_logits(logits, top_k=2, top_p=0.9)) == [0, 1]
    assert kept(filter_logits(logits)) == [0, 1, 2, 3]
    shuffled = logits[:, [2, 0, 3, 1]]  # order must not depend on vocabulary position
    assert kept(filter_logits(shuffled, top_p=0.75)) == [1, 3]


# -- API ---------------------------------------------------------------------------------------


def test_decode_dispatch_and_empty_batch(lstm, feats):
    assert decode(lstm, feats[:0], DecodeConfig("beam"), **IDS) == []
    assert decode(lstm, feats[:0], DecodeConfig(), **IDS) == []
    assert isinstance(lstm, StepDecoder)
    cfg = DecodeConfig("beam", max_len=8, beam_size=3, n_best=2)
    assert decode(lstm, feats, cfg, **IDS) == beam_search(lstm, feats, cfg, **IDS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"strategy": "nucleus"}, "strategy"),
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 2, "n_best": 3}, "n_best"),
        ({"n_best": 0}, "n_best"),
        ({"max_len": 0}, "max_len"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e-320}, "temperature"),
        ({"length_penalty": 600.0}, "length_penalty"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(UserError, match=field):
        DecodeConfig(**kwargs)


def test_draw_follows_the_probabilities_and_never_draws_a_zero() -> None:
    """Inverse-CDF sampling, the sampler of ``sample``: multinomial's distribution."""
    from captioner.decoding import draw

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.8], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    drawn = torch.stack([draw(probs, gen) for _ in range(20000)])  # [n, 3]
    freq = torch.stack([torch.bincount(drawn[:, r], minlength=4) for r in range(3)]) / 20000
    assert (freq[probs == 0] == 0).all()
    assert torch.allclose(freq, probs, atol=0.015)
