"""Unit tests of the model, its encoder builders, the loss and checkpoints (no training runs)."""

from __future__ import annotations

import pathlib
import pickle
import types

import helpers
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from captioner.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
    save_checkpoint,
)
from captioner.configs.decode import DecodeConfig
from captioner.configs.model import DecoderConfig, EncoderConfig, ModelConfig
from captioner.configs.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from captioner.errors import UserError
from captioner.inference import decode_features, hypothesis_text
from captioner.models.captioning import CaptionModel, build_model
from captioner.models.decoders import PooledDecoder
from captioner.models.encoders import Encoder, create_encoder
from captioner.training.losses import caption_loss
from captioner.vocab import Vocab

PAD = Vocab.pad_id
V, FEAT = 11, 8


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The network is off: any attempt to fetch torchvision weights is a test failure."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"weights download attempted: {args}")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)


def _block(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyBackbone(nn.Module):
    """Three conv+BN stages and a pool: [B, 3, H, W] -> [B, 8, 1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(3, 4), _block(4, 8), _block(8, FEAT))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))


def tiny_model(**decoder: object) -> CaptionModel:
    """The tiny captioner of :func:`helpers.tiny_model` on :class:`TinyBackbone`."""
    return helpers.tiny_model(TinyBackbone, FEAT, V, {"name": "tiny", "weights": None}, **decoder)


def padded(seqs: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> captions [N, T] padded with PAD, lengths [N]."""
    width = width or max(map(len, seqs))
    caps = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        caps[i, : len(s)] = torch.tensor(s)
    return caps, torch.tensor([len(s) for s in seqs])


SEQS = [[1, 4, 5, 6, 7, 2], [1, 8, 2], [1, 9, 10, 4, 2]]  # <start> .. <end>
ATTENTION = ["none", "soft", "topdown"]


def features(n: int, attention: str) -> torch.Tensor:
    """n random pooled features [n, F], or grids of 4 positions [n, 4, F] for a decoder that
    attends."""
    return torch.randn(n, FEAT) if attention == "none" else torch.randn(n, 4, FEAT)


def resnet18_config(**encoder: object) -> ModelConfig:
    enc = {"name": "resnet18", "weights": None, "resize": 32, "crop": 32, "freeze": True, **encoder}
    return ModelConfig(
        EncoderConfig(**enc), DecoderConfig(embed_dim=8, hidden_size=16, dropout=0.2)
    )


# ---------------------------------------------------------------------------------------------
# shapes, padding, packing


@pytest.mark.parametrize("feature_mode", ["init_state", "first_input"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_output_shapes(feature_mode: str, num_layers: int) -> None:
    model = tiny_model(feature_mode=feature_mode, num_layers=num_layers)
    caps, lengths = padded(SEQS)  # [3, 6]
    images = torch.randn(2, 3, 16, 16)
    owner = torch.tensor([0, 1, 1])  # caption -> image row
    assert model.encode(images).shape == (2, FEAT)
    assert model(images, caps, lengths, owner).shape == (3, 5, V)
    feats = torch.randn(3, FEAT)
    assert model(feats, caps, lengths, features=True).shape == (3, 5, V)
    h, c = model.decoder.init_state(feats)
    assert h.shape == c.shape == (num_layers, 3, 10)
    logits, (h2, c2) = model.decoder.step(torch.tensor([1, 1, 1]), (h, c))
    assert logits.shape == (3, V) and h2.shape == (num_layers, 3, 10)


def test_loss_ignores_padding_and_is_mean_ce_over_real_tokens() -> None:
    torch.manual_seed(0)
    caps, _ = padded(SEQS)
    logits = torch.randn(3, caps.shape[1] - 1, V)
    loss = caption_loss(logits, caps, PAD)

    targets = caps[:, 1:]
    real = targets != PAD
    by_hand = torch.cat(
        [
            F.cross_entropy(logits[i, real[i]], targets[i, real[i]], reduction="none")
            for i in range(3)
        ]
    ).mean()
    assert real.sum() == sum(len(s) - 1 for s in SEQS)
    torch.testing.assert_close(loss, by_hand)

    garbage = logits.clone()
    garbage[~real] = 1e4 * torch.randn_like(garbage[~real])
    assert torch.equal(caption_loss(garbage, caps, PAD), loss)


@pytest.mark.parametrize("attention", ATTENTION)
def test_padding_tokens_do_not_reach_logits_or_loss(attention: str) -> None:
    model = tiny_model(feature_mode="init_state", attention=attention).eval()
    caps, lengths = padded(SEQS)
    feats = features(3, attention)
    noisy = caps.clone()
    noisy[caps == PAD] = 9  # real word ids where the padding was
    clean_logits = model.decoder(feats, caps, lengths)
    noisy_logits = model.decoder(feats, noisy, lengths)
    real = caps[:, 1:] != PAD
    assert torch.equal(clean_logits[real], noisy_logits[real])
    assert torch.equal(caption_loss(clean_logits, caps, PAD), caption_loss(noisy_logits, caps, PAD))


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("feature_mode", ["init_state", "first_input"])
def test_logits_do_not_depend_on_padding_length_of_others(
    feature_mode: str, attention: str
) -> None:
    model = tiny_model(feature_mode=feature_mode, num_layers=2, attention=attention).eval()
    feats = features(3, attention)
    caps, lengths = padded(SEQS, width=12)  # unsorted lengths, all padded further
    batched = model.decoder(feats, caps, lengths)  # [3, 11, V]
    for i, seq in enumerate(SEQS):
        alone = model.decoder(feats[i : i + 1], *padded([seq]))  # [1, n-1, V]
        # [3, 11] vs [1, n-1] matrix shapes sum in other orders: rtol 1e-5 = 84 eps covers a few
        # roundings per value over <= 11 steps, which PyTorch's default init (a contractive
        # recurrence) does not amplify; observed <= 0.03 of it on scalar, AVX2 and AVX-512 kernels
        torch.testing.assert_close(batched[i, : len(seq) - 1], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ATTENTION)
def test_tied_weights_share_one_matrix_that_learns_from_both_ends(attention: str) -> None:
    model = tiny_model(embed_dim=10, hidden_size=10, tie_weights=True, attention=attention)
    dec = model.decoder
    assert dec.out.weight is dec.embed.weight
    assert dec.embed.weight.abs().max() <= 0.1 and not dec.embed.weight[PAD].any()
    params = list(dec.parameters())
    assert len(params) == len({id(p) for p in params})  # the optimizer sees it once
    untied = tiny_model(embed_dim=10, hidden_size=10, attention=attention)
    assert (
        sum(p.numel() for p in untied.decoder.parameters()) - sum(p.numel() for p in params)
        == V * 10
    )

    caps, lengths = padded(SEQS)
    feats = features(3, attention)
    loss = caption_loss(dec(feats, caps, lengths), caps)
    loss.backward()
    grad = dec.embed.weight.grad
    assert (
        grad[3].abs().sum() > 0
    )  # <unk> (id 3) is never an input: its gradient comes from the output layer
    assert not any(3 in s[:-1] for s in SEQS)


def test_tied_weights_need_equal_embedding_and_hidden_sizes() -> None:
    with pytest.raises(UserError, match="tie_weights=true needs embed_dim == hidden_size"):
        DecoderConfig(embed_dim=8, hidden_size=16, tie_weights=True)


def test_tied_checkpoint_round_trip_stays_tied(tmp_path: pathlib.Path) -> None:
    vocab = Vocab.build(["a red circle"])
    config = resnet18_config()
    config.decoder = DecoderConfig(embed_dim=16, hidden_size=16, tie_weights=True)
    model, pre = build_model(config, len(vocab))
    save_checkpoint(model_payload(model, vocab, pre), tmp_path / "m.pt")
    loaded, _, _ = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    assert loaded.decoder.out.weight is loaded.decoder.embed.weight
    assert torch.equal(loaded.decoder.out.weight, model.decoder.out.weight)


# ---------------------------------------------------------------------------------------------
# freezing


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in module.state_dict().items()
        if "running_" in k or "num_batches" in k
    }


def _train_step(model: CaptionModel, images: torch.Tensor) -> None:
    caps, lengths = padded(SEQS[:2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    loss = caption_loss(model(images, caps, lengths), caps, PAD)
    loss.backward()
    opt.step()


def test_frozen_encoder_gets_no_gradients_and_keeps_bn_stats() -> None:
    torch.manual_seed(0)
    model, _ = build_model(resnet18_config(freeze=True), V)
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    assert any(k.endswith("running_mean") for k in enc_before)

    _train_step(model, torch.randn(2, 3, 32, 32) * 3 + 1)

    assert model.training and model.decoder.training
    assert all(not m.training for m in model.encoder.modules())
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    for k, v in model.encoder.state_dict().items():  # weights AND running_mean/var/num_batches
        assert torch.equal(v, enc_before[k]), k
    assert any(not torch.equal(v, dec_before[k]) for k, v in model.decoder.state_dict().items())
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)


def test_unfrozen_encoder_does_train() -> None:
    """The counterpart of the test above: without freezing, BN stats and weights move."""
    torch.manual_seed(0)
    model, _ = build_model(resnet18_config(freeze=False), V)
    before = _bn_stats(model.encoder)
    _train_step(model, torch.randn(2, 3, 32, 32))
    assert all(m.training for m in model.encoder.modules())
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert not torch.equal(
        before["backbone.bn1.running_mean"], model.encoder.backbone.bn1.running_mean
    )


def test_frozen_batchnorm_trains_the_weights_and_keeps_the_statistics() -> None:
    """``model.encoder.frozen_batchnorm``: a fine-tuned encoder's BatchNorm layers normalise by
    their running statistics (eval mode, unchanged by a step) while every weight, the norms'
    scale and shift included, gets a gradient and moves."""
    torch.manual_seed(0)
    model, _ = build_model(resnet18_config(freeze=False, frozen_batchnorm=True), V)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    _train_step(model, torch.randn(2, 3, 32, 32) * 3 + 1)
    norms = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)
    assert model.decoder.training and model.encoder.backbone.conv1.training
    after = model.encoder.state_dict()
    for k, v in after.items():
        statistic = k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        assert torch.equal(v, before[k]) == statistic, k
    model.set_encoder_trainable(2)  # a later epoch's stages: the norms stay frozen
    model.train()
    assert all(not m.training for m in norms)


def test_finetune_last_stages_trains_only_those() -> None:
    torch.manual_seed(0)
    model, _ = build_model(resnet18_config(freeze=True), V)
    stages = model.encoder.stages()
    bb = model.encoder.backbone
    assert stages == [bb.conv1, bb.bn1, bb.layer1, bb.layer2, bb.layer3, bb.layer4]
    model.set_encoder_trainable(2)
    frozen, trainable = stages[:-2], stages[-2:]
    before = {i: _bn_stats(s) for i, s in enumerate(stages)}

    _train_step(model, torch.randn(2, 3, 32, 32))

    assert not model.encoder_frozen
    for i, stage in enumerate(stages):
        is_trainable = stage in trainable
        assert all(m.training == is_trainable for m in stage.modules()), i
        assert all(p.requires_grad == is_trainable for p in stage.parameters()), i
        assert all((p.grad is not None) == is_trainable for p in stage.parameters()), i
        stats_same = all(torch.equal(v, _bn_stats(stage)[k]) for k, v in before[i].items())
        assert stats_same != is_trainable or not before[i], i
    assert len(frozen) == 4

    model.set_encoder_trainable(None)  # whole encoder
    model.train()
    assert all(m.training for m in model.encoder.modules())
    assert all(p.requires_grad for p in model.encoder.parameters())
    model.set_encoder_trainable(0)  # frozen again, even under train()
    model.train()
    assert all(not m.training for m in model.encoder.modules())


# ---------------------------------------------------------------------------------------------
# encoder builders


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("resnet18", 512),
        ("mobilenet_v3_small", 576),
        ("efficientnet_b0", 1280),
        ("squeezenet1_1", 512),
    ],
)
def test_torchvision_heads_are_removed(name: str, dim: int) -> None:
    enc, pre = create_encoder(EncoderConfig(name=name, weights=None, resize=64, crop=64))
    assert enc.feature_dim == dim
    assert pre.crop == 64
    with torch.no_grad():
        assert enc.eval()(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_timm_encoder() -> None:
    pytest.importorskip("timm")
    enc, pre = create_encoder(
        EncoderConfig(source="timm", name="efficientnet_lite0", weights=None, resize=64, crop=64)
    )
    assert enc.feature_dim == 1280
    with torch.no_grad():
        assert enc.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1280)
    _, pre = create_encoder(EncoderConfig(source="timm", name="efficientnet_lite0", weights=None))
    assert (pre.resize, pre.crop) == (256, 224)  # from timm's pretrained_cfg (crop_pct 0.875)


