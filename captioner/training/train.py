"""Training: a recurrent decoder on CNN features, a replaceable per-batch objective (teacher forcing
by default), validated by free-running BLEU-4.

``train(cfg, out_dir)`` is what ``captioner train`` runs (and what tests call): it parses the
composed config into :class:`~captioner.configs.training.TrainConfig` first, so a bad value fails before
any work. One process, or one per GPU under ``torchrun`` (PyTorch DDP): rank 0 logs and writes.

What lives where: the counters in :class:`~captioner.training.progress.Progress`, the run's records in
:class:`~captioner.training.runlog.RunLog`, the objective in :mod:`captioner.training.objectives`, validation in
:mod:`captioner.training.validation`, devices, precision, RNG streams and signals in
:mod:`captioner.runtime`. :class:`Trainer` holds them together and runs the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.checkpoint import load_checkpoint, model_payload, save_checkpoint
from captioner.configs.model import ARCHITECTURE_FIELDS, ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.configs.training import TrainConfig, check_cache_features, parse_train_config
from captioner.datasets.captions import load_split
from captioner.errors import UserError, first_line
from captioner.models.captioning import CaptionModel, build_model
from captioner.runtime import (
    Runtime,
    StopSignal,
    autocast,
    autocast_dtype,
    gather_rng_states,
    seed_everything,
    set_rng_state,
    setup_runtime,
    teardown_runtime,
)
from captioner.training.ema import ModelEMA
from captioner.training.loaders import RunLoaders
from captioner.training.objectives import Objective, TeacherForcing, to_device
from captioner.training.progress import Progress
from captioner.training.runlog import RunLog
from captioner.training.scst import SelfCritical
from captioner.training.validation import validate
from captioner.vocab import Vocab

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; ``last.pt`` was saved and the run can be resumed."""

    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint
        where = f"; resume with resume={checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted{where}")


def gradient_norm(params: list[torch.nn.Parameter]) -> float:
    """The L2 norm of all gradients together (what ``clip_grad_norm_`` compares with its
    limit); logged per step, so ``metrics.jsonl`` shows exploding gradients with or without
    clipping. inf or nan when a gradient is."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def _resume_checkpoint(resume: str | None) -> tuple[dict[str, Any] | None, Path]:
    """``resume=`` (a run directory or its last.pt) loaded, and the path it names."""
    if not resume:
        return None, Path()
    path = Path(resume) if Path(resume).is_file() else Path(resume) / "last.pt"
    ckpt = load_checkpoint(path, map_location="cpu")
    if "optimizer" not in ckpt:
        raise UserError(f"resume: {resume} is a best.pt without training state; use last.pt")
    log.info(
        "resuming from %s (epoch %d, batch %d)", path, ckpt["epoch"] + 1, ckpt["batch_in_epoch"]
    )
    return ckpt, path


def _init_weights(model: CaptionModel, vocab: Vocab, path: str) -> None:
    """``init_from=``: load a checkpoint's model weights (not its optimizer or counters) into
    this run's model; another vocabulary or architecture is one clear error."""
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
    theirs, ours = ModelConfig.from_dict(ckpt["model_config"]), model.config
    for part in ("encoder", "decoder"):
        a, b = vars(getattr(theirs, part)), vars(getattr(ours, part))
        for name in ARCHITECTURE_FIELDS[part]:
            if name == "attention_dim" and a["attention"] == b["attention"] == "none":
                continue  # no attention, no attention weights
            if a[name] != b[name]:
                raise UserError(
                    f"init_from: {path} has model.{part}.{name}={a[name]}, this run "
                    f"model.{part}.{name}={b[name]}"
                )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"init_from: {path} does not fit this model ({first_line(exc)})") from exc
    scores = ckpt.get("metrics") or {}
    log.info(
        "weights from %s%s",
        path,
        f" (epoch {scores['epoch']} of its run, val BLEU-4 {scores['val_bleu4']:.4f})"
        if "epoch" in scores and "val_bleu4" in scores
        else "",
    )


