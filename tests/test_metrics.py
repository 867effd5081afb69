"""Tests for captioner.evaluation.metrics: corpus BLEU (NLTK) against hand-worked values and coco-caption."""

from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import warnings

import pytest

from captioner.evaluation import metrics
from captioner.evaluation.metrics import (
    bleu_from_text,
    coco_caption_metrics,
    corpus_bleu,
    sentence_bleu,
    strip_specials,
)
from captioner.vocab import tokenize

KEYS = ["bleu1", "bleu2", "bleu3", "bleu4"]


def toks(text: str) -> list[str]:
    return text.split()


# -- corpus_bleu: hand-worked values -----------------------------------------------------------
def test_perfect_match_is_one_for_every_order():
    hyps = [toks("a dog runs on the grass"), toks("two men ride red bikes")]
    refs = [[toks("a dog runs on the grass"), toks("a dog")], [toks("two men ride red bikes")]]
    scores = corpus_bleu(hyps, refs)
    assert list(scores) == KEYS
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in scores.values())


def test_disjoint_is_zero():
    scores = corpus_bleu([toks("a b c d e")], [[toks("v w x y z")]])
    assert scores == {k: 0.0 for k in KEYS}


def test_hand_worked_example():
    # hyp  = the cat sat on the mat                 (c = 6)
    # ref1 = the cat is on the mat                  (6 tokens)
    # ref2 = there is a cat on the mat              (7 tokens)
    # p1: the x2 (max ref count 2) + cat + on + mat = 5 of 6 ('sat' unmatched)    -> 5/6
    # p2: the-cat, on-the, the-mat match; cat-sat, sat-on do not                  -> 3/5
    # p3: only on-the-mat matches                                                 -> 1/4
    # p4: the-cat-sat-on, cat-sat-on-the, sat-on-the-mat: none                    -> 0/3
    # r = 6 (closest to 6), c = r -> BP = exp(1 - 6/6) = 1
    # bleu1 = 5/6; bleu2 = sqrt(5/6 * 3/5) = sqrt(1/2);
    # bleu3 = (5/6 * 3/5 * 1/4) ** (1/3) = (1/8) ** (1/3) = 0.5; bleu4 = 0 (no smoothing)
    hyp = toks("the cat sat on the mat")
    refs = [toks("the cat is on the mat"), toks("there is a cat on the mat")]
    scores = corpus_bleu([hyp], [refs])
    assert scores["bleu1"] == pytest.approx(5 / 6, abs=1e-12)
    assert scores["bleu2"] == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert scores["bleu3"] == pytest.approx(0.5, abs=1e-12)
    assert scores["bleu4"] == 0.0
    assert list(corpus_bleu([hyp], [refs], max_n=2)) == ["bleu1", "bleu2"]


def test_corpus_level_sums_counts_instead_of_averaging_sentences():
    # image 1: 4 of 4 unigrams match; image 2: 0 of 2. Corpus p1 = 4/6 (a sentence average
    # would give (1 + 0) / 2 = 0.5). r = 4 + 2 = 6 = c -> BP = 1, so bleu1 = 2/3.
    hyps = [toks("a b c d"), toks("x y")]
    refs = [[toks("a b c d")], [toks("q r")]]
    assert corpus_bleu(hyps, refs, max_n=1)["bleu1"] == pytest.approx(2 / 3, abs=1e-12)


def test_multi_reference_clipping_uses_max_count_over_references():
    # 'the' occurs 4 times in the hypothesis; ref1 has it twice, ref2 once. The clip is the MAX
    # over references (2), not the sum (3) nor the unclipped count (4): p1 = 2/4.
    # c = 4, closest reference length is 4 (ref1) -> BP = 1, so bleu1 = 0.5.
    hyp = toks("the the the the")
    refs = [toks("the cat on the"), toks("the dog")]
    assert corpus_bleu([hyp], [refs], max_n=1)["bleu1"] == pytest.approx(0.5, abs=1e-12)
    # a third reference with three 'the' raises the clip to 3 -> 3/4 (r stays 4)
    refs3 = [*refs, toks("the the the dog")]
    assert corpus_bleu([hyp], [refs3], max_n=1)["bleu1"] == pytest.approx(0.75, abs=1e-12)


