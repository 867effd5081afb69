"""Running a trained model over many images: the one code path shared by training validation,
``captioner evaluate`` and ``captioner caption``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from captioner.configs.decode import DecodeConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.annotations import CaptionRecord
from captioner.datasets.captions import pad_captions
from captioner.datasets.images import ImageLoadError, build_transform, from_pil, load_image
from captioner.decoding import Hypothesis, decode
from captioner.errors import UserError
from captioner.evaluation.cider import corpus_cider_d
from captioner.evaluation.metrics import bleu_from_text
from captioner.models.captioning import CaptionModel
from captioner.runtime import autocast, resolve_device
from captioner.vocab import Vocab, detokenize

if TYPE_CHECKING:
    from captioner.pretrained import ModelInfo


@torch.inference_mode()
def decode_features(
    model: CaptionModel, features: torch.Tensor, vocab: Vocab, config: DecodeConfig
) -> list[list[Hypothesis]]:
    """features [B, F] (grids [B, P, F] for a model that attends) -> per image, its hypotheses
    (best first)."""
    return decode(
        model.decoder,
        features.float(),
        config,
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        unk_id=vocab.unk_id,
        pad_id=vocab.pad_id,
    )


@torch.inference_mode()
def generate(
    model: CaptionModel,
    batches: Iterable[dict[str, Any]],
    vocab: Vocab,
    config: DecodeConfig,
    device: torch.device | str,
    features: bool = False,
    *,
    autocast_dtype: torch.dtype | None = None,
    on_features: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
    attention: bool = False,
) -> dict[int, list[Hypothesis]]:
    """Decode every batch (``inputs`` images, or encoder features when ``features``) ->
    {dataset index: hypotheses}. The model must be in eval mode.

    ``on_features(batch, features)`` is called with each batch's encoder features (as
    :meth:`CaptionModel.encode` gives them) before
    they are decoded (validation computes its teacher-forced loss there, on the same features).
    ``attention``: set every hypothesis's ``attention`` maps (a model that attends only).
    """
    if attention and not model.attends:
        raise UserError("attention maps need a model with model.decoder.attention=soft or topdown")
    device = torch.device(device)
    out: dict[int, list[Hypothesis]] = {}
    for batch in batches:
        if not len(batch["index"]):
            continue
        inputs = batch["inputs"].to(device, non_blocking=True)
        with autocast(device, autocast_dtype):
            feats = inputs if features else model.encode(inputs)
        feats = feats.float()
        if on_features is not None:
            on_features(batch, feats)
        hyps = decode_features(model, feats, vocab, config)
        if attention:
            attach_attention(model, feats, hyps, vocab)
        out.update(zip(batch["index"].tolist(), hyps, strict=True))
    return out


def attach_attention(
    model: CaptionModel, features: torch.Tensor, hyps: list[list[Hypothesis]], vocab: Vocab
) -> None:
    """Set ``hyp.attention`` [n words, h, w] of every hypothesis of every image of the batch:
    its caption teacher-forced once more (deterministic in eval mode: the decoding's weights)."""
    flat = [(row, h) for row, image_hyps in enumerate(hyps) for h in image_hyps]
    if not flat:
        return
    captions, lengths = pad_captions(
        [[vocab.start_id, *h.tokens, vocab.end_id] for _, h in flat], vocab.pad_id
    )
    rows = torch.tensor([row for row, _ in flat], device=features.device)
    maps = model.attention_maps(features[rows], captions.to(features.device), lengths)
    for (_, h), m in zip(flat, maps, strict=True):
        h.attention = m


def hypothesis_text(hyp: Hypothesis, vocab: Vocab) -> str:
    """A hypothesis as display text (no specials, clitics re-attached)."""
    return detokenize(vocab.decode(hyp.tokens))


def corpus_scores(captions: dict[int, str], records: Sequence[CaptionRecord]) -> dict[str, float]:
    """Scores of ``{record index: caption}`` against ALL references of each image: corpus
    BLEU-1..4, CIDEr-D (document frequencies from these references, as coco-caption computes
    it) and ``distinct``, the number of different captions over the number of images."""
    order = sorted(captions)
    hyps, refs = [captions[i] for i in order], [records[i].captions for i in order]
    return {
        **bleu_from_text(hyps, refs),
        "cider_d": corpus_cider_d(hyps, refs),
        "distinct": len(set(hyps)) / max(len(hyps), 1),
    }


# ---------------------------------------------------------------------------------------------
# the Python API for captioning files


@dataclass
class CaptionResult:
    """The outcome for one input image: ``caption`` (best hypothesis) or ``error``."""

    source: str
    caption: str | None = None
    score: float | None = None
    hypotheses: list[tuple[str, float]] = field(
        default_factory=list
    )  # (text, log-prob), best first
    error: str | None = None
    words: list[str] = field(default_factory=list)  # the tokens of ``caption``
    # with Captioner.caption(..., attention=True): where the model looked for each of
    # ``words``, [len(words), h, w] over the model's view of the image (data.model_view)
    attention: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.source}
        if self.error is not None:
            out["error"] = self.error
        else:
            out["caption"] = self.caption
            out["score"] = self.score
            if len(self.hypotheses) > 1:
                out["hypotheses"] = [{"caption": t, "score": s} for t, s in self.hypotheses]
        return out


