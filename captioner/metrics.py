"""Caption metrics: corpus-level BLEU-1..4 (hand-written) and optional COCO metrics.

BLEU here follows Papineni et al. (2002) and the official coco-caption scorer:

* it scores TOKEN LISTS (a ``str`` would be scored as characters, so it is rejected);
* modified n-gram precision clips each hypothesis n-gram count by its largest count in ANY of the
  image's references, and matches and totals are summed over the whole corpus before dividing;
* the brevity penalty uses, per image, the reference length closest to the hypothesis length
  (ties -> the shorter reference), summed over the corpus: ``BP = 1 if c > r else exp(1 - r/c)``;
* ``bleuN`` is the CUMULATIVE score: geometric mean of p1..pN (weights 1/N) times BP, with no
  smoothing (any ``pk == 0`` makes it 0).

The result equals ``nltk.translate.bleu_score.corpus_bleu(refs, hyps, weights=(1/N,)*N)``, with
one documented exception: NLTK counts at least one n-gram for every hypothesis even when it is
shorter than n (it floors each sentence's denominator at 1), while this module and coco-caption
count the true number of n-grams (``max(0, len - n + 1)``). The two agree whenever every
hypothesis has at least ``max_n`` tokens.

``bleu_from_text`` is what training validation and evaluation call: it tokenizes hypotheses and
references with the one :func:`captioner.vocab.tokenize`, drops special tokens on both sides and
compares words as text, so a predicted ``<unk>`` can never match anything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from typing import Any

from captioner.vocab import SPECIALS, tokenize

log = logging.getLogger(__name__)

__all__ = [
    "bleu_from_text",
    "coco_caption_metrics",
    "corpus_bleu",
    "sentence_bleu",
    "strip_specials",
]

# Special tokens as they may appear in decoded text ("a <unk> on a bench <end>"). They are removed
# from the TEXT before tokenizing, because tokenize() drops the brackets and would turn "<unk>"
# into the ordinary word "unk".
_SPECIALS_RE = re.compile("|".join(re.escape(s) for s in SPECIALS), re.IGNORECASE)
_SPECIALS_SET = frozenset(SPECIALS)


# -- helpers -----------------------------------------------------------------------------------
def _check_tokens(tokens: Any, what: str) -> None:
    """Raise TypeError unless ``tokens`` is a sequence of str tokens (not a str, not ids)."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(
            f"{what} must be a list of tokens, got a string {tokens[:40]!r} (it would be scored "
            "as characters); tokenize it first or use bleu_from_text()"
        )
    if not isinstance(tokens, Sequence):
        raise TypeError(f"{what} must be a list of str tokens, got {type(tokens).__name__}")
    for tok in tokens:
        if not isinstance(tok, str):
            raise TypeError(
                f"{what} must contain str tokens, got {type(tok).__name__} "
                "(BLEU compares words as text, never token ids)"
            )


