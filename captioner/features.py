"""On-disk cache of frozen-encoder features.

When the encoder is frozen and the training transform is deterministic, each image's pooled
feature [F] (or, for a decoder that attends, its grid [P, F]) is computed once (batched, with a
progress bar) and stored as a float16 memory-mapped array. The cache is keyed by a fingerprint of
the encoder's actual weights and output (pooled, or the grid size), the preprocessing and the
list of images, so a cache built by another encoder, grid or transform is never reused. Its size
is logged once the first batch gives the shape of a feature, and a cache that would not fit the
disk is refused then, before anything is written.

Several processes may share a cache folder: an entry is built under an exclusive lock on its
``.lock`` file (``fcntl.flock``, released by the kernel when its holder dies), so a second
builder waits for the first and reuses its result, and a temporary file is removed as stale only
by the lock's holder. Every file of an entry is written atomically, ``meta.json`` last. A stop
request (a signal) is honoured between batches: the build is discarded and
:class:`CacheInterrupted` raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.images import ImageDataset, build_transform, collate_images
from captioner.errors import UserError
from captioner.files import atomic_path, atomic_write
from captioner.models.encoders import Encoder
from captioner.runtime import StopRequested, ignore_stop_signals

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one builder per cache folder
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class CacheInterrupted(StopRequested):
    """A stop was requested while the cache was built; nothing of it was kept."""


def encoder_fingerprint(encoder: Encoder) -> str:
    """sha1 over the encoder's architecture, ``flip_average``, its output (pooled, or a grid of
    which size) and every tensor of its state (weights and buffers)."""
    # "|flip" and "|grid" only when set, so the caches of pooled encoders keep their keys
    tag = type(encoder.backbone).__name__ + ("|flip" if encoder.flip_average else "")
    if encoder.spatial:
        tag += f"|grid{encoder.grid if encoder.grid is not None else 'native'}"
    h = hashlib.sha1(tag.encode())
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(fingerprint: str, preprocessing: Preprocessing, paths: Sequence[Path]) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{fingerprint}".encode())
    h.update(json.dumps(preprocessing.to_dict(), sort_keys=True).encode())
    for p in paths:
        h.update(str(Path(p).resolve()).encode() + b"\0")
    return h.hexdigest()


class CachedFeatures:
    """Read-only view of a complete cache: ``cache[i]`` is a float32 tensor [F] (a grid: [P, F])
    or None when the image could not be read when the cache was built."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.array = np.load(directory / "features.npy", mmap_mode="r")  # [N, (P,) F] float16
        self.valid = np.load(directory / "valid.npy")  # [N] bool

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def dim(self) -> int:
        return int(self.array.shape[-1])

    def __getitem__(self, index: int) -> torch.Tensor | None:
        if not self.valid[index]:
            return None
        return torch.from_numpy(np.asarray(self.array[index], dtype=np.float32))


class IndexedFeatures(Dataset):
    """``(feature or None, index)`` per image: a cache in the place of an ``ImageDataset``, for
    ``collate_images`` and ``inference.generate(..., features=True)``."""

    def __init__(self, cache: CachedFeatures):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        return self.cache[index], index


