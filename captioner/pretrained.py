"""A trained model as a folder another person can use: ``captioner export`` writes it,
:func:`load_pretrained` (``Captioner.from_pretrained``, ``captioner caption --model``) reads it.

The folder holds no pickle and needs no training code, config or dataset::

    model.safetensors   the weights (float32, or float16 with --half)
    config.json         format version, model config, preprocessing, vocabulary size, decoding
    vocab.json          the vocabulary, a list of words (index = id)
    README.md           a model card: what it was trained on, its scores, how to use it

A folder is found by path, or as a Hugging Face Hub id (``owner/name``) through the optional
``huggingface_hub`` package and its cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from captioner import __version__
from captioner.checkpoint import (
    load_checkpoint,
    rebuild_model,
    resolve_checkpoint,
    saved_metrics,
    train_config,
    validated_weights,
    weights_epoch,
)
from captioner.configs.decode import DecodeConfig
from captioner.configs.model import ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.trained_on import describe_trained_on
from captioner.errors import UserError, first_line
from captioner.files import atomic_path, atomic_write, read_json
from captioner.manifest import CONFIG, FORMAT_NAME, FORMAT_VERSION, read_manifest, sized_fields
from captioner.models.captioning import CaptionModel, build_model
from captioner.vocab import Vocab

log = logging.getLogger(__name__)

WEIGHTS, VOCAB, CARD = "model.safetensors", "vocab.json", "README.md"
FILES = (WEIGHTS, CONFIG, VOCAB, CARD)
# the metrics a model card reports, in this order, with their display names
CARD_METRICS = {
    "val_bleu1": "BLEU-1",
    "val_bleu4": "BLEU-4",
    "val_cider_d": "CIDEr-D",
    "val_distinct": "distinct captions",
    "val_loss": "teacher-forced loss",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelInfo:
    """What is known about a loaded model besides its weights (a model card's data)."""

    source: str  # the checkpoint, folder or hub id it was loaded from
    decoding: DecodeConfig  # the decoding it was selected with: captioning's default
    dtype: str = "float32"  # the stored weights' dtype: float32 or float16
    scores: dict[str, float] = field(default_factory=dict)  # val metrics of these weights
    trained_on: dict[str, Any] = field(default_factory=dict)  # dataset name, epoch

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], path: str | Path) -> ModelInfo:
        config = train_config(ckpt)
        return cls(
            source=str(path),
            decoding=_decoding(config),
            scores=_scores(ckpt, Path(path)),
            trained_on=_trained_on(ckpt, config),
        )


def export_pretrained(checkpoint: str | Path, out_dir: str | Path, half: bool = False) -> Path:
    """Write ``out_dir`` from a checkpoint, or a run directory (its ``best.pt``); returns
    ``out_dir``. The folder is created if needed, or must be empty or an earlier export (whose
    files are replaced, each atomically). A ``last.pt`` of a run with a weight average exports
    the average: the weights its val scores were measured with."""
    checkpoint = resolve_checkpoint(checkpoint, prefer="best")
    ckpt = load_checkpoint(checkpoint)
    out = Path(out_dir)
    _check_out_dir(out)
    config = ModelConfig.from_dict(ckpt["model_config"])
    vocab = Vocab(ckpt["vocab"])
    info = ModelInfo.from_checkpoint(ckpt, checkpoint)
    dtype = "float16" if half else "float32"

    from safetensors.torch import save_file

    tensors = {}
    for name, value in validated_weights(ckpt).items():
        # tied weights share storage, which safetensors refuses: every tensor gets its own copy
        t = value.detach().to("cpu").contiguous().clone()
        if half and t.is_floating_point():
            t = t.half()
            if not torch.isfinite(t).all():
                raise UserError(f"--half: {name} has values beyond float16's range (65504)")
        tensors[name] = t
    metadata = {"format": f"{FORMAT_NAME}/{FORMAT_VERSION}", "dtype": dtype}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "captioner_version": __version__,
        "dtype": dtype,
        "vocab_size": len(vocab),
        "vocab_sha256": vocab_digest(vocab.itos),
        "model": config.to_dict(),
        "preprocessing": Preprocessing.from_dict(ckpt["preprocessing"]).to_dict(),
        "decoding": asdict(info.decoding),
        "scores": info.scores,
        "trained_on": info.trained_on,
    }
    atomic_write(out / CONFIG, json.dumps(manifest, indent=2) + "\n")
    atomic_write(out / VOCAB, json.dumps(list(vocab.itos), ensure_ascii=False) + "\n")
    atomic_write(out / CARD, model_card(manifest, checkpoint.name))
    return out


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / CONFIG).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != FORMAT_NAME:
        raise UserError(
            f"{out}: not empty and not an earlier `captioner export`: export into a new folder"
        )


def vocab_digest(words: Sequence[str]) -> str:
    """SHA-256 of the vocabulary's words in order: ties vocab.json to the weights."""
    return hashlib.sha256(json.dumps(list(words), ensure_ascii=False).encode()).hexdigest()


