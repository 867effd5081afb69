"""Soft and top-down attention and the recurrent cells (LSTM, GRU, vanilla RNN): shapes of every
variant, the attention weights and the doubly stochastic regulariser, tiny attention models that
learn to look at a planted shape, checkpoints of every variant, the grid feature cache, attention
maps."""

from __future__ import annotations

import html
import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captioner.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
    save_checkpoint,
)
from captioner.configs.decode import DecodeConfig
from captioner.configs.model import DecoderConfig, EncoderConfig, ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.captions import pad_captions
from captioner.errors import UserError
from captioner.evaluation.attention_maps import (
    attention_figure,
    heat_overlay,
    map_sharpness,
    save_attention_figure,
)
from captioner.features import build_feature_cache
from captioner.inference import decode_features
from captioner.models.captioning import CaptionModel
from captioner.models.encoders import Encoder
from captioner.training.losses import attention_penalty, caption_loss
from captioner.training.objectives import TeacherForcing
from captioner.training.setup import init_weights as _init_weights
from captioner.vocab import Vocab, tokenize

V, FEAT, PAD, START, END = 12, 8, Vocab.pad_id, Vocab.start_id, Vocab.end_id
VOCAB = Vocab(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(4, V))])
CELLS = ["lstm", "gru", "rnn"]
ATTENTION = ["none", "soft", "topdown"]
ATTENDING = ["soft", "topdown"]
SEQS = [[START, 4, 5, 6, 7, END], [START, 8, END], [START, 9, 10, 4, END]]


