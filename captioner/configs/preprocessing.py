"""How an image becomes the encoder's input: :class:`Preprocessing` (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from captioner.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


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
            raise UserError(f"need 1 <= crop <= resize, got resize={self.resize} crop={self.crop}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**d)
