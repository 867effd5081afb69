"""Caption metrics: corpus-level BLEU-1..4 (NLTK's ``bleu_score``) and optional COCO metrics.

BLEU is NLTK's :func:`nltk.translate.bleu_score.corpus_bleu` (Papineni et al., 2002), called the
way the captioning papers mean it:

* it scores TOKEN LISTS (a ``str`` would be scored as characters, so it is rejected);
* modified n-gram precision clips each hypothesis n-gram count by its largest count in ANY of the
  image's references, and matches and totals are summed over the whole corpus before dividing;
* the brevity penalty uses, per image, the reference length closest to the hypothesis length
  (ties -> the shorter reference), summed over the corpus: ``BP = 1 if c > r else exp(1 - r/c)``;
* ``bleuN`` is the CUMULATIVE score: geometric mean of p1..pN (weights 1/N) times BP, with no
  smoothing: an order with no clipped match makes it exactly 0.0 (NLTK's own "no smoothing"
  returns about 1e-77 there and warns; see :func:`corpus_bleu`).

NLTK needs no downloaded data for this (``bleu_score`` is pure Python; ``word_tokenize`` is never
used). Where it differs from the official coco-caption scorer (``pycocoevalcap.bleu``, which also
uses the closest reference length):

* a hypothesis SHORTER than n tokens (the empty one included) adds one unmatched n-gram to NLTK's
  order-n total, because NLTK floors each sentence's n-gram count at 1, where coco-caption adds
  its true count ``max(0, len - n + 1)`` = 0. A perfect corpus ``[a b c d], [x]`` scores BLEU-4
  ``(1 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.7071`` here and 1.0 in coco-caption;
* coco-caption adds 1e-15 to every match count (and 1e-9 to totals and lengths), so an order with
  no match gives it a small positive score (8e-5 for BLEU-4 of one six-word caption), not 0.

The two agree whenever every hypothesis has at least ``max_n`` tokens and every order has a match.

``bleu_from_text`` is what training validation and evaluation call: it tokenizes hypotheses and
references with the one :func:`captioner.vocab.tokenize`, drops special tokens on both sides and
compares words as text, so a predicted ``<unk>`` can never match anything.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import warnings
from collections.abc import Sequence
from typing import Any

from captioner.vocab import SPECIALS, tokenize

log = logging.getLogger(__name__)

__all__ = [
    "bleu_from_text",
    "coco_caption_metrics",
    "corpus_bleu",
    "sentence_bleu",
    "sentence_bleu_from_text",
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


def _check_image(hypothesis: Any, references: Any, index: int) -> None:
    """One image's hypothesis is a token list and its references a non-empty list of them."""
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


def _cumulative_weights(max_n: int) -> list[tuple[float, ...]]:
    """NLTK weights of BLEU-1..max_n: ``(1/n,) * n`` for every n, scored in one pass."""
    return [(1.0 / n,) * n for n in range(1, max_n + 1)]


def _as_scores(result: float | list[float], first_unmatched: int | None = None) -> dict[str, float]:
    """``{"bleu1": .., ...}`` from NLTK's scores, 0.0 from order ``first_unmatched`` on.

    NLTK returns a bare number for one weight tuple (and int 0 without unigram matches).
    """
    values = result if isinstance(result, list) else [result]
    return {
        f"bleu{n}": 0.0 if first_unmatched is not None and n >= first_unmatched else float(v)
        for n, v in enumerate(values, start=1)
    }


# -- public API --------------------------------------------------------------------------------
def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    max_n: int = 4,
) -> dict[str, float]:
    """Corpus-level cumulative BLEU-1..``max_n`` over token lists, no smoothing.

    ``hypotheses[i]`` is one token list; ``references[i]`` is the list of ALL reference token
    lists of image ``i``. Returns ``{"bleu1": .., ..., f"bleu{max_n}": ..}``, floats in [0, 1].
    BLEU-n is exactly 0.0 when some order <= n has no clipped match in the whole corpus.
    """
    from nltk.translate import bleu_score

    _check_max_n(max_n)
    if isinstance(hypotheses, (str, bytes)) or isinstance(references, (str, bytes)):
        raise TypeError("corpus_bleu() expects lists of token lists, not a string")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but references for {len(references)} images"
        )
    if len(hypotheses) == 0:
        raise ValueError("corpus_bleu() needs at least one hypothesis")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
        _check_image(hyp, refs, i)

    # No smoothing, but exact: NLTK's default (SmoothingFunction().method0) turns a zero
    # precision into sys.float_info.min, so BLEU-n comes out as ~1e-77 instead of 0, with a
    # UserWarning per call. This hook sees the corpus precisions (numerator = clipped matches)
    # and passes them on unchanged; orders from the first one without a match are set to 0.0.
    unmatched: list[int] = []

    def no_smoothing(p_n: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        unmatched.extend(n for n, p in enumerate(p_n, start=1) if p.numerator == 0)
        return p_n

    with warnings.catch_warnings():  # keep any zero-count warning of NLTK out of training logs
        warnings.filterwarnings("ignore", category=UserWarning, module=r"nltk\.translate")
        result = bleu_score.corpus_bleu(
            references,
            hypotheses,
            weights=_cumulative_weights(max_n),
            smoothing_function=no_smoothing,
        )
    return _as_scores(result, min(unmatched, default=None))


def sentence_bleu(
    hypothesis: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
    epsilon: float = 0.1,
) -> dict[str, float]:
    """Smoothed BLEU of ONE hypothesis, for per-image error analysis only (not for reporting).

    NLTK's ``sentence_bleu`` with ``SmoothingFunction(epsilon).method1``: an order with no
    clipped match gets precision ``epsilon / max(1, total)`` instead of 0 (NLTK counts at least
    one n-gram per order, see the module docstring). A hypothesis that shares no word with its
    references scores 0.
    """
    from nltk.translate import bleu_score

    _check_max_n(max_n)
    _check_image(hypothesis, references, 0)
    result = bleu_score.sentence_bleu(
        references,
        hypothesis,
        weights=_cumulative_weights(max_n),
        smoothing_function=bleu_score.SmoothingFunction(epsilon=epsilon).method1,
    )
    return _as_scores(result)


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
