"""CIDEr-D (Vedantam et al. 2015), as the coco-caption scorer computes it, without Java.

Per image: 1..4-gram counts of the caption and of each reference, weighted by tf-idf with
document frequencies from a reference corpus (an n-gram's df is the number of images whose
references contain it); per n, the cosine of the clipped caption vector with each reference
vector (``min(caption, reference)``: repeating a word earns nothing), times a Gaussian penalty
on the length difference (sigma = 6); averaged over n and over the references, times 10.

The document frequencies are computed ONCE, from the corpus given to :class:`CiderD`: for
evaluation the evaluated split's references (what coco-caption does), for self-critical
training the TRAINING split's references (never the batch, never the test set). Captions are
token lists from the project's one tokenizer (:func:`captioner.vocab.tokenize`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

Ngrams = list[Counter[tuple[str, ...]]]  # per n (1..N), n-gram -> count


def ngrams(tokens: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    """The n-grams of ``tokens`` as tuples, in order: ``n`` shifted copies zipped (the shorter
    ones end it), each tuple built in C rather than sliced per position."""
    return zip(*(tokens[k:] for k in range(n)), strict=False)


def ngram_counts(tokens: Sequence[str], max_n: int = 4) -> Ngrams:
    return [Counter(ngrams(tokens, n)) for n in range(1, max_n + 1)]


class CiderD:
    """CIDEr-D with document frequencies from ``corpus`` (one list of reference token lists per
    image). ``score`` and ``corpus_score`` take tokenised captions and references."""

    def __init__(
        self, corpus: Sequence[Sequence[Sequence[str]]], max_n: int = 4, sigma: float = 6.0
    ):
        if not corpus:
            raise ValueError("CIDEr-D needs a non-empty reference corpus for document frequencies")
        self.max_n, self.sigma = max_n, sigma
        self.df: Counter[tuple[str, ...]] = Counter()
        for refs in corpus:
            self.df.update({g for ref in refs for n in range(1, max_n + 1) for g in ngrams(ref, n)})
        self.log_corpus = math.log(float(len(corpus)))
        self._refs: dict[tuple[tuple[str, ...], ...], list[tuple]] = {}

    def _vector(self, tokens: Sequence[str]) -> tuple[list[dict], list[float], int]:
        """tf-idf vectors per n, their norms, and the length (as coco-caption counts it: the
        number of bigrams; only length differences enter the score)."""
        vecs, norms = [], []
        for counts in ngram_counts(tokens, self.max_n):
            vec = {
                g: tf * (self.log_corpus - math.log(max(1.0, self.df[g])))
                for g, tf in counts.items()
            }
            vecs.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vecs, norms, max(len(tokens) - 1, 0)

    def _ref_vectors(self, refs: Sequence[Sequence[str]]) -> list[tuple]:
        key = tuple(tuple(r) for r in refs)
        if key not in self._refs:  # references are scored again and again (every SCST epoch)
            self._refs[key] = [self._vector(r) for r in refs]
        return self._refs[key]

    def _similarity(self, hyp: tuple, ref: tuple) -> float:
        (h_vecs, h_norms, h_len), (r_vecs, r_norms, r_len) = hyp, ref
        penalty = math.exp(-((h_len - r_len) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for h_vec, r_vec, h_norm, r_norm in zip(h_vecs, r_vecs, h_norms, r_norms, strict=True):
            dot = sum(min(v, r_vec[g]) * r_vec[g] for g, v in h_vec.items() if g in r_vec)
            if h_norm != 0 and r_norm != 0:
                dot /= h_norm * r_norm
            total += dot * penalty
        return total / self.max_n

    def score(self, hypothesis: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """CIDEr-D of one caption against its image's references (x10, as coco-caption)."""
        if not references:
            raise ValueError("CIDEr-D needs at least one reference per image")
        hyp = self._vector(hypothesis)
        refs = self._ref_vectors(references)
        return 10.0 * sum(self._similarity(hyp, r) for r in refs) / len(refs)

    def corpus_score(
        self, hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
    ) -> tuple[float, list[float]]:
        """(mean CIDEr-D, per-image scores) of aligned captions and reference lists."""
        if len(hypotheses) != len(references) or not hypotheses:
            raise ValueError("CIDEr-D needs one reference list per caption, and some captions")
        scores = [self.score(h, r) for h, r in zip(hypotheses, references, strict=True)]
        return sum(scores) / len(scores), scores


def corpus_cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D of caption texts against their reference texts, tokenised by the project's one
    tokenizer, with document frequencies from these references (as coco-caption computes it)."""
    from captioner.vocab import tokenize

    refs = [[tokenize(r) for r in image_refs] for image_refs in references]
    return CiderD(refs).corpus_score([tokenize(h) for h in hypotheses], refs)[0]


__all__ = ["CiderD", "corpus_cider_d", "ngram_counts", "ngrams"]