def _check_max_n(max_n: int) -> None:
    if not isinstance(max_n, int) or isinstance(max_n, bool) or max_n < 1:
        raise ValueError(f"max_n must be a positive int, got {max_n!r}")


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _closest_ref_len(ref_lens: Sequence[int], hyp_len: int) -> int:
    """Reference length closest to ``hyp_len``; on a tie the shorter reference wins."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _sentence_stats(
    hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int, index: int
) -> tuple[list[int], list[int], int, int]:
    """Clipped matches and totals per order 1..max_n, hypothesis length, closest ref length."""
    _check_tokens(hypothesis, f"hypothesis {index}")
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
        raise TypeError(
            f"references of image {index} must be a list of token lists, "
            f"got {type(references).__name__}"
        )
    if len(references) == 0:
        raise ValueError(f"image {index} has no references")
    for j, ref in enumerate(references):
        _check_tokens(ref, f"reference {j} of image {index}")

    matches, totals = [], []
    for n in range(1, max_n + 1):
        hyp_counts = _ngrams(hypothesis, n)
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in references:
            max_ref |= _ngrams(ref, n)  # union of Counters = element-wise max
        matches.append(sum(min(c, max_ref[g]) for g, c in hyp_counts.items()))
        totals.append(max(0, len(hypothesis) - n + 1))
    ref_len = _closest_ref_len([len(r) for r in references], len(hypothesis))
    return matches, totals, len(hypothesis), ref_len


def _brevity_penalty(hyp_len: int, ref_len: int) -> float:
    if hyp_len > ref_len:
        return 1.0
    if hyp_len == 0:
        return 0.0
    return math.exp(1.0 - ref_len / hyp_len)


def _cumulative(precisions: Sequence[float], bp: float) -> dict[str, float]:
    """``bleuN = BP * exp(mean(log p1..pN))`` for every N; 0 once some ``pk`` is 0."""
    scores: dict[str, float] = {}
    log_sum = 0.0
    for n, p in enumerate(precisions, start=1):
        if p <= 0.0 or math.isinf(log_sum):
            log_sum = -math.inf
            scores[f"bleu{n}"] = 0.0
            continue
        log_sum += math.log(p)
        scores[f"bleu{n}"] = bp * math.exp(log_sum / n)
    return scores


# -- public API --------------------------------------------------------------------------------
def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    max_n: int = 4,
) -> dict[str, float]:
    """Corpus-level cumulative BLEU-1..``max_n`` over token lists, no smoothing.

    ``hypotheses[i]`` is one token list; ``references[i]`` is the list of ALL reference token
    lists of image ``i``. Returns ``{"bleu1": .., ..., f"bleu{max_n}": ..}``, floats in [0, 1].
    """
    _check_max_n(max_n)
    if isinstance(hypotheses, (str, bytes)) or isinstance(references, (str, bytes)):
        raise TypeError("corpus_bleu() expects lists of token lists, not a string")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but references for {len(references)} images"
        )
    if len(hypotheses) == 0:
        raise ValueError("corpus_bleu() needs at least one hypothesis")

    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
        m, t, c, r = _sentence_stats(hyp, refs, max_n, i)
        matches = [a + b for a, b in zip(matches, m, strict=True)]
        totals = [a + b for a, b in zip(totals, t, strict=True)]
        hyp_len += c
        ref_len += r

    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals, strict=True)]
    return _cumulative(precisions, _brevity_penalty(hyp_len, ref_len))


def sentence_bleu(
    hypothesis: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
    epsilon: float = 0.1,
) -> dict[str, float]:
    """Smoothed BLEU of ONE hypothesis, for per-image error analysis only (not for reporting).

    Same definition as :func:`corpus_bleu` on a corpus of one, plus additive smoothing: an order
    with no clipped match gets precision ``epsilon / max(1, total)`` instead of 0, as NLTK's
    ``SmoothingFunction(epsilon).method1`` does. As in NLTK, a hypothesis that shares no word
    with its references scores 0.
    """
    _check_max_n(max_n)
    matches, totals, hyp_len, ref_len = _sentence_stats(hypothesis, references, max_n, 0)
    if matches[0] == 0:
        return {f"bleu{n}": 0.0 for n in range(1, max_n + 1)}
    precisions = [(m if m else epsilon) / max(1, t) for m, t in zip(matches, totals, strict=True)]
    return _cumulative(precisions, _brevity_penalty(hyp_len, ref_len))


def strip_specials(tokens: Sequence[str]) -> list[str]:
    """Drop ``<pad>``, ``<start>``, ``<end>`` and ``<unk>`` tokens."""
    _check_tokens(tokens, "tokens")
    return [t for t in tokens if t not in _SPECIALS_SET]


def _text_to_tokens(text: str, what: str) -> list[str]:
    """Caption text -> tokens, with special tokens removed before and after tokenizing."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a caption string, got {type(text).__name__}")
    return strip_specials(tokenize(_SPECIALS_RE.sub(" ", text)))


def sentence_bleu_from_text(
    hypothesis: str, references: Sequence[str], max_n: int = 4
) -> dict[str, float]:
    """:func:`sentence_bleu` of caption TEXT, tokenized exactly as :func:`bleu_from_text` does."""
    refs = [_text_to_tokens(r, f"reference {j}") for j, r in enumerate(references)]
    return sentence_bleu(_text_to_tokens(hypothesis, "hypothesis"), refs, max_n=max_n)


def _check_text_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("expected a list of hypothesis strings and a list of reference lists")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but references for {len(references)} images; "
            "they must be aligned one-to-one"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(
                f"references of image {i} must be a LIST of caption strings, got one string"
            )
        if len(refs) == 0:
            raise ValueError(f"image {i} has no reference captions")


