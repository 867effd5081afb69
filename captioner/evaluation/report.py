"""A self-contained HTML report of an evaluation run, and a training run's curves (matplotlib).

``write_report`` turns the rows of ``per_image.jsonl`` into ``report.html``: a grid of thumbnails
(embedded as JPEG data URIs, so the file can be mailed or attached anywhere), each with the
generated caption, its references and its sentence BLEU-4, worst first, under the corpus scores,
and the training curves as inline SVG. An attending model's maps are stored once per caption as
bytes (its grids: 49 bytes a word on a 7 x 7 grid) and drawn by the page's script over the
thumbnail when an entry's maps are opened: 5,000 entries with maps make 47 MB and open in
headless Chromium in 4.5 s (benchmarks/README.md, "scale.py"), where a JPEG per word made 208 MB
that took two minutes.

``training_curves_figure`` draws train/val loss and validation BLEU-4 per epoch from a run's
``metrics.jsonl`` records with matplotlib's object-oriented API on a non-GUI canvas (pyplot is
never imported, so a notebook's backend is left alone); ``training_curves_svg`` renders it as an
SVG string for the page and ``plot_training_curves`` writes it to a PNG, SVG or PDF file.
matplotlib is imported only when a curve is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.images import load_image
from captioner.evaluation.attention_maps import jet_lut, quantized_maps, view_box
from captioner.evaluation.report_assets import CSS, JS
from captioner.training.runlog import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SCORE_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "cider_d")
SCORE_NAMES = {
    "bleu1": "BLEU-1",
    "bleu2": "BLEU-2",
    "bleu3": "BLEU-3",
    "bleu4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider": "CIDEr",
    "cider_d": "CIDEr-D (no Java)",
}
# decode settings worth showing for each strategy (the others are ignored by it)
DECODE_KEYS = {
    "greedy": ("max_len", "suppress_unk"),
    "beam": ("beam_size", "length_penalty", "max_len", "suppress_unk"),
    "sample": ("temperature", "top_k", "top_p", "seed", "max_len", "suppress_unk"),
}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# a 160 px thumbnail of a Flickr8k photo is 7.3 KB as base64 at quality 70 (11.1 KB at 85):
# 5,000 entries with attention maps under 50 MB
THUMB_QUALITY = 70


def thumbnail(path: str | Path | None, size: int) -> tuple[str, tuple[int, int]] | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of ``path`` (longest side ``size``) and the
    image's own size, or None."""
    if not path:
        return None
    try:
        img = load_image(path)
        full = img.size
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    except Exception as exc:  # a report must never die on one bad image
        log.warning("report: no thumbnail for %s (%s)", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), full


def _bleu(row: dict[str, Any]) -> float:
    value = row.get("bleu4")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def _id_key(image_id: Any) -> tuple[int, float, str]:
    """Numeric ids in numeric order, before the others in text order (as the page's JS does)."""
    try:
        return (0, float(image_id), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(image_id))


def _attention_strip(words: Sequence[str], maps: Any, box: Sequence[float]) -> str:
    """A folded strip of a caption's attention maps, one panel per word, drawn by the page's
    script when opened: ``words``, the grids ``maps`` [words, h, w] (bytes on the caption's one
    scale, :func:`quantized_maps`) and ``box``, the model's view in the thumbnail (fractions)."""
    grids = quantized_maps(maps)
    if len(grids) != len(words):
        raise ValueError(f"{len(words)} words but {len(grids)} attention maps")
    _, h, w = grids.shape
    return (
        f'<details class="attention" data-words="{esc(json.dumps(list(words)))}" '
        f'data-grid="{h} {w}" data-box="{" ".join(f"{v:.4f}" for v in box)}" '
        f'data-maps="{base64.b64encode(grids.tobytes()).decode("ascii")}">'
        f'<summary>attention, {len(words)} words</summary><div class="strip"></div></details>'
    )


def _entry(
    row: dict[str, Any],
    thumb_size: int,
    attention: tuple[Sequence[str], Any] | None = None,
    pre: Preprocessing | None = None,
) -> str:
    bleu = _bleu(row)
    thumb = thumbnail(row.get("file"), thumb_size)
    name = Path(str(row.get("file") or "")).name
    box: Sequence[float] = (0.0, 0.0, 1.0, 1.0)
    if thumb:
        picture = f'<img src="{thumb[0]}" alt="{esc(name)}">'
        if pre is not None:
            box = view_box(*thumb[1], pre.resize, pre.crop)
    else:
        picture = '<div class="missing">image unavailable</div>'
    refs = "".join(f"<li>{esc(r)}</li>" for r in row.get("references") or [])
    hue = round(120 * min(1.0, max(0.0, bleu) * 2))  # red at 0, green from 0.5 up
    return (
        f'<figure class="entry" data-bleu4="{bleu:.6f}" data-image-id="{esc(row.get("image_id", ""))}">'
        f'<div class="thumb" style="height:{thumb_size}px">{picture}</div>'
        f"<figcaption>"
        f'<div class="meta"><span class="bleu" style="background:hsl({hue} 65% 38%)" '
        f'title="sentence BLEU-4">BLEU-4 {bleu:.3f}</span>'
        f'<span class="id" title="{esc(row.get("file", ""))}">#{esc(row.get("image_id", ""))} '
        f"{esc(name)}</span></div>"
        f'<p class="caption">{esc(row.get("caption", ""))}</p>'
        f'<ol class="refs">{refs}</ol>'
        f"{_attention_strip(*attention, box) if attention and len(attention[0]) else ''}"
        f"</figcaption></figure>"
    )


