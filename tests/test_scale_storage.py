"""The compact storage that keeps loader workers from copying the dataset (issue 20): packed
captions and packed paths give exactly what the lists they replace gave, index the same, and
reach workers (forked, or pickled for spawn) intact."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from captioner.datasets.annotations import CaptionRecord, PathTable
from captioner.datasets.captions import (
    CaptionTrainDataset,
    EncodedCaptions,
    ResumableSampler,
    collate_captions,
    encode_caption,
)
from captioner.vocab import Vocab

WORDS = [
    "a",
    "dog",
    "cat",
    "runs",
    "on",
    "the",
    "grass",
    "red",
    "ball",
    "jumps",
    "over",
    "fence",
    "with",
    "two",
    "men",
]


def make_records(counts: list[int], seed: int = 0) -> list[CaptionRecord]:
    rng = random.Random(seed)
    return [
        CaptionRecord(
            100 + i,
            Path(f"/data/images/{i:06d}.jpg"),
            [" ".join(rng.choices(WORDS, k=rng.randint(1, 14))) + " ." for _ in range(n)],
        )
        for i, n in enumerate(counts)
    ]


@pytest.fixture
def records() -> list[CaptionRecord]:
    return make_records([5, 1, 7, 3, 5, 2, 6])


@pytest.fixture
def vocab(records: list[CaptionRecord]) -> Vocab:
    # a few words left out, so <unk> is in the ids too
    return Vocab.build((c for r in records[:3] for c in r.captions), min_freq=2)


def old_lists(records: list[CaptionRecord], vocab: Vocab, max_len: int) -> list[list[list[int]]]:
    """What CaptionTrainDataset stored before the packing."""
    return [[encode_caption(vocab, c, max_len) for c in r.captions] for r in records]


class OldDataset:
    """CaptionTrainDataset's items as the list-based implementation made them."""

    def __init__(self, captions: list[list[list[int]]], k: int | None, seed: int, epoch: int):
        self.captions, self.k, self.seed, self.epoch = captions, k, seed, epoch
        self.pairs = [(r, c) for r, caps in enumerate(captions) for c in range(len(caps))]

    def __len__(self) -> int:
        return len(self.pairs) if self.k is None else len(self.captions)

    def __getitem__(self, index: int) -> tuple[None, list[list[int]], int]:
        if self.k is None:
            r, c = self.pairs[index]
            return None, [self.captions[r][c]], r
        caps = self.captions[index]
        if len(caps) <= self.k:
            return None, caps, index
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        return None, rng.sample(caps, self.k), index


@pytest.mark.parametrize("max_len", [4, 8, 20])
def test_encoded_captions_round_trip(records, vocab, max_len) -> None:
    packed = EncodedCaptions.encode(records, vocab, max_len)
    assert packed.to_lists() == old_lists(records, vocab, max_len)
    assert packed.tokens.dtype == np.int32 and packed.num_records == len(records)
    assert len(packed) == sum(len(r.captions) for r in records)
    assert max(len(c) for r in packed.to_lists() for c in r) <= max_len


def test_encoded_captions_indexing(records, vocab) -> None:
    packed = EncodedCaptions.encode(records, vocab, 10)
    flat = [(r, ids) for r, caps in enumerate(old_lists(records, vocab, 10)) for ids in caps]
    for j, (r, ids) in enumerate(flat):
        assert packed.caption(j) == ids
        assert packed.owner(j) == r and isinstance(packed.owner(j), int)
    assert [packed.count(r) for r in range(len(records))] == [len(r.captions) for r in records]
    with pytest.raises(IndexError):
        packed.caption(len(flat))  # past the end: an error, not an empty caption


def test_encoded_captions_empty(vocab) -> None:
    packed = EncodedCaptions.encode([], vocab, 10)
    assert len(packed) == 0 and packed.num_records == 0 and packed.to_lists() == []


