"""What a model was trained on, in words for the person about to use it.

A checkpoint and an exported folder record the training data as ``trained_on`` (the data
preset's name, ``data.name``, and the epoch of the weights: see
:class:`captioner.pretrained.ModelInfo`); :func:`describe_trained_on` turns it into the phrase
shown wherever the model is named outside training, so that nobody mistakes the shapes demo for
a photo captioner. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# the data presets of conf/data/, by name: what their images are
DATASETS = {
    "demo": "the synthetic shapes demo: it captions coloured shapes, not photos",
    "flickr8k": "Flickr8k: real photos, mostly of people and animals",
    "coco": "COCO-format captions (data=coco: MS-COCO, or a dataset converted to its format)",
    "karpathy": "MS-COCO in Karpathy's splits: real photos of everyday scenes",
}


def describe_dataset(name: str | None) -> str:
    """``data.name`` -> what it is (an unknown name is quoted as it is)."""
    if not name:
        return "an unrecorded dataset"
    return DATASETS.get(name, f"the {name!r} dataset")


def describe_trained_on(trained_on: Mapping[str, Any] | None) -> str:
    """``trained_on`` (``dataset``, ``epoch``, ``self_critical``) -> "trained on ..."."""
    trained_on = trained_on or {}
    text = f"trained on {describe_dataset(trained_on.get('dataset'))}"
    details = []
    if trained_on.get("epoch") is not None:
        details.append(f"weights of epoch {trained_on['epoch']}")
    if trained_on.get("self_critical"):
        details.append("fine-tuned self-critically on CIDEr-D")
    return f"{text} ({', '.join(details)})" if details else text
