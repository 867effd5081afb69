"""Vanishing gradients, measured: how much of the last word's loss reaches each earlier hidden
state of a trained decoder.

For each caption of a batch, :func:`gradient_norms` steps the decoder by hand (teacher forcing,
eval mode so dropout is off) so that every hidden state h_t is a node of one graph, takes the
cross-entropy L_T of the caption's FINAL target (by default ``<end>``) and returns
||dL_T / dh_t|| for every step t, aligned by the distance k = T - t from the last step.
:func:`gradient_flow` averages them over captions into a :class:`GradientFlow` curve;
:func:`plot_gradient_flow` draws several models' curves on one log-scale plot
(``benchmarks/gradient_flow.py`` does both for checkpoints).

Steps and distances. The decoder reads ``<start> w1 .. wn`` and step t (0-based) reads token t
and predicts token t + 1 from h_t, the state after reading it; the image's initial state is
h_{-1}. A caption of ``n`` words (length n + 2 with ``<start>``/``<end>``) predicts ``<end>`` at
step T = n, so its distances run k = 0 (the state the prediction is read from: the gradient is
the direct one, W_out^T (softmax - onehot)) to k = T + 1 (the image's initial state).

Why ``<end>`` (``target="end"``): every caption has it, as the last target the model is trained
on, predicted from the state that has read the whole caption, also for captions cut at
``data.max_caption_len`` (which keep their ``<end>``); its loss is the one that depends on the
longest stretch of the recurrence. ``target="last_word"`` takes the last real word's loss
instead (step T = n - 1). How sure the model is of the target scales the direct gradient
(softmax - onehot); :attr:`GradientFlow.relative` divides each caption's curve by it.

h is the first tensor of the decoder's state, the cell's hidden state [L, B, H] over all L
layers (the language cell's, with top-down attention); for an LSTM the gradient at h is the one
arriving there with the cell state c_t a separate node, i.e. dL_T/dh_t with c_t held fixed.

Shapes: N captions, T caption length (with <start>/<end>), K distances, L layers, H hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.datasets.captions import encode_caption, load_split, pad_captions
from captioner.datasets.images import build_transform, collate_images
from captioner.errors import UserError
from captioner.evaluation.evaluate import load_model, resolve_data_config
from captioner.features import build_feature_cache, image_source
from captioner.models.decoders import Decoder

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Target = Literal["end", "last_word"]
# how many positions before the caption's end the final target sits: <end> is the last id
TARGET_FROM_END: dict[str, int] = {"end": 1, "last_word": 2}


@dataclass(frozen=True)
class GradientFlow:
    """One model's curve: at each distance k = T - t, the gradient norms ||dL_T / dh_t||
    averaged over the captions long enough to have a step at that distance.

    ``relative`` is the mean of each caption's norm divided by its own norm at k = 0, which takes
    out how sure the model was of the final word (a curve of ``relative`` starts at 1);
    ``count[k]`` is how many captions each mean is over."""

    distance: list[int]  # k = 0 .. K
    mean_norm: list[float]  # mean over captions of ||dL_T / dh_{T-k}||
    relative: list[float]  # mean over captions of ||dL_T / dh_{T-k}|| / ||dL_T / dh_T||
    count: list[int]  # captions with a step at distance k
    label: str = ""
    target: str = "end"

    @classmethod
    def from_norms(cls, norms: Tensor, label: str = "", target: str = "end") -> GradientFlow:
        """The curve of per-caption norms [N, K+1] (NaN where a caption is too short), as
        :func:`gradient_norms` returns them (concatenate batches along dim 0 first)."""
        norms = norms.detach().double().cpu()
        present = ~torch.isnan(norms)  # [N, K+1]
        count = present.sum(dim=0)  # [K+1]
        zero = torch.zeros_like(norms)
        # relative: over the captions with a non-zero direct gradient (one that is exactly 0,
        # a saturated softmax, has no scale to divide by)
        scaled = present & (norms[:, :1] > 0)  # [N, K+1]
        ratio = torch.where(scaled, norms / norms[:, :1].clamp(min=1e-300), zero)
        keep = int(count.nonzero().max()) + 1 if bool(count.any()) else 0
        return cls(
            distance=list(range(keep)),
            mean_norm=(torch.where(present, norms, zero).sum(0) / count.clamp(min=1))[
                :keep
            ].tolist(),
            relative=(ratio.sum(0) / scaled.sum(0).clamp(min=1))[:keep].tolist(),
            count=count[:keep].tolist(),
            label=label,
            target=target,
        )

    def per_step_factor(self, min_count: int = 1) -> float:
        """The geometric mean decay per step of ``relative``: relative[K] ** (1 / K), K the
        farthest distance with at least ``min_count`` captions (NaN when K < 1 or the gradient
        there is exactly 0). Below 1 the gradient vanishes with distance, above 1 it grows."""
        far = max(
            (k for k, n in zip(self.distance, self.count, strict=True) if n >= min_count), default=0
        )
        if far < 1 or self.relative[far] <= 0.0:
            return math.nan
        return self.relative[far] ** (1.0 / far)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradientFlow:
        return cls(**data)


def _decoder(model: nn.Module) -> Decoder:
    decoder = getattr(model, "decoder", model)
    if not isinstance(decoder, Decoder):
        raise TypeError(f"expected a CaptionModel or a Decoder, got {type(model).__name__}")
    return decoder


def _final_steps(captions: Tensor, lengths: Tensor, target: str) -> Tensor:
    """The step T [N] of each caption that predicts its final ``target``."""
    if target not in TARGET_FROM_END:
        raise ValueError(f"target must be one of {sorted(TARGET_FROM_END)}, got {target!r}")
    if captions.dim() != 2 or lengths.shape != captions.shape[:1]:
        raise ValueError(
            f"captions must be [N, T] and lengths [N], got {list(captions.shape)} and "
            f"{list(lengths.shape)}"
        )
    lengths = lengths.to(torch.long).cpu()
    shortest = TARGET_FROM_END[target] + 1  # <start>, the target, and <end> after a last word
    if len(lengths) and (int(lengths.min()) < shortest or int(lengths.max()) > captions.shape[1]):
        raise ValueError(
            f"lengths must lie in [{shortest}, {captions.shape[1]}] for target={target!r}, got "
            f"{int(lengths.min())}..{int(lengths.max())}"
        )
    return lengths - TARGET_FROM_END[target] - 1  # T: the index of the step that predicts it


def _hidden_states(
    decoder: Decoder, features: Tensor, captions: Tensor, final: Tensor
) -> tuple[list[Tensor], Tensor]:
    """Teacher forcing step by step up to the last final step -> (the hidden states h_{-1} ..
    h_{max T}, each [L, N, H] and a node of the graph, the sum over captions of the
    cross-entropy L_T of each caption's final target at its step T)."""
    state = tuple(s.detach() for s in decoder.init_state(features))
    state = (state[0].requires_grad_(), *state[1:])  # h_{-1}: the graph starts here
    hidden, losses = [state[0]], []
    for t in range(int(final.max()) + 1):
        x = decoder.dropout(decoder.embed(captions[:, t]))  # [N, E]
        out, state, _ = decoder._advance(x, state)
        h = state[0]  # [L, N, H]
        if t == 0 and not torch.allclose(out, h[-1], rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"{type(decoder).__name__}: its output is not its top hidden state, so the "
                "gradient at h does not hold every path to the loss"
            )
        rows = (final == t).nonzero().squeeze(1).to(captions.device)
        if len(rows):  # the loss is read from h itself, so that dL_T / dh_T is the direct one
            logits = decoder.out(h[-1, rows])  # [n, V]
            losses.append(F.cross_entropy(logits, captions[rows, t + 1], reduction="sum"))
        hidden.append(h)
    return hidden, torch.stack(losses).sum()


def gradient_norms(
    model: nn.Module,
    features: Tensor,
    captions: Tensor,
    lengths: Tensor,
    *,
    target: Target = "end",
    image_of_caption: Tensor | None = None,
) -> Tensor:
    """Per caption and distance, ||dL_T / dh_{T-k}||: norms [N, K+1] (float64, CPU), K the
    longest caption's final step plus 1 (the image's initial state h_{-1}); NaN where
    k > T + 1 for a caption's own T.

    ``model``: a :class:`~captioner.models.captioning.CaptionModel` (or its decoder), run in
    eval mode and put back in the mode it was in. ``features``: encoder features [N, F] (the
    grid [N, P, F] for a decoder that attends), or one row per image with ``image_of_caption``
    [N] mapping captions to rows; ``captions`` [N, T] (``<start> .. <end> <pad>..``) and
    ``lengths`` [N] as the model is trained on. Captions do not interact in eval mode, so the
    gradient of the SUM of their final losses at caption i's h_t is its own dL_T / dh_t.
    """
    decoder = _decoder(model)
    final = _final_steps(captions, lengths, target)
    param = next(decoder.parameters())
    if image_of_caption is not None:
        features = features[image_of_caption]
    features = features.to(param.device, param.dtype)
    captions = captions.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            hidden, loss = _hidden_states(decoder, features, captions, final)
            grads = torch.autograd.grad(loss, hidden, allow_unused=True)
    finally:
        model.train(was_training)
    # by step: [N, max T + 2], column j the state h_{j-1} (None: no path to any loss, 0)
    by_step = torch.stack(
        [
            torch.zeros(len(final))
            if g is None
            else g.detach().transpose(0, 1).flatten(1).norm(dim=1).cpu()
            for g in grads
        ],
        dim=1,
    )
    by_step = by_step.double().cpu()
    k = torch.arange(by_step.shape[1])  # distances 0 .. max T + 1
    column = final[:, None] + 1 - k[None, :]  # [N, K+1]: the column of h_{T-k}
    norms = by_step.gather(1, column.clamp(min=0))
    return norms.masked_fill(column < 0, math.nan)


def gradient_flow(
    model: nn.Module,
    features: Tensor,
    captions: Tensor,
    lengths: Tensor,
    *,
    target: Target = "end",
    image_of_caption: Tensor | None = None,
    batch_size: int | None = None,
    label: str = "",
) -> GradientFlow:
    """The curve (:class:`GradientFlow`) of :func:`gradient_norms` over ``captions``, computed
    ``batch_size`` captions at a time (None: all at once). Same arguments."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if image_of_caption is not None:
        features = features[image_of_caption]
    n = captions.shape[0]
    if n == 0:
        raise UserError("gradient flow: no captions to measure")
    step = batch_size or n
    parts = [
        gradient_norms(
            model,
            features[i : i + step],
            captions[i : i + step],
            lengths[i : i + step],
            target=target,
        )
        for i in range(0, n, step)
    ]
    width = max(p.shape[1] for p in parts)
    norms = torch.cat([F.pad(p, (0, width - p.shape[1]), value=math.nan) for p in parts])
    return GradientFlow.from_norms(norms, label=label, target=target)


# ---------------------------------------------------------------------------------------------
# a checkpoint on the captions of a split


def model_label(model: nn.Module) -> str:
    """A curve's name for a model: its decoder's cell, and its attention if any ("GRU + soft")."""
    cfg = _decoder(model).cfg
    return cfg.cell.upper() if cfg.attention == "none" else f"{cfg.cell.upper()} + {cfg.attention}"


def measure_checkpoint(
    checkpoint: str | Path,
    *,
    split: str = "val",
    num_captions: int = 250,
    target: Target = "end",
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    label: str | None = None,
) -> GradientFlow:
    """The curve of a checkpoint (a file, a run directory or an exported folder, as
    ``captioner evaluate checkpoint=`` reads it) on the reference
    captions of the first images of ``split`` of the data it was trained on (``data_root``: the
    same dataset elsewhere), ``num_captions`` of them, every reference of an image in order.

    The encoder's features come from the feature cache under ``cache_dir`` for the whole split
    (the training run's own cache is a hit when its encoder was frozen), or with ``cache_dir``
    None from encoding just the images the captions need. Unreadable images are left out."""
    if num_captions < 1:
        raise UserError(f"gradient flow: num_captions must be >= 1, got {num_captions}")
    device = torch.device(device)
    _, model, vocab, pre, trained = load_model(str(checkpoint), device)
    data = resolve_data_config(trained, {"root": str(data_root) if data_root else None})
    records = load_split(data, split)
    used, total = 0, 0
    while used < len(records) and total < num_captions:
        total, used = total + len(records[used].captions), used + 1
    if total == 0:
        raise UserError(f"gradient flow: the {split} split of {data.root} has no captions")
    cache = None
    if cache_dir is not None:
        paths = [r.path for r in records]
        cache = build_feature_cache(model.encoder, pre, paths, cache_dir, device=device)
    source = image_source([r.path for r in records[:used]], pre, build_transform(pre), cache)
    feats, ids = [], []
    with torch.no_grad():
        for start in range(0, used, batch_size):
            batch = collate_images([source[i] for i in range(start, min(start + batch_size, used))])
            if len(batch["index"]):
                inputs = batch["inputs"].to(device)
                encoded = inputs if cache is not None else model.encode(inputs)
                for row, index in zip(encoded, batch["index"].tolist(), strict=True):
                    for caption in records[index].captions:
                        feats.append(row)
                        ids.append(encode_caption(vocab, caption, data.max_caption_len))
    if not ids:
        raise UserError(f"gradient flow: no image of the first {used} of {split} could be read")
    captions, lengths = pad_captions(ids[:num_captions], vocab.pad_id)
    return gradient_flow(
        model,
        torch.stack(feats[:num_captions]),
        captions,
        lengths,
        target=target,
        batch_size=batch_size,
        label=label or model_label(model),
    )


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UserError("plotting gradient flow needs matplotlib: pip install matplotlib") from exc
    return plt


def plot_gradient_flow(
    flows: Sequence[GradientFlow],
    ax: Axes | None = None,
    *,
    relative: bool = True,
    min_count: int = 1,
) -> Figure:
    """Several models' curves on one log-scale plot: ``relative`` (each caption's norm over its
    own at k = 0) or the mean norm, against the distance k, at the distances with at least
    ``min_count`` captions. Draws on ``ax`` (None: a new pyplot figure); returns its figure."""
    if not flows:
        raise UserError("gradient flow: no curves to plot")
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6.5, 4))
    for i, flow in enumerate(flows):
        keep = [j for j, n in enumerate(flow.count) if n >= min_count]
        values = flow.relative if relative else flow.mean_norm
        ax.plot(
            [flow.distance[j] for j in keep],
            [values[j] for j in keep],
            marker="o",
            markersize=3,
            label=flow.label or f"model {i + 1}",
        )
    ax.set_yscale("log")
    final = {"end": "<end>", "last_word": "the last word"}.get(flows[0].target, flows[0].target)
    ax.set_xlabel("distance k = T - t (steps back from the last prediction)")
    ax.set_ylabel(
        "||dL_T/dh_t|| / ||dL_T/dh_T||" if relative else "||dL_T/dh_t||  (mean over captions)"
    )
    ax.set_title(f"gradient of the loss of {final} at earlier hidden states")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax.figure
