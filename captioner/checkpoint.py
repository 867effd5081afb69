"""The checkpoint: its schema, atomic writes, ``weights_only`` loads, rebuilding the model, and
what a path names. Every other module asks this one; none reads the keys on its own.

A checkpoint holds only tensors and plain containers (``torch.save`` of a dict, tagged
``format: captioner/1``). Its keys:

* every checkpoint (:data:`MODEL_KEYS`, :func:`model_payload`): ``model`` (the state_dict),
  ``model_config`` (a dict), ``vocab`` (a list of words), ``preprocessing`` (a dict): all that
  captioning needs. It never needs the training config, the dataset or a download to caption.
* a run's checkpoints add ``train_config`` (the composed config, :func:`train_config`).
* ``best.pt`` (:func:`best_payload`): ``epoch`` (the 0-based epoch it was validated at) and
  ``metrics`` (that epoch's row of metrics.jsonl).
* ``last.pt`` (:class:`TrainingState`): what a resumed run needs: ``optimizer``, ``scheduler``,
  ``scaler``, ``rng`` (every rank's random streams), ``ema`` (the weight average or None) and
  the counters of :class:`captioner.training.progress.Progress` at the top level (``epoch`` there
  counts completed epochs). :func:`is_training_state` tells the two apart.

What a path names (one rule, :func:`resolve_checkpoint`): a file is itself; a run directory is
its ``best.pt`` (else its ``last.pt``) wherever weights are read (caption, export, serve,
evaluate, the ``Captioner`` API), and its ``last.pt`` only in training (``resume=``, which needs
the training state, and ``init_from=``, both through :func:`load_checkpoint` itself).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from captioner.configs.model import ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.errors import UserError, first_line
from captioner.files import atomic_path
from captioner.models.captioning import CaptionModel, build_model
from captioner.models.decoders import rename_legacy_keys
from captioner.vocab import Vocab

FORMAT = "captioner/1"
MODEL_KEYS = ("model", "model_config", "vocab", "preprocessing")  # in every checkpoint
DEFAULT_RUNS = Path("outputs") / "train"  # where `captioner train` writes its runs
BEST, LAST = "best.pt", "last.pt"  # a run directory's two checkpoints


# ---------------------------------------------------------------------------------------------
# writing


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``module.``) and ``torch.compile`` (``_orig_mod.``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_payload(
    model: nn.Module,
    vocab: Vocab,
    preprocessing: Preprocessing,
    train_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What captioning needs: weights, model config, vocabulary, preprocessing; a run's
    checkpoints add the ``train_config`` they were trained with."""
    core = unwrap(model)
    assert isinstance(core, CaptionModel)
    payload = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "model_config": core.config.to_dict(),
        "vocab": list(vocab.itos),
        "preprocessing": preprocessing.to_dict(),
    }
    if train_config is not None:
        payload["train_config"] = train_config
    return payload