def _vocab_and_model(
    config: TrainConfig, train_records: list, resume: dict[str, Any] | None
) -> tuple[Vocab, CaptionModel, Preprocessing]:
    """A new run: the vocabulary of the TRAIN captions and a model with pretrained weights (or
    those of ``init_from``); a resumed one: both as ``last.pt`` saved them (no download)."""
    if resume is not None:
        vocab, model_cfg = Vocab(resume["vocab"]), ModelConfig.from_dict(resume["model_config"])
    else:
        captions = (c for r in train_records for c in r.captions)
        vocab, model_cfg = Vocab.build(captions, min_freq=config.data.min_freq), config.model
    fresh = resume is None and config.init_from is None
    model, preprocessing = build_model(model_cfg, len(vocab), pretrained=fresh)
    if resume is not None:
        model.load_state_dict(resume["model"])
        preprocessing = Preprocessing.from_dict(resume["preprocessing"])
    elif config.init_from is not None:
        _init_weights(model, vocab, config.init_from)
    log.info(
        "model: %s encoder (%d-d features, %.1fM params), decoder %.1fM params; preprocessing %s",
        model_cfg.encoder.name,
        model.encoder.feature_dim,
        sum(p.numel() for p in model.encoder.parameters()) / 1e6,
        sum(p.numel() for p in model.decoder.parameters()) / 1e6,
        preprocessing,
    )
    return vocab, model, preprocessing


