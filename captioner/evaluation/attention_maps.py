"""Attention maps: where a decoder that attends looked for each word, drawn over the image.

The weights of one word are a grid [h, w] over the model's view of the image (the resized,
center-cropped input, :func:`captioner.datasets.images.model_view`). They are upsampled to the view's size
(bilinear), and blended over the view on one colour scale for the whole caption: the most
attended position of any of its words is at the top of the colour map, so a word whose weights
are spread thin looks cold instead of having its noise stretched into a pattern. ``captioner caption --attention-map DIR`` writes one PNG per image
(:func:`save_attention_figure`: the image, then one panel per word); the evaluation report stores
each caption's grids once, as bytes (:func:`quantized_maps`), and its script draws the same
panels over the entry's thumbnail (:func:`view_box`, :func:`jet_lut`) when they are opened.
matplotlib's object-oriented API on a non-GUI canvas draws the figures, so a notebook's pyplot
backend is left alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = 5  # panels per row of a figure


def heat_overlay(
    view: Image.Image, weights: torch.Tensor, vmax: float | None = None, opacity: float = 0.55
) -> Image.Image:
    """``view`` with the attention ``weights`` [h, w] as a heat map over it (RGB, same size);
    ``vmax`` is the weight at the top of the colour map (None: the largest of ``weights``)."""
    from matplotlib import colormaps

    width, height = view.size
    grid = weights.detach().float().cpu()[None, None]  # [1, 1, h, w]
    heat = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    top = float(weights.max()) if vmax is None else vmax
    heat = (heat / max(top, 1e-12)).clamp(0, 1).numpy()
    colours = colormaps["jet"](heat)[..., :3]  # [H, W, 3] in [0, 1]
    image = np.asarray(view.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1 - opacity) * image + opacity * colours
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def attention_figure(
    view: Image.Image, words: Sequence[str], maps: torch.Tensor, panel_inches: float = 2.0
) -> Figure:
    """A figure of the image (titled with the caption) followed by one panel per word, the
    word's attention map over the image; ``maps`` [len(words), h, w]."""
    from matplotlib.figure import Figure

    if len(words) != len(maps):
        raise ValueError(f"{len(words)} words but {len(maps)} attention maps")
    vmax = float(maps.max()) if len(maps) else None
    panels = len(words) + 1
    cols = min(COLUMNS, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(cols * panel_inches, rows * (panel_inches + 0.3)))
    for i in range(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i == 0:
            ax.imshow(view)
            ax.set_title(" ".join(words), fontsize=7, wrap=True)
        else:
            ax.imshow(heat_overlay(view, maps[i - 1], vmax))
            ax.set_title(words[i - 1], fontsize=10)
    fig.tight_layout()
    return fig


def attention_png(view: Image.Image, words: Sequence[str], maps: torch.Tensor) -> bytes:
    """:func:`attention_figure` as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = attention_figure(view, words, maps)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def save_attention_figure(
    path: str | Path, view: Image.Image, words: Sequence[str], maps: torch.Tensor
) -> Path:
    """Write :func:`attention_figure` as a PNG to ``path``."""
    path = Path(path)
    path.write_bytes(attention_png(view, words, maps))
    return path


def quantized_maps(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """``maps`` [words, h, w] (a tensor or array; NaN read as 0) as uint8 on the caption's one colour scale (255: its largest
    weight), what the report stores: :func:`heat_overlay` of ``maps[i]`` with the caption's
    ``vmax`` is the colour map of these over 255, to half a step of 255."""
    weights = torch.as_tensor(maps).detach().float().cpu().nan_to_num(0.0)
    top = max(float(weights.max()), 1e-12) if weights.numel() else 1.0
    return (weights / top).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def map_sharpness(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How concentrated each word's weights in ``maps`` [words, h, w] are -> (entropy, peak),
    one value per word: the entropy of the word's weights over the grid as a share of a uniform
    map's (1: spread evenly over all h * w positions, 0: all on one), and its largest weight as
    a multiple of a uniform map's 1 / (h * w) (1 to h * w). Each word's weights are taken as they
    are (they sum to 1: a softmax over the grid); NaN, a padded word's, is read as 0."""
    weights = torch.as_tensor(maps).detach().double().nan_to_num(0.0).flatten(1)
    cells = weights.shape[1]
    plogp = torch.where(weights > 0, weights * weights.clamp_min(1e-300).log(), 0.0)
    entropy = -plogp.sum(1) / math.log(cells) if cells > 1 else torch.zeros(len(weights))
    return entropy, weights.amax(1) * cells


def view_box(width: int, height: int, resize: int, crop: int) -> tuple[float, float, float, float]:
    """The model's view of a ``width`` x ``height`` image (``model_view``: shorter side
    resized to ``resize``, center crop ``crop``) as (left, top, right, bottom) fractions of the
    image: the region an attention grid covers, for drawing it over a thumbnail."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)
    new_w, new_h = (resize, new_long) if width <= height else (new_long, resize)
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    return left / new_w, top / new_h, (left + crop) / new_w, (top + crop) / new_h


def jet_lut() -> bytes:
    """matplotlib's ``jet`` as 256 RGB triplets (what :func:`heat_overlay` draws with), for the
    report's script, which colours the maps itself."""
    from matplotlib import colormaps

    rgb = colormaps["jet"](np.arange(256))[:, :3]
    return (rgb * 255).round().astype(np.uint8).tobytes()


__all__ = [
    "attention_figure",
    "attention_png",
    "heat_overlay",
    "jet_lut",
    "map_sharpness",
    "quantized_maps",
    "save_attention_figure",
    "view_box",
]
