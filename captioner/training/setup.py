"""Setting up a run: what it starts from (``resume=``, ``init_from=`` or pretrained weights),
its data, vocabulary and model, and its optimization (optimizer, schedule, precision, weight
average). :class:`~captioner.training.trainer.Trainer` calls these in this order, which is the
order of the random draws a seeded run makes (a resumed one restores them afterwards)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from captioner.checkpoint import (
    TrainingState,
    is_training_state,
    load_checkpoint,
    rebuild_model,
    resolve_checkpoint,
    saved_metrics,
    train_config,
    validated_weights,
)
from captioner.configs.model import ARCHITECTURE_FIELDS, ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.configs.training import TrainConfig, TrainerConfig, check_cache_features
from captioner.datasets.annotations import CaptionRecord
from captioner.datasets.captions import load_split
from captioner.errors import UserError, first_line
from captioner.models.captioning import CaptionModel
from captioner.runtime import Runtime, autocast_dtype
from captioner.training.ema import ModelEMA
from captioner.training.gradients import clip_and_measure
from captioner.training.objectives import TeacherForcing
from captioner.vocab import Vocab

log = logging.getLogger(__name__)


def load_resume(config: TrainConfig) -> tuple[dict[str, Any] | None, Path]:
    """``resume=`` (a run directory or its last.pt) loaded, and the path it names; settings it
    cannot continue with are refused (:func:`check_resume`)."""
    resume = config.resume
    if not resume:
        return None, Path()
    path = resolve_checkpoint(resume, prefer="last")
    ckpt = load_checkpoint(path, map_location="cpu")
    if not is_training_state(ckpt):
        raise UserError(f"resume: {resume} is a best.pt without training state; use last.pt")
    check_resume(config, ckpt, path)
    log.info(
        "resuming from %s (epoch %d, batch %d)", path, ckpt["epoch"] + 1, ckpt["batch_in_epoch"]
    )
    return ckpt, path


def check_architecture(theirs: ModelConfig, ours: ModelConfig, where: str, hint: str = "") -> None:
    """Refuse, in one line starting with ``where``, a model whose weights would not fit: the
    first of :data:`ARCHITECTURE_FIELDS` that differs."""
    for part in ("encoder", "decoder"):
        a, b = vars(getattr(theirs, part)), vars(getattr(ours, part))
        for name in ARCHITECTURE_FIELDS[part]:
            if name == "attention_dim" and a["attention"] == b["attention"] == "none":
                continue  # no attention, no attention weights
            if a[name] != b[name]:
                raise UserError(
                    f"{where} has model.{part}.{name}={a[name]}, this run "
                    f"model.{part}.{name}={b[name]}{hint}"
                )


# what a resumed run may set otherwise than the run it continues, and gets: its length, early
# stopping, where it runs and where its files are; a schedule's length that follows
# trainer.max_epochs (cosine's T_max) goes on as saved, with a warning
RESUME_MAY_CHANGE = (
    "resume",
    "init_from",
    "device",
    "trainer.max_epochs",
    "trainer.patience",
    "trainer.tensorboard",
    "trainer.cache_dir",
    "data.root",
    "data.num_workers",
)
# the schedule lengths a scheduler cannot step past (OneCycleLR raises): following a longer
# trainer.max_epochs is refused instead (a shorter one only stops the schedule early)
FIXED_LENGTH = ("scheduler.total_steps", "scheduler.epochs")


def check_resume(config: TrainConfig, ckpt: dict[str, Any], path: Path) -> None:
    """A resumed run continues its saved model, optimizer and schedule, so an option set
    otherwise is refused in one line naming it, unless it is one of :data:`RESUME_MAY_CHANGE`:
    another architecture first, then every other setting the saved ``train_config`` records."""
    check_architecture(
        ModelConfig.from_dict(ckpt["model_config"]),
        config.model,
        f"resume: {path}",
        ": a resumed run keeps its architecture (start a new run to change it)",
    )
    saved = _flat(train_config(ckpt))
    if not saved:  # a last.pt from before train_config
        return
    raw = OmegaConf.create(OmegaConf.to_container(config.raw, resolve=False))
    for key in RESUME_MAY_CHANGE:  # set as saved, so that what follows them compares equal
        if key in saved:
            OmegaConf.update(raw, key, saved[key], merge=False)
    ours = _flat(OmegaConf.to_container(raw, resolve=True))
    for key, value in _flat(OmegaConf.to_container(config.raw, resolve=True)).items():
        if key in RESUME_MAY_CHANGE or key not in ours or value == ours[key]:
            continue
        if key in FIXED_LENGTH and isinstance(value, int) and value > (ours[key] or 0):
            raise UserError(
                f"resume: {path} was trained with {key}={ours[key]}, which follows a changed "
                f"option ({value} here), but its schedule cannot step past it: keep its "
                f"trainer.max_epochs, or start a new run with init_from={path}"
            )
        log.warning(
            "resume: %s follows a changed option (%s here), but the saved schedule goes on "
            "with %s=%s",
            key,
            value,
            key,
            ours[key],
        )
    changed = [k for k in ours if k in saved and k not in RESUME_MAY_CHANGE and ours[k] != saved[k]]
    if changed:
        was = ", ".join(f"{k}={saved[k]}" for k in changed)
        now = ", ".join(f"{k}={ours[k]}" for k in changed)
        raise UserError(
            f"resume: {path} was trained with {was}, this run sets {now}: a resumed run keeps "
            f"its settings but {', '.join(RESUME_MAY_CHANGE[2:])} (to change others, start a "
            f"new run with init_from={path})"
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b": value}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def init_weights(model: CaptionModel, vocab: Vocab, path: str) -> None:
    """``init_from=``: load a checkpoint's model weights (not its optimizer or counters) into
    this run's model: those its val scores were measured with (a ``last.pt``'s weight average,
    :func:`validated_weights`); another vocabulary or architecture is one clear error."""
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except UserError as exc:
        raise UserError(f"init_from: {exc}") from exc
    if list(ckpt["vocab"]) != list(vocab.itos):
        raise UserError(
            f"init_from: {path} has a vocabulary of {len(ckpt['vocab'])} words, this run's data "
            f"gives {len(vocab)} (or other words): train on the same data with the same "
            "data.min_freq"
        )
    check_architecture(
        ModelConfig.from_dict(ckpt["model_config"]), model.config, f"init_from: {path}"
    )
    try:
        model.load_state_dict(validated_weights(ckpt))
    except RuntimeError as exc:
        raise UserError(f"init_from: {path} does not fit this model ({first_line(exc)})") from exc
    scores = saved_metrics(ckpt)
    log.info(
        "weights from %s%s",
        path,
        f" (epoch {scores['epoch']} of its run, val BLEU-4 {scores['val_bleu4']:.4f})"
        if "epoch" in scores and "val_bleu4" in scores
        else "",
    )


class RunData(NamedTuple):
    """A run's records, vocabulary, model (on its device) and preprocessing."""

    train_records: list[CaptionRecord]
    val_records: list[CaptionRecord]
    vocab: Vocab
    model: CaptionModel
    preprocessing: Preprocessing


