"""Images: opening any file as RGB (one clear error for a bad one), the ONE evaluation transform
and the training transform factory, the model's view of an image, and the dataset of images that
the feature cache and evaluation read."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.annotations import PathTable
from captioner.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageLoadError(UserError):
    """An image file that cannot be decoded (corrupt, truncated, not an image, too large)."""


def load_image(path: str | Path, draft_to: int | None = None) -> Image.Image:
    """Open any image Pillow reads as 8-bit RGB (grayscale, palette, RGBA, CMYK, 16-bit, float),
    upright: its EXIF orientation applied (a phone photo taken sideways is read as seen).

    ``draft_to`` (:attr:`Preprocessing.draft_to`): a JPEG is decoded at the smallest of
    libjpeg's DCT scales (1/2, 1/4, 1/8) that keeps both sides >= it, which skips most of the
    decoding work for photos larger than the model's input. The one decode path of training,
    the feature cache, evaluation, ``caption`` and ``serve``."""
    return _open_rgb(Path(path), Path(path), draft_to)


def load_image_bytes(data: bytes, name: str, draft_to: int | None = None) -> Image.Image:
    """:func:`load_image` of a file's contents (an upload); errors name it ``name``."""
    return _open_rgb(io.BytesIO(data), name, draft_to)


def _open_rgb(
    source: Path | io.BytesIO, label: str | Path, draft_to: int | None = None
) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if draft_to is not None and img.format == "JPEG":
                    img.draft(None, (draft_to, draft_to))  # JPEG only; before load()
                img.load()
                _apply_orientation(img, label)
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


def _apply_orientation(img: Image.Image, label: str | Path) -> None:
    """Turn ``img`` upright in place by its EXIF orientation tag (if any). An EXIF block Pillow
    cannot parse leaves the image as stored, with a warning: the pixels themselves are fine."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable EXIF orientation (%s); read as stored", label, exc)


def from_pil(img: Image.Image) -> Image.Image:
    """An image the caller opened (``Captioner.caption([Image.open(...)])``): turned upright by
    its EXIF orientation, as every file this package opens is, and converted to RGB. The caller's
    image is left as it is; one already turned upright carries no orientation tag any more."""
    img = img.copy()
    _apply_orientation(img, "image")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB: transparency is put on white; 16-bit, 32-bit and float grayscale are
    scaled to 8 bits (:func:`_gray_to_8bit`), not clipped."""
    if img.mode == "F" or img.mode.startswith("I"):
        img = _gray_to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """A mode I / I;16 / F image as 8-bit "L": the nominal range of its type when its values lie
    within it, else its actual range, to 0..255.

    Nominal ranges: 0..255 and then 0..65535 for integers (16-bit data is often stored as mode I),
    always 0..65535 for I;16, 0..1 for floats (the usual convention: a dim float image stays
    dim). Values outside them (a float image in [0, 1000] or [-1, 1], a 32-bit count) are
    stretched from their minimum to their maximum; a constant one becomes black. NaN reads as
    the minimum, +-inf as the maximum / minimum."""
    arr = np.asarray(img, dtype=np.float32)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    nominal = [(0.0, 1.0)] if img.mode == "F" else [(0.0, 65535.0)]
    if img.mode == "I":
        nominal.insert(0, (0.0, 255.0))
    for low, top in nominal:
        if low <= lo and hi <= top:
            lo, hi = low, top
            break
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((arr - lo) * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


# the interpolations a Preprocessing may name (INTERPOLATIONS: torchvision's InterpolationMode
# values) -> the Pillow filter torchvision resizes PIL images with (its ``pil_modes_mapping``)
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
    (see :mod:`captioner.models.backbones`): what captioning a single image waits for.

    That is, as long as the resized image has at most :attr:`max_resized_pixels`, and the
    preprocessing is not ``fast_decode``. An extreme aspect ratio (a 4 KB PNG of 1 x 1,000,000
    pixels would be 256 x 256,000,000 at resize 256) resamples only the region of the source the
    crop keeps: the same sample positions up to float rounding, at a cost bounded by the crop
    (``tests/test_hostile_images.py``).

    ``fast_decode`` (after the reduced-DCT decode of :func:`load_image`) resizes an RGB image
    with PyTorch's vectorised 8-bit antialiased resize, Pillow's algorithm, within 1-2 levels of
    its output (``tests/test_fast_decode.py``) at about 1.7x its speed, for the bilinear and
    bicubic filters, whenever the resized image has at most :attr:`max_fast_pixels_per_crop`
    times the crop's pixels; otherwise it takes the crop-only resample above.
    """

    # 48 MiB as RGB: at resize 256 every aspect ratio up to 256:1 takes the exact path
    max_resized_pixels = 2**24
    # fast_decode resizes the whole image (then crops) up to this many times the crop's pixels:
    # a 16:9 photo is 1.8x; a longer strip takes the crop-only resample, bounded by the crop
    max_fast_pixels_per_crop = 4

    def __init__(self, pre: Preprocessing):
        self.pre = pre  # its interpolation, std, sizes are checked by Preprocessing itself
        self.filter = PIL_FILTERS[pre.interpolation]
        self.torch_resize = pre.fast_decode and pre.interpolation in ("bilinear", "bicubic")

    def _layout(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The resized size (shorter side ``resize``, the longer one in proportion, truncated)
        and the crop's top-left corner (offsets rounded half to even, as torchvision)."""
        w, h = size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.pre.resize, int(self.pre.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        crop = self.pre.crop  # <= resize (Preprocessing checks it): no padding is ever needed
        return new_w, new_h, int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))

    def _resized_by_torch(self, img: Image.Image, new_w: int, new_h: int) -> bool:
        small = new_w * new_h <= self.max_fast_pixels_per_crop * self.pre.crop**2
        return self.torch_resize and img.mode == "RGB" and small and (new_w, new_h) != img.size

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """The resized, center-cropped 8-bit pixels, uint8 [channels, crop, crop]."""
        layout = self._layout(img.size)
        if self._resized_by_torch(img, *layout[:2]):
            return self._torch_pixels(img, *layout)
        return _uint8_chw(self._pillow_geometry(img, *layout))

    def geometry(self, img: Image.Image) -> Image.Image:
        """Resize the shorter side to ``resize``, then center-crop ``crop`` x ``crop``: the
        image the model sees, as a PIL image (the pixels :meth:`pixels` gives)."""
        layout = self._layout(img.size)
        if self._resized_by_torch(img, *layout[:2]):
            return Image.fromarray(self._torch_pixels(img, *layout).permute(1, 2, 0).numpy())
        return self._pillow_geometry(img, *layout)

    def _torch_pixels(
        self, img: Image.Image, new_w: int, new_h: int, top: int, left: int
    ) -> torch.Tensor:
        source = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None]
        # channels-last uint8 [1, 3, h, w]: the layout of PyTorch's vectorised antialiased kernel
        resized = torch.nn.functional.interpolate(
            source, size=(new_h, new_w), mode=self.pre.interpolation, antialias=True
        )
        crop = self.pre.crop
        return resized[0, :, top : top + crop, left : left + crop]

    def _pillow_geometry(
        self, img: Image.Image, new_w: int, new_h: int, top: int, left: int
    ) -> Image.Image:
        w, h = img.size
        crop = self.pre.crop
        too_large = new_w * new_h > self.max_resized_pixels
        if (new_w, new_h) != (w, h) and (too_large or self.pre.fast_decode):
            # the crop's box in source coordinates: resample that region alone
            sx, sy = w / new_w, h / new_h
            box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
            return img.resize((crop, crop), self.filter, box=box)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), self.filter)
        return img.crop((left, top, left + crop, top + crop))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(img))

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """An image :meth:`geometry` already resized and cropped -> the normalised tensor."""
        return self.normalize(_uint8_chw(img))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [C, H, W] -> ToTensor's float in [0, 1], then Normalize's (x - mean) / std per
        channel, in that order (the same roundings as torchvision's)."""
        x = pixels.contiguous().to(torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.pre.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.pre.std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pre})"