def test_flip_average_is_the_mean_over_the_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    backbone = TinyBackbone().eval()
    plain, flipped = Encoder(backbone, FEAT), Encoder(backbone, FEAT, flip_average=True)
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = (plain(images) + plain(images.flip(-1))) / 2
        torch.testing.assert_close(flipped(images), want)
        assert not torch.allclose(flipped(images), plain(images))  # the images are asymmetric
        # flip-invariant by construction; a left-right symmetric image gives the plain features
        torch.testing.assert_close(flipped(images.flip(-1)), flipped(images))
        symmetric = torch.cat([images[..., :4], images[..., :4].flip(-1)], dim=-1)
        torch.testing.assert_close(flipped(symmetric), plain(symmetric))


def test_flip_average_survives_the_checkpoint(tmp_path: pathlib.Path) -> None:
    vocab = Vocab.build(["a red circle"])
    model, pre = build_model(resnet18_config(flip_average=True), len(vocab))
    assert model.encoder.flip_average
    save_checkpoint(model_payload(model, vocab, pre), tmp_path / "m.pt")
    loaded, _, _ = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    assert loaded.encoder.flip_average
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images), model.encode(images))


def test_unknown_encoder_and_weights_are_user_errors() -> None:
    with pytest.raises(UserError, match="model.encoder.name"):
        create_encoder(EncoderConfig(name="no_such_net", weights=None))
    with pytest.raises(UserError, match="model.encoder.weights"):
        create_encoder(EncoderConfig(name="resnet18", weights="IMAGENET9K_V9"))
    with pytest.raises(UserError, match="model.encoder.source"):
        EncoderConfig(source="keras")
    with pytest.raises(UserError, match="model.encoder.bogus"):
        ModelConfig.from_dict({"encoder": {"bogus": 1}})


