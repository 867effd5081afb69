"""The training loop: :class:`Trainer` holds a run's parts together and runs its epochs.

What lives where: setting up the run in :mod:`captioner.training.setup`, the counters in
:class:`~captioner.training.progress.Progress`, best-checkpoint selection and early stopping in
:class:`~captioner.training.monitor.Monitor`, the objectives in
:mod:`captioner.training.objectives` and the switch to self-critical training in
:class:`~captioner.training.scst.ScstSwitch`, gradient norms in
:mod:`captioner.training.gradients`, validation in :mod:`captioner.training.validation`, the
run's records in :class:`~captioner.training.runlog.RunLog`, the checkpoint's schema in
:mod:`captioner.checkpoint`, and devices, precision, RNG streams and signals in
:mod:`captioner.runtime`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.checkpoint import (
    BEST,
    LAST,
    TrainingState,
    best_payload,
    model_payload,
    save_checkpoint,
)
from captioner.configs.training import TrainConfig
from captioner.runtime import (
    Runtime,
    StopRequested,
    StopSignal,
    autocast,
    gather_rng_states,
    seed_everything,
    set_rng_state,
)
from captioner.training.loaders import RunLoaders
from captioner.training.monitor import Monitor
from captioner.training.objectives import Objective, backpropagate, loss_parts, to_device
from captioner.training.progress import Progress
from captioner.training.runlog import RunLog
from captioner.training.scst import ScstSwitch
from captioner.training.setup import (
    Optimization,
    load_data_and_model,
    load_resume,
    saved_train_config,
    teacher_forcing_for,
)
from captioner.training.validation import validate

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; ``last.pt`` was saved and the run can be resumed."""

    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint
        where = f"; resume with resume={checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted{where}")


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

        resume, self._resume_path = load_resume(config)
        self.train_records, self.val_records, self.vocab, self.model, self.preprocessing = (
            load_data_and_model(config, rt, resume)
        )
        teacher_forcing: Objective = (
            make_objective(self)
            if make_objective is not None
            else teacher_forcing_for(self.model, self.vocab, self.tcfg)
        )
        tcfg, records = self.tcfg, {"train": self.train_records, "val": self.val_records}
        self.objectives = ScstSwitch(
            tcfg.scst, teacher_forcing, self.vocab, self.train_records, tcfg.val_decode.max_len
        )
        self.objective: Objective = teacher_forcing  # this epoch's (see start_epoch)
        self.optimization = opt = Optimization.build(config, self.model, rt)
        self.optimizer, self.scheduler, self.scaler = opt.optimizer, opt.scheduler, opt.scaler
        self.autocast_dtype, self.ema = opt.autocast_dtype, opt.ema
        self.progress = Progress()
        self.monitor = Monitor(self.tcfg.monitor, self.tcfg.patience, self.progress)
        self.rng_states: list[dict[str, Any]] | None = None
        self.loaders = RunLoaders(
            self.dcfg, tcfg, config.seed, rt, self.model, self.preprocessing, self.vocab, records
        )
        self._ddp: DistributedDataParallel | None = None
        self._ddp_trainable: int | None | str = "unset"
        self._trainable: list[torch.nn.Parameter] = []  # what clipping sees (set per epoch)

        self.runlog = RunLog(out_dir, rt.is_main, tcfg)
        if resume is not None:
            self.load_state_dict(resume)
            p = self.progress
            self.runlog.continue_from(self._resume_path.parent, p.epoch, p.last_record)
        if rt.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.vocab.save(out_dir / "vocab.json")

    # -- the state last.pt saves and a resume restores ---------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``last.pt``: the model payload and the :class:`~captioner.checkpoint.TrainingState`.
        Collective under DDP (the RNG states are gathered): every rank calls it."""
        state = TrainingState(
            counters=self.progress.state_dict(),
            rng=gather_rng_states(self.rt),
            **self.optimization.state(),
        )
        return state.payload(self._payload())

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (this rank's RNG streams at :meth:`fit`)."""
        state = TrainingState.from_checkpoint(ckpt)
        self.optimization.restore(state, self._resume_path)
        self.progress.load_state_dict(state.counters)
        self.rng_states = state.rng

    def _payload(self) -> dict[str, Any]:
        config = saved_train_config(self.config)
        return model_payload(self.model, self.vocab, self.preprocessing, config)

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
        """Make ``epoch``'s encoder schedule and objective effective; -> (module to call, the
        rest of the epoch's batches, whether they hold cached features)."""
        module = self._forward_model(epoch)
        p = self.progress
        self.objective = self.objectives.objective(epoch)
        self.objectives.begin_epoch(
            epoch, p.batch_in_epoch, self.optimizer, self.scheduler, self.monitor
        )
        options = self.objectives.loader_options(epoch)
        loader, cached = self.loaders.train(epoch, p.batch_in_epoch, **options)
        module.train()
        if self.ema is not None:
            self.ema.track(self.model)
        self._trainable = [w for w in self.model.parameters() if w.requires_grad]
        return module, loader, cached

    def train_step(self, module: torch.nn.Module, batch: dict[str, Any], cached: bool) -> float:
        """One optimizer step on ``batch`` with the objective; returns its loss. A loss that
        comes in parts (truncated BPTT's chunks) is back-propagated part by part
        (:func:`~captioner.training.objectives.backpropagate`), each forward under autocast."""
        out = backpropagate(
            loss_parts(self.objective, module, to_device(batch, self.rt.device), features=cached),
            lambda loss: self.scaler.scale(loss).backward(),
            lambda: autocast(self.rt.device, self.autocast_dtype),
        )
        p = self.progress
        lr_scale = self.objectives.lr_scale(p.epoch, p.batch_in_epoch)
        out.logs.update(
            self.optimization.step(self.model, self._trainable, self.tcfg.grad_clip, lr_scale)
        )
        loss = float(out.loss)
        p.add_batch(loss, out.weight, out.logs)
        return loss

    def train_batch(
        self, module: torch.nn.Module, batch: dict[str, Any], cached: bool
    ) -> float | None:
        """What the loop does with each batch of :meth:`start_epoch`'s loader: count its
        unreadable images, take a :meth:`train_step` unless none of its images was readable,
        advance the counters. Returns the step's loss (None: no step)."""
        p = self.progress
        p.epoch_skipped.update(batch["skipped"])
        loss = self.train_step(module, batch, cached) if len(batch["lengths"]) else None
        p.batch_in_epoch += 1
        p.global_step += 1
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
            loss = self.train_batch(module, batch, cached)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.3f}")
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
                should_stop=self.loaders.stop_requested,
            )
        return result.metrics, result.samples(self.val_records)

    def save_last(self) -> Path | None:
        state = self.state_dict()  # every rank: it gathers the RNG states
        return save_checkpoint(state, self.out_dir / LAST) if self.rt.is_main else None

    def save_best(self, metrics: dict[str, Any]) -> None:
        if self.rt.is_main:
            payload = best_payload(self._payload(), self.progress.epoch, metrics)
            save_checkpoint(payload, self.out_dir / BEST)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        p = self.progress
        if self.rng_states is not None:  # resumed: continue this rank's random streams
            set_rng_state(self.rng_states[min(self.rt.rank, len(self.rng_states) - 1)])
        last: dict[str, Any] = {}
        self.runlog.start(p.epoch, cached=self.loaders.use_cache(p.epoch))
        with StopSignal() as stop:
            self.loaders.stop = stop
            while p.epoch < self.tcfg.max_epochs:
                if self.monitor.stop_early(hold=self.objectives.ahead(p.epoch)):
                    break
                start = time.perf_counter()
                try:  # stopped building the feature cache, or validating
                    self.train_epoch(p.epoch, stop)
                    val, samples = self.validate(p.epoch)
                except StopRequested:
                    raise TrainingInterrupted(self.save_last()) from None
                val["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
                self.scheduler.step()
                last = self._end_epoch(val, samples, time.perf_counter() - start)
                if self._should_stop(stop):
                    raise TrainingInterrupted(self.out_dir / LAST if self.rt.is_main else None)
        self.runlog.close()
        return {**last, **self.monitor.summary(), "out_dir": str(self.out_dir)}

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
        improved = self.monitor.record(metrics)
        # best.pt, last.pt (holding the row), metrics.jsonl: a failed write loses nothing a
        # resume cannot redo (no last.pt: the epoch and its best.pt are redone)
        if improved:
            with self.averaged_weights():
                self.save_best(metrics)
        p.next_epoch()
        p.last_record = json.loads(json.dumps(metrics))  # plain types: a weights_only load
        self.save_last()
        self.runlog.epoch(metrics, improved, samples)
        return metrics


__all__ = ["Trainer", "TrainingInterrupted"]
