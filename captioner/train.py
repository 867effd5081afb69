"""Training: teacher-forced LSTM decoder on CNN features, validated by free-running BLEU-4.

Validation decodes as ``trainer.val_decode`` says (greedy by default; beam to select ``best.pt``
by the decoding you will evaluate with), with the weight average when ``trainer.ema_decay`` is set.

``train(cfg, out_dir)`` is what ``captioner train`` runs (and what tests call). One process, or
one per GPU under ``torchrun`` (PyTorch DDP): rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from captioner.checkpoint import load_checkpoint, model_payload, save_checkpoint
from captioner.data import (
    CaptionTrainDataset,
    ImageDataset,
    Preprocessing,
    ResumableSampler,
    build_transform,
    collate_captions,
    load_split,
)
from captioner.decoding import DecodeConfig
from captioner.ema import ModelEMA
from captioner.errors import UserError
from captioner.features import build_feature_cache, encoder_fingerprint
from captioner.inference import corpus_scores, decode_features, hypothesis_text
from captioner.model import ModelConfig, build_model, caption_loss
from captioner.runtime import Runtime, setup_runtime, teardown_runtime
from captioner.vocab import Vocab

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; ``last.pt`` was saved and the run can be resumed."""

    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint
        where = f"; resume with resume={checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted{where}")


def _barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    raise UserError(f"trainer.precision must be auto, fp32, bf16 or fp16, got {precision!r}")