def bleu_from_text(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> dict[str, float]:
    """Corpus BLEU of caption TEXT: the function training validation and evaluation call.

    Every hypothesis and every reference is tokenized with :func:`captioner.vocab.tokenize`
    (lower case, punctuation dropped) and stripped of special tokens, then scored with
    :func:`corpus_bleu` against ALL references of its image.
    """
    _check_text_inputs(hypotheses, references)
    hyp_tokens = [_text_to_tokens(h, f"hypothesis {i}") for i, h in enumerate(hypotheses)]
    ref_tokens = [
        [_text_to_tokens(r, f"reference {j} of image {i}") for j, r in enumerate(refs)]
        for i, refs in enumerate(references)
    ]
    return corpus_bleu(hyp_tokens, ref_tokens, max_n=max_n)


# -- optional: the official coco-caption metrics -----------------------------------------------
_COCO_WARNED = False


def _coco_unavailable_reason() -> str | None:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        return 'pycocoevalcap is not installed (pip install "captioner[coco-eval]")'
    if shutil.which("java") is None:
        return "pycocoevalcap needs Java, but `java` is not on PATH"
    return None


def _close_meteor(meteor: Any) -> None:
    """Stop METEOR's Java process; release its lock first so its ``__del__`` cannot deadlock."""
    lock = getattr(meteor, "lock", None)
    if lock is not None and lock.locked():
        lock.release()
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    with contextlib.suppress(OSError):
        proc.stdin.close()
    proc.kill()
    proc.wait()


def coco_caption_metrics(
    hypotheses: dict[int, str], references: dict[int, list[str]]
) -> dict[str, float] | None:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr from the official ``pycocoevalcap`` scorers.

    Captions are tokenized by pycocoevalcap's own PTBTokenizer (Java; it also removes
    punctuation) after special tokens are removed from the text. Returns ``None`` (and logs once)
    when pycocoevalcap or Java is unavailable, or when the tokenizer fails; a scorer that fails
    (e.g. METEOR's Java process) is skipped with a warning. Keys: ``coco_bleu1``..``coco_bleu4``,
    ``meteor``, ``rouge_l``, ``cider``.
    """
    global _COCO_WARNED
    if set(hypotheses) != set(references):
        raise ValueError("hypotheses and references must have the same image ids")
    if not hypotheses:
        raise ValueError("coco_caption_metrics() needs at least one image")
    for img_id, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {img_id}: references must be a non-empty list of captions")

    reason = _coco_unavailable_reason()
    if reason is not None:
        if not _COCO_WARNED:
            log.warning("skipping METEOR/ROUGE-L/CIDEr and coco BLEU: %s", reason)
            _COCO_WARNED = True
        return None

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def clean(text: str) -> str:
        return " ".join(_SPECIALS_RE.sub(" ", text).split())

    gts_raw = {k: [{"caption": clean(c)} for c in references[k]] for k in hypotheses}
    res_raw = {k: [{"caption": clean(hypotheses[k])}] for k in hypotheses}
    try:
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize(gts_raw)
        res = tokenizer.tokenize(res_raw)
        if set(gts) != set(hypotheses) or set(res) != set(hypotheses):
            raise RuntimeError("PTBTokenizer lost some captions")
    except Exception as exc:  # Java failure, read-only install dir (it writes a temp file there)
        log.warning("pycocoevalcap PTBTokenizer failed, no COCO metrics: %s", exc)
        return None

    out: dict[str, float] = {}
    try:
        scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"coco_bleu{n}": float(s) for n, s in enumerate(scores, start=1)})
    except Exception as exc:
        log.warning("coco BLEU failed, skipped: %s", exc)

    meteor = None
    try:
        meteor = Meteor()
        out["meteor"] = float(meteor.compute_score(gts, res)[0])
    except Exception as exc:
        log.warning("METEOR failed (it needs Java and ~2 GB of memory), skipped: %s", exc)
    finally:
        if meteor is not None:
            _close_meteor(meteor)

    for key, scorer_cls in (("rouge_l", Rouge), ("cider", Cider)):
        try:
            out[key] = float(scorer_cls().compute_score(gts, res)[0])
        except Exception as exc:
            log.warning("%s failed, skipped: %s", key, exc)
    return out