def test_local_weights_file(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(123)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    torch.manual_seed(0)  # a different random init, which the file must overwrite
    enc, _ = create_encoder(EncoderConfig(name="resnet18", weights=None, weights_file=str(path)))
    expected = reference.state_dict()
    got = enc.backbone.state_dict()
    assert set(got) == set(expected) - {"fc.weight", "fc.bias"}
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k


def test_bad_weights_file_is_user_error(tmp_path: pathlib.Path) -> None:
    def build(path: pathlib.Path) -> None:
        create_encoder(EncoderConfig(name="resnet18", weights=None, weights_file=str(path)))

    with pytest.raises(UserError, match="not found"):
        build(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), wrong)
    with pytest.raises(UserError, match="does not fit resnet18"):
        build(wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="weights_file"):
        build(junk)


def test_preprocessing_from_weights_metadata_and_overrides(tmp_path: pathlib.Path) -> None:
    # weights come from a local file, metadata from the enum: nothing is downloaded
    # (MobileNet_V2_Weights.IMAGENET1K_V2 has ResNet50_Weights.IMAGENET1K_V2's 232/224 recipe)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    base = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V2", "weights_file": str(path)}

    _, pre = create_encoder(EncoderConfig(**base))
    assert (pre.resize, pre.crop, pre.interpolation) == (232, 224, "bilinear")
    assert pre.mean == pytest.approx(IMAGENET_MEAN) and pre.std == pytest.approx(IMAGENET_STD)

    _, pre = create_encoder(EncoderConfig(**base, crop=200, mean=[0.5, 0.5, 0.5]))
    assert (pre.resize, pre.crop, pre.mean) == (232, 200, (0.5, 0.5, 0.5))
    assert pre.std == pytest.approx(IMAGENET_STD)
    _, pre = create_encoder(EncoderConfig(**base, resize=128))  # crop follows a smaller resize
    assert (pre.resize, pre.crop) == (128, 128)
    with pytest.raises(UserError, match="preprocessing"):
        create_encoder(EncoderConfig(**base, resize=100, crop=200))

    # bicubic metadata, without any weights at all (pretrained=False: checkpoint rebuild)
    _, pre = create_encoder(
        EncoderConfig(name="efficientnet_b0", weights="IMAGENET1K_V1"), pretrained=False
    )
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bicubic")


