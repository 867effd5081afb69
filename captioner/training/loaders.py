"""The batches of a training run: per epoch, a train loader (sharded, shuffled, resumable
mid-epoch) and a val loader, reading the frozen encoder's cached features or the images.

The choice between the two follows the encoder's schedule: while the encoder is frozen and the
transform deterministic (``trainer.cache_features=auto``), each split's features are computed
once into the feature cache (rank 0 builds, the other ranks open it) and the CNN leaves the loop.
A stop signal ends the build between batches (:class:`~captioner.features.CacheInterrupted`, on
every rank), and the loaders' workers leave SIGINT and SIGTERM to the main process.
"""

from __future__ import annotations

import contextlib
import gc
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from captioner.configs.data import DataConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.configs.training import TrainerConfig
from captioner.datasets.annotations import CaptionRecord
from captioner.datasets.captions import CaptionTrainDataset, ResumableSampler, collate_captions
from captioner.datasets.images import build_transform
from captioner.features import (
    CachedFeatures,
    CacheInterrupted,
    build_feature_cache,
    encoder_fingerprint,
    image_source,
)
from captioner.models.captioning import CaptionModel
from captioner.runtime import Runtime, StopSignal, barrier, ignore_stop_signals
from captioner.vocab import Vocab


def init_worker(worker_id: int) -> None:
    """A loader worker's start: SIGINT and SIGTERM left to the main process, and every object
    inherited from it frozen out of the garbage collector. A full collection writes to every
    object it visits, so it would copy into the worker each page of the run's records,
    vocabulary and model that fork had shared (Python's advice: ``gc.freeze`` around fork)."""
    ignore_stop_signals(worker_id)
    gc.freeze()


class RunLoaders:
    def __init__(
        self,
        data: DataConfig,
        trainer: TrainerConfig,
        seed: int,
        rt: Runtime,
        model: CaptionModel,
        preprocessing: Preprocessing,
        vocab: Vocab,
        records: dict[str, list[CaptionRecord]],
    ):
        self.data, self.trainer, self.seed, self.rt = data, trainer, seed, rt
        self.model, self.preprocessing, self.vocab = model, preprocessing, vocab
        self.records = records  # "train" and "val"
        self._fingerprint: str | None = None
        self._caches: dict[str, CachedFeatures] = {}
        self._train_sets: dict[tuple[bool, bool], CaptionTrainDataset] = {}
        self.stop: StopSignal | None = None  # the run's, while it trains

    def use_cache(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) reads cached features instead of images."""
        frozen = self.model.config.encoder.trainable_stages(epoch) == 0
        mode = self.trainer.cache_features  # "true" was checked against the schedule up front
        return mode == "true" or (mode == "auto" and frozen and not self.data.augment)

    def cache(self, split: str) -> CachedFeatures:
        if split not in self._caches:
            if self._fingerprint is None:
                self._fingerprint = encoder_fingerprint(self.model.encoder)
            build = partial(
                build_feature_cache,
                self.model.encoder,
                self.preprocessing,
                [r.path for r in self.records[split]],
                self.trainer.feature_cache_dir,
                fingerprint=self._fingerprint,
                device=self.rt.device,
                batch_size=self.data.batch_size,
                num_workers=self.data.num_workers,
                desc=f"{split} images",
            )
            if self.rt.is_main:  # rank 0 computes; the others then open the finished cache
                with contextlib.suppress(CacheInterrupted):  # every rank learns it below
                    self._caches[split] = build(should_stop=self.stop_requested)
            barrier(self.rt)
            if self.stop is not None and self.stop.agreed(self.rt):
                raise CacheInterrupted(f"stopped before the {split} features were cached")
            if not self.rt.is_main:
                self._caches[split] = build()
        return self._caches[split]

    def stop_requested(self) -> bool:
        """Whether the run was asked to stop (a signal): long phases end at their next batch."""
        return self.stop is not None and self.stop.requested

    def _images(self, split: str, epoch: int) -> tuple[Dataset, bool]:
        cached = self.use_cache(epoch)
        train = split == "train"
        transform = build_transform(
            self.preprocessing, train=train, augment=train and self.data.augment
        )
        paths: list[Path] = [r.path for r in self.records[split]]
        cache = self.cache(split) if cached else None
        return image_source(paths, self.preprocessing, transform, cache), cached

    def _loader(
        self, dataset: Any, sampler: Any, cached: bool, epoch: int, batch_size: int
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=0 if cached else self.data.num_workers,
            collate_fn=partial(collate_captions, pad_id=self.vocab.pad_id),
            pin_memory=self.rt.device.type == "cuda",
            worker_init_fn=init_worker,
            # own generator: worker seeds never consume the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed * 100003 + epoch),
        )

    def train(
        self,
        epoch: int,
        start_batch: int = 0,
        *,
        per_image: bool = False,
        batch_size: int | None = None,
    ) -> tuple[DataLoader, bool]:
        """This rank's training batches of ``epoch`` from batch ``start_batch`` on, and whether
        they hold cached features. ``per_image``: each image once per epoch (self-critical
        training samples its own captions), ``batch_size`` images a batch (null:
        ``data.batch_size``)."""
        images, cached = self._images("train", epoch)
        if (cached, per_image) not in self._train_sets:  # tokenised once, not every epoch
            self._train_sets[cached, per_image] = CaptionTrainDataset(
                self.records["train"],
                self.vocab,
                self.data.max_caption_len,
                images,
                captions_per_image=1 if per_image else self.data.captions_per_image,
                seed=self.seed,
            )
        dataset = self._train_sets[cached, per_image]
        dataset.images = images  # the same source: the cache, or images with this epoch's transform
        dataset.set_epoch(epoch)
        sampler = ResumableSampler(
            dataset, seed=self.seed, rank=self.rt.rank, world_size=self.rt.world_size
        )
        batch_size = batch_size or self.data.batch_size
        sampler.set_position(epoch, start_batch * batch_size)
        return self._loader(dataset, sampler, cached, epoch, batch_size), cached

    def val(self, epoch: int) -> tuple[DataLoader, bool]:
        """This rank's shard of the val images, each with all its reference captions."""
        records = self.records["val"]
        images, cached = self._images("val", epoch)
        most = max(len(r.captions) for r in records)
        dataset = CaptionTrainDataset(records, self.vocab, self.data.max_caption_len, images, most)
        shard = Subset(dataset, range(self.rt.rank, len(dataset), self.rt.world_size))
        return self._loader(shard, None, cached, epoch, self.data.batch_size), cached


__all__ = ["RunLoaders"]