def best_payload(payload: dict[str, Any], epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """``best.pt``: the model payload, the 0-based ``epoch`` it was validated at, its metrics."""
    return {**payload, "epoch": epoch, "metrics": metrics}


@dataclass
class TrainingState:
    """What ``last.pt`` adds to the model payload so that a run resumes exactly: the optimizer's,
    scheduler's and gradient scaler's state_dicts, the loop's counters (a
    :class:`~captioner.training.progress.Progress` state, stored at the top level), every rank's
    random streams and the weight average (None without one)."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    counters: dict[str, Any]
    rng: list[dict[str, Any]]
    ema: dict[str, Any] | None

    def payload(self, model_payload: dict[str, Any]) -> dict[str, Any]:
        """``last.pt``: ``model_payload`` with this state."""
        return {
            **model_payload,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            **self.counters,
            "rng": self.rng,
            "ema": self.ema,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> TrainingState:
        """The state of a ``last.pt`` (:func:`is_training_state`); ``counters`` holds every
        other top-level key, of which :class:`Progress` reads its own."""
        own = {"optimizer", "scheduler", "scaler", "rng", "ema"}
        return cls(
            optimizer=ckpt["optimizer"],
            scheduler=ckpt["scheduler"],
            scaler=ckpt["scaler"],
            counters={k: v for k, v in ckpt.items() if k not in own},
            rng=ckpt["rng"],
            ema=ckpt.get("ema"),  # a last.pt from before weight averaging has none
        )


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (:func:`captioner.files.atomic_path`): a crash never leaves a torn file."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return path


# ---------------------------------------------------------------------------------------------
# what a path names


def resolve_checkpoint(path: str | Path, prefer: Literal["best", "last"] = "best") -> Path:
    """The checkpoint file ``path`` names: the one rule for a run directory, everywhere.

    A file (or anything that is not a directory) is itself. A directory is a run directory, and
    which of its checkpoints it means depends on what is wanted:

    * ``prefer="best"`` (the default), the weights: its ``best.pt`` when it has one (the
      validated best), else its ``last.pt`` (a run stopped before its first validation).
      ``captioner caption``, ``export``, ``serve`` and ``evaluate``, ``Captioner.from_checkpoint``
      and ``Captioner.load`` read this.
    * ``prefer="last"``, the training state: its ``last.pt``. ``resume=`` and
      :func:`load_checkpoint` given a directory (so ``init_from=``) read this.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    if prefer == "best" and (path / BEST).is_file():
        return path / BEST
    return path / LAST


def find_checkpoint(runs: Path = DEFAULT_RUNS) -> Path:
    """The newest ``best.pt`` under the default training output directory."""
    found = (
        sorted(runs.glob(f"**/{BEST}"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    )
    if not found:
        raise UserError(
            f"no checkpoint given and no best.pt under {runs}/: train one with `captioner train` "
            "or pass --checkpoint PATH"
        )
    return found[-1]


# ---------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``path`` (a run directory: its ``last.pt``, see :func:`resolve_checkpoint`) with
    ``weights_only=True``: a pickle that is not a plain checkpoint is refused, never executed.
    Every failure is a one-line :class:`UserError` naming the file."""
    path = resolve_checkpoint(path, prefer="last")
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
    for key in MODEL_KEYS:
        if key not in ckpt:
            raise UserError(f"{path}: checkpoint is missing '{key}'")
    return ckpt


def is_training_state(ckpt: Mapping[str, Any]) -> bool:
    """Whether ``ckpt`` is a ``last.pt`` (it holds the training state a resume needs, and its
    ``epoch`` counts completed epochs) rather than a ``best.pt`` (weights and their scores; its
    ``epoch`` is the 0-based epoch they were validated at)."""
    return "optimizer" in ckpt


def train_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The composed training config the checkpoint's run was trained with ({} if none)."""
    return dict(ckpt.get("train_config") or {})


def saved_metrics(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The val metrics a ``best.pt`` was selected with ({} for a ``last.pt``)."""
    return dict(ckpt.get("metrics") or {})


def weights_epoch(ckpt: Mapping[str, Any]) -> int | None:
    """The 1-based epoch (as metrics.jsonl numbers them) whose weights the checkpoint holds."""
    if ckpt.get("epoch") is None:
        return None
    return int(ckpt["epoch"]) if is_training_state(ckpt) else int(ckpt["epoch"]) + 1


def validated_weights(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights the checkpoint's val scores were measured with: a ``best.pt``'s own; a
    ``last.pt``'s weight average when it has one, else its weights."""
    weights = dict(ckpt["model"])
    ema = ckpt.get("ema") if is_training_state(ckpt) else None
    if ema and ema.get("averages"):
        weights.update(rename_legacy_keys(dict(ema["averages"])))
    return weights


# ---------------------------------------------------------------------------------------------
# rebuilding the model


def rebuild_model(
    config: ModelConfig | Mapping[str, Any],
    vocab_size: int,
    weights: Mapping[str, torch.Tensor] | Callable[[CaptionModel], None] | None,
    *,
    pretrained: bool = False,
) -> tuple[CaptionModel, Preprocessing]:
    """The one way a model is made from saved state: build ``config``'s architecture for
    ``vocab_size`` words (bare unless ``pretrained``: no download when weights follow), then
    load ``weights``: a state_dict (a misfit is one-line :class:`UserError`) or a function that
    loads them into the model with its own checks (an exported folder, ``init_from=``), or
    None (a new run's own pretrained weights). Returns the model, in training mode on the CPU,
    and the preprocessing of its encoder's weights (a checkpoint's own overrides it)."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_dict(config)
    model, preprocessing = build_model(config, vocab_size, pretrained=pretrained)
    if callable(weights):
        weights(model)
    elif weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise UserError(
                f"checkpoint: its weights do not fit its model config ({first_line(exc)})"
            ) from exc
    return model, preprocessing


def model_from_checkpoint(
    ckpt: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[CaptionModel, Vocab, Preprocessing]:
    """Rebuild the model (:func:`rebuild_model`: no download) with the weights its val scores
    were measured with (:func:`validated_weights`: a ``last.pt``'s weight average, as
    ``export`` writes it), its vocabulary and preprocessing; the model is returned in eval mode."""
    vocab = Vocab(ckpt["vocab"])
    model, _ = rebuild_model(ckpt["model_config"], len(vocab), validated_weights(ckpt))
    return model.to(device).eval(), vocab, Preprocessing.from_dict(ckpt["preprocessing"])
