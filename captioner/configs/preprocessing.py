"""How an image becomes the encoder's input: :class:`Preprocessing` (torch-free)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from captioner.configs.checks import one_of
from captioner.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's InterpolationMode values; captioner.datasets.images maps each to its Pillow filter
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")

# The largest resize / crop: 8x the largest input of common pretrained encoders (torchvision's
# 518 px ViT-H/14, timm's 800 px EfficientNet-L2). It bounds one image's tensor at 4096^2 * 3
# floats = 192 MiB; a checkpoint or config.json asking for more is refused, not obeyed until the
# kernel kills the process.
MAX_SIZE = 4096


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    # The fast path from a file to the tensor (benchmarks/decode.py): a JPEG is decoded at the
    # smallest of libjpeg's DCT scales (1/1, 1/2, 1/4, 1/8) that keeps both sides >= resize
    # (Pillow's ``draft``), and resized by PyTorch's vectorised 8-bit port of Pillow's filter
    # (bilinear, bicubic; other filters, and long strips, resample the crop's region alone, in
    # Pillow: :class:`~captioner.datasets.images.EvalTransform`). The pixels differ slightly
    # from the exact path's (torchvision's Resize + CenterCrop on a full decode), so a checkpoint
    # stores which: False in checkpoints written before it existed, which caption exactly as
    # before; ``model.encoder.fast_decode`` sets it for new ones.
    fast_decode: bool = False

    def __post_init__(self) -> None:
        """Each value checked (they may come from a checkpoint or an exported ``config.json``):
        one :class:`UserError` line naming the field."""
        for name, top in (("resize", MAX_SIZE), ("crop", self.resize)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise UserError(
                    f"preprocessing.{name} must be an integer in 1..{top}, got {value!r}"
                )
        for name in ("mean", "std"):
            value = getattr(self, name)
            ok = isinstance(value, (list, tuple)) and len(value) == 3
            ok = ok and all(_is_number(v) and (name == "mean" or v > 0) for v in value)
            if not ok:
                need = "3 numbers" if name == "mean" else "3 numbers > 0"
                raise UserError(f"preprocessing.{name} must be {need}, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        one_of(self, "preprocessing", interpolation=INTERPOLATIONS)
        if not isinstance(self.fast_decode, bool):
            raise UserError(
                f"preprocessing.fast_decode must be true or false, got {self.fast_decode!r}"
            )

    @property
    def draft_to(self) -> int | None:
        """The side a JPEG may be decoded down to (:func:`captioner.datasets.images.load_image`),
        or None: decode every pixel."""
        return self.resize if self.fast_decode else None

    def to_dict(self) -> dict[str, Any]:
        """As stored in checkpoints, ``config.json`` and feature-cache keys; ``fast_decode`` only
        when set, so what was written before it existed (and the caches keyed on it) reads the
        same."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.fast_decode:
            del d["fast_decode"]
        return d

    def describe(self) -> str:
        """In words, for a log line: ``resize 64, crop 64 x 64, bilinear, mean 0.5 0.5 0.5, std
        0.25 0.25 0.25``."""

        def three(values: tuple[float, float, float]) -> str:
            return " ".join(f"{v:g}" for v in values)

        return (
            f"resize {self.resize}, crop {self.crop} x {self.crop}, {self.interpolation}, "
            f"mean {three(self.mean)}, std {three(self.std)}"
            + (", fast decode (JPEG DCT scaling, crop resampled)" if self.fast_decode else "")
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        if not isinstance(d, dict):
            raise UserError(f"preprocessing: expected an object, got {d!r}")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise UserError(f"preprocessing: unknown key {key!r}")
        for key in ("resize", "crop"):
            if key not in d:
                raise UserError(f"preprocessing: missing {key!r}")
        return cls(**d)