def test_brevity_penalty_exact_value():
    # hyp = a b c (c = 3), ref = a b c d e f (r = 6): p1 = p2 = p3 = 1, so
    # bleu1..3 = BP = exp(1 - r/c) = exp(1 - 2) = exp(-1); a 3-token hypothesis has no 4-gram
    # to match (NLTK counts 0 of 1), so bleu4 = 0.
    scores = corpus_bleu([toks("a b c")], [[toks("a b c d e f")]])
    for key in ("bleu1", "bleu2", "bleu3"):
        assert scores[key] == pytest.approx(math.exp(-1), abs=1e-12)
    assert scores["bleu4"] == 0.0


def test_no_penalty_when_hypothesis_is_longer():
    # c = 5 > r = 3 -> BP = 1; p1 = 3/5
    scores = corpus_bleu([toks("a b c x y")], [[toks("a b c")]], max_n=1)
    assert scores["bleu1"] == pytest.approx(3 / 5, abs=1e-12)


@pytest.mark.parametrize("order", [1, -1])
def test_closest_reference_length_tie_takes_the_shorter(order):
    # c = 5; references of length 4 and 6 are both at distance 1 -> r = 4 (the shorter),
    # c > r -> BP = 1 and bleu1 = 5/5 = 1. Taking the longer would give exp(1 - 6/5).
    hyp = toks("a b c d e")
    refs = [toks("a b c d"), toks("a b c d e f")][::order]
    assert corpus_bleu([hyp], [refs], max_n=1)["bleu1"] == pytest.approx(1.0, abs=1e-12)
    # without a tie the closest one is used: lengths 6 and 3 -> r = 6, BP = exp(1 - 6/5)
    refs = [toks("a b c d e f"), toks("a b c")][::order]
    expected = math.exp(1 - 6 / 5)
    assert corpus_bleu([hyp], [refs], max_n=1)["bleu1"] == pytest.approx(expected, abs=1e-12)


def test_empty_hypothesis_scores_zero():
    scores = corpus_bleu([[]], [[toks("a b c d")]])
    assert scores == {k: 0.0 for k in KEYS}


def test_an_order_without_matches_is_exactly_zero_and_silent():
    # NLTK's own "no smoothing" gives ~1e-77 (sys.float_info.min ** (1/4)) and a UserWarning;
    # corpus_bleu reports 0.0, as the hand-worked definition says, and warns about nothing.
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    hyp = toks("the cat sat on the mat")
    refs = [toks("the cat is on the mat"), toks("there is a cat on the mat")]
    with pytest.warns(UserWarning, match="0 counts of 4-gram"):
        raw = nltk_bleu.corpus_bleu([refs], [hyp])
    assert 0.0 < raw < 1e-70
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = corpus_bleu([hyp], [refs])
        assert scores["bleu4"] == 0.0 and scores["bleu3"] == pytest.approx(0.5, abs=1e-12)
        # once an order has no match, every higher cumulative order is 0 too
        assert corpus_bleu([toks("a x b y")], [[toks("a b")]]) == {
            "bleu1": pytest.approx(0.5, abs=1e-12),
            "bleu2": 0.0,
            "bleu3": 0.0,
            "bleu4": 0.0,
        }


def test_single_order_and_float_results():
    # NLTK returns a bare number (and int 0 without any unigram match) for one weight tuple
    assert corpus_bleu([toks("a b")], [[toks("a b")]], max_n=1) == {"bleu1": 1.0}
    zero = corpus_bleu([toks("x")], [[toks("a")]], max_n=1)["bleu1"]
    assert zero == 0.0 and type(zero) is float
    assert all(type(v) is float for v in corpus_bleu([toks("q")], [[toks("a")]]).values())
    assert sentence_bleu(toks("a b"), [toks("a b")], max_n=1) == {"bleu1": 1.0}