def _header(metrics: dict[str, Any], shown: int, total: int) -> str:
    scores = "".join(
        f'<div class="score"><b>{float(metrics[k]):.4f}</b><span>{SCORE_NAMES[k]}</span></div>'
        for k in SCORE_KEYS
        if isinstance(metrics.get(k), int | float)
    )
    decode = metrics.get("decode") or {}
    strategy = decode.get("strategy", "?")
    keys = DECODE_KEYS.get(strategy, tuple(k for k in decode if k != "strategy"))
    settings = ", ".join(f"{k}={decode[k]}" for k in keys if k in decode)
    images = f"{total} images" if shown == total else f"{shown} of {total} images (the worst)"
    skipped = metrics.get("skipped_images")
    facts = [
        ("split", metrics.get("split", "?")),
        ("images", images + (f", {skipped} unreadable skipped" if skipped else "")),
        ("decoding", f"{strategy} ({settings})" if settings else strategy),
        ("checkpoint", metrics.get("checkpoint", "?")),
    ]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    return f'<div class="scores">{scores}</div><table class="facts">{rows}</table>'


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    rows: list[dict[str, Any]],
    thumb_size: int = 160,
    max_images: int | None = None,
    metrics_log: Path | None = None,
    attention: dict[Any, tuple[Sequence[str], Any]] | None = None,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    ``rows`` are ``per_image.jsonl`` records (image_id, file, caption, references, bleu4); they
    are shown worst sentence BLEU-4 first (``max_images`` keeps the worst N). ``metrics_log``, a
    training run's ``metrics.jsonl``, adds its loss/BLEU curves when the file exists.
    ``attention``: per image id, the caption's words and their attention maps [words, h, w]
    (a tensor or array), drawn over the thumbnail's part that ``preprocessing`` (the model's
    resize and crop) shows the model; without it, over the whole thumbnail.
    """
    out_dir = Path(out_dir)
    ordered = sorted(rows, key=lambda r: (_bleu(r), _id_key(r.get("image_id"))))
    shown = ordered if max_images is None else ordered[: max(0, int(max_images))]
    maps = attention or {}
    entries = "\n".join(
        _entry(r, thumb_size, maps.get(r.get("image_id")), preprocessing) for r in shown
    )
    jet = f' data-jet="{base64.b64encode(jet_lut()).decode("ascii")}"' if maps else ""
    curves = ""
    if metrics_log is not None and Path(metrics_log).is_file():
        svg = training_curves_svg(read_metrics(metrics_log))
        if svg:
            curves = f'<h2>Training curves</h2><div class="curves">{svg}</div>'
    title = f"captioner evaluation: {metrics.get('split', '?')} split"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
{_header(metrics, len(shown), len(rows))}
{curves}
<div class="controls"><label for="order">Order</label>
<select id="order"><option value="worst" selected>worst first (sentence BLEU-4)</option>
<option value="best">best first</option><option value="id">image id</option></select>
<span>{len(shown)} entries</span></div>
<main class="grid" id="grid"{jet}>
{entries}
</main>
<script>{JS}</script>
</body></html>
"""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _series(history: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    points = []
    for rec in history:
        value = rec.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            points.append((float(rec["epoch"]), float(value)))
    return points


# (panel title, its lines as (legend label, colour, metrics.jsonl key)); a panel without data is
# left out
CURVES = (
    ("Loss", (("train", "#2563eb", "train_loss"), ("val", "#ea580c", "val_loss"))),
    ("Validation BLEU-4", (("val BLEU-4", "#16a34a", "val_bleu4"),)),
)


def training_curves_figure(history: Sequence[dict[str, Any]]) -> Figure | None:
    """Train/val loss and val BLEU-4 per epoch as a matplotlib Figure (None without data).

    One panel per non-empty group of :data:`CURVES`; each line has the SVG id (``gid``)
    ``curve-<key>``, e.g. ``curve-val_bleu4``. The figure sits on an Agg canvas; its ``savefig``
    picks the (non-GUI) backend of the file format.
    """
    panels = [
        (title, lines)
        for title, specs in CURVES
        if (lines := [(spec, pts) for spec in specs if (pts := _series(history, spec[2]))])
    ]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(3.8 * len(panels), 2.7), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, lines) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        for (label, color, key), pts in lines:
            epochs, values = zip(*pts, strict=True)
            ax.plot(
                epochs,
                values,
                color=color,
                marker="o",
                markersize=4,
                label=label,
                gid=f"curve-{key}",
            )
        ax.set_title(title, fontsize=11, loc="left")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    return fig


def training_curves_svg(history: Sequence[dict[str, Any]]) -> str:
    """:func:`training_curves_figure` as an SVG string to inline in HTML ("" without data).

    Text stays text (``svg.fonttype: none``), ids are reproducible, and there is no XML
    prolog, no metadata and no external reference (only namespace names).
    """
    fig = training_curves_figure(history)
    if fig is None:
        return ""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "captioner"}):
        fig.savefig(
            buf,
            format="svg",
            metadata={"Creator": None, "Date": None, "Format": None, "Type": None},
        )
    text = buf.getvalue()
    return text[text.index("<svg") :]


def plot_training_curves(metrics_jsonl: Path, out: Path) -> Path:
    """Plot train/val loss and val BLEU-4 per epoch from ``metrics_jsonl`` into ``out``; return it.

    The format follows the suffix of ``out`` (``.png``, ``.svg``, ``.pdf``, ...).
    """
    fig = training_curves_figure(read_metrics(metrics_jsonl))
    if fig is None:
        raise ValueError(f"{metrics_jsonl}: no epoch with train_loss, val_loss or val_bleu4")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