def _scores(ckpt: Mapping[str, Any], checkpoint: Path) -> dict[str, float]:
    """The val metrics of the exported weights: best.pt carries them; for a last.pt, its epoch's
    row of the run's metrics.jsonl (torn lines skipped), if there is one."""
    metrics = saved_metrics(ckpt)
    if not metrics and checkpoint.is_file():
        from captioner.training.runlog import read_metrics

        epoch = weights_epoch(ckpt)
        rows = [r for r in read_metrics(checkpoint.parent / "metrics.jsonl") if r["epoch"] == epoch]
        metrics = rows[-1] if rows else {}
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("val_") and isinstance(v, int | float) and math.isfinite(v)
    }


def _trained_on(ckpt: Mapping[str, Any], train_config: Mapping[str, Any]) -> dict[str, Any]:
    data = train_config.get("data") or {}
    named = {
        "dataset": data.get("name"),
        "dataset_format": data.get("format"),
        "epoch": weights_epoch(ckpt),
    }
    out: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
    scst = (train_config.get("trainer") or {}).get("scst") or {}
    if scst.get("start_epoch") is not None:
        out["self_critical"] = True
    return out


def _decoding(train_config: Mapping[str, Any]) -> DecodeConfig:
    """The decoding the model was selected with (``trainer.val_decode``), else the defaults."""
    node = (train_config.get("trainer") or {}).get("val_decode")
    try:
        return DecodeConfig.from_dict(node, "trainer.val_decode") if node else DecodeConfig()
    except UserError as exc:  # e.g. an option of another captioner version
        log.warning("the checkpoint's decoding is not usable (%s): greedy by default", exc)
        return DecodeConfig()


def model_card(manifest: Mapping[str, Any], checkpoint_name: str) -> str:
    """The README.md of an exported folder (Hugging Face model-card front matter)."""
    enc, dec = manifest["model"]["encoder"], manifest["model"]["decoder"]
    trained = manifest["trained_on"]
    if dec["attention"] != "none":
        grid = f"{enc['grid']}x{enc['grid']} " if enc.get("grid") else ""
        how = " (top-down: an attention cell, then a language cell)"
        how = how if dec["attention"] == "topdown" else ""
        reads = f"the decoder{how} attends over its {grid}feature grid at every word"
    else:
        reads = "the decoder reads its pooled features"
    install = (
        "pip install 'captioner[timm]'" if enc["source"] == "timm" else "pip install captioner"
    )
    lines = [
        "---",
        "library_name: captioner",
        "pipeline_tag: image-to-text",
        "tags: [image-captioning, captioner]",
        "---",
        "",
        f"# captioner model: {enc['source']} {enc['name']} + {dec['cell'].upper()} {dec['hidden_size']}",
        "",
        f"- **Encoder:** {enc['source']} `{enc['name']}`, {manifest['preprocessing']['crop']} px "
        f"input; {reads}.",
        f"- **Decoder:** {dec['num_layers']}-layer {dec['cell'].upper()}, hidden size "
        f"{dec['hidden_size']}, embeddings {dec['embed_dim']}, vocabulary "
        f"{manifest['vocab_size']} words.",
        f"- **Trained on:** {describe_trained_on(trained).removeprefix('trained on ')} "
        f"(exported from `{checkpoint_name}`).",
        f"- **Weights:** `{WEIGHTS}`, {manifest['dtype']}.",
        "",
        "## Scores",
        "",
    ]
    scores = manifest["scores"]
    shown = [(CARD_METRICS[k], scores[k]) for k in CARD_METRICS if k in scores]
    if shown:
        d = manifest["decoding"]
        how = f"beam {d['beam_size']}" if d["strategy"] == "beam" else d["strategy"]
        lines += [
            f"Measured on the validation split during training ({how} decoding):",
            "",
            "| metric | value |",
            "|---|---:|",
            *(f"| {name} | {value:.4f} |" for name, value in shown),
        ]
    else:
        lines.append("No validation scores were recorded with the checkpoint.")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"{install}   # captioner {manifest['captioner_version']} exported this folder",
        "captioner caption --model PATH_OR_HUB_ID image.jpg",
        "captioner serve --model PATH_OR_HUB_ID      # pip install 'captioner[serve]'",
        "```",
        "",
        "```python",
        "from captioner import Captioner",
        "",
        'captioner = Captioner.from_pretrained("PATH_OR_HUB_ID")',
        'print(captioner.caption(["image.jpg"])[0].caption)',
        "```",
        "",
    ]
    return "\n".join(lines)