# -- agreement with NLTK -----------------------------------------------------------------------
def _random_corpus(rng: random.Random, min_hyp_len: int) -> tuple[list, list]:
    vocab = [f"w{i}" for i in range(rng.randint(4, 12))]
    n_images = rng.randint(1, 30)
    hyps = [
        [rng.choice(vocab) for _ in range(rng.randint(min_hyp_len, 16))] for _ in range(n_images)
    ]
    refs = [
        [[rng.choice(vocab) for _ in range(rng.randint(1, 18))] for _ in range(rng.randint(1, 5))]
        for _ in range(n_images)
    ]
    return hyps, refs


@pytest.mark.parametrize("seed", range(8))
def test_corpus_bleu_agrees_with_nltk(seed):
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rng = random.Random(seed)
    for _ in range(10):
        # any length, empty included: corpus_bleu IS NLTK's, apart from its exact zeros
        hyps, refs = _random_corpus(rng, min_hyp_len=0)
        ours = corpus_bleu(hyps, refs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NLTK warns when some order has no match
            for n in range(1, 5):
                expected = nltk_bleu.corpus_bleu(refs, hyps, weights=(1 / n,) * n)
                assert ours[f"bleu{n}"] == pytest.approx(expected, abs=1e-9)


def _coco_bleu(hyps: list[list[str]], refs: list[list[list[str]]]) -> list[float]:
    """coco-caption's corpus BLEU-1..4 (``Bleu(4)``: the "closest" reference length) of tokens."""
    bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    scores, _ = bleu.Bleu(4).compute_score(gts, res, verbose=0)
    return scores


def test_hypotheses_shorter_than_n_are_where_nltk_and_coco_caption_differ():
    # NLTK floors EVERY SENTENCE's n-gram count at 1 (modified_precision: max(1, count)), so a
    # hypothesis shorter than n adds one unmatched n-gram to the order-n total; coco-caption adds
    # its true count max(0, len - n + 1) = 0. The 1-token hypothesis of this PERFECT corpus:
    #   NLTK:  p1..p4 = 5/5, 3/(3+1), 2/(2+1), 1/(1+1), BP = 1
    #   coco:  p1..p4 = 5/5, 3/3, 2/2, 1/1 -> 1.0 for every order
    # (the hand-written BLEU before NLTK counted like coco-caption: 1.0)
    hyps = [toks("a b c d"), toks("x")]
    refs = [[toks("a b c d")], [toks("x")]]
    scores = corpus_bleu(hyps, refs)
    assert scores["bleu1"] == pytest.approx(1.0, abs=1e-12)
    assert scores["bleu2"] == pytest.approx((3 / 4) ** (1 / 2), abs=1e-12)
    assert scores["bleu3"] == pytest.approx((3 / 4 * 2 / 3) ** (1 / 3), abs=1e-12)
    assert scores["bleu4"] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4), abs=1e-12)
    assert scores["bleu4"] == pytest.approx(0.7071, abs=1e-4)
    assert _coco_bleu(hyps, refs) == pytest.approx([1.0] * 4, abs=1e-8)
    # An empty hypothesis is the same case for every order: c = 4, r = 4 + 1 -> BP = exp(-1/4);
    # NLTK: p1..p4 = 4/5, 3/4, 2/3, 1/2; coco-caption: all 1, so its BLEU-n is BP alone.
    hyps = [toks("a b c d"), []]
    refs = [[toks("a b c d")], [toks("x")]]
    bp = math.exp(1 - 5 / 4)
    assert corpus_bleu(hyps, refs)["bleu1"] == pytest.approx(bp * 4 / 5, abs=1e-12)
    assert corpus_bleu(hyps, refs)["bleu4"] == pytest.approx(bp * (1 / 5) ** (1 / 4), abs=1e-12)
    assert _coco_bleu(hyps, refs) == pytest.approx([bp] * 4, abs=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_sentence_bleu_agrees_with_nltk_method1(seed):
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smooth = nltk_bleu.SmoothingFunction(epsilon=0.1).method1
    rng = random.Random(100 + seed)
    for _ in range(30):
        hyps, refs = _random_corpus(rng, min_hyp_len=1)
        ours = sentence_bleu(hyps[0], refs[0])
        for n in range(1, 5):
            expected = nltk_bleu.sentence_bleu(
                refs[0], hyps[0], weights=(1 / n,) * n, smoothing_function=smooth
            )
            assert ours[f"bleu{n}"] == pytest.approx(expected, abs=1e-9)


def test_sentence_bleu_smooths_missing_orders():
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0 -> epsilon / 3 = 0.1 / 3; BP = 1
    hyp = toks("the cat sat on the mat")
    refs = [toks("the cat is on the mat"), toks("there is a cat on the mat")]
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert sentence_bleu(hyp, refs)["bleu4"] == pytest.approx(expected, abs=1e-12)
    assert sentence_bleu(toks("x y"), [toks("a b")]) == {k: 0.0 for k in KEYS}


# -- agreement with coco-caption's BleuScorer (pure Python, no Java needed) ---------------------
@pytest.mark.parametrize("seed", range(3))
def test_corpus_bleu_agrees_with_coco_bleu_scorer(seed):
    bleu_scorer = pytest.importorskip("pycocoevalcap.bleu.bleu_scorer")
    rng = random.Random(200 + seed)
    # hypotheses of >= 4 tokens: shorter ones are where the two differ (see the test above)
    hyps, refs = _random_corpus(rng, min_hyp_len=4)
    hyps[0] = refs[0][0][:4] + hyps[0]  # make sure some 4-gram matches (coco adds 1e-15)
    scorer = bleu_scorer.BleuScorer(n=4)
    for hyp, rs in zip(hyps, refs, strict=True):
        scorer += (" ".join(hyp), [" ".join(r) for r in rs])
    coco, _ = scorer.compute_score(option="closest", verbose=0)
    ours = corpus_bleu(hyps, refs)
    assert [ours[k] for k in KEYS] == pytest.approx(coco, rel=1e-6)


def test_corpus_bleu_agrees_with_coco_caption_on_demo_captions():
    """A realistic corpus: 40 demo scenes; each hypothesis is one caption of its scene (or, for
    every third image, of another scene) scored against the other captions of its own scene."""
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    from captioner.datasets.synthetic import describe_scene, sample_scene

    rng = random.Random(7)
    captions = [describe_scene(sample_scene(rng, 64), rng) for _ in range(40)]
    hyps = [
        tokenize(captions[(i + 1) % 40][0] if i % 3 == 0 else caps[0])
        for i, caps in enumerate(captions)
    ]
    refs = [[tokenize(c) for c in caps[1:]] for caps in captions]
    assert min(len(h) for h in hyps) >= 4  # real captions: NLTK and coco-caption count alike
    ours = corpus_bleu(hyps, refs)
    assert 0.2 < ours["bleu4"] < 0.9  # neither trivial nor degenerate
    assert [ours[k] for k in KEYS] == pytest.approx(_coco_bleu(hyps, refs), abs=1e-4)


# -- input validation --------------------------------------------------------------------------
def test_strings_instead_of_token_lists_raise_type_error():
    with pytest.raises(TypeError, match="string"):
        corpus_bleu(["a dog runs"], [[toks("a dog runs")]])
    with pytest.raises(TypeError, match="string"):
        corpus_bleu([toks("a dog runs")], [["a dog runs"]])
    with pytest.raises(TypeError):  # forgot the per-image list of references
        corpus_bleu([toks("a dog runs")], [toks("a dog runs")])
    with pytest.raises(TypeError, match="ids"):
        corpus_bleu([[4, 5, 6]], [[[4, 5, 6]]])
    with pytest.raises(TypeError, match="string"):
        sentence_bleu("a dog", [toks("a dog")])
    with pytest.raises(TypeError, match="string"):
        sentence_bleu(toks("a dog"), ["a dog"])
    with pytest.raises(ValueError, match="no references"):
        sentence_bleu(toks("a dog"), [])
    with pytest.raises(TypeError, match="string"):
        strip_specials("<start> a dog")


def test_corpus_bleu_rejects_misaligned_or_empty_input():
    with pytest.raises(ValueError, match="2 hypotheses"):
        corpus_bleu([toks("a"), toks("b")], [[toks("a")]])
    with pytest.raises(ValueError, match="no references"):
        corpus_bleu([toks("a")], [[]])
    with pytest.raises(ValueError, match="at least one"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="max_n"):
        corpus_bleu([toks("a")], [[toks("a")]], max_n=0)


# -- text-level BLEU ---------------------------------------------------------------------------
def test_strip_specials():
    tokens = ["<start>", "a", "<unk>", "dog", "<end>", "<pad>", "<pad>"]
    assert strip_specials(tokens) == ["a", "dog"]


def test_bleu_from_text_tokenizes_and_strips_specials():
    hyps = ["<start> A Dog runs on the GRASS! <end> <pad> <pad>", "two men, riding bikes."]
    refs = [
        ["a dog runs on the grass .", "A brown dog is running"],
        ["Two men riding bikes", "people on bicycles"],
    ]
    scores = bleu_from_text(hyps, refs)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in scores.values())


