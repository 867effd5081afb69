"""CIDEr-D: hand-worked cases, document frequencies from a given corpus, and agreement with the
official coco-caption scorer (pycocoevalcap's Cider, pure Python)."""

from __future__ import annotations

import json
import math

import pytest

from captioner.datasets.synthetic import ensure_demo_dataset
from captioner.evaluation.cider import CiderD
from captioner.vocab import tokenize

REFS = [
    [["a", "dog", "runs"], ["a", "dog", "is", "running"]],
    [["two", "cats", "sleep"], ["cats", "asleep", "on", "a", "bed"]],
    [["a", "red", "car"], ["the", "red", "car", "is", "parked"]],
]


def test_a_disjoint_caption_scores_zero() -> None:
    cider = CiderD(REFS)
    assert cider.score(["purple", "elephants"], REFS[0]) == 0.0


def test_the_caption_equal_to_its_only_reference_scores_ten_when_every_ngram_is_rare() -> None:
    """With one reference, cosine 1 at every n and no length penalty: 10 x mean over n of 1,
    for n-grams that some image lacks (idf > 0); a caption too short for 4-grams loses that n."""
    corpus = [[["a", "b", "c", "d"]], [["x", "y"]]]
    cider = CiderD(corpus)
    assert cider.score(["a", "b", "c", "d"], corpus[0]) == pytest.approx(10.0)
    assert cider.score(["x", "y"], corpus[1]) == pytest.approx(10.0 * 2 / 4)  # 1- and 2-grams only


def test_repeating_a_word_is_clipped() -> None:
    """CIDEr-D's min(caption, reference): saying 'dog' five times earns no more than once."""
    cider = CiderD(REFS)
    once = cider.score(["a", "dog"], [["a", "dog", "runs"]])
    spam = cider.score(["a", "dog", "dog", "dog", "dog", "dog"], [["a", "dog", "runs"]])
    assert spam < once


def test_the_gaussian_length_penalty() -> None:
    corpus = [[["w1", "w2", "w3"]], [["z"]]]
    cider = CiderD(corpus)
    ref = corpus[0][0]
    exact = cider.score(ref, [ref])
    longer = cider.score([*ref, *(f"pad{i}" for i in range(6))], [ref])
    # the shared n-grams' cosine shrinks with the extra words, and exp(-36 / 72) multiplies it
    assert longer < exact * math.exp(-(6**2) / (2 * 6.0**2)) + 1e-12


def test_document_frequencies_come_from_the_given_corpus_only() -> None:
    """An n-gram in every image of the df corpus has idf 0 and earns nothing."""
    everywhere = [[["a", "dog"]], [["a", "cat"]]]
    cider = CiderD(everywhere)
    assert cider.df[("a",)] == 2 and cider.df[("dog",)] == 1
    assert cider.score(["a"], [["a", "fish"]]) == 0.0  # 'a' is in every df image
    assert CiderD([[["a", "fish"]], [["x"]]]).score(["a"], [["a", "fish"]]) > 0.0


def test_agreement_with_pycocoevalcap(tmp_path) -> None:
    """The same captions, references and df source (the scored split's references, as
    coco-caption does): agreement to 1e-6 per image and on the corpus."""
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    root = ensure_demo_dataset(tmp_path / "demo", splits={"train": 4, "val": 60, "test": 4})
    data = json.loads((root / "annotations" / "captions_val.json").read_text())
    refs: dict[int, list[list[str]]] = {}
    for ann in data["annotations"]:
        refs.setdefault(ann["image_id"], []).append(tokenize(ann["caption"]))
    ids = sorted(refs)
    # a caption per image: another image's first reference, so scores spread from 0 to high
    hyps = {i: refs[ids[(k * 7) % len(ids)]][0] for k, i in enumerate(ids)}
    ours, per_image = CiderD([refs[i] for i in ids]).corpus_score(
        [hyps[i] for i in ids], [refs[i] for i in ids]
    )
    theirs, their_per_image = cider_module.Cider().compute_score(
        {i: [" ".join(r) for r in refs[i]] for i in ids}, {i: [" ".join(hyps[i])] for i in ids}
    )
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert per_image == pytest.approx(list(their_per_image), abs=1e-6)
    assert max(per_image) > 1.0 and min(per_image) < 0.5  # the comparison covers a range


def test_ngrams_are_the_sliced_windows() -> None:
    """The zipped n-grams and the document frequencies are the slicing definition's."""
    import random
    from collections import Counter

    from captioner.evaluation.cider import CiderD, ngram_counts

    rng = random.Random(0)
    corpus = [
        [tuple(rng.choices("abcde", k=rng.randint(0, 7))) for _ in range(rng.randint(1, 4))]
        for _ in range(60)
    ]
    df: Counter = Counter()
    for refs in corpus:
        seen = set()
        for ref in refs:
            counts = ngram_counts(ref)
            for n in range(1, 5):
                windows = [tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)]
                assert counts[n - 1] == Counter(windows)
                seen.update(windows)
        df.update(seen)
    assert CiderD(corpus).df == df