@pytest.mark.parametrize("k", [None, 1, 3, 5])
@pytest.mark.parametrize("seed,epoch", [(0, 0), (7, 3)])
def test_dataset_items_unchanged(records, vocab, k, seed, epoch) -> None:
    """Every item, in both modes, across seeds and epochs, is what the list-based dataset gave."""
    ds = CaptionTrainDataset(records, vocab, 10, [None] * len(records), k, seed=seed)
    ds.set_epoch(epoch)
    old = OldDataset(old_lists(records, vocab, 10), k, seed, epoch)
    assert len(ds) == len(old)
    assert [ds[i] for i in range(len(ds))] == [old[i] for i in range(len(old))]


def test_dataset_batches_unchanged(records, vocab) -> None:
    """A shuffled epoch's collated batches equal the list-based dataset's."""
    images = [torch.full((3,), float(i)) for i in range(len(records))]
    ds = CaptionTrainDataset(records, vocab, 10, images)
    old = OldDataset(old_lists(records, vocab, 10), None, 0, 0)
    for epoch in range(2):
        sampler = ResumableSampler(ds, seed=3)
        sampler.set_position(epoch)
        order = list(sampler)
        for start in range(0, len(order), 4):
            ids = order[start : start + 4]
            new = collate_captions([ds[i] for i in ids])
            ref = collate_captions([(images[old[i][2]], *old[i][1:]) for i in ids])
            for key in ("inputs", "captions", "lengths", "image_of_caption", "index"):
                assert torch.equal(new[key], ref[key]), key


def test_dataset_pickles_for_spawned_workers(records, vocab) -> None:
    ds = CaptionTrainDataset(records, vocab, 10, [None] * len(records), 3, seed=5)
    ds.set_epoch(2)
    copy = pickle.loads(pickle.dumps(ds))
    assert [copy[i] for i in range(len(copy))] == [ds[i] for i in range(len(ds))]
    # the packed arrays travel as three buffers, not as per-caption Python objects
    assert len(pickle.dumps(ds.captions)) < 8 * ds.captions.tokens.size + 2000


def test_forked_workers_serve_the_same_batches(records, vocab) -> None:
    images = [torch.full((2,), float(i)) for i in range(len(records))]
    ds = CaptionTrainDataset(records, vocab, 10, images)

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(
            ds,
            batch_size=4,
            sampler=ResumableSampler(ds, seed=1),
            num_workers=workers,
            collate_fn=collate_captions,
            multiprocessing_context="fork" if workers else None,
        )
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a["captions"], b["captions"]) and torch.equal(a["index"], b["index"])


# -- paths --------------------------------------------------------------------------------------


def test_path_table_round_trip(tmp_path) -> None:
    paths = [Path("/a/b.jpg"), tmp_path / "é ü.png", Path("rel/x.png"), Path("/")]
    table = PathTable(paths)
    assert len(table) == 4 and list(table) == paths
    assert [table[i] for i in range(4)] == paths and table[-1] == Path("/")
    assert all(isinstance(p, Path) for p in table)
    assert list(pickle.loads(pickle.dumps(table))) == paths
    with pytest.raises(IndexError):
        table[4]
    assert list(PathTable([])) == []


def test_path_table_keeps_undecodable_names(tmp_path) -> None:
    """A file name that is not UTF-8 (bytes from the file system) survives the packing."""
    odd = Path(tmp_path / b"caf\xe9.jpg".decode("utf-8", "surrogateescape"))
    assert PathTable([odd])[0] == odd


# -- workers ------------------------------------------------------------------------------------


def _worker_state(queue) -> None:
    import gc
    import signal

    from captioner.training.loaders import init_worker

    before = gc.get_freeze_count()
    init_worker(0)
    queue.put((before, gc.get_freeze_count(), signal.getsignal(signal.SIGINT) == signal.SIG_IGN))


def test_init_worker_freezes_inherited_objects_and_ignores_signals() -> None:
    """The loaders' workers never run a collection over what they inherited (which would copy
    it into each of them) and leave Ctrl-C to the main process."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker_state, args=(queue,))
    proc.start()
    before, after, ignored = queue.get(timeout=60)
    proc.join(timeout=60)
    assert after > max(before, 1000) and ignored