def test_bleu_from_text_unk_never_matches_a_reference_word():
    # tokenize('<unk>') would give the plain word 'unk'; it must be removed before tokenizing.
    # hyp -> [a, dog] (c = 2), ref -> [a, unk, dog] (r = 3): p1 = 1, p2 = 0/1
    # bleu1 = exp(1 - 3/2) = exp(-0.5), bleu2 = 0 (scoring 'unk' as a word would give 1 and 1)
    scores = bleu_from_text(["a <unk> dog"], [["a unk dog"]], max_n=2)
    assert scores["bleu1"] == pytest.approx(math.exp(-0.5), abs=1e-12)
    assert scores["bleu2"] == 0.0
    # references are text, not ids: '<unk>' stands for a rare word and scores nothing
    # hyp -> [a, on, a, bench] (c = 4), ref has 5 words: p1 = 4/4, BP = exp(1 - 5/4);
    # the only 4-gram 'a on a bench' is not in the reference -> bleu4 = 0
    scores = bleu_from_text(["a <unk> on a bench"], [["A pelican on a bench."]])
    assert scores["bleu1"] == pytest.approx(math.exp(1 - 5 / 4), abs=1e-12)
    assert scores["bleu4"] == 0.0


def test_bleu_from_text_uses_all_references():
    hyps = ["a man rides a red bike"]
    one = bleu_from_text(hyps, [["a woman walks a dog in the park"]])
    many = bleu_from_text(hyps, [["a woman walks a dog in the park", "a man rides a red bike"]])
    assert many["bleu4"] == pytest.approx(1.0, abs=1e-12)
    assert one["bleu4"] < many["bleu4"]