# ---------------------------------------------------------------------------------------------
# a tiny model can learn


@pytest.mark.parametrize("feature_mode", ["init_state", "first_input"])
def test_tiny_decoder_overfits_a_handful_of_captions(feature_mode: str) -> None:
    captions = [
        "a red circle on the left",
        "two blue squares",
        "a small green triangle above a red circle",
        "the blue circle is on the right",
    ]
    vocab = Vocab.build(captions)
    torch.manual_seed(0)
    feats = torch.randn(4, 16)
    decoder = PooledDecoder(
        16, len(vocab), DecoderConfig(32, 64, dropout=0.0, feature_mode=feature_mode)
    )
    caps, lengths = padded([vocab.encode(c) for c in captions])
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    decoder.train()
    for _ in range(200):
        loss = caption_loss(decoder(feats, caps, lengths), caps, vocab.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05

    model = types.SimpleNamespace(decoder=decoder.eval())  # decoding needs only the decoder
    hyps = decode_features(model, feats, vocab, DecodeConfig(strategy="greedy", max_len=15))
    assert [hypothesis_text(h[0], vocab) for h in hyps] == captions
    assert all(h[0].finished for h in hyps)
    beams = decode_features(model, feats, vocab, DecodeConfig(strategy="beam", beam_size=3))
    assert [hypothesis_text(h[0], vocab) for h in beams] == captions


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture
def saved(tmp_path: pathlib.Path) -> tuple[pathlib.Path, CaptionModel, Vocab, Preprocessing]:
    torch.manual_seed(0)
    vocab = Vocab.build(["a red circle", "a blue square"])
    model, pre = build_model(resnet18_config(freeze=False), len(vocab))
    model.train()
    with torch.no_grad():  # move the BN running stats away from their init
        model.encode(torch.randn(4, 3, 32, 32) * 2 + 1)
    path = save_checkpoint(model_payload(model, vocab, pre), tmp_path / "run" / "best.pt")
    return path, model, vocab, pre


def test_checkpoint_round_trip_gives_identical_logits(saved) -> None:
    path, model, vocab, pre = saved
    torch.manual_seed(1)  # the rebuild's random init differs; the saved weights must win
    loaded, vocab2, pre2 = model_from_checkpoint(load_checkpoint(path))
    assert vocab2 == vocab and pre2 == pre and loaded.config == model.config
    assert not loaded.training
    images = torch.randn(2, 3, 32, 32)
    caps, lengths = padded([vocab.encode("a red circle"), vocab.encode("a blue square")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images, caps, lengths), model(images, caps, lengths))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


class _Evil:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.marker,))