# ---------------------------------------------------------------------------------------------
# RNG state (saved per rank, so a resumed run continues the same random streams)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# the trainer


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("got %s: saving last.pt after this step", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: DictConfig, out_dir: Path, rt: Runtime):
        self.cfg, self.out_dir, self.rt = cfg, out_dir, rt
        self.tcfg = cfg.trainer
        seed_everything(int(cfg.seed) + rt.rank)

        resume_ckpt = self._load_resume(cfg.get("resume"))
        self.train_records = load_split(cfg.data, "train")
        self.val_records = load_split(cfg.data, "val")
        if self.tcfg.get("val_max_images"):
            self.val_records = self.val_records[: int(self.tcfg.val_max_images)]

        if resume_ckpt is not None:
            self.vocab = Vocab(resume_ckpt["vocab"])
            model_cfg = ModelConfig.from_dict(resume_ckpt["model_config"])
        else:
            self.vocab = Vocab.build(
                (c for r in self.train_records for c in r.captions), min_freq=int(cfg.data.min_freq)
            )
            model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        log.info(
            "data: %d train images, %d val images; vocabulary: %d words (min_freq >= %d)",
            len(self.train_records),
            len(self.val_records),
            len(self.vocab),
            cfg.data.min_freq,
        )

        self.model, self.preprocessing = build_model(
            model_cfg, len(self.vocab), pretrained=resume_ckpt is None
        )
        if resume_ckpt is not None:
            self.model.load_state_dict(resume_ckpt["model"])
            self.preprocessing = Preprocessing.from_dict(resume_ckpt["preprocessing"])
        self.model.to(rt.device)
        self.model_cfg = model_cfg
        log.info(
            "model: %s encoder (%d-d features, %.1fM params), decoder %.1fM params; preprocessing %s",
            model_cfg.encoder.name,
            self.model.encoder.feature_dim,
            sum(p.numel() for p in self.model.encoder.parameters()) / 1e6,
            sum(p.numel() for p in self.model.decoder.parameters()) / 1e6,
            self.preprocessing,
        )

        self.optimizer = self._build_optimizer()
        self.scheduler = instantiate(cfg.scheduler, optimizer=self.optimizer)
        self.autocast_dtype = _autocast_dtype(str(self.tcfg.precision), rt.device)
        self.scaler = torch.amp.GradScaler(
            rt.device.type, enabled=self.autocast_dtype == torch.float16
        )
        self.label_smoothing = float(self.tcfg.get("label_smoothing", 0.0))
        self.val_decode = DecodeConfig.from_dict(
            OmegaConf.to_container(self.tcfg.val_decode, resolve=True), "trainer.val_decode"
        )
        ema_decay = self.tcfg.get("ema_decay")
        self.ema = ModelEMA(self.model, float(ema_decay)) if ema_decay is not None else None
        self.augment = bool(cfg.data.get("augment", False))
        self._fingerprint: str | None = None
        self._caches: dict[str, Any] = {}
        self._ddp: DistributedDataParallel | None = None
        self._ddp_trainable: int | None | str = "unset"

        # progress counters (restored on resume)
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.best_score, self.best_epoch, self.bad_epochs = -1.0, 0, 0
        self.epoch_loss_sum, self.epoch_tokens, self.epoch_skipped = 0.0, 0, set()
        self.rng_states: list[dict[str, Any]] | None = None
        if resume_ckpt is not None:
            self._restore(resume_ckpt)

        if rt.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.vocab.save(out_dir / "vocab.json")
        self.tensorboard = self._open_tensorboard() if rt.is_main else None

    # -- set-up helpers ------------------------------------------------------------------------
    def _load_resume(self, resume: str | None) -> dict[str, Any] | None:
        if not resume:
            return None
        ckpt = load_checkpoint(resume, map_location="cpu")
        if "optimizer" not in ckpt:
            raise UserError(f"resume: {resume} is a best.pt without training state; use last.pt")
        self._resume_path = Path(resume) if Path(resume).is_file() else Path(resume) / "last.pt"
        log.info(
            "resuming from %s (epoch %d, batch %d)",
            self._resume_path,
            ckpt["epoch"] + 1,
            ckpt["batch_in_epoch"],
        )
        return ckpt

    def _build_optimizer(self) -> torch.optim.Optimizer:
        enc_lr = self.model_cfg.encoder.lr
        groups = [{"params": list(self.model.decoder.parameters()), "name": "decoder"}]
        enc_group: dict[str, Any] = {
            "params": list(self.model.encoder.parameters()),
            "name": "encoder",
        }
        if enc_lr is not None:
            enc_group["lr"] = float(enc_lr)
        groups.append(enc_group)
        return instantiate(self.cfg.optim, params=groups, _convert_="all")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        for key in (
            "epoch",
            "batch_in_epoch",
            "global_step",
            "best_score",
            "best_epoch",
            "bad_epochs",
            "epoch_loss_sum",
            "epoch_tokens",
            "epoch_skipped",
        ):
            setattr(self, key, ckpt[key])
        self.epoch_skipped = set(self.epoch_skipped)
        self.rng_states = ckpt["rng"]
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                log.warning("resume: %s has no weight average; starting one now", self._resume_path)
        if self.rt.is_main:  # carry the history over into this run's directory
            old_dir = self._resume_path.parent
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if (
                old_dir / "metrics.jsonl"
            ).is_file() and old_dir.resolve() != self.out_dir.resolve():
                lines = (old_dir / "metrics.jsonl").read_text().splitlines()
                kept = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= self.epoch]
                (self.out_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
                if (old_dir / "best.pt").is_file():
                    shutil.copy2(old_dir / "best.pt", self.out_dir / "best.pt")

    def _open_tensorboard(self) -> Any:
        if not self.tcfg.get("tensorboard", False):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(
                "trainer.tensorboard=true needs tensorboard: pip install 'captioner[tensorboard]'"
            ) from exc
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    # -- encoder schedule and the feature cache -------------------------------------------------
    def trainable_stages(self, epoch: int) -> int | None:
        """0: frozen; None: whole encoder; K: last K stages (``epoch`` is 0-based)."""
        enc = self.model_cfg.encoder
        if not enc.freeze:
            return enc.finetune_last_stages
        if enc.finetune_from_epoch is not None and epoch + 1 >= enc.finetune_from_epoch:
            return enc.finetune_last_stages
        return 0

    def use_cache(self, epoch: int) -> bool:
        mode = str(self.tcfg.cache_features).lower()
        frozen = self.trainable_stages(epoch) == 0
        if mode == "true":
            if not frozen or self.augment:
                raise UserError(
                    "trainer.cache_features=true needs a frozen encoder (model.encoder.freeze=true) "
                    "and a deterministic transform (data.augment=false)"
                )
            return True
        if mode == "false":
            return False
        if mode != "auto":
            raise UserError(f"trainer.cache_features must be auto, true or false, got {mode!r}")
        return frozen and not self.augment

    def cached_features(self, split: str, records: list) -> Any:
        if split not in self._caches:
            if self._fingerprint is None:
                self._fingerprint = encoder_fingerprint(self.model.encoder)
            build = partial(
                build_feature_cache,
                self.model.encoder,
                self.preprocessing,
                [r.path for r in records],
                self.tcfg.cache_dir,
                fingerprint=self._fingerprint,
                device=self.rt.device,
                batch_size=int(self.cfg.data.batch_size),
                num_workers=int(self.cfg.data.num_workers),
                desc=f"{split} images",
            )
            if self.rt.is_main:  # rank 0 computes; the others then open the finished cache
                self._caches[split] = build()
            _barrier(self.rt)
            if not self.rt.is_main:
                self._caches[split] = build()
        return self._caches[split]

    # -- loaders --------------------------------------------------------------------------------
    def _loader(self, dataset: Any, sampler: Any, cached: bool, epoch: int) -> DataLoader:
        workers = 0 if cached else int(self.cfg.data.num_workers)
        return DataLoader(
            dataset,
            batch_size=int(self.cfg.data.batch_size),
            sampler=sampler,
            num_workers=workers,
            collate_fn=partial(collate_captions, pad_id=self.vocab.pad_id),
            pin_memory=self.rt.device.type == "cuda",
            # own generator: worker seeds never consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(int(self.cfg.seed) * 100003 + epoch),
        )

    def train_loader(self, epoch: int, start_batch: int) -> tuple[DataLoader, bool]:
        cached = self.use_cache(epoch)
        images = (
            self.cached_features("train", self.train_records)
            if cached
            else ImageDataset(
                [r.path for r in self.train_records],
                build_transform(self.preprocessing, train=True, augment=self.augment),
            )
        )
        dataset = CaptionTrainDataset(
            self.train_records,
            self.vocab,
            int(self.cfg.data.max_caption_len),
            images,
            captions_per_image=self.cfg.data.get("captions_per_image"),
            seed=int(self.cfg.seed),
        )
        dataset.set_epoch(epoch)
        sampler = ResumableSampler(
            dataset, seed=int(self.cfg.seed), rank=self.rt.rank, world_size=self.rt.world_size
        )
        sampler.set_position(epoch, start_batch * int(self.cfg.data.batch_size))
        return self._loader(dataset, sampler, cached, epoch), cached

    def val_loader(self, epoch: int) -> tuple[DataLoader, bool]:
        cached = self.use_cache(epoch)
        images = (
            self.cached_features("val", self.val_records)
            if cached
            else ImageDataset(
                [r.path for r in self.val_records], build_transform(self.preprocessing)
            )
        )
        most = max(len(r.captions) for r in self.val_records)
        dataset = CaptionTrainDataset(
            self.val_records,
            self.vocab,
            int(self.cfg.data.max_caption_len),
            images,
            captions_per_image=most,
        )
        shard = Subset(dataset, range(self.rt.rank, len(dataset), self.rt.world_size))
        return self._loader(shard, None, cached, epoch), cached

    # -- one epoch ------------------------------------------------------------------------------
    def _forward_model(self, epoch: int) -> torch.nn.Module:
        """The module to call: DDP-wrapped (re-wrapped when the trainable set changes)."""
        stages = self.trainable_stages(epoch)
        if stages != self._ddp_trainable:
            self.model.set_encoder_trainable(stages)
            self._ddp_trainable = stages
            self._ddp = None
            if self.rt.distributed:
                ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
                self._ddp = DistributedDataParallel(self.model, device_ids=ids)
        return self._ddp if self._ddp is not None else self.model

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.autocast_dtype)

    def _batch_loss(
        self, module: torch.nn.Module, batch: dict[str, Any], cached: bool
    ) -> torch.Tensor:
        dev = self.rt.device
        captions = batch["captions"].to(dev, non_blocking=True)
        with self._autocast():
            logits = module(
                batch["inputs"].to(dev, non_blocking=True),
                captions,
                batch["lengths"],
                batch["image_of_caption"].to(dev, non_blocking=True),
                features=cached,
            )
        return caption_loss(logits, captions, self.vocab.pad_id, self.label_smoothing)

    def train_epoch(self, epoch: int, stop: _StopFlag) -> None:
        module = self._forward_model(epoch)
        loader, cached = self.train_loader(epoch, self.batch_in_epoch)
        module.train()
        clip = self.tcfg.get("grad_clip")
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = self.batch_in_epoch + len(loader)
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}",
            initial=self.batch_in_epoch,
            total=total,
            unit="batch",
            disable=None if self.rt.is_main else True,
            leave=False,
        )
        for batch in bar:
            self.epoch_skipped.update(batch["skipped"])
            if len(batch["lengths"]):
                loss = self._batch_loss(module, batch, cached)
                self.scaler.scale(loss).backward()
                if clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(params, float(clip))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
                ntok = int((batch["lengths"] - 1).sum())
                self.epoch_loss_sum += float(loss.detach()) * ntok
                self.epoch_tokens += ntok
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            self.batch_in_epoch += 1
            self.global_step += 1
            if self._should_stop(stop):
                path = self.save_last()
                raise TrainingInterrupted(path)
        bar.close()

    def _should_stop(self, stop: _StopFlag) -> bool:
        if not self.rt.distributed:
            return stop.signum is not None
        flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=self.rt.device)
        dist.all_reduce(flag)  # every rank stops at the same step
        return bool(flag.item())

    # -- validation -----------------------------------------------------------------------------
    def averaged_weights(self) -> contextlib.AbstractContextManager[None]:
        """The weights to validate and keep as best.pt: the EMA when there is one."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        """Teacher-forced val loss, and BLEU from FREE-RUNNING ``trainer.val_decode`` decoding."""
        with self.averaged_weights():
            return self._validate(epoch)

    def _validate(self, epoch: int) -> dict[str, float]:
        loader, cached = self.val_loader(epoch)
        self.model.eval()
        decode_cfg = self.val_decode
        loss_sum, tokens, captions = 0.0, 0, {}
        for batch in tqdm(
            loader,
            desc="validating",
            unit="batch",
            leave=False,
            disable=None if self.rt.is_main else True,
        ):
            if not len(batch["index"]):
                continue
            dev = self.rt.device
            inputs = batch["inputs"].to(dev)
            with self._autocast():
                feats = inputs if cached else self.model.encode(inputs)
            caps = batch["captions"].to(dev)
            with self._autocast():
                logits = self.model.decoder(
                    feats.float()[batch["image_of_caption"].to(dev)], caps, batch["lengths"]
                )
            ntok = int((batch["lengths"] - 1).sum())
            loss_sum += float(caption_loss(logits, caps, self.vocab.pad_id)) * ntok
            tokens += ntok
            hyps = decode_features(self.model, feats.float(), self.vocab, decode_cfg)
            for idx, h in zip(batch["index"].tolist(), hyps, strict=True):
                captions[idx] = hypothesis_text(h[0], self.vocab)
        if self.rt.distributed:
            sums = torch.tensor(
                [loss_sum, float(tokens)], dtype=torch.float64, device=self.rt.device
            )
            dist.all_reduce(sums)
            loss_sum, tokens = float(sums[0]), int(sums[1])
            gathered: list[dict[int, str]] = [{} for _ in range(self.rt.world_size)]
            dist.all_gather_object(gathered, captions)
            captions = {k: v for part in gathered for k, v in part.items()}
        scores = corpus_scores(captions, self.val_records)
        self.last_samples = [
            (self.val_records[i].path.name, captions[i]) for i in sorted(captions)[:3]
        ]
        return {"val_loss": loss_sum / max(tokens, 1), **{f"val_{k}": v for k, v in scores.items()}}

    # -- checkpoints ----------------------------------------------------------------------------
    def _gather_rng(self) -> list[dict[str, Any]]:
        state = _rng_state()
        if not self.rt.distributed:
            return [state]
        states: list[Any] = [None] * self.rt.world_size
        dist.all_gather_object(states, state)
        return states

    def _training_state(self) -> dict[str, Any]:
        return {
            **model_payload(self.model, self.vocab, self.preprocessing),
            "train_config": OmegaConf.to_container(self.cfg, resolve=True),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_tokens": self.epoch_tokens,
            "epoch_skipped": sorted(self.epoch_skipped),
            "rng": self._gather_rng(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def save_last(self) -> Path | None:
        state = self._training_state()  # collective under DDP: every rank takes part
        if not self.rt.is_main:
            return None
        return save_checkpoint(state, self.out_dir / "last.pt")

    def save_best(self, metrics: dict[str, Any]) -> None:
        if self.rt.is_main:
            payload = {
                **model_payload(self.model, self.vocab, self.preprocessing),
                "train_config": OmegaConf.to_container(self.cfg, resolve=True),
                "epoch": self.epoch,
                "metrics": metrics,
            }
            save_checkpoint(payload, self.out_dir / "best.pt")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        max_epochs, patience = int(self.tcfg.max_epochs), self.tcfg.get("patience")
        if self.rng_states is not None:  # resumed: continue this rank's random streams
            _set_rng_state(self.rng_states[min(self.rt.rank, len(self.rng_states) - 1)])
        last: dict[str, Any] = {}
        with _StopFlag() as stop:
            while self.epoch < max_epochs:
                if patience is not None and self.bad_epochs >= int(patience):
                    log.info("early stopping: no val BLEU-4 gain in %d epochs", self.bad_epochs)
                    break
                start = time.perf_counter()
                self.train_epoch(self.epoch, stop)
                val = self.validate(self.epoch)
                val["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
                self.scheduler.step()
                last = self._end_epoch(val, time.perf_counter() - start)
                if self._should_stop(stop):
                    raise TrainingInterrupted(self.out_dir / "last.pt" if self.rt.is_main else None)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return {
            **last,
            "best_val_bleu4": self.best_score,
            "best_epoch": self.best_epoch,
            "out_dir": str(self.out_dir),
        }

    def _end_epoch(self, val: dict[str, float], seconds: float) -> dict[str, Any]:
        metrics = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "train_loss": self.epoch_loss_sum / max(self.epoch_tokens, 1),
            **val,
            "skipped_images": len(self.epoch_skipped),
            "seconds": round(seconds, 2),
        }
        if self.epoch_skipped:
            log.warning(
                "epoch %d: skipped %d unreadable images", self.epoch + 1, len(self.epoch_skipped)
            )
        improved = metrics["val_bleu4"] > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = (
                metrics["val_bleu4"],
                self.epoch + 1,
                0,
            )
        else:
            self.bad_epochs += 1
        if self.rt.is_main:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info(
                "epoch %d: train_loss %.4f val_loss %.4f val_bleu4 %.4f%s (%.0fs)",
                self.epoch + 1,
                metrics["train_loss"],
                metrics["val_loss"],
                metrics["val_bleu4"],
                " *best*" if improved else "",
                seconds,
            )
            for name, text in self.last_samples:
                log.info("  %s: %s", name, text)
            if self.tensorboard is not None:
                for k, v in metrics.items():
                    if k != "epoch" and isinstance(v, float | int) and math.isfinite(v):
                        self.tensorboard.add_scalar(k, v, self.epoch + 1)
        if improved:
            with self.averaged_weights():
                self.save_best(metrics)
        self.epoch += 1
        self.batch_in_epoch, self.epoch_loss_sum, self.epoch_tokens, self.epoch_skipped = (
            0,
            0.0,
            0,
            set(),
        )
        self.save_last()
        return metrics


def train(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train as configured, writing the run to ``out_dir``; returns the final metrics."""
    rt = setup_runtime(str(cfg.get("device", "auto")))
    try:
        return Trainer(cfg, Path(out_dir), rt).fit()
    finally:
        teardown_runtime(rt)


__all__ = ["Trainer", "TrainingInterrupted", "train"]