class Trainer:
    """Set up a run (data, vocabulary, model, optimizer; or all of it from ``last.pt``), then
    :meth:`fit`.

    ``make_objective(trainer)`` builds what each batch minimises, once the trainer holds the
    vocabulary, the records and the model (default: teacher forcing, ``TeacherForcing``)."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: Path,
        rt: Runtime,
        make_objective: Callable[[Trainer], Objective] | None = None,
    ):
        self.config, self.out_dir, self.rt = config, out_dir, rt
        self.tcfg, self.dcfg = config.trainer, config.data
        seed_everything(config.seed + rt.rank)

        resume, self._resume_path = _resume_checkpoint(config.resume)
        self.train_records = load_split(self.dcfg, "train")
        self.val_records = load_split(self.dcfg, "val")[: self.tcfg.val_max_images]
        self.vocab, self.model, self.preprocessing = _vocab_and_model(
            config, self.train_records, resume
        )
        check_cache_features(self.dcfg, self.model.config.encoder, self.tcfg)  # resumed: its own
        log.info(
            "data: %d train images, %d val images; vocabulary: %d words (min_freq >= %d)",
            len(self.train_records),
            len(self.val_records),
            len(self.vocab),
            self.dcfg.min_freq,
        )
        self.model.to(rt.device)

        decoder = self.model.config.decoder
        self.teacher_forcing: Objective = (
            make_objective(self)
            if make_objective is not None
            else TeacherForcing(
                self.vocab.pad_id,
                self.tcfg.label_smoothing,
                decoder.attention_penalty if decoder.attention == "soft" else 0.0,
            )
        )
        scst = self.tcfg.scst
        self.self_critical = (
            SelfCritical(
                self.vocab,
                self.train_records,
                scst,
                scst.max_len if scst.max_len is not None else self.tcfg.val_decode.max_len,
            )
            if scst.start_epoch is not None
            else None
        )
        self.objective: Objective = self.teacher_forcing  # this epoch's (see start_epoch)
        self.optimizer = instantiate(
            config.optim, params=self.model.param_groups(), _convert_="all"
        )
        self.scheduler = instantiate(config.scheduler, optimizer=self.optimizer)
        self.autocast_dtype = autocast_dtype(self.tcfg.precision, rt.device)
        self.scaler = torch.amp.GradScaler(
            rt.device.type, enabled=self.autocast_dtype == torch.float16
        )
        decay = self.tcfg.ema_decay
        self.ema = ModelEMA(self.model, decay) if decay is not None else None
        self.progress = Progress()
        self.rng_states: list[dict[str, Any]] | None = None
        self.loaders = RunLoaders(
            self.dcfg,
            self.tcfg,
            config.seed,
            rt,
            self.model,
            self.preprocessing,
            self.vocab,
            {"train": self.train_records, "val": self.val_records},
        )
        self._ddp: DistributedDataParallel | None = None
        self._ddp_trainable: int | None | str = "unset"
        self._trainable: list[torch.nn.Parameter] = []  # what clipping sees (set per epoch)

        self.runlog = RunLog(out_dir, enabled=rt.is_main, tensorboard=self.tcfg.tensorboard)
        if resume is not None:
            self._restore(resume)
        if rt.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.vocab.save(out_dir / "vocab.json")

    # -- resume ---------------------------------------------------------------------------------
    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress.load_state_dict(ckpt)
        self.rng_states = ckpt["rng"]
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                log.warning("resume: %s has no weight average; starting one now", self._resume_path)
        self.runlog.continue_from(self._resume_path.parent, self.progress.epoch)

    # -- one epoch ------------------------------------------------------------------------------
    def _forward_model(self, epoch: int) -> torch.nn.Module:
        """The module to call: DDP-wrapped (re-wrapped when the trainable set changes)."""
        stages = self.model.config.encoder.trainable_stages(epoch)
        if stages != self._ddp_trainable:
            self.model.set_encoder_trainable(stages)
            self._ddp_trainable = stages
            self._ddp = None
            if self.rt.distributed:
                ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
                # a grid is read before the backbone's pooled head, whose weights (timm's
                # conv_head of a MobileNetV3, say) then get no gradient while they train
                unused = self.model.attends and stages != 0
                self._ddp = DistributedDataParallel(
                    self.model, device_ids=ids, find_unused_parameters=unused
                )
        return self._ddp if self._ddp is not None else self.model

    def start_epoch(self, epoch: int) -> tuple[torch.nn.Module, DataLoader, bool]:
        """Make ``epoch``'s encoder schedule effective; -> (module to call, the rest of the
        epoch's batches, whether they hold cached features)."""
        module = self._forward_model(epoch)
        scst = self.tcfg.scst
        if scst.active(epoch) and self.self_critical is not None:
            self.objective = self.self_critical
            if epoch == scst.start_epoch and self.progress.batch_in_epoch == 0:
                self._switch_to_scst()
            loader, cached = self.loaders.train(
                epoch, self.progress.batch_in_epoch, per_image=True, batch_size=scst.batch_size
            )
        else:
            self.objective = self.teacher_forcing
            loader, cached = self.loaders.train(epoch, self.progress.batch_in_epoch)
        module.train()
        if self.ema is not None:
            self.ema.track(self.model)
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        return module, loader, cached

    def _switch_to_scst(self) -> None:
        """The first SCST epoch, at its first batch (a resumed run restores what this set):
        ``trainer.scst.lr`` becomes every group's rate, and the schedule continues from it.
        Early stopping never ends a run before its SCST epochs (see :meth:`fit`)."""
        lr = self.tcfg.scst.lr
        log.info("epoch %d on: self-critical training", self.tcfg.scst.start_epoch + 1)
        self.progress.bad_epochs = 0  # early stopping counts the new objective's epochs afresh
        if lr is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]

    def train_step(self, module: torch.nn.Module, batch: dict[str, Any], cached: bool) -> float:
        """One optimizer step on ``batch`` with the objective; returns its loss."""
        with autocast(self.rt.device, self.autocast_dtype):
            out = self.objective(module, to_device(batch, self.rt.device), features=cached)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.optimizer)  # no-op without a float16 scaler
        if self.tcfg.grad_clip:  # the norm before clipping
            norm = float(torch.nn.utils.clip_grad_norm_(self._trainable, self.tcfg.grad_clip))
        else:
            norm = gradient_norm(self._trainable)
        # the epoch's mean norm over the steps with finite gradients, and the share of steps
        # without (a float16 scaler skips those; in float32 they are what explodes)
        out.logs["grad_nonfinite"] = float(not math.isfinite(norm))
        if math.isfinite(norm):
            out.logs["grad_norm"] = norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        loss = float(out.loss.detach())
        self.progress.add_batch(loss, out.weight, out.logs)
        return loss

    def train_epoch(self, epoch: int, stop: StopSignal) -> None:
        module, loader, cached = self.start_epoch(epoch)
        p = self.progress
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}",
            initial=p.batch_in_epoch,
            total=p.batch_in_epoch + len(loader),
            unit="batch",
            disable=None if self.rt.is_main else True,
            leave=False,
        )
        for batch in bar:
            p.epoch_skipped.update(batch["skipped"])
            if len(batch["lengths"]):
                bar.set_postfix(loss=f"{self.train_step(module, batch, cached):.3f}")
            p.batch_in_epoch += 1
            p.global_step += 1
            if self._should_stop(stop):
                raise TrainingInterrupted(self.save_last())
        bar.close()

    def _should_stop(self, stop: StopSignal) -> bool:
        return stop.agreed(self.rt)

    # -- validation and checkpoints --------------------------------------------------------------
    def averaged_weights(self) -> contextlib.AbstractContextManager[None]:
        """The weights to validate and keep as best.pt: the EMA when there is one."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    def validate(self, epoch: int) -> tuple[dict[str, float], list[tuple[str, str]]]:
        """Val loss and BLEU of ``trainer.val_decode`` decoding, and a few sample captions."""
        loader, cached = self.loaders.val(epoch)
        with self.averaged_weights():
            result = validate(
                self.model,
                loader,
                self.val_records,
                self.vocab,
                self.tcfg.val_decode,
                self.rt,
                features=cached,
                autocast_dtype=self.autocast_dtype,
            )
        return result.metrics, result.samples(self.val_records)

    def _payload(self) -> dict[str, Any]:
        train_config: Any = OmegaConf.to_container(self.config.raw, resolve=True)
        # the folder the features were cached in, absolute, so that evaluate finds it from anywhere
        train_config["trainer"]["cache_dir"] = str(self.tcfg.feature_cache_dir.resolve())
        return {
            **model_payload(self.model, self.vocab, self.preprocessing),
            "train_config": train_config,
        }

    def save_last(self) -> Path | None:
        state = {
            **self._payload(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.progress.state_dict(),
            "rng": gather_rng_states(self.rt),  # collective under DDP: every rank takes part
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        return save_checkpoint(state, self.out_dir / "last.pt") if self.rt.is_main else None

    def save_best(self, metrics: dict[str, Any]) -> None:
        if self.rt.is_main:
            payload = {**self._payload(), "epoch": self.progress.epoch, "metrics": metrics}
            save_checkpoint(payload, self.out_dir / "best.pt")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        p, patience = self.progress, self.tcfg.patience
        if self.rng_states is not None:  # resumed: continue this rank's random streams
            set_rng_state(self.rng_states[min(self.rt.rank, len(self.rng_states) - 1)])
        last: dict[str, Any] = {}
        with StopSignal() as stop:
            while p.epoch < self.tcfg.max_epochs:
                scst_ahead = (self.tcfg.scst.start_epoch or 0) > p.epoch
                if patience is not None and p.bad_epochs >= patience and not scst_ahead:
                    log.info(
                        "early stopping: no %s gain in %d epochs", self.tcfg.monitor, p.bad_epochs
                    )
                    break
                start = time.perf_counter()
                self.train_epoch(p.epoch, stop)
                val, samples = self.validate(p.epoch)
                val["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
                self.scheduler.step()
                last = self._end_epoch(val, samples, time.perf_counter() - start)
                if self._should_stop(stop):
                    raise TrainingInterrupted(self.out_dir / "last.pt" if self.rt.is_main else None)
        self.runlog.close()
        return {
            **last,
            "monitor": self.tcfg.monitor,
            "best_score": p.best_score,
            "best_epoch": p.best_epoch,
            "out_dir": str(self.out_dir),
        }

    def _end_epoch(
        self, val: dict[str, float], samples: list[tuple[str, str]], seconds: float
    ) -> dict[str, Any]:
        p = self.progress
        metrics = {
            "epoch": p.epoch + 1,
            "step": p.global_step,
            **p.epoch_means(),
            **val,
            "skipped_images": len(p.epoch_skipped),
            "seconds": round(seconds, 2),
        }
        if p.epoch_skipped:
            log.warning("epoch %d: skipped %d unreadable images", p.epoch + 1, len(p.epoch_skipped))
        improved = p.record_score(metrics[self.tcfg.monitor])
        self.runlog.epoch(metrics, improved, samples)
        if improved:
            with self.averaged_weights():
                self.save_best(metrics)
        p.next_epoch()
        self.save_last()
        return metrics


def train(
    cfg: DictConfig | TrainConfig,
    out_dir: str | Path,
    make_objective: Callable[[Trainer], Objective] | None = None,
) -> dict[str, Any]:
    """Train as configured, writing the run to ``out_dir``; returns the final metrics."""
    config = cfg if isinstance(cfg, TrainConfig) else parse_train_config(cfg)
    rt = setup_runtime(config.device)
    try:
        return Trainer(config, Path(out_dir), rt, make_objective).fit()
    finally:
        teardown_runtime(rt)


__all__ = ["Trainer", "TrainingInterrupted", "train"]