class GridBackbone(nn.Module):
    """A timm-like CNN: ``forward_features`` gives a feature map [B, F, H/4, W/4], ``forward``
    its global average."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, FEAT, 4, stride=4), nn.BatchNorm2d(FEAT), nn.ReLU())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def tiny_model(
    cell: str = "lstm",
    attention: str = "soft",
    feature_mode: str = "init_state",
    num_layers: int = 1,
    grid: int | None = None,
    **decoder: object,
) -> CaptionModel:
    """The tiny captioner of :func:`helpers.tiny_model` on :class:`GridBackbone`, in eval mode."""
    return helpers.tiny_model(
        GridBackbone,
        FEAT,
        V,
        {"name": "grid", "weights": None, "grid": grid},
        **{
            "cell": cell,
            "attention": attention,
            "attention_dim": 7,
            "feature_mode": feature_mode,
            "num_layers": num_layers,
            **decoder,
        },
    ).eval()


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_captions(seqs, PAD)


# -- shapes ------------------------------------------------------------------------------------


MODES = ["init_state", "first_input", "zeros"]
# every cell x attention x feature_mode a decoder can be built with (a zero start needs attention)
BUILDABLE = [
    (cell, attention, mode)
    for cell, attention, mode in itertools.product(CELLS, ATTENTION, MODES)
    if not (mode == "zeros" and attention == "none")
]


@pytest.mark.parametrize(
    ("cell", "attention", "feature_mode", "layers"),
    [(*variant, layers) for variant in BUILDABLE for layers in (1, 2)],
)
def test_shapes_of_every_variant(cell: str, attention: str, feature_mode: str, layers: int) -> None:
    model = tiny_model(cell, attention, feature_mode, layers)
    images = torch.randn(3, 3, 16, 16)  # a 4 x 4 grid
    caps, lengths = padded(SEQS)
    feats = model.encode(images)
    assert feats.shape == ((3, FEAT) if attention == "none" else (3, 16, FEAT))
    state = model.decoder.init_state(feats)
    # the cells' tensors (top-down: the language cell's, then the attention cell's), then memory
    cells = (2 if cell == "lstm" else 1) * (2 if attention == "topdown" else 1)
    memory = {"none": [], "soft": [(16, 3, FEAT), (16, 3, 7)]}
    memory["topdown"] = [*memory["soft"], (1, 3, FEAT)]  # and the grid's mean
    assert [tuple(s.shape) for s in state] == [(layers, 3, 10)] * cells + memory[attention]
    if attention == "topdown":
        torch.testing.assert_close(state[-1][0], feats.mean(dim=1))
    if feature_mode == "zeros":  # the paper's start: nothing of the image in the cells
        assert all(not s.any() for s in state[:cells])
        assert not any(
            n.startswith(("init_", "feature_embed")) for n, _ in model.named_parameters()
        )
    logits, alpha = model(images, caps, lengths, return_attention=True)
    assert logits.shape == (3, 5, V)
    assert alpha is None if attention == "none" else alpha.shape == (3, 5, 16)
    step_logits, _ = model.decoder.step(caps[:, 0], state)
    assert step_logits.shape == (3, V)
    if cell != "lstm":  # GRU and RNN have no c0, so no init_c
        assert not hasattr(model.decoder, "init_c")


@pytest.mark.parametrize(("cell", "attention", "feature_mode"), BUILDABLE)
def test_stepping_equals_teacher_forcing(cell: str, attention: str, feature_mode: str) -> None:
    """Decoding's step function is teacher forcing's, one position at a time."""
    model = tiny_model(cell, attention, feature_mode, num_layers=2)
    feats = model.encode(torch.randn(3, 3, 16, 16))
    caps, lengths = padded(SEQS)
    with torch.no_grad():
        logits = model.decoder(feats, caps, lengths)
        state, steps = model.decoder.init_state(feats), []
        for t in range(caps.shape[1] - 1):
            out, state = model.decoder.step(caps[:, t], state)
            steps.append(out)
    # one step at a time vs the whole sequence through nn.LSTM/GRU/RNN: other kernels and shapes,
    # the same math. 1e-5 = 84 eps covers a few roundings per value over <= 5 steps of a
    # contractive (default init) recurrence; observed <= 0.01 of it on scalar, AVX2 and AVX-512
    torch.testing.assert_close(torch.stack(steps, dim=1), logits, atol=1e-5, rtol=1e-5)


def test_bad_cell_and_attention_are_user_errors() -> None:
    with pytest.raises(UserError, match=r"model\.decoder\.cell must be one of"):
        DecoderConfig(cell="transformer")
    with pytest.raises(UserError, match=r"model\.decoder\.attention must be one of"):
        DecoderConfig(attention="hard")
    with pytest.raises(UserError, match=r"model\.encoder\.grid must be >= 1"):
        EncoderConfig(grid=0)
    with pytest.raises(UserError, match=r"model\.decoder\.attention_penalty must be >= 0"):
        DecoderConfig(attention_penalty=-1.0)
    with pytest.raises(UserError, match=r"model\.decoder\.feature_mode must be one of"):
        DecoderConfig(feature_mode="image")
    with pytest.raises(UserError, match=r"feature_mode=zeros .* needs model\.decoder\.attention"):
        DecoderConfig(feature_mode="zeros")


@pytest.mark.parametrize("attention", ATTENDING)
def test_a_zero_start_reads_the_image_through_attention(attention: str) -> None:
    """``feature_mode=zeros``: two grids of one mean (what top-down's attention cell also reads)
    start from the same state, and yet their first words' logits differ: through attention."""
    model = tiny_model("lstm", attention, "zeros")
    gen = torch.Generator().manual_seed(3)
    grid, noise = torch.randn(2, 16, FEAT, generator=gen)
    noise = 10 * (noise - noise.mean(dim=0))  # large, zero-mean over the positions
    feats = torch.stack([grid, grid + noise])  # [2, P, F], equal means
    torch.testing.assert_close(feats[0].mean(dim=0), feats[1].mean(dim=0))
    with torch.no_grad():
        state = model.decoder.init_state(feats)
        logits, _ = model.decoder.step(torch.tensor([START, START]), state)
    n = 4 if attention == "topdown" else 2  # the cells' tensors
    assert all(torch.equal(s[:, 0], s[:, 1]) for s in state[:n])
    # float32 rounding of these O(1) logits is ~1e-6; the two contexts differ by the weights'
    # departure from uniform (small at init) times the noise: the logits by 1e-2 or more
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def composed(experiment: str, *more: str) -> dict:
    """The train config ``experiment=`` composes (with ``more`` overrides), as plain data."""
    from omegaconf import OmegaConf

    from captioner.configs.hydra import compose

    overrides = [f"experiment={experiment}", "model.encoder.weights_file=/w.pth", *more]
    return OmegaConf.to_container(compose("train", overrides), resolve=True)  # type: ignore[return-value]


def test_topdown_preset_is_the_attention_preset_with_the_topdown_decoder() -> None:
    """``experiment=flickr8k_topdown`` changes the decoder (and its penalty's weight) only: the
    same encoder, grid and feature cache as ``flickr8k_attention``, so the two compare on one
    cache."""
    topdown, soft = composed("flickr8k_topdown"), composed("flickr8k_attention")
    assert ModelConfig.from_dict(topdown["model"]).decoder.attention == "topdown"
    soft["model"]["decoder"]["attention"] = "topdown"
    soft["model"]["decoder"]["attention_penalty"] = 0.1
    soft["trainer"]["max_epochs"] = 8
    assert topdown == soft


def test_topdown_scst_preset_trains_the_topdown_model_the_scst_way() -> None:
    """``experiment=flickr8k_topdown_scst`` is ``flickr8k_topdown``'s model (so its best.pt is
    accepted by ``init_from``, and its grid cache reused) under ``flickr8k_scst``'s training,
    plus the warm-up, stopping sooner (where it levelled off on Flickr8k val)."""
    both = composed("flickr8k_topdown_scst", "init_from=/best.pt")
    assert both["model"] == composed("flickr8k_topdown")["model"]
    scst = composed("flickr8k_scst", "init_from=/best.pt")
    assert both["trainer"]["scst"] == {**scst["trainer"]["scst"], "warmup_steps": 120}
    assert both["trainer"].pop("max_epochs") < scst["trainer"].pop("max_epochs")
    del both["model"], scst["model"], both["trainer"]["scst"], scst["trainer"]["scst"]
    assert both == scst


@pytest.mark.parametrize(
    ("preset", "base"),
    [("flickr8k_topdown_finetune", "flickr8k_topdown"), ("flickr8k_finetune", "flickr8k")],
)
def test_finetune_preset_fine_tunes_its_base_model_batched_by_image(preset: str, base: str) -> None:
    """``experiment=flickr8k_topdown_finetune`` is ``flickr8k_topdown``'s architecture (its
    best.pt is accepted by ``init_from``, and ``flickr8k_topdown_scst`` accepts this one's), and
    ``flickr8k_finetune`` is the pooled ``flickr8k``'s: each with the encoder's last stages
    trained from the first epoch, by image, and no feature cache."""
    from captioner.configs.hydra import compose
    from captioner.configs.training import parse_train_config
    from captioner.training.setup import check_architecture

    finetune = composed(preset)
    start = composed(base)
    check_architecture(
        ModelConfig.from_dict(start["model"]), ModelConfig.from_dict(finetune["model"]), "x"
    )
    encoder = finetune["model"]["encoder"]
    assert (encoder["finetune_from_epoch"], encoder["finetune_last_stages"]) == (1, 4)
    assert encoder["lr"] < finetune["optim"]["lr"]
    data = finetune["data"]
    assert data["captions_per_image"] * data["batch_size"] >= start["data"]["batch_size"]
    overrides = [f"experiment={preset}", "model.encoder.weights_file=/w.pth"]
    with pytest.raises(UserError, match=r"^trainer\.cache_features=true needs a frozen encoder"):
        parse_train_config(compose("train", [*overrides, "trainer.cache_features=true"]))


def test_encoder_without_a_spatial_map_is_a_user_error() -> None:
    encoder = Encoder(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, FEAT)), FEAT, spatial=True)
    with pytest.raises(UserError, match="no spatial feature map known for Sequential"):
        encoder(torch.randn(1, 3, 4, 4))


