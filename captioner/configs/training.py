"""``trainer.*`` and a whole training run, typed: :func:`parse_train_config` turns the composed
``train`` config into :class:`TrainConfig` ONCE, at start-up, so that every bad value is a one-line
``UserError`` naming its key before any data is read or a cache is built."""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.configs.checks import at_least, one_of
from captioner.configs.data import DataConfig
from captioner.configs.decode import DecodeConfig
from captioner.configs.model import EncoderConfig, ModelConfig
from captioner.errors import UserError, first_line
from captioner.typed import from_dict

if (
    TYPE_CHECKING
):  # omegaconf is imported where a config is parsed, not by every reader of PRECISIONS
    from omegaconf import DictConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

MONITORS = ("val_bleu4", "val_cider_d")


SCST_BASELINES = ("mean", "greedy")


@dataclass
class SCSTConfig:
    """``trainer.scst.*``: self-critical sequence training (:mod:`captioner.training.scst`), the objective
    of every epoch from ``start_epoch`` on (0-based: after that many teacher-forced epochs)."""

    start_epoch: int | None = None  # null: teacher forcing only; 0: SCST from the start (init_from)
    samples: int = 5  # K captions sampled per image
    baseline: str = "mean"  # mean: of the image's OTHER K-1 samples | greedy: the greedy caption
    batch_size: int | None = None  # images per batch; null: data.batch_size
    lr: float | None = None  # null: keep the optimizer's rate; else every group's rate from here
    # the first SCST epoch's first N optimizer steps take 1/N, 2/N, ... of the rate (a linear
    # warm-up from the teacher-forced model); 0: the full rate from the first step
    warmup_steps: int = 0
    max_len: int | None = None  # tokens per sample, <end> included; null: trainer.val_decode's
    # <end> is a word of the samples and the references for CIDEr-D, so unfinished fragments
    # miss the final n-grams
    end_in_reward: bool = True
    # sample and score with the decoder's dropout on (each pass its own masks: not the exact
    # policy gradient)
    dropout: bool = False

    def __post_init__(self) -> None:
        where = "trainer.scst"
        one_of(self, where, baseline=SCST_BASELINES)
        at_least(self, where, samples=1)
        if self.baseline == "mean" and self.samples < 2:
            raise UserError(
                "trainer.scst.baseline=mean needs trainer.scst.samples >= 2 (the mean of the "
                f"OTHER samples), got {self.samples}"
            )
        if self.start_epoch is not None:
            at_least(self, where, start_epoch=0)
        at_least(self, where, warmup_steps=0)
        for name in ("batch_size", "max_len"):
            if getattr(self, name) is not None:
                at_least(self, where, **{name: 1})
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"trainer.scst.lr must be > 0 or null, got {self.lr}")

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) trains with SCST."""
        return self.start_epoch is not None and epoch >= self.start_epoch


@dataclass
class TrainerConfig:
    """``trainer.*``: the loop, validation, checkpoints and the feature cache."""

    max_epochs: int = 20
    grad_clip: float | None = 5.0  # max gradient norm; null: no clipping
    label_smoothing: float = 0.0
    # truncated backpropagation through time for teacher forcing: chunks of this many steps, the
    # state carried from chunk to chunk but its gradient cut; null: full BPTT
    tbptt_steps: int | None = None
    # auto (bf16/fp16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    precision: str = "auto"
    # auto: cache frozen-encoder features when the transform is deterministic | true | false
    # (normalised to a string)
    cache_features: str | bool = "auto"
    cache_dir: str | None = None  # the feature cache; null: default_cache_dir()
    patience: int | None = 5  # epochs without a gain of `monitor` before stopping; null: never
    monitor: str = "val_bleu4"  # what selects best.pt and early-stops: val_bleu4 | val_cider_d
    val_max_images: int | None = None  # validate on the first N val images only
    # how val captions are decoded for val BLEU, which selects best.pt (greedy; strategy=beam
    # beam_size=3 to select by the decoding you will evaluate with)
    val_decode: DecodeConfig = field(default_factory=DecodeConfig)
    ema_decay: float | None = None  # e.g. 0.999: validate and save best.pt with a weight average
    # also log scalars to <run dir>/tensorboard (pip install 'captioner[tensorboard]')
    tensorboard: bool = False
    scst: SCSTConfig = field(default_factory=SCSTConfig)

    def __post_init__(self) -> None:
        if isinstance(self.cache_features, bool):  # YAML true/false
            self.cache_features = str(self.cache_features).lower()
        one_of(
            self,
            "trainer",
            cache_features=("auto", "true", "false"),
            precision=PRECISIONS,
            monitor=MONITORS,
        )
        at_least(self, "trainer", max_epochs=1)
        start = self.scst.start_epoch
        if start is not None and start >= self.max_epochs:
            raise UserError(
                f"trainer.scst.start_epoch must be < trainer.max_epochs={self.max_epochs} "
                f"(the epochs before it are teacher-forced), got {start}"
            )
        for name in ("patience", "val_max_images", "tbptt_steps"):
            if getattr(self, name) is not None:
                at_least(self, "trainer", **{name: 1})
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"trainer.grad_clip must be > 0 or null, got {self.grad_clip}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(
                f"trainer.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"trainer.ema_decay must be in (0, 1) or null, got {self.ema_decay}")

    @property
    def feature_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


def default_cache_dir() -> Path:
    """Where frozen-encoder features are cached unless ``trainer.cache_dir`` says otherwise:
    ``$XDG_CACHE_HOME/captioner/features``, else ``~/.cache/captioner/features`` (the user cache
    that torch hub and Hugging Face use too; datasets are often on read-only storage)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captioner" / "features"


