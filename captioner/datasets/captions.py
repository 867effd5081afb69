"""Caption datasets: the split a data config names, images, the one transform factory, collate.

Every source is turned into a list of :class:`CaptionRecord` (one image, all its captions) by the
readers of :mod:`captioner.datasets.annotations`; the torch datasets on top of it serve training pairs
``(image, one caption)`` and evaluation items ``(image, index)`` whose references are looked up
in the records.
"""

from __future__ import annotations

import logging
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
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


class EncodedCaptions:
    """Every caption of a split as ids, packed: caption ``j`` is
    ``tokens[offsets[j]:offsets[j + 1]]`` and record ``r`` owns captions ``first[r]`` to
    ``first[r + 1] - 1``, in the records' order.

    Three numpy arrays instead of a list of lists of Python ints: a forked loader worker reads
    them without writing to their pages (reading a Python object writes its reference count, so
    a worker ends up with its own copy of every list it touched: PyTorch issue 13246), and a
    spawned worker receives three buffers."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, first: np.ndarray):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.first = np.ascontiguousarray(first, dtype=np.int64)

    @classmethod
    def encode(
        cls, records: Sequence[CaptionRecord], vocab: Vocab, max_len: int
    ) -> EncodedCaptions:
        """Each record's captions through :func:`encode_caption`, packed."""
        tokens, lengths, counts = array("i"), array("q", [0]), array("q", [0])
        for record in records:
            for caption in record.captions:
                ids = encode_caption(vocab, caption, max_len)
                tokens.extend(ids)
                lengths.append(len(ids))
            counts.append(len(record.captions))
        return cls(
            np.frombuffer(tokens, dtype=np.int32),
            np.cumsum(np.frombuffer(lengths, dtype=np.int64)),
            np.cumsum(np.frombuffer(counts, dtype=np.int64)),
        )

    def __len__(self) -> int:
        """The number of captions (of all records)."""
        return len(self.offsets) - 1

    @property
    def num_records(self) -> int:
        return len(self.first) - 1

    def caption(self, j: int) -> list[int]:
        """Caption ``j``'s ids (a new list)."""
        return self.tokens[self.offsets[j] : self.offsets[j + 1]].tolist()

    def count(self, r: int) -> int:
        """How many captions record ``r`` has."""
        return int(self.first[r + 1] - self.first[r])

    def of_record(self, r: int) -> list[list[int]]:
        """Record ``r``'s captions' ids, in its order."""
        return [self.caption(j) for j in range(self.first[r], self.first[r + 1])]

    def owner(self, j: int) -> int:
        """The record that caption ``j`` belongs to."""
        return int(np.searchsorted(self.first, j, side="right")) - 1

    def to_lists(self) -> list[list[list[int]]]:
        """Every record's captions as lists (what the packing stands for)."""
        return [self.of_record(r) for r in range(self.num_records)]


class CaptionTrainDataset(Dataset):
    """Training items ``(image tensor or None, [caption ids, ..], record index)``.

    ``captions_per_image=None``: the classic epoch, one item per (image, caption) pair.
    ``captions_per_image=k``: one item per image with k of its captions (all if it has fewer),
    chosen afresh each epoch from ``seed + epoch``; the image is encoded once for its k captions
    (ruotianluo's ``seq_per_img``), which makes a CNN-in-the-loop epoch up to k times cheaper.

    ``images`` is anything indexable by record index that returns a tensor or None: an
    :class:`ImageDataset` (CNN in the loop) or a cached feature array. The captions are held as
    :class:`EncodedCaptions` (shared by forked workers, not copied into each).
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
        self.captions = EncodedCaptions.encode(records, vocab, max_len)
        self.captions_per_image = captions_per_image
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.captions_per_image is None:
            return len(self.captions)  # the (image, caption) pairs, in the records' order
        return self.captions.num_records

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, list[list[int]], int]:
        captions = self.captions
        if self.captions_per_image is None:
            r_idx, chosen = captions.owner(index), [captions.caption(index)]
        else:
            r_idx, n = index, captions.count(index)
            if n <= self.captions_per_image:
                chosen = captions.of_record(index)
            else:  # sample() picks positions from len() alone: the same as over the id lists
                rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
                base = int(captions.first[index])
                picks = rng.sample(range(n), self.captions_per_image)
                chosen = [captions.caption(base + k) for k in picks]
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
