"""Attention maps: where a decoder that attends looked for each word, drawn over the image.

The weights of one word are a grid [h, w] over the model's view of the image (the resized,
center-cropped input, :func:`captioner.datasets.images.model_view`). They are upsampled to the view's size
(bilinear), and blended over the view on one colour scale for the whole caption: the most
attended position of any of its words is at the top of the colour map, so a word whose weights
are spread thin looks cold instead of having its noise stretched into a pattern. ``captioner caption --attention-map DIR`` writes one PNG per image
(:func:`save_attention_figure`: the image, then one panel per word); the evaluation report shows
a strip of small panels per entry (:func:`attention_panels`). matplotlib's object-oriented API on
a non-GUI canvas draws the figures, so a notebook's pyplot backend is left alone.
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


def attention_panels(view: Image.Image, maps: torch.Tensor, size: int = 80) -> list[bytes]:
    """One small JPEG per word (longest side ``size``): the report's strip of maps."""
    small = view.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    vmax = float(maps.max()) if len(maps) else None
    out = []
    for weights in maps:
        buf = io.BytesIO()
        heat_overlay(small, weights, vmax).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


__all__ = [
    "attention_figure",
    "attention_panels",
    "attention_png",
    "heat_overlay",
    "save_attention_figure",
]