def _uint8_chw(img: Image.Image) -> torch.Tensor:
    """An 8-bit PIL image -> uint8 [channels, H, W] (mode "1" as 0 / 255)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        raise TypeError(f"EvalTransform takes 8-bit images, got mode {img.mode} (use to_rgb)")
    arr = np.array(img, dtype=np.uint8, copy=True)  # [H, W(, channels)]
    if img.mode == "1":
        arr *= 255
    return torch.from_numpy(arr).view(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)


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


class ImageDataset(Dataset):
    """``(image tensor or None if unreadable, index)`` per record: evaluation and captioning.
    ``draft_to``: the preprocessing's :attr:`~Preprocessing.draft_to` (see :func:`load_image`)."""

    def __init__(self, paths: Sequence[Path | str], transform: Any, draft_to: int | None = None):
        self.paths = PathTable(paths)  # shared by forked workers, not copied into each
        self.transform = transform
        self.draft_to = draft_to

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor | None:
        try:
            return self.transform(load_image(self.paths[index], self.draft_to))
        except ImageLoadError as exc:
            log.warning("skipping %s", exc)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        return self.load(index), index


def collate_images(batch: Sequence[tuple[torch.Tensor | None, int]]) -> dict[str, Any]:
    """Stack the readable images of an evaluation batch; ``index`` says which records they are."""
    kept = [b for b in batch if b[0] is not None]
    return {
        "inputs": torch.stack([b[0] for b in kept]) if kept else torch.empty(0),
        "index": torch.tensor([b[1] for b in kept], dtype=torch.long),
        "skipped": len(batch) - len(kept),
    }
