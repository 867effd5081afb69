"""Validation during training: teacher-forced val loss, and BLEU of FREE-RUNNING decoding.

Captions are decoded by :func:`captioner.inference.generate`, the one inference path that
``captioner evaluate`` and ``captioner caption`` use too, so that val BLEU is what an evaluation
with the same decoding reports. Under DDP each rank decodes its shard; the captions are gathered
and every rank scores the whole split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from captioner.configs.decode import DecodeConfig
from captioner.datasets.annotations import CaptionRecord
from captioner.inference import corpus_scores, generate, hypothesis_text
from captioner.models.captioning import CaptionModel
from captioner.runtime import Runtime, StopRequested, autocast
from captioner.training.losses import caption_loss
from captioner.training.objectives import target_tokens
from captioner.vocab import Vocab


@dataclass
class Validation:
    metrics: dict[str, float]  # val_loss, val_bleu1..4
    captions: dict[int, str]  # record index -> decoded caption

    def samples(self, records: Sequence[CaptionRecord], n: int = 3) -> list[tuple[str, str]]:
        """(file name, caption) of the first ``n`` images, for the log."""
        return [(records[i].path.name, self.captions[i]) for i in sorted(self.captions)[:n]]


LOSS_CAPTIONS = 64  # captions per teacher-forced pass of the val loss


@torch.no_grad()
def validate(
    model: CaptionModel,
    batches: Any,
    records: Sequence[CaptionRecord],
    vocab: Vocab,
    decode: DecodeConfig,
    rt: Runtime,
    *,
    features: bool,
    autocast_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Validation:
    """Score ``model`` (put in eval mode here) on validation ``batches`` of
    :func:`captioner.datasets.captions.collate_captions` holding every reference caption of each image.
    ``should_stop`` is asked before each batch of a single-process run (under DDP the ranks
    would disagree on where they stopped): yes raises :class:`StopRequested`."""
    model.eval()
    if rt.distributed:
        should_stop = lambda: False  # noqa: E731
    totals = {"loss": 0.0, "tokens": 0}

    def teacher_forced_loss(batch: dict[str, Any], feats: torch.Tensor) -> None:
        # LOSS_CAPTIONS captions at a time: the logits of a whole batch's captions would be
        # [5 x images, T, V], about 0.5 GB at COCO's vocabulary and batch size
        for start in range(0, len(batch["lengths"]), LOSS_CAPTIONS):
            rows = slice(start, start + LOSS_CAPTIONS)
            lengths = batch["lengths"][rows]
            captions = batch["captions"][rows, : int(lengths.max())].to(rt.device)
            with autocast(rt.device, autocast_dtype):
                logits = model.decoder(
                    feats[batch["image_of_caption"][rows].to(rt.device)], captions, lengths
                )
            tokens = target_tokens(lengths)
            totals["loss"] += float(caption_loss(logits, captions, vocab.pad_id)) * tokens
            totals["tokens"] += tokens

    hyps = generate(
        model,
        tqdm(
            _until_stopped(batches, should_stop),
            total=len(batches) if hasattr(batches, "__len__") else None,
            desc="validating",
            unit="batch",
            leave=False,
            disable=None if rt.is_main else True,
        ),
        vocab,
        decode,
        rt.device,
        features=features,
        autocast_dtype=autocast_dtype,
        on_features=teacher_forced_loss,
    )
    captions = {i: hypothesis_text(h[0], vocab) for i, h in hyps.items()}
    loss_sum, tokens = totals["loss"], totals["tokens"]
    if rt.distributed:
        sums = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=rt.device)
        dist.all_reduce(sums)
        loss_sum, tokens = float(sums[0]), int(sums[1])
        gathered: list[dict[int, str]] = [{} for _ in range(rt.world_size)]
        dist.all_gather_object(gathered, captions)
        captions = {k: v for part in gathered for k, v in part.items()}
    scores = corpus_scores(captions, records)
    metrics = {"val_loss": loss_sum / max(tokens, 1), **{f"val_{k}": v for k, v in scores.items()}}
    return Validation(metrics, captions)


def _until_stopped(batches: Iterable[Any], should_stop: Callable[[], bool]) -> Iterator[Any]:
    for batch in batches:
        if should_stop():
            raise StopRequested("stopped while validating")
        yield batch


__all__ = ["Validation", "validate"]