def build_feature_cache(
    encoder: Encoder,
    preprocessing: Preprocessing,
    paths: Sequence[Path],
    cache_root: str | Path,
    *,
    fingerprint: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "features",
    should_stop: Callable[[], bool] = lambda: False,
) -> CachedFeatures:
    """Return the cache for ``paths`` under ``cache_root``, computing it first if needed (or
    waiting for the process that is). ``should_stop`` is asked between batches, and while
    waiting: when it says yes, :class:`CacheInterrupted` is raised and nothing is kept."""
    fingerprint = fingerprint or encoder_fingerprint(encoder)
    key = cache_key(fingerprint, preprocessing, paths)
    directory = Path(cache_root) / key[:20]
    if _complete(directory, key, desc):
        return CachedFeatures(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a cache_dir that cannot be written is the user's setting
        raise UserError(f"feature cache: cannot create {directory}: {exc.strerror}") from exc
    with _exclusive(directory, should_stop):
        if _complete(directory, key, desc):  # built by the process this one waited for
            return CachedFeatures(directory)
        meta_file = directory / "meta.json"
        if meta_file.is_file():
            log.warning("feature cache %s was built for another encoder; rebuilding", directory)
        meta_file.unlink(missing_ok=True)  # an incomplete cache never looks complete
        for stale in directory.glob(".*.tmp"):  # left by a killed build: its lock is gone
            stale.unlink(missing_ok=True)
        loader = DataLoader(
            ImageDataset(paths, build_transform(preprocessing), preprocessing.draft_to),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_images,
            generator=torch.Generator(),  # never the global RNG: hit and miss train alike
            worker_init_fn=ignore_stop_signals,
        )
        was_training = encoder.training
        encoder.eval()
        try:
            valid = _compute(encoder, loader, paths, directory, device, desc, should_stop)
        finally:
            encoder.train(was_training)
        with atomic_path(directory / "valid.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, valid)
        meta: dict[str, Any] = {
            "key": key,
            "version": CACHE_VERSION,
            "encoder_fingerprint": fingerprint,
            "preprocessing": preprocessing.to_dict(),
            "num_images": len(paths),
            "num_unreadable": int((~valid).sum()),
        }
        atomic_write(meta_file, json.dumps(meta, indent=1))  # written last: complete
    log.info("cached %d %s in %s", len(paths), desc, directory)
    return CachedFeatures(directory)


def _complete(directory: Path, key: str, desc: str) -> bool:
    """Whether ``directory`` holds the finished cache of ``key``."""
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        return False
    if json.loads(meta_file.read_text()).get("key") != key:
        return False
    log.info("using cached %s from %s", desc, directory)
    return True


@contextlib.contextmanager
def _exclusive(directory: Path, should_stop: Callable[[], bool]) -> Iterator[None]:
    """Hold the entry's lock; while another process holds it, wait (asking ``should_stop``)."""
    if fcntl is None:
        yield
        return
    try:
        handle = open(directory / ".lock", "a+b")  # noqa: SIM115 - held for the block
    except OSError as exc:
        raise UserError(
            f"feature cache: cannot create {directory / '.lock'}: {exc.strerror}"
        ) from exc
    with handle:
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log.info("feature cache %s: another process is building it; waiting", directory)
                    waiting = True
                if should_stop():
                    raise CacheInterrupted(f"stopped while waiting for {directory}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@torch.no_grad()
def _compute(
    encoder: Encoder,
    loader: DataLoader,
    paths: Sequence[Path],
    directory: Path,
    device: str | torch.device,
    desc: str,
    should_stop: Callable[[], bool],
) -> np.ndarray:
    """Write ``features.npy`` (atomically) from ``loader``'s batches; -> which images were read."""
    n = len(paths)
    valid = np.zeros(n, dtype=bool)
    with atomic_path(directory / "features.npy") as tmp:
        array: np.ndarray | None = None
        for batch in tqdm(loader, desc=f"caching {desc}", unit="batch", leave=False, disable=None):
            if should_stop():
                raise CacheInterrupted(f"stopped while caching {desc}; nothing kept")
            if not len(batch["index"]):
                continue
            feats = encoder(batch["inputs"].to(device)).float().cpu().numpy()  # [B, (P,) F]
            if array is None:
                shape = (n, *feats.shape[1:])
                _check_room(shape, directory, desc)
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            idx = batch["index"].numpy()
            array[idx] = feats.astype(np.float16)
            valid[idx] = True
        if array is None:
            raise UserError(
                f"feature cache: no image of {desc} could be read ({n} files"
                f"{f', first: {paths[0]}' if n else ''}); nothing cached in "
                f"{directory}"
            )
        array.flush()
        del array
    return valid


def _check_room(shape: tuple[int, ...], directory: Path, desc: str) -> None:
    """Log the cache's size; refuse one that would not fit the disk, before writing it."""
    need = 2 * int(np.prod(shape))  # float16
    free = shutil.disk_usage(directory).free
    dims = " x ".join(str(d) for d in shape[1:])
    log.info(
        "feature cache: %d %s x %s float16 = %s in %s", shape[0], desc, dims, _gb(need), directory
    )
    if need > free:
        raise UserError(
            f"feature cache: {shape[0]} {desc} x {dims} float16 need {_gb(need)} but "
            f"{directory} has {_gb(free)} free: set a smaller model.encoder.grid, or "
            "trainer.cache_dir on a larger disk, or trainer.cache_features=false"
        )


def _gb(n: int) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def image_source(
    paths: Sequence[Path], pre: Preprocessing, transform: Any, cache: CachedFeatures | None
) -> IndexedFeatures | ImageDataset:
    """What the model reads per image, ``(tensor or None, index)``: the cached encoder features
    when a cache is given, else the images decoded and transformed (the CNN in the loop). The one
    place where training, validation and ``captioner evaluate`` make that choice concrete."""
    if cache is not None:
        return IndexedFeatures(cache)
    return ImageDataset(paths, transform, pre.draft_to)