# -- the attention weights ---------------------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENDING)
def test_weights_sum_to_one_over_positions_and_padded_steps_are_zero(attention: str) -> None:
    model = tiny_model("gru", attention)
    feats = model.encode(torch.randn(3, 3, 16, 16))
    caps, lengths = padded(SEQS)
    _, alpha = model.decoder(feats, caps, lengths, return_attention=True)
    for i, n in enumerate(lengths.tolist()):
        real, pads = alpha[i, : n - 1], alpha[i, n - 1 :]
        torch.testing.assert_close(real.sum(dim=-1), torch.ones(n - 1))
        assert (real > 0).all() and (pads == 0).all()
    # each caption attends over its own image only: alone in a batch, the same weights
    for i, seq in enumerate(SEQS):
        one, n = padded([seq])
        _, alone = model.decoder(feats[i : i + 1], one, n, return_attention=True)
        torch.testing.assert_close(alone[0], alpha[i, : len(seq) - 1])


def test_regulariser_is_zero_when_every_position_gets_total_weight_one() -> None:
    P = 4
    one_each = torch.eye(P)[None]  # step t looks only at position t: every position sums to 1
    assert float(attention_penalty(one_each)) == 0.0
    spread = torch.full((1, P, P), 1.0 / P)  # P steps of uniform weights: also 1 per position
    assert float(attention_penalty(spread)) == pytest.approx(0.0, abs=1e-12)
    stuck = torch.zeros(1, P, P)
    stuck[0, :, 0] = 1.0  # every step on position 0: (1 - 4)^2 + 3 * (1 - 0)^2
    assert float(attention_penalty(stuck)) == pytest.approx(12.0)
    # the mean over captions; a padded (all-zero) step adds nothing
    pad = torch.zeros(1, 1, P)
    batch = torch.cat([torch.cat([one_each, pad], dim=1), torch.cat([stuck, pad], dim=1)])
    assert batch.shape == (2, P + 1, P) and float(attention_penalty(batch)) == 6.0