def vocab_and_model(
    config: TrainConfig, train_records: list[CaptionRecord], resume: dict[str, Any] | None
) -> tuple[Vocab, CaptionModel, Preprocessing]:
    """A new run: the vocabulary of the TRAIN captions and a model with pretrained weights (or
    those of ``init_from``); a resumed one: both as ``last.pt`` saved them (no download)."""
    if resume is not None:
        vocab, model_cfg = Vocab(resume["vocab"]), ModelConfig.from_dict(resume["model_config"])
    else:
        captions = (c for r in train_records for c in r.captions)
        vocab = Vocab.build(captions, config.data.min_freq, max_size=config.data.max_vocab)
        model_cfg = config.model
    init_from = config.init_from
    if resume is not None:
        weights: Any = resume["model"]
    elif init_from is not None:
        weights = lambda model: init_weights(model, vocab, init_from)  # noqa: E731
    else:
        weights = None  # the encoder's pretrained weights
    model, preprocessing = rebuild_model(model_cfg, len(vocab), weights, pretrained=weights is None)
    if resume is not None:
        preprocessing = Preprocessing.from_dict(resume["preprocessing"])
    log.info(
        "model: %s encoder (%d-d features, %.1fM params), decoder %.1fM params; images: %s",
        model_cfg.encoder.name,
        model.encoder.feature_dim,
        sum(p.numel() for p in model.encoder.parameters()) / 1e6,
        sum(p.numel() for p in model.decoder.parameters()) / 1e6,
        preprocessing.describe(),
    )
    return vocab, model, preprocessing


