"""``captioner evaluate``: corpus BLEU-1..4 (and the official COCO metrics when available).

Every image of the split is decoded once with the configured strategy, and scored against ALL its
references with the same tokenizer and BLEU code as training validation. The encoder's features
come from the feature cache, by default the one the checkpoint's training used (keyed by the
encoder's weights, so a hit is always what the encoder computes): sweeping decode settings
encodes each image only once. The run directory gets
``metrics.json``, ``results.json`` (the COCO results format) and ``per_image.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
    train_config,
)
from captioner.configs.data import DataConfig
from captioner.configs.evaluate import EvaluateConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.annotations import CaptionRecord
from captioner.datasets.captions import load_split
from captioner.datasets.images import build_transform, collate_images
from captioner.decoding import Hypothesis
from captioner.errors import UserError
from captioner.evaluation.metrics import coco_caption_metrics, sentence_bleu_from_text
from captioner.evaluation.report import SCORE_KEYS, write_report
from captioner.features import build_feature_cache, image_source
from captioner.inference import corpus_scores, generate, hypothesis_text
from captioner.models.captioning import CaptionModel
from captioner.models.ensemble import ensemble_model
from captioner.pretrained import CONFIG, load_pretrained
from captioner.runtime import resolve_device
from captioner.typed import from_dict
from captioner.vocab import Vocab

log = logging.getLogger(__name__)


def resolve_data_config(trained: dict[str, Any], overrides: dict[str, Any]) -> DataConfig:
    """The ``data`` config of the training config ``trained`` with the non-null ``overrides``
    on top, typed.

    Overriding any field drops the demo generator (unless ``demo`` itself is given), so pointing
    ``data.root`` at another dataset never writes demo images there.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    base = dict(trained.get("data") or {})
    if not base and not given.get("root"):
        raise UserError(
            "the model has no training data config (an exported folder, or a checkpoint saved "
            "outside a run): give data.root=... and data.test_annotations=... data.test_images=..."
        )
    if given and "demo" not in given:
        base.pop("demo", None)
    return from_dict(DataConfig, {**base, **given}, "data")