@pytest.mark.parametrize("attention", ATTENDING)
def test_teacher_forcing_adds_the_weighted_regulariser(attention: str) -> None:
    model = tiny_model("lstm", attention).train()
    caps, lengths = padded(SEQS)
    batch = {
        "inputs": model.encode(torch.randn(3, 3, 16, 16)),
        "captions": caps,
        "lengths": lengths,
        "image_of_caption": torch.arange(3),
    }
    plain = TeacherForcing(PAD)(model, batch, features=True)
    out = TeacherForcing(PAD, attention_penalty=0.5)(model, batch, features=True)
    logits, alpha = model(batch["inputs"], caps, lengths, features=True, return_attention=True)
    expected = caption_loss(logits, caps, PAD) + 0.5 * attention_penalty(alpha)
    torch.testing.assert_close(out.loss, expected)
    assert out.logs["attention_penalty"] == pytest.approx(float(attention_penalty(alpha.detach())))
    assert out.logs["xe_loss"] == pytest.approx(float(caption_loss(logits.detach(), caps, PAD)))
    assert "attention_penalty" not in plain.logs
    out.loss.backward()
    assert model.decoder.attention.score.weight.grad.abs().sum() > 0
    attends = model.decoder.gate if attention == "soft" else model.decoder.attention_rnn
    assert all(p.grad.abs().sum() > 0 for p in attends.parameters())


# -- a tiny attention model learns where to look -------------------------------------------------

SHAPES = {"square": 10, "cross": 11}  # word ids of the two shapes