def load_data_and_model(config: TrainConfig, rt: Runtime, resume: dict[str, Any] | None) -> RunData:
    """The splits (val cut to ``trainer.val_max_images``), the vocabulary and the model, moved
    to the run's device; a feature-cache setting the model's encoder cannot use fails here."""
    dcfg, tcfg = config.data, config.trainer
    train_records = load_split(dcfg, "train")
    val_records = load_split(dcfg, "val")[: tcfg.val_max_images]
    vocab, model, preprocessing = vocab_and_model(config, train_records, resume)
    check_cache_features(dcfg, model.config.encoder, tcfg)  # resumed: its own encoder
    log.info(
        "data: %d train images, %d val images; vocabulary: %d words (min_freq >= %d)",
        len(train_records),
        len(val_records),
        len(vocab),
        dcfg.min_freq,
    )
    model.to(rt.device)
    return RunData(train_records, val_records, vocab, model, preprocessing)


def saved_train_config(config: TrainConfig) -> dict[str, Any]:
    """The composed config as a run's checkpoints keep it (``train_config``), with the folder
    the features were cached in made absolute, so that evaluate finds it from anywhere."""
    saved: Any = OmegaConf.to_container(config.raw, resolve=True)
    saved["trainer"]["cache_dir"] = str(config.trainer.feature_cache_dir.resolve())
    return saved


def teacher_forcing_for(model: CaptionModel, vocab: Vocab, tcfg: TrainerConfig) -> TeacherForcing:
    """The default objective: teacher forcing with ``trainer.label_smoothing`` and
    ``trainer.tbptt_steps``, and the decoder's attention penalty when it attends."""
    decoder = model.config.decoder
    penalty = decoder.attention_penalty if model.attends else 0.0
    return TeacherForcing(vocab.pad_id, tcfg.label_smoothing, penalty, tcfg.tbptt_steps)


@dataclass
class Optimization:
    """What updates the weights: the optimizer over the model's parameter groups, its
    schedule, the autocast dtype with its gradient scaler, and the weight average (or None)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None

    @classmethod
    def build(cls, config: TrainConfig, model: CaptionModel, rt: Runtime) -> Optimization:
        optimizer = instantiate(config.optim, params=model.param_groups(), _convert_="all")
        scheduler = instantiate(config.scheduler, optimizer=optimizer)
        dtype = autocast_dtype(config.trainer.precision, rt.device)
        scaler = torch.amp.GradScaler(rt.device.type, enabled=dtype == torch.float16)
        decay = config.trainer.ema_decay
        ema = ModelEMA(model, decay) if decay is not None else None
        return cls(optimizer, scheduler, dtype, scaler, ema)

    def step(
        self,
        model: torch.nn.Module,
        trainable: list[torch.nn.Parameter],
        grad_clip: float | None,
        lr_scale: float = 1.0,
    ) -> dict[str, float]:
        """One update from the gradients back-propagated into ``trainable``: unscale (float16),
        clip and measure them, step at ``lr_scale`` times every group's rate, clear them, and
        move the weight average. The groups' rates are scaled for this step only, so the
        schedule and a checkpoint see the unscaled ones. Returns the gradient's logs."""
        self.scaler.unscale_(self.optimizer)  # no-op without a float16 scaler
        logs = clip_and_measure(trainable, grad_clip)
        groups = self.optimizer.param_groups
        rates = [group["lr"] for group in groups]
        if lr_scale != 1.0:
            for group, lr in zip(groups, rates, strict=True):
                group["lr"] = lr * lr_scale
        try:
            self.scaler.step(self.optimizer)
        finally:
            for group, lr in zip(groups, rates, strict=True):
                group["lr"] = lr
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(model)
        return logs

    def state(self) -> dict[str, Any]:
        """The parts of :class:`~captioner.checkpoint.TrainingState` this holds."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def restore(self, state: TrainingState, source: Path) -> None:
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if state.counters.get("global_step", 0) > 0:
            # The optimizer stepped before last.pt was saved. PyTorch's schedulers note an
            # optimizer step in memory only (``_opt_called``, set by the step they wrap), so a
            # resume right after an epoch's last batch would step the scheduler with no step
            # in this process and be warned of the wrong order, which it is not.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
        self.scaler.load_state_dict(state.scaler)
        if self.ema is not None:
            if state.ema is not None:
                self.ema.load_state_dict(state.ema)
            else:
                log.warning("resume: %s has no weight average; starting one now", source)


__all__ = [
    "RESUME_MAY_CHANGE",
    "Optimization",
    "RunData",
    "check_architecture",
    "check_resume",
    "init_weights",
    "load_data_and_model",
    "load_resume",
    "saved_train_config",
    "teacher_forcing_for",
    "vocab_and_model",
]