def test_bleu_from_text_validates_inputs():
    with pytest.raises(ValueError, match="aligned"):
        bleu_from_text(["a dog", "a cat"], [["a dog"]])
    with pytest.raises(ValueError, match="image 1 has no reference"):
        bleu_from_text(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(TypeError, match="LIST"):
        bleu_from_text(["a dog"], ["a dog"])
    with pytest.raises(TypeError, match="caption string"):
        bleu_from_text([["a", "dog"]], [["a dog"]])


# -- optional coco-caption metrics -------------------------------------------------------------
HYPS = {1: "A dog runs on the grass.", 2: "a man riding a horse <end>"}
REFS = {
    1: ["a dog is running on grass", "The dog runs on the grass ."],
    2: ["a man rides a horse .", "A person riding a brown horse"],
}


def _java_works() -> bool:
    return shutil.which("java") is not None


@pytest.fixture
def fresh_warning_state(monkeypatch):
    monkeypatch.setattr(metrics, "_COCO_WARNED", False)


def test_coco_metrics_none_without_pycocoevalcap(monkeypatch, caplog, fresh_warning_state):
    for name in [m for m in sys.modules if m.startswith("pycocoevalcap")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # makes the import fail
    with caplog.at_level(logging.INFO, logger="captioner.evaluation.metrics"):
        assert coco_caption_metrics(HYPS, REFS) is None
        assert coco_caption_metrics(HYPS, REFS) is None
    messages = [r.getMessage() for r in caplog.records if r.name == "captioner.evaluation.metrics"]
    assert len(messages) == 1  # logged once, not per call
    assert 'pip install "captioner[coco-eval]"' in messages[0]


def test_coco_metrics_none_without_java(monkeypatch, caplog, fresh_warning_state):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with caplog.at_level(logging.INFO, logger="captioner.evaluation.metrics"):
        assert coco_caption_metrics(HYPS, REFS) is None
    assert len(caplog.records) == 1


def test_coco_metrics_validate_ids():
    with pytest.raises(ValueError, match="same image ids"):
        coco_caption_metrics({1: "a dog"}, {2: ["a dog"]})
    with pytest.raises(ValueError, match="non-empty"):
        coco_caption_metrics({1: "a dog"}, {1: []})


def test_coco_metrics_skip_a_failing_scorer(monkeypatch):
    """A broken scorer is skipped with a warning; Java-free via a stand-in tokenizer."""
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    import pycocoevalcap.meteor.meteor as meteor_mod
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb_mod

    class FakeTokenizer:
        def tokenize(self, captions):
            return {
                k: [" ".join(metrics.tokenize(c["caption"])) for c in v]
                for k, v in captions.items()
            }

    class BrokenMeteor:
        def compute_score(self, gts, res):
            raise RuntimeError("java exploded")

    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(ptb_mod, "PTBTokenizer", FakeTokenizer)
    monkeypatch.setattr(meteor_mod, "Meteor", BrokenMeteor)
    result = coco_caption_metrics(HYPS, REFS)
    assert result is not None
    assert "meteor" not in result
    assert {"coco_bleu1", "coco_bleu4", "rouge_l", "cider"} <= set(result)


@pytest.mark.slow
def test_coco_metrics_match_our_bleu(capfd):
    """Every official scorer runs, agrees with our BLEU, and prints nothing to stdout (where
    `captioner evaluate` writes its table; coco BLEU prints its n-gram counts unless verbose=0),
    nor do the Java processes of the tokenizer and METEOR (capfd: file descriptor 1)."""
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    if not _java_works():
        pytest.skip("java is not on PATH")
    result = coco_caption_metrics(HYPS, REFS)
    assert capfd.readouterr().out == ""
    assert result is not None
    assert set(result) == {
        "coco_bleu1",
        "coco_bleu2",
        "coco_bleu3",
        "coco_bleu4",
        "meteor",
        "rouge_l",
        "cider",
    }
    # both tokenizers lower-case and drop punctuation, and '<end>' is stripped on both paths
    ours = bleu_from_text([HYPS[1], HYPS[2]], [REFS[1], REFS[2]])
    for n in range(1, 5):
        assert result[f"coco_bleu{n}"] == pytest.approx(ours[f"bleu{n}"], rel=1e-6)
    assert 0.0 < result["meteor"] <= 1.0
    assert 0.0 < result["rouge_l"] <= 1.0
    assert result["cider"] > 0.0


@pytest.mark.slow
def test_coco_metrics_survive_a_dead_meteor_process(monkeypatch):
    """METEOR's Java dying must not crash the run nor deadlock pycocoevalcap's Meteor.__del__."""
    meteor_mod = pytest.importorskip("pycocoevalcap.meteor.meteor")
    if not _java_works():
        pytest.skip("java is not on PATH")
    monkeypatch.setattr(meteor_mod, "METEOR_JAR", "no-such-meteor.jar")
    result = coco_caption_metrics(HYPS, REFS)
    assert result is not None
    assert "meteor" not in result
    assert result["coco_bleu1"] > 0.5