def planted(shape: str, corner: int, size: int = 16) -> torch.Tensor:
    """A black image with a white square or cross of 8 x 8 pixels in one of its four corners."""
    img = torch.zeros(3, size, size)
    r, c = divmod(corner, 2)
    y, x = r * (size // 2), c * (size // 2)
    patch = torch.zeros(8, 8)
    if shape == "square":
        patch[1:7, 1:7] = 1
    else:
        patch[3:5, :] = 1
        patch[:, 3:5] = 1
    img[:, y : y + 8, x : x + 8] = patch
    return img


def corner_cells(corner: int) -> list[int]:
    """The 2 x 2 cells of a 4 x 4 grid that cover ``corner``."""
    r, c = divmod(corner, 2)
    return [(2 * r + i) * 4 + 2 * c + j for i in (0, 1) for j in (0, 1)]


@pytest.mark.parametrize("attention", ATTENDING)
def test_tiny_attention_model_looks_at_the_planted_shape(attention: str) -> None:
    """Captions "a <shape>": to name the shape, the trained model's map for that word puts most
    of its weight on the corner where the shape is."""
    model = tiny_model("lstm", attention, hidden_size=16, embed_dim=8, attention_dim=16)
    cases = [(s, k) for s in SHAPES for k in range(4)]
    images = torch.stack([planted(s, k) for s, k in cases])
    with torch.no_grad():
        feats = model.encode(images)  # frozen random conv features, 4 x 4 grid
    caps, lengths = padded([[START, 4, SHAPES[s], END] for s, _ in cases])
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=0.02)
    model.train()
    for _ in range(150):
        loss = caption_loss(model.decoder(feats, caps, lengths), caps, PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    hyps = decode_features(model, feats, VOCAB, DecodeConfig())
    assert [h[0].tokens for h in hyps] == [[4, SHAPES[s]] for s, _ in cases]  # overfit
    maps = model.attention_maps(feats, caps, lengths)
    for (_, corner), m in zip(cases, maps, strict=True):
        weights = m[1].flatten()  # the step that names the shape
        assert weights[corner_cells(corner)].sum() > 0.5
        assert int(weights.argmax()) in corner_cells(corner)


@pytest.mark.parametrize("attention", ATTENDING)
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_maps_of_decoded_captions_are_the_weights_decoding_used(
    monkeypatch: pytest.MonkeyPatch, strategy: str, attention: str
) -> None:
    """``generate(..., attention=True)`` teacher-forces each decoded caption once more; its maps
    equal the weights the decoding steps computed for those words."""
    from captioner.inference import generate
    from captioner.models.attention import SoftAttention

    model = tiny_model("gru", attention, num_layers=2)
    used: list[torch.Tensor] = []
    forward = SoftAttention.forward

    def recording(self, grid, projected, query):  # type: ignore[no-untyped-def]
        context, alpha = forward(self, grid, projected, query)
        used.append(alpha)
        return context, alpha

    images = torch.randn(3, 3, 16, 16)
    batch = {"inputs": images, "index": torch.arange(3)}
    config = DecodeConfig(strategy=strategy, beam_size=2, max_len=6)
    hyps = generate(model, [batch], VOCAB, config, "cpu")
    monkeypatch.setattr(SoftAttention, "forward", recording)
    if strategy == "greedy":
        generate(model, [batch], VOCAB, config, "cpu")  # records every step's weights [3, P]
        decoded = torch.stack(used, dim=1)  # [3, steps, P]
    with_maps = generate(model, [batch], VOCAB, config, "cpu", attention=True)
    for i in range(3):
        h = with_maps[i][0]
        assert h.tokens == hyps[i][0].tokens and h.attention is not None
        assert h.attention.shape == (len(h.tokens), 4, 4)
        if strategy == "greedy":  # decoding's own weights of the steps that chose the words
            n = len(h.tokens)
            torch.testing.assert_close(h.attention.flatten(1), decoded[i, :n])


# -- checkpoints ---------------------------------------------------------------------------------


def spatial_config(cell: str, attention: str) -> ModelConfig:
    return ModelConfig(
        EncoderConfig(name="resnet18", weights=None, resize=64, crop=64, grid=None),
        DecoderConfig(embed_dim=8, hidden_size=12, cell=cell, attention=attention),
    )


@pytest.mark.parametrize(("cell", "attention"), list(itertools.product(CELLS, ATTENTION)))
def test_checkpoints_of_every_variant_round_trip(cell: str, attention: str, tmp_path: Path) -> None:
    from captioner.models.captioning import build_model

    vocab = Vocab.build(["a red circle", "a blue square"])
    torch.manual_seed(0)
    model, pre = build_model(spatial_config(cell, attention), len(vocab), pretrained=False)
    path = save_checkpoint(model_payload(model, vocab, pre), tmp_path / "best.pt")
    torch.manual_seed(1)
    loaded, _, _ = model_from_checkpoint(load_checkpoint(path))
    assert loaded.config == model.config
    assert loaded.encoder.grid_shape == (None if attention == "none" else (2, 2))
    images = torch.randn(2, 3, 64, 64)
    caps, lengths = padded([vocab.encode("a red circle"), vocab.encode("a blue square")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images, caps, lengths), model(images, caps, lengths))


def test_checkpoint_of_one_variant_refuses_to_load_as_another(tmp_path: Path) -> None:
    vocab = VOCAB
    gru = tiny_model("gru", "soft")
    path = save_checkpoint(model_payload(gru, vocab, Preprocessing(16, 16)), tmp_path / "gru.pt")
    for other, field in (
        (tiny_model("lstm", "soft"), "cell"),
        (tiny_model("gru", "none"), "attention"),
        (tiny_model("gru", "topdown"), "attention"),  # init_from a soft checkpoint into topdown
        (tiny_model("gru", "soft", attention_dim=9), "attention_dim"),
    ):
        with pytest.raises(UserError) as info:
            _init_weights(other, vocab, str(path))
        message = str(info.value)
        assert f"model.decoder.{field}=" in message and "\n" not in message, message
    # without attention, attention_dim names no weights: another value is no mismatch
    pooled = save_checkpoint(
        model_payload(tiny_model("gru", "none"), vocab, Preprocessing(16, 16)), tmp_path / "p.pt"
    )
    _init_weights(tiny_model("gru", "none", attention_dim=9), vocab, str(pooled))
    # a checkpoint whose weights contradict its own config: one line, not a state_dict dump
    ckpt = load_checkpoint(path)
    ckpt["model_config"]["decoder"]["cell"] = "lstm"
    ckpt["model_config"]["encoder"] = spatial_config("lstm", "soft").encoder.__dict__
    with pytest.raises(UserError, match="weights do not fit its model config") as info:
        model_from_checkpoint(ckpt)
    assert "\n" not in str(info.value)


def test_weight_averages_from_before_the_cell_option_still_load() -> None:
    """A last.pt's EMA of a pre-cell model names its LSTM weights ``decoder.lstm.*`` too."""
    from captioner.training.ema import ModelEMA

    model = tiny_model("lstm", "none").train()
    ema = ModelEMA(model, 0.9)
    state = ema.state_dict()
    state["averages"] = {
        k.replace("decoder.rnn.", "decoder.lstm."): v + 1.0 for k, v in state["averages"].items()
    }
    fresh = ModelEMA(model, 0.9)
    fresh.load_state_dict(state)
    for k, v in fresh.averages.items():
        assert torch.equal(v, ema.averages[k] + 1.0), k


def test_map_sharpness_is_one_for_a_uniform_map_and_zero_for_one_cell() -> None:
    """Entropy as a share of a uniform map's and the peak as a multiple of a uniform weight, per
    word, on maps whose values are known in closed form: uniform, one cell, two cells evenly
    (entropy log 2 / log 12, peak 6), and a padded word (NaN) read as all zeros."""
    h, w = 3, 4
    one = torch.zeros(h, w)
    one[1, 2] = 1.0
    two = torch.zeros(h, w)
    two[0, 0] = two[2, 3] = 0.5
    maps = torch.stack([torch.full((h, w), 1 / (h * w)), one, two, torch.full((h, w), math.nan)])
    entropy, peak = map_sharpness(maps)
    # the maps are float32 (1/12 to ~6e-8 relative), summed in float64: 1e-6 bounds both
    assert entropy.tolist() == pytest.approx([1.0, 0.0, math.log(2) / math.log(12), 0.0], abs=1e-6)
    assert peak.tolist() == pytest.approx([1.0, 12.0, 6.0, 0.0], abs=1e-6)


def test_a_swin_style_channels_last_map_gives_a_channels_first_grid() -> None:
    """torchvision's Swin gives its map as [B, h, w, F]: the grid has F-d features."""
    from captioner.models.encoders import create_encoder

    cfg = EncoderConfig(name="swin_t", weights=None, resize=64, crop=64, flip_average=True)
    encoder, _ = create_encoder(cfg, pretrained=False, spatial=True)
    assert (encoder.feature_dim, encoder.grid_shape, encoder.channels_last) == (768, (2, 2), True)
    encoder.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        grid = encoder(image)
        native = encoder.backbone.features(image).permute(0, 3, 1, 2)  # [1, F, h, w]
        mirrored = encoder.backbone.features(image.flip(-1)).permute(0, 3, 1, 2).flip(-1)
    assert grid.shape == (1, 4, 768)
    torch.testing.assert_close(grid, ((native + mirrored) / 2).flatten(2).transpose(1, 2))


def test_checkpoints_from_before_the_cell_option_still_load() -> None:
    """Their LSTM weights are under ``decoder.lstm.*``; now ``decoder.rnn.*``."""
    model = tiny_model("lstm", "none")
    state = {
        k.replace("decoder.rnn.", "decoder.lstm."): v.clone() + 1.0
        for k, v in model.state_dict().items()
    }
    assert any(k.startswith("decoder.lstm.") for k in state)
    model.load_state_dict(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k.replace("decoder.rnn.", "decoder.lstm.")]), k