class Captioner:
    """Caption images with a trained checkpoint::

    captioner = Captioner.from_checkpoint("outputs/train/.../best.pt")
    for result in captioner.caption(["cat.jpg", "dog.png"]):
        print(result.source, result.caption)
    """

    def __init__(
        self,
        model: CaptionModel,
        vocab: Vocab,
        preprocessing: Preprocessing,
        device: torch.device | str = "cpu",
        info: ModelInfo | None = None,
    ):
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.transform = build_transform(preprocessing)
        # where the model came from, its default decoding and scores (None: built in code)
        self.info = info

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> Captioner:
        """A checkpoint file, or a run directory: its best.pt, else its last.pt."""
        from captioner.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
        from captioner.pretrained import ModelInfo

        dev = resolve_device(device)
        path = resolve_checkpoint(path)
        ckpt = load_checkpoint(path, map_location="cpu")
        model, vocab, pre = model_from_checkpoint(ckpt, device=dev)
        return cls(model, vocab, pre, dev, ModelInfo.from_checkpoint(ckpt, path))

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str = "auto") -> Captioner:
        """A folder written by ``captioner export`` (or its Hugging Face Hub id, with the
        optional ``huggingface_hub`` package)."""
        from captioner.pretrained import load_pretrained

        dev = resolve_device(device)
        model, vocab, pre, info = load_pretrained(path_or_id, device=dev)
        return cls(model, vocab, pre, dev, info)

    @classmethod
    def load(cls, source: str | Path, device: str = "auto") -> Captioner:
        """Whatever ``source`` is: a checkpoint file, a run directory (its best.pt, else its
        last.pt), an exported folder (it has one of the exported files) or a Hub id. A missing
        ``*.pt`` is a checkpoint not found."""
        from captioner.checkpoint import resolve_checkpoint
        from captioner.pretrained import FILES

        path, given = resolve_checkpoint(source), Path(source)
        exported = given.is_dir() and any((given / name).is_file() for name in FILES)
        if path.is_file() or (not exported and (given.is_dir() or given.suffix in (".pt", ".pth"))):
            return cls.from_checkpoint(path, device)
        return cls.from_pretrained(source, device)

    @classmethod
    def ensemble(cls, sources: Sequence[str | Path], device: str = "auto") -> Captioner:
        """Several models (each as :meth:`load` reads it) decoded as one: the mean of their word
        probabilities at every step (:mod:`captioner.models.ensemble`). They must share the
        vocabulary, the preprocessing and the encoder's weights; the first one's decoding
        defaults and description apply."""
        from captioner.models.ensemble import ensemble_model

        members = [cls.load(source, device) for source in sources]
        model = ensemble_model(
            [
                (str(s), c.model, c.vocab, c.preprocessing)
                for s, c in zip(sources, members, strict=True)
            ]
        )
        first = members[0]
        return cls(model, first.vocab, first.preprocessing, first.device, first.info)

    def _tensor(self, image: str | Path | Image.Image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            img = from_pil(image)  # decoded by the caller: taken as it is
        else:
            img = load_image(image, self.preprocessing.draft_to)
        return self.transform(img)

    @torch.inference_mode()
    def caption(
        self,
        images: str | Path | Image.Image | Sequence[str | Path | Image.Image],
        config: DecodeConfig | None = None,
        batch_size: int = 32,
        attention: bool = False,
    ) -> list[CaptionResult]:
        """One :class:`CaptionResult` per input, in order (a single path or image is one input);
        an unreadable image gets ``error`` set and does not stop the others. ``config``:
        default :attr:`default_decoding`. ``attention``: also each caption's attention maps (a
        model that attends only; else a ``UserError``)."""
        if isinstance(images, str | Path | Image.Image):  # one image, not a str's characters
            images = [images]
        config = config or self.default_decoding
        if attention and not self.model.attends:
            raise UserError(
                "attention maps need a model with model.decoder.attention=soft or topdown"
            )
        results: list[CaptionResult] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch_results, tensors = [], []
            for image in chunk:
                res = CaptionResult(
                    source=str(image) if not isinstance(image, Image.Image) else "<image>"
                )
                try:
                    tensors.append((res, self._tensor(image)))
                except ImageLoadError as exc:
                    res.error = str(exc)
                batch_results.append(res)
            if tensors:
                hyps = self.decode_tensors([t for _, t in tensors], config, attention)
                for (res, _), image_hyps in zip(tensors, hyps, strict=True):
                    self.fill_result(res, image_hyps)
            results.extend(batch_results)
        return results

    @property
    def default_decoding(self) -> DecodeConfig:
        """How the model was selected in training (``trainer.val_decode``), else greedy, with
        ``<unk>`` suppressed: a caption shown to a person never says "<unk>" (``caption``,
        ``serve`` and this class decode this way unless told otherwise; ``evaluate`` scores
        the decoding it is given)."""
        base = self.info.decoding if self.info is not None else DecodeConfig()
        return replace(base, suppress_unk=True)

    @torch.inference_mode()
    def decode_tensors(
        self, tensors: Sequence[torch.Tensor], config: DecodeConfig, attention: bool = False
    ) -> list[list[Hypothesis]]:
        """Preprocessed images (``self.transform``'s tensors) -> per image, its hypotheses, best
        first: one encoder pass and one decoding over them all."""
        batch = {"inputs": torch.stack(list(tensors)), "index": torch.arange(len(tensors))}
        out = generate(self.model, [batch], self.vocab, config, self.device, attention=attention)
        return [out[i] for i in range(len(tensors))]

    def fill_result(self, res: CaptionResult, hyps: list[Hypothesis]) -> CaptionResult:
        """Set ``res``'s caption, score, hypotheses, words and attention from ``hyps``."""
        res.hypotheses = [(hypothesis_text(h, self.vocab), h.score) for h in hyps]
        res.caption, res.score = res.hypotheses[0]
        res.words = self.vocab.decode(hyps[0].tokens)
        res.attention = hyps[0].attention
        return res
