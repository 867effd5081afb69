"""Caption datasets: the split a data config names, images, the one transform factory, collate.

Every source is turned into a list of :class:`CaptionRecord` (one image, all its captions) by the
readers of :mod:`captioner.datasets.annotations`; the torch datasets on top of it serve training pairs
``(image, one caption)`` and evaluation items ``(image, index)`` whose references are looked up
in the records.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from captioner.configs.data import DataConfig

# the records and their readers live in captioner.datasets.annotations (importable from here too)
from captioner.datasets.annotations import CaptionRecord, load_coco_captions, load_karpathy_split
from captioner.errors import UserError
from captioner.vocab import Vocab

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the split a data config names


def load_split(data: DataConfig, split: str) -> list[CaptionRecord]:
    """Load ``split`` (train/val/test) of the dataset described by the typed ``data`` config."""
    root = Path(data.root)
    if data.demo:
        from captioner.datasets.synthetic import ensure_demo_dataset

        ensure_demo_dataset(root, **asdict(data.demo))
    if data.format == "karpathy":
        assert data.split_file is not None and data.images is not None  # DataConfig checks it
        return load_karpathy_split(
            root / data.split_file,
            root / data.images,
            split,
            restval_in_train=data.restval_in_train,
        )
    ann, images = data.split_files(split)
    return load_coco_captions(root / ann, root / images)


# ---------------------------------------------------------------------------------------------
# images and the one transform factory


# ---------------------------------------------------------------------------------------------
# torch datasets


def encode_caption(vocab: Vocab, caption: str, max_len: int) -> list[int]:
    """``<start> w1 .. wn <end>``, truncated to ``max_len`` ids with ``<end>`` kept last."""
    ids = vocab.encode(caption)
    if len(ids) > max_len:
        ids = ids[: max_len - 1] + [vocab.end_id]
    return ids


class CaptionTrainDataset(Dataset):
    """Training items ``(image tensor or None, [caption ids, ..], record index)``.

    ``captions_per_image=None``: the classic epoch, one item per (image, caption) pair.
    ``captions_per_image=k``: one item per image with k of its captions (all if it has fewer),
    chosen afresh each epoch from ``seed + epoch``; the image is encoded once for its k captions
    (ruotianluo's ``seq_per_img``), which makes a CNN-in-the-loop epoch up to k times cheaper.

    ``images`` is anything indexable by record index that returns a tensor or None: an
    :class:`ImageDataset` (CNN in the loop) or a cached feature array.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        vocab: Vocab,
        max_len: int,
        images: Any,
        captions_per_image: int | None = None,
        seed: int = 0,
    ):
        if captions_per_image is not None and captions_per_image < 1:
            raise UserError(
                f"data.captions_per_image must be >= 1 or null, got {captions_per_image}"
            )
        self.images = images
        self.captions = [[encode_caption(vocab, c, max_len) for c in r.captions] for r in records]
        self.captions_per_image = captions_per_image
        self.seed = seed
        self.epoch = 0
        self.pairs = [(r, c) for r, caps in enumerate(self.captions) for c in range(len(caps))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs) if self.captions_per_image is None else len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, list[list[int]], int]:
        if self.captions_per_image is None:
            r_idx, c_idx = self.pairs[index]
            chosen = [self.captions[r_idx][c_idx]]
        else:
            r_idx, caps = index, self.captions[index]
            if len(caps) <= self.captions_per_image:
                chosen = caps
            else:
                rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
                chosen = rng.sample(caps, self.captions_per_image)
        item = self.images[r_idx]
        image = item[0] if isinstance(item, tuple) else item
        return image, chosen, r_idx


def pad_captions(
    captions: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists -> (captions [N, T] padded with ``pad_id`` to the longest, lengths [N])."""
    lengths = torch.tensor([len(ids) for ids in captions], dtype=torch.long)
    width = int(lengths.max()) if len(captions) else 0
    padded = torch.full((len(captions), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(captions):
        padded[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return padded, lengths


def collate_captions(batch: Sequence[tuple], pad_id: int = 0) -> dict[str, Any]:
    """Stack images, flatten their captions, pad to the batch's longest, keep lengths (CPU).

    Items whose image could not be read are dropped and counted in ``skipped``.
    """
    kept = [b for b in batch if b[0] is not None]
    owner = [i for i, b in enumerate(kept) for _ in b[1]]
    captions, lengths = pad_captions([ids for b in kept for ids in b[1]], pad_id)
    inputs = torch.stack([torch.as_tensor(b[0]) for b in kept]) if kept else torch.empty(0)
    return {
        "inputs": inputs,  # [B, 3, H, W] images or [B, F] cached features
        "captions": captions,  # [N, T] <start> w .. <end> <pad>.. (N >= B captions)
        "lengths": lengths,  # [N]
        "image_of_caption": torch.tensor(owner, dtype=torch.long),  # [N] row of inputs
        "index": torch.tensor([b[2] for b in kept], dtype=torch.long),  # [B] record indices
        "skipped": sorted({b[2] for b in batch if b[0] is None}),  # unreadable record indices
    }


class ResumableSampler(DistributedSampler):
    """Shuffled per epoch from ``seed + epoch`` (never the global RNG), sharded across ranks, and
    able to start mid-epoch (``start_index``) so a resumed run sees exactly the batches an
    uninterrupted run would."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.start_index = 0

    def set_position(self, epoch: int, start_index: int = 0) -> None:
        self.set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)
