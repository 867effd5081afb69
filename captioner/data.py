"""Caption datasets: the split a data config names, images, the one transform factory, collate.

Every source is turned into a list of :class:`CaptionRecord` (one image, all its captions) by the
readers of :mod:`captioner.annotations`; the torch datasets on top of it serve training pairs
``(image, one caption)`` and evaluation items ``(image, index)`` whose references are looked up
in the records.
"""

from __future__ import annotations

import io
import logging
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

# the records and their readers live in captioner.annotations (importable from here too)
from captioner.annotations import CaptionRecord, load_coco_captions, load_karpathy_split
from captioner.config import DataConfig
from captioner.errors import UserError
from captioner.vocab import Vocab

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# the split a data config names


def load_split(data: DataConfig, split: str) -> list[CaptionRecord]:
    """Load ``split`` (train/val/test) of the dataset described by the typed ``data`` config."""
    root = Path(data.root)
    if data.demo:
        from captioner.synthetic import ensure_demo_dataset

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


class ImageLoadError(UserError):
    """An image file that cannot be decoded (corrupt, truncated, not an image, too large)."""


def load_image(path: str | Path) -> Image.Image:
    """Open any image Pillow reads as 8-bit RGB (grayscale, palette, RGBA, CMYK, 16-bit)."""
    return _open_rgb(Path(path), Path(path))


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """:func:`load_image` of a file's contents (an upload); errors name it ``name``."""
    return _open_rgb(io.BytesIO(data), name)


def _open_rgb(source: Path | io.BytesIO, label: str | Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()
                return to_rgb(img)
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{label}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(f"{label}: is a directory, not an image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{label}: image is too large ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        reason = "not an image" if "cannot identify" in str(exc) else f"corrupt image ({exc})"
        raise ImageLoadError(f"{label}: {reason}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB: 16-bit is scaled (not clipped), transparency is put on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a tensor: resize the shorter side, center-crop, normalise.

    Resolved once from the encoder's weights metadata and stored in every checkpoint, so train,
    evaluate and caption use exactly the same pixels.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize < 1 or self.crop < 1 or self.crop > self.resize:
            raise ValueError(f"need 1 <= crop <= resize, got resize={self.resize} crop={self.crop}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**d)


# the interpolations a Preprocessing may name (torchvision's InterpolationMode values) -> the
# Pillow filter torchvision resizes PIL images with (its ``pil_modes_mapping``)
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class EvalTransform:
    """The deterministic transform: PIL image -> normalised tensor [3, crop, crop].

    Bit for bit torchvision's ``Compose([Resize(resize, interpolation, antialias=True),
    CenterCrop(crop), ToTensor(), Normalize(mean, std)])`` on PIL images (``tests/test_backbones.py``
    compares them), without importing torchvision, whose import costs about as much as torch's
    (see :mod:`captioner.backbones`): what captioning a single image waits for.
    """

    def __init__(self, pre: Preprocessing):
        if pre.interpolation not in PIL_FILTERS:
            raise ValueError(
                f"interpolation {pre.interpolation!r} is not one of {', '.join(PIL_FILTERS)}"
            )
        if 0.0 in pre.std:
            raise ValueError(f"std {pre.std} has a zero: division by zero")
        self.pre = pre
        self.filter = PIL_FILTERS[pre.interpolation]

    def geometry(self, img: Image.Image) -> Image.Image:
        """Resize the shorter side to ``resize`` (the longer one in proportion, truncated),
        then center-crop ``crop`` x ``crop`` (offsets rounded half to even, as torchvision)."""
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.pre.resize, int(self.pre.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), self.filter)
        crop = self.pre.crop  # <= resize (Preprocessing checks it): no padding is ever needed
        top = int(round((new_h - crop) / 2.0))
        left = int(round((new_w - crop) / 2.0))
        return img.crop((left, top, left + crop, top + crop))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.geometry(img))

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """An image :meth:`geometry` already resized and cropped -> the normalised tensor."""
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            raise TypeError(f"EvalTransform takes 8-bit images, got mode {img.mode} (use to_rgb)")
        arr = np.array(img, dtype=np.uint8, copy=True)  # [crop, crop(, channels)]
        if img.mode == "1":
            arr *= 255
        x = torch.from_numpy(arr).view(arr.shape[0], arr.shape[1], -1)
        # ToTensor: HWC uint8 -> CHW float in [0, 1]; Normalize: (x - mean) / std per channel
        x = x.permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.pre.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.pre.std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pre})"


def build_transform(
    pre: Preprocessing, train: bool = False, augment: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """The ONE transform factory: eval/caption use ``train=False``; training augments only when
    ``augment`` (random scale crop, no flip: captions say "left" and "right"). The eval
    transform is :class:`EvalTransform`; only augmentation imports torchvision."""
    if not (train and augment):
        return EvalTransform(pre)
    from torchvision import transforms as T

    interp = T.InterpolationMode(pre.interpolation)
    return T.Compose(
        [
            T.RandomResizedCrop(pre.crop, scale=(0.6, 1.0), interpolation=interp, antialias=True),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def model_view(image: Image.Image, pre: Preprocessing) -> Image.Image:
    """The part of ``image`` the model sees, at its input size: resized and center-cropped as
    the eval transform does, not normalised (what an attention map is drawn over)."""
    return EvalTransform(pre).geometry(to_rgb(image))


# ---------------------------------------------------------------------------------------------
# torch datasets


def encode_caption(vocab: Vocab, caption: str, max_len: int) -> list[int]:
    """``<start> w1 .. wn <end>``, truncated to ``max_len`` ids with ``<end>`` kept last."""
    ids = vocab.encode(caption)
    if len(ids) > max_len:
        ids = ids[: max_len - 1] + [vocab.end_id]
    return ids


class ImageDataset(Dataset):
    """``(image tensor or None if unreadable, index)`` per record: evaluation and captioning."""

    def __init__(self, paths: Sequence[Path | str], transform: Any):
        self.paths = [Path(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor | None:
        try:
            return self.transform(load_image(self.paths[index]))
        except ImageLoadError as exc:
            log.warning("skipping %s", exc)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        return self.load(index), index


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


def collate_images(batch: Sequence[tuple[torch.Tensor | None, int]]) -> dict[str, Any]:
    """Stack the readable images of an evaluation batch; ``index`` says which records they are."""
    kept = [b for b in batch if b[0] is not None]
    return {
        "inputs": torch.stack([b[0] for b in kept]) if kept else torch.empty(0),
        "index": torch.tensor([b[1] for b in kept], dtype=torch.long),
        "skipped": len(batch) - len(kept),
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