@dataclass
class TrainConfig:
    """A whole training run, typed. ``optim`` and ``scheduler`` stay Hydra ``_target_`` nodes
    (instantiated by Hydra, checked here on a dummy parameter); ``raw`` is the composed config,
    saved in every checkpoint."""

    data: DataConfig
    model: ModelConfig
    trainer: TrainerConfig
    optim: DictConfig
    scheduler: DictConfig
    raw: DictConfig
    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    init_from: str | None = None  # a checkpoint whose weights (only) start this run


def parse_train_config(cfg: DictConfig) -> TrainConfig:
    """The composed ``train`` config, validated and typed; raises a one-line ``UserError``."""
    unknown = sorted(k for k in cfg if k not in _TOP_LEVEL and k != "hydra")
    if unknown:
        raise UserError(f"{unknown[0]}: unknown option (known: {', '.join(sorted(_TOP_LEVEL))})")
    top = from_dict(RunConfig, {k: cfg.get(k) for k in _TOP_LEVEL_SCALARS}, "")
    resolved = _resolve(cfg)
    data = from_dict(DataConfig, resolved.get("data"), "data")
    model = ModelConfig.from_dict(resolved.get("model") or {})
    trainer = from_dict(TrainerConfig, resolved.get("trainer"), "trainer")
    check_optimizer(cfg.optim, cfg.scheduler)  # after trainer: the schedule reads max_epochs
    _check_combination(data, model, trainer, top.init_from)
    return TrainConfig(
        data=data,
        model=model,
        trainer=trainer,
        optim=cfg.optim,
        scheduler=cfg.scheduler,
        raw=cfg,
        seed=top.seed,
        device=top.device,
        resume=top.resume,
        init_from=top.init_from,
    )


@dataclass
class RunConfig:
    """The top-level scalars of a training run (``seed``, ``device``, ``resume``, ``init_from``)."""

    seed: int = 0
    device: str = "auto"  # auto (CUDA > MPS > CPU) | cpu | cuda | cuda:1 | mps
    resume: str | None = None  # a run directory or its last.pt: continue that run exactly
    # a checkpoint (best.pt or last.pt) whose weights start this new run: not its optimizer or
    # counters
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.init_from and self.resume is None and not Path(self.init_from).is_file():
            raise UserError(f"init_from: {self.init_from}: checkpoint not found")


_TOP_LEVEL_SCALARS = [f.name for f in fields(RunConfig)]


_TOP_LEVEL = {"data", "model", "trainer", "optim", "scheduler", *_TOP_LEVEL_SCALARS}


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as exc:  # noqa: BLE001 - an interpolation that does not resolve
        raise UserError(f"config: {first_line(exc)}") from exc


def check_cache_features(data: DataConfig, encoder: EncoderConfig, trainer: TrainerConfig) -> None:
    """``trainer.cache_features=true`` needs the encoder frozen in every epoch and a
    deterministic transform (checked on the config, and on a resumed run's model config)."""
    fine_tunes = not encoder.freeze or (
        encoder.finetune_from_epoch is not None
        and encoder.finetune_from_epoch <= trainer.max_epochs
    )
    if trainer.cache_features == "true" and (fine_tunes or data.augment):
        raise UserError(
            "trainer.cache_features=true needs a frozen encoder (model.encoder.freeze=true, no "
            "finetune_from_epoch within max_epochs) and a deterministic transform "
            "(data.augment=false)"
        )


def _check_combination(
    data: DataConfig, model: ModelConfig, trainer: TrainerConfig, init_from: str | None
) -> None:
    """Settings that are fine alone and wrong together, caught before any work."""
    check_cache_features(data, model.encoder, trainer)
    if trainer.scst.start_epoch == 0 and init_from is None:
        raise UserError(
            "trainer.scst.start_epoch=0 needs init_from=<checkpoint>: self-critical training "
            "fine-tunes a model that teacher forcing trained first"
        )
    if trainer.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "trainer.tensorboard=true needs tensorboard: pip install 'captioner[tensorboard]'"
        )


def check_optimizer(optim: DictConfig, scheduler: DictConfig) -> None:
    """Build ``optim`` and ``scheduler`` once on a dummy parameter, so that a bad value
    (``optim.lr=-1``) is one line naming the group before any work, not Hydra's traceback."""
    import torch
    from hydra.utils import instantiate

    for name, value in optim.items():
        if name != "_target_" and isinstance(value, str):
            raise UserError(f"optim.{name}: expected a number or true/false, got {value!r}")
    try:
        optimizer = instantiate(optim, params=[torch.nn.Parameter(torch.zeros(1))])
    except Exception as exc:  # noqa: BLE001 - whatever the optimizer refuses
        raise UserError(f"optim: {_cause(exc)} ({_settings('optim', optim)})") from exc
    try:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore")
            instantiate(scheduler, optimizer=optimizer).step()  # a value used only when stepping
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"scheduler: {_cause(exc)} ({_settings('scheduler', scheduler)})") from exc


def _settings(where: str, node: DictConfig) -> str:
    """``torch.optim.Adam with optim.lr=-1, optim.weight_decay=0.0``, for a message."""
    items = ", ".join(f"{where}.{k}={v}" for k, v in node.items() if k != "_target_")
    return f"{node.get('_target_', '?')} with {items}"


def _cause(exc: BaseException) -> str:
    """The innermost message of Hydra's InstantiationException chain."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return first_line(exc)