# -- the grid feature cache ----------------------------------------------------------------------


def _images(tmp_path: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def test_grid_cache_has_the_grid_shape_in_its_key(tmp_path: Path) -> None:
    paths, pre, root = _images(tmp_path), Preprocessing(16, 16), tmp_path / "cache"
    caches = {}
    for grid in (None, 2, 1):
        model = tiny_model(attention="soft", grid=grid)
        caches[grid] = build_feature_cache(model.encoder, pre, paths, root)
    pooled = build_feature_cache(tiny_model(attention="none").encoder, pre, paths, root)
    assert caches[None].array.shape == (3, 16, FEAT)  # the native 4 x 4 grid
    assert caches[2].array.shape == (3, 4, FEAT)
    assert caches[1].array.shape == (3, 1, FEAT)
    assert pooled.array.shape == (3, FEAT)
    assert len({c.directory for c in [*caches.values(), pooled]}) == 4
    # the same grid again is a hit: same folder, nothing recomputed
    encoder = tiny_model(attention="soft", grid=2).encoder
    encoder.forward = lambda images: pytest.fail("a cache hit ran the encoder")  # type: ignore[method-assign]
    again = build_feature_cache(encoder, pre, paths, root)
    assert again.directory == caches[2].directory
    # the mean of a cached grid over its positions is the pooled feature (float16 apart)
    grids = torch.from_numpy(np.asarray(caches[None].array, dtype=np.float32))
    torch.testing.assert_close(
        grids.mean(dim=1),
        torch.from_numpy(np.asarray(pooled.array, dtype=np.float32)),
        atol=2e-3,
        rtol=2e-3,
    )


def test_cache_too_large_for_the_disk_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from captioner import features

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(features.shutil, "disk_usage", lambda _: usage._replace(free=100))
    paths, root = _images(tmp_path), tmp_path / "cache"
    with caplog.at_level("INFO", logger="captioner.features"), pytest.raises(UserError) as info:
        build_feature_cache(
            tiny_model(attention="soft").encoder, Preprocessing(16, 16), paths, root
        )
    message = str(info.value)
    assert "3 features x 16 x 8 float16 need 0.8 kB" in message, message  # 768 bytes
    assert "0.1 kB free" in message and "model.encoder.grid" in message
    assert "\n" not in message
    assert any("x 16 x 8 float16 =" in r.message for r in caplog.records)  # logged first
    assert not any(root.glob("*/*.npy")) and not any(root.glob("*/.*.tmp"))


# -- attention maps ------------------------------------------------------------------------------


def test_heat_overlay_is_hottest_where_the_weight_is() -> None:
    view = Image.new("RGB", (40, 40), (128, 128, 128))
    weights = torch.zeros(2, 2)
    weights[1, 0] = 1.0  # bottom left
    heat = np.asarray(heat_overlay(view, weights)).astype(int)
    assert heat.shape == (40, 40, 3)
    red_minus_blue = heat[..., 0] - heat[..., 2]
    assert red_minus_blue[35, 5] > 50 and red_minus_blue[5, 35] < -50  # jet: hot red, cold blue
    # on the caption's shared scale a word whose weights are spread thin stays cold everywhere,
    # instead of having its small differences stretched over the whole colour map
    spread = torch.tensor([[0.26, 0.25], [0.25, 0.24]])
    assert (np.asarray(heat_overlay(view, spread)).astype(int)[..., 0] > 150).any()  # own scale
    cold = np.asarray(heat_overlay(view, spread, vmax=1.0)).astype(int)
    assert (cold[..., 2] - cold[..., 0] > 50).all()


def test_attention_figure_has_the_image_and_one_panel_per_word(tmp_path: Path) -> None:
    view = Image.new("RGB", (32, 32))
    words = ["a", "dog", "runs", "on", "the", "grass"]
    maps = torch.rand(len(words), 3, 3)
    fig = attention_figure(view, words, maps)
    assert len(fig.axes) == 1 + len(words)
    assert [ax.get_title() for ax in fig.axes[1:]] == words
    path = save_attention_figure(tmp_path / "a.png", view, words, maps)
    with Image.open(path) as png:
        png.verify()
    with pytest.raises(ValueError, match="6 words but 2 attention maps"):
        attention_figure(view, words, maps[:2])


# -- a training run, SCST and the evaluation report --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("attention", ATTENDING)
def test_attention_run_trains_from_the_grid_cache_with_scst_and_reports_maps(
    make_cfg, tmp_path: Path, attention: str
) -> None:
    """A frozen encoder's grids are cached and trained on, the regulariser and the gradient norm
    (without clipping) are logged, an SCST epoch samples from the attending GRU (soft or
    top-down), and the evaluation report shows each entry's maps."""
    from captioner.configs.hydra import compose
    from captioner.evaluation.evaluate import evaluate
    from captioner.training.runlog import read_metrics
    from captioner.training.train import train

    run = tmp_path / "run"
    overrides = [
        "model.encoder.freeze=true",
        "model.encoder.resize=64",
        "model.encoder.crop=64",  # the demo's small ResNet: a 4 x 4 grid of 256-d features
        "model.decoder.cell=gru",
        f"model.decoder.attention={attention}",
        "model.decoder.attention_dim=16",
        "trainer.grad_clip=null",
        "trainer.scst.start_epoch=1",
        "trainer.scst.samples=2",
        "trainer.scst.max_len=6",
    ]
    train(make_cfg(*overrides), run)
    first, second = read_metrics(run / "metrics.jsonl")
    assert first["attention_penalty"] > 0 and first["grad_norm"] > 0
    assert first["grad_nonfinite"] == 0.0
    assert "scst_reward" in second and second["grad_norm"] > 0
    ckpt = load_checkpoint(run / "best.pt")
    cache = Path(ckpt["train_config"]["trainer"]["cache_dir"])
    shapes = sorted(np.load(f, mmap_mode="r").shape for f in cache.glob("*/features.npy"))
    assert (8, 16, 256) in shapes and (24, 16, 256) in shapes  # val and train grids, 4 x 4

    out = tmp_path / "eval"
    evaluate(compose("evaluate", [f"checkpoint={run / 'best.pt'}", "split=val", "report=true",
                                  "coco_metrics=false", "decode.max_len=6"]), out)  # fmt: skip
    page = (out / "report.html").read_text()
    rows = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert page.count('<details class="attention"') == len(rows) == 8
    # one map per word of every caption, with its word (the page draws them when opened)
    captions = [json.loads(html.unescape(w)) for w in re.findall(r'data-words="([^"]*)"', page)]
    assert Counter(w for words in captions for w in words) == Counter(
        w for row in rows for w in tokenize(row["caption"])
    )