def evaluate(cfg: DictConfig | EvaluateConfig, out_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split``; write the run files into ``out_dir``."""
    if not isinstance(cfg, EvaluateConfig):
        cfg = from_dict(EvaluateConfig, {k: v for k, v in cfg.items() if k != "hydra"}, "")
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    ckpt_path, model, vocab, pre, trained = load_model(cfg.checkpoint, device)
    members = [(str(ckpt_path), model, vocab, pre)]
    for source in cfg.ensemble:
        path, member, member_vocab, member_pre, _ = load_model(source, device)
        members.append((str(path), member, member_vocab, member_pre))
    if cfg.ensemble:
        model = ensemble_model(members).eval()
    decode_cfg = cfg.decode
    records = load_split(resolve_data_config(trained, cfg.data or {}), cfg.split)
    records = records[: cfg.max_images]
    log.info(
        "evaluating %s on %d %s images (%s decoding)",
        " + ".join(m[0] for m in members),
        len(records),
        cfg.split,
        decode_cfg.strategy,
    )

    start = time.perf_counter()
    hyps = _caption_images(cfg, model, vocab, pre, [r.path for r in records], trained, device)
    seconds = time.perf_counter() - start
    captions = {i: hypothesis_text(h[0], vocab) for i, h in hyps.items()}
    if not captions:
        raise UserError(f"no image of the {cfg.split} split could be read")
    skipped = len(records) - len(captions)
    if skipped:
        log.warning("%d unreadable images were left out of the scores", skipped)

    metrics: dict[str, Any] = {
        **_scores(captions, records, cfg.coco_metrics),
        "split": cfg.split,
        "num_images": len(captions),
        "skipped_images": skipped,
        "checkpoint": str(ckpt_path),
        "ensemble": [m[0] for m in members[1:]],  # the files read, as "checkpoint"
        "decode": asdict(decode_cfg),
        "seconds": round(seconds, 2),
    }
    rows = _write_run_files(out_dir, metrics, captions, records)
    if cfg.report:
        attention = None
        if model.attends:  # each word's map, drawn by the page over the thumbnail
            attention = {
                records[i].image_id: (vocab.decode(h[0].tokens), h[0].attention)
                for i, h in hyps.items()
            }
        report = write_report(
            out_dir,
            metrics,
            rows,
            metrics_log=ckpt_path.parent / "metrics.jsonl" if ckpt_path.is_file() else None,
            attention=attention,
            preprocessing=pre,
        )
        metrics["report"] = str(report)
        log.info("report: %s", report)
    metrics["out_dir"] = str(out_dir)
    return metrics


def load_model(
    source: str | None, device: torch.device
) -> tuple[Path, CaptionModel, Vocab, Preprocessing, dict[str, Any]]:
    """The model ``checkpoint=`` names -> (the file or folder read, model, vocabulary,
    preprocessing, its training config). A checkpoint file; a run directory: its best.pt, else
    its last.pt (:func:`resolve_checkpoint`, as every command reads it); a folder written by
    ``captioner export`` (no training config: the data must be given); null: the newest best.pt
    under outputs/train/."""
    if source and (Path(source) / CONFIG).is_file():
        model, vocab, pre, _ = load_pretrained(source, device=device)
        return Path(source), model, vocab, pre, {}
    path = resolve_checkpoint(source) if source else find_checkpoint()
    ckpt = load_checkpoint(path)
    model, vocab, pre = model_from_checkpoint(ckpt, device=device)
    return path, model, vocab, pre, train_config(ckpt)


def _caption_images(
    cfg: EvaluateConfig,
    model: CaptionModel,
    vocab: Vocab,
    pre: Preprocessing,
    paths: list[Path],
    train_config: dict[str, Any] | None,
    device: torch.device,
) -> dict[int, list[Hypothesis]]:
    """Decode every readable image of ``paths`` with ``cfg.decode``: {index: hypotheses}.

    With ``cfg.cache_features`` the encoder's features come from the feature cache of
    ``train_config``'s run (keyed by the encoder's weights: a hit is always what it computes).
    """
    cache = None
    if cfg.cache_features:
        cache = build_feature_cache(
            model.encoder,
            pre,
            paths,
            cfg.feature_cache_dir(train_config),
            device=device,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            desc=f"{cfg.split} images",
        )
    loader = DataLoader(
        image_source(paths, pre, build_transform(pre), cache),
        batch_size=cfg.batch_size,
        num_workers=0 if cache is not None else cfg.num_workers,
        collate_fn=collate_images,
    )
    return generate(
        model,
        tqdm(loader, desc="captioning", unit="batch", leave=False, disable=None),
        vocab,
        cfg.decode,
        device,
        features=cache is not None,
        attention=cfg.report and model.attends,  # the report shows where each word looked
    )


def _scores(
    captions: dict[int, str], records: list[CaptionRecord], coco_metrics: bool
) -> dict[str, Any]:
    """BLEU, CIDEr-D without Java and distinct-n of ``captions`` against all references of
    their images, plus the official COCO metrics when ``coco_metrics`` (and available)."""
    scores = corpus_scores(captions, records)
    coco = None
    if coco_metrics:
        coco = coco_caption_metrics(
            {records[i].image_id: c for i, c in captions.items()},
            {records[i].image_id: records[i].captions for i in captions},
        )
    return {**scores, **(coco or {})}


def _write_run_files(
    out_dir: Path,
    metrics: dict[str, Any],
    captions: dict[int, str],
    records: list[CaptionRecord],
) -> list[dict[str, Any]]:
    """Write ``metrics.json``, ``results.json`` (the COCO results format) and
    ``per_image.jsonl`` into ``out_dir``; returns the per-image rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    results = [{"image_id": records[i].image_id, "caption": c} for i, c in sorted(captions.items())]
    (out_dir / "results.json").write_text(json.dumps(results) + "\n")
    rows = [
        {
            "image_id": records[i].image_id,
            "file": str(records[i].path),
            "caption": cap,
            "references": records[i].captions,
            "bleu4": sentence_bleu_from_text(cap, records[i].captions)["bleu4"],
        }
        for i, cap in sorted(captions.items())
    ]
    with open(out_dir / "per_image.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return rows


# what each score printed by `captioner evaluate` is, beside its value
TABLE_NOTES = {
    "meteor": "coco-caption's official scorer",
    "rouge_l": "coco-caption's official scorer",
    "cider": "CIDEr-D, coco-caption's official scorer (pycocoevalcap, PTB tokenizer)",
    "cider_d": "CIDEr-D, captioner's own code (no Java), as training's val_cider_d",
    "distinct": "different captions / images",
}


def format_table(metrics: dict[str, Any]) -> str:
    """A small aligned table of the scores: BLEU-1..4, the official coco-caption scores when
    computed, CIDEr-D and ``distinct``, each but BLEU labelled with what it is."""
    keys = [k for k in (*SCORE_KEYS, "distinct") if k in metrics]
    decode = metrics["decode"]["strategy"]
    head = f"{metrics['split']} split, {metrics['num_images']} images, {decode} decoding"
    rows = [f"  {k:<8} {metrics[k]:.4f}  {TABLE_NOTES.get(k, '')}".rstrip() for k in keys]
    return "\n".join([head, *rows])