def resolve_pretrained(path_or_id: str | Path) -> Path:
    """A local folder as it is; ``owner/name`` that is no local path: the Hub snapshot (cached
    by ``huggingface_hub``)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise UserError(
            f"{text}: not a pretrained model folder (export one with `captioner export`)"
        )
    if not _HUB_ID.match(text) or path.suffix in (".pt", ".pth", ".safetensors", ".json"):
        raise UserError(f"{text}: no such folder (and not a Hugging Face Hub id owner/name)")
    try:
        import huggingface_hub
    except ImportError as exc:
        raise UserError(
            f"{text}: no such local folder; to fetch it as a Hugging Face Hub id: "
            "pip install 'captioner[hub]'"
        ) from exc
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=text, allow_patterns=list(FILES)))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: one line naming it
        raise UserError(
            f"{text}: no such local folder, and fetching it as a Hugging Face Hub id failed "
            f"({first_line(exc)})"
        ) from exc


def load_pretrained(
    path_or_id: str | Path, device: str | torch.device = "cpu"
) -> tuple[CaptionModel, Vocab, Preprocessing, ModelInfo]:
    """Rebuild an exported model (eval mode, float32 on ``device``), its vocabulary,
    preprocessing and :class:`ModelInfo`. Every problem with the folder is one
    :class:`UserError` naming the file."""
    folder = resolve_pretrained(path_or_id)
    manifest = read_manifest(folder)  # every field checked
    words = read_json(folder / VOCAB, "exported vocabulary")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise UserError(f"{folder / VOCAB}: expected a JSON list of words")
    if len(words) != manifest.vocab_size:
        raise UserError(
            f"{folder / VOCAB}: {len(words)} words, but {CONFIG} says vocab_size="
            f"{manifest.vocab_size} (the vocabulary does not belong to these weights)"
        )
    digest = manifest.vocab_sha256
    if digest is not None and digest != vocab_digest(words):
        raise UserError(
            f"{folder / VOCAB}: not the vocabulary these weights were trained with (its SHA-256 "
            f"differs from {CONFIG}'s vocab_sha256)"
        )
    try:
        vocab = Vocab(words)
    except UserError as exc:
        raise UserError(f"{folder / VOCAB}: {exc}") from exc
    # the config is checked against the weights' shapes before the model is built: a config.json
    # with hidden_size 10^6 would otherwise allocate terabytes before any weight was read
    check_weights_fit(manifest.model, folder, len(vocab))
    model, _ = rebuild_model(
        manifest.model, len(vocab), lambda m: _load_weights(m, folder / WEIGHTS)
    )
    info = ModelInfo(
        source=str(path_or_id),
        decoding=manifest.decoding,
        dtype=manifest.dtype,
        scores=dict(manifest.scores),
        trained_on=dict(manifest.trained_on),
    )
    return model.to(device).eval(), vocab, manifest.preprocessing, info


def weights_header(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in the safetensors file ``path``, from its header alone (the
    tensors themselves are not read)."""
    if not path.is_file():
        raise UserError(f"{path}: missing (the model's weights)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(exc)})") from exc


def check_weights_fit(config: ModelConfig, folder: Path, vocab_size: int) -> None:
    """The model ``folder``'s config.json describes has exactly the tensors of its
    model.safetensors, name by name and shape by shape, checked on the ``meta`` device (no
    memory): else one UserError naming the tensor, and the config's field when its size is out
    of proportion with the weights."""
    path, config_path = folder / WEIGHTS, folder / CONFIG
    shapes = weights_header(path)
    layers = config.decoder.num_layers
    if layers > len(shapes):  # each layer has tensors: bounds the meta model's Python objects
        raise UserError(
            f"{config_path}: model.decoder.num_layers={layers}, but {WEIGHTS} holds "
            f"{len(shapes)} tensors in all (the config does not belong to these weights)"
        )
    with torch.device("meta"):
        model, _ = build_model(config, vocab_size, pretrained=False)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        parts = [f"missing {len(missing)} ({', '.join(missing[:3])})"] if missing else []
        parts += [f"unexpected {len(extra)} ({', '.join(extra[:3])})"] if extra else []
        raise UserError(f"{path}: tensors do not match the model in {CONFIG}: {'; '.join(parts)}")
    for name, want in expected.items():
        got = shapes[name]
        if got == want:
            continue
        if got and want and got[0] != want[0] and want[0] == vocab_size:
            note = f" (the weights are for a {got[0]}-word vocabulary, vocab.json has {vocab_size})"
            raise UserError(
                f"{path}: {name} has shape {got}, the model in {CONFIG} needs {want}{note}"
            )
        raise UserError(
            f"{config_path}: the model it describes{sized_fields(config, want, got)} needs {name} of shape {want} "
            f"({math.prod(want):,} values), {WEIGHTS} holds {got} ({math.prod(got):,}): "
            "the config does not belong to these weights"
        )


def _load_weights(model: CaptionModel, path: Path) -> None:
    """Copy ``path``'s tensors (their names and shapes checked by :func:`check_weights_fit`)
    into ``model``: float16 ones are widened to the model's float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(exc)})") from exc
    model.load_state_dict(tensors)  # copying into the float32 parameters widens float16
