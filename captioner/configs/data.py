"""``data.*``: which dataset, how captions become targets, how batches are made (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from captioner.configs.checks import at_least
from captioner.errors import UserError

SPLITS = ("train", "val", "test")  # what a data config can load

# the keys of one dataset layout (COCO, Karpathy, the demo): each ``conf/data`` option sets those
# of its own layout and has no others, so the schema's node in Hydra's ConfigStore leaves them out
LAYOUT_FIELDS = (
    "year",
    "demo",
    "train_annotations",
    "train_images",
    "val_annotations",
    "val_images",
    "test_annotations",
    "test_images",
    "split_file",
    "images",
    "restval_in_train",
)


@dataclass
class DemoConfig:
    """``data.demo``: the embedded demo dataset, generated on first use (``captioner.datasets.synthetic``)."""

    seed: int = 0
    image_size: int = 64
    splits: dict | None = None  # images per split; null: 3000 train / 300 val / 300 test

    def __post_init__(self) -> None:
        at_least(self, "data.demo", image_size=16)


@dataclass
class DataConfig:
    """``data.*``: which dataset, how captions become targets, how batches are made."""

    name: str | None = None  # the Hydra option's label
    format: str = "coco"  # coco | karpathy
    root: str = "data/demo"
    year: int | None = None  # COCO layout year (interpolated into the paths)
    demo: DemoConfig | None = None  # generate the embedded demo dataset here on first use
    train_annotations: str | None = None  # COCO format: relative to root
    train_images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    test_annotations: str | None = None
    test_images: str | None = None
    split_file: str | None = None  # Karpathy format: dataset_*.json, relative to root
    images: str | None = None  # Karpathy format: image folder, relative to root
    restval_in_train: bool = True
    min_freq: int = 5  # a word enters the vocabulary iff it occurs >= min_freq times in TRAIN
    max_vocab: int | None = None  # null: every such word; k: the k most frequent (specials apart)
    max_caption_len: int = 20  # ids incl. <start>/<end>; longer captions are cut, <end> kept
    captions_per_image: int | None = None  # null: (image, caption) pairs; k: each image once
    augment: bool = False
    batch_size: int = 32
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("coco", "karpathy"):
            raise UserError(f"data.format must be 'coco' or 'karpathy', got {self.format!r}")
        if self.format == "karpathy" and (self.split_file is None or self.images is None):
            raise UserError("data.format=karpathy needs data.split_file and data.images")
        at_least(self, "data", min_freq=1, max_caption_len=3, batch_size=1, num_workers=0)
        if self.captions_per_image is not None:
            at_least(self, "data", captions_per_image=1)
        if self.max_vocab is not None:
            at_least(self, "data", max_vocab=1)

    def split_files(self, split: str) -> tuple[str, str]:
        """(annotations, images) of a COCO-format split, relative to ``root``."""
        ann, images = getattr(self, f"{split}_annotations"), getattr(self, f"{split}_images")
        if ann is None or images is None:
            raise UserError(f"data.{split}_annotations / data.{split}_images are not set")
        return ann, images