def _one_line_error(path: pathlib.Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_refuses_bad_files(saved, tmp_path: pathlib.Path) -> None:
    path, *_ = saved
    _one_line_error(tmp_path / "missing.pt", "not found")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _one_line_error(truncated, "truncated or corrupt")

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    _one_line_error(other, "not a captioner checkpoint")

    marker = tmp_path / "PWNED"
    evil_torch, evil_pickle = tmp_path / "evil.pt", tmp_path / "evil.pkl"
    torch.save({"format": "captioner/1", "model": _Evil(marker)}, evil_torch)
    evil_pickle.write_bytes(pickle.dumps({"format": "captioner/1", "x": _Evil(marker)}))
    assert not marker.exists()
    for evil in (evil_torch, evil_pickle):
        with pytest.raises(UserError) as info:
            load_checkpoint(evil)
        assert "\n" not in str(info.value)
        assert not marker.exists(), "unpickling executed code"
    pickle.loads(evil_pickle.read_bytes())  # the payload is real: plain pickle runs it
    assert marker.exists()


def test_atomic_save_keeps_previous_file_on_failure(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    path, *_ = saved
    before = path.read_bytes()

    def broken_save(obj: object, f, *args: object, **kwargs: object) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": "captioner/1"}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]
    load_checkpoint(path)


def test_teacher_forcing_equals_the_packed_lstm_in_loss_and_gradients() -> None:
    """The decoder runs the LSTM on the padded batch (faster on a CPU): the loss and every
    gradient are those of packing the sequences to their lengths."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    model = tiny_model(feature_mode="init_state", dropout=0.0)
    dec = model.decoder
    caps, lengths = padded(SEQS, width=9)
    feats = torch.randn(3, FEAT)

    def packed_logits() -> torch.Tensor:
        x = dec.embed(caps[:, :-1])
        seq = pack_padded_sequence(x, lengths - 1, batch_first=True, enforce_sorted=False)
        out, _ = dec.rnn(seq, dec.init_state(feats))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=caps.shape[1] - 1)
        return dec.out(out)

    grads = []
    for logits in (lambda: dec(feats, caps, lengths), packed_logits):
        dec.zero_grad()
        loss = caption_loss(logits(), caps, PAD)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in dec.named_parameters()}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    # the same sums over other shapes (padded vs packed): the loss, a mean over ~10 tokens, is
    # within ~8 eps (1e-6); gradients sum over tokens and steps of backpropagation, 84 eps (1e-5);
    # observed <= 0.06 of these bounds on scalar, AVX2 and AVX-512 kernels
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-5, atol=1e-7, msg=name)
