"""Self-contained checkpoints: atomic writes, ``weights_only`` loads, rebuilding the model.

A checkpoint holds only tensors and plain containers: the model's state_dict, its config as a
dict, the vocabulary as a list of words, the preprocessing, and (for ``last.pt``) everything a
resumed run needs. It never needs the training config, the dataset or a download to caption.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captioner.configs.model import ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.errors import UserError, first_line
from captioner.files import atomic_path
from captioner.models.captioning import CaptionModel, build_model
from captioner.vocab import Vocab

FORMAT = "captioner/1"
DEFAULT_RUNS = Path("outputs") / "train"  # where `captioner train` writes its runs


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``module.``) and ``torch.compile`` (``_orig_mod.``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_payload(model: nn.Module, vocab: Vocab, preprocessing: Preprocessing) -> dict[str, Any]:
    """What captioning needs: weights, model config, vocabulary, preprocessing."""
    core = unwrap(model)
    assert isinstance(core, CaptionModel)
    return {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "model_config": core.config.to_dict(),
        "vocab": list(vocab.itos),
        "preprocessing": preprocessing.to_dict(),
    }


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (:func:`captioner.files.atomic_path`): a crash never leaves a torn file."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: a pickle that is not a plain checkpoint is refused, never
    executed. Every failure is a one-line :class:`UserError` naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles: the error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise UserError(
                f"{path}: refused to load: not a plain captioner checkpoint (unsafe pickle content)"
            ) from exc
        raise UserError(f"{path}: not a checkpoint (not a torch file: {first_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - whatever torch.load trips on, the file is bad
        raise UserError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {first_line(exc)})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a captioner checkpoint (no '{FORMAT}' format tag)")
    for key in ("model", "model_config", "vocab", "preprocessing"):
        if key not in ckpt:
            raise UserError(f"{path}: checkpoint is missing '{key}'")
    return ckpt


def model_from_checkpoint(
    ckpt: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[CaptionModel, Vocab, Preprocessing]:
    """Rebuild the model (no download: the architecture is built bare, then the saved weights
    are loaded), its vocabulary and preprocessing; the model is returned in eval mode."""
    config = ModelConfig.from_dict(ckpt["model_config"])
    vocab = Vocab(ckpt["vocab"])
    model, _ = build_model(config, len(vocab), pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(
            f"checkpoint: its weights do not fit its model config ({first_line(exc)})"
        ) from exc
    return model.to(device).eval(), vocab, Preprocessing.from_dict(ckpt["preprocessing"])


def run_checkpoint(path: str | Path) -> Path:
    """A run directory's ``best.pt`` when it has one (the weights to caption with, export or
    serve); any other path as it is."""
    path = Path(path)
    return path / "best.pt" if path.is_dir() and (path / "best.pt").is_file() else path


def find_checkpoint(runs: Path = DEFAULT_RUNS) -> Path:
    """The newest ``best.pt`` under the default training output directory."""
    found = (
        sorted(runs.glob("**/best.pt"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    )
    if not found:
        raise UserError(
            f"no checkpoint given and no best.pt under {runs}/: train one with `captioner train` "
            "or pass --checkpoint PATH"
        )
    return found[-1]
