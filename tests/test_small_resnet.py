"""The demo's encoder: ``model.encoder.source=builtin`` (:mod:`captioner.models.small_resnet`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captioner.configs.model import DecoderConfig, EncoderConfig, ModelConfig
from captioner.errors import UserError
from captioner.models.captioning import build_model
from captioner.models.encoders import create_encoder
from captioner.models.small_resnet import small_resnet, with_coordinates


def builtin(**overrides: object) -> EncoderConfig:
    return EncoderConfig(
        **{"source": "builtin", "name": "small_resnet", "weights": None, **overrides}
    )


def test_coordinates_are_appended_as_x_then_y_from_minus_one_to_one() -> None:
    images = torch.rand(2, 3, 4, 6)
    out = with_coordinates(images)
    assert out.shape == (2, 5, 4, 6)
    assert torch.equal(out[:, :3], images)
    x, y = out[0, 3], out[0, 4]
    assert torch.equal(x[0], torch.linspace(-1, 1, 6)) and torch.equal(x[3], x[0])  # along width
    assert torch.equal(y[:, 0], torch.linspace(-1, 1, 4)) and torch.equal(y[:, 5], y[:, 0])
    assert torch.equal(out[1, 3:], out[0, 3:])


def test_shapes_parameters_and_the_grid_at_64_px() -> None:
    torch.manual_seed(0)
    net = small_resnet("small_resnet").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert net(images).shape == (2, 256)
        assert net.forward_features(images).shape == (2, 256, 4, 4)  # 64 / 16
    # a quarter of ResNet-18's widths, one block a stage: 1.2 M parameters against 11.2 M
    assert 1.0e6 < sum(p.numel() for p in net.parameters()) < 1.5e6


def test_halves_pool_the_left_and_right_of_the_map_apart() -> None:
    torch.manual_seed(0)
    plain, halves = small_resnet("small_resnet").eval(), small_resnet("small_resnet_halves").eval()
    halves.load_state_dict(plain.state_dict())  # the same layers: only the pooling differs
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = plain.forward_features(images)  # [2, 256, 4, 4]
        out = halves(images)
        whole = plain(images)
    assert out.shape == (2, 512)
    left, right = out[:, 0::2], out[:, 1::2]  # each feature's left-half mean, then its right's
    # means of 8 float32 values of order 1: equal to a few ulps
    assert torch.allclose(left, maps[..., :2].mean((2, 3)), atol=1e-6)
    assert torch.allclose(right, maps[..., 2:].mean((2, 3)), atol=1e-6)
    assert torch.allclose(whole, (left + right) / 2, atol=1e-6)


def test_the_halves_encoder_attends_over_its_map_and_pools_512_features() -> None:
    enc, _ = create_encoder(builtin(name="small_resnet_halves"), pretrained=True)
    assert enc.feature_dim == 512
    enc, _ = create_encoder(builtin(name="small_resnet_halves"), pretrained=False, spatial=True)
    assert enc.feature_dim == 256  # what a grid position holds
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 64, 64)).shape == (2, 16, 256)


def test_encoder_builds_with_its_preprocessing_and_spatial_grid() -> None:
    enc, pre = create_encoder(builtin(), pretrained=True)
    assert (pre.resize, pre.crop, pre.mean, pre.std) == (64, 64, (0.5,) * 3, (0.25,) * 3)
    assert enc.feature_dim == 256 and type(enc.backbone).__name__ == "SmallResNet"
    enc, _ = create_encoder(builtin(), pretrained=False, spatial=True)
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 64, 64)).shape == (2, 16, 256)
    assert enc.grid_shape == (4, 4)
    assert [type(s).__name__ for s in enc.stages()][-4:] == ["Sequential"] * 4  # layer1..4


def test_a_weights_file_loads_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = small_resnet("small_resnet")
    path = tmp_path / "small.pth"
    torch.save(reference.state_dict(), path)
    enc, _ = create_encoder(builtin(weights_file=str(path)))
    assert torch.equal(enc.backbone.conv1.weight, reference.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"weights_file: .*does not fit small_resnet"):
        create_encoder(builtin(weights_file=str(path)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"name": "resnet18"},
            r"unknown builtin encoder 'resnet18' \(builtin: small_resnet, small_resnet_halves\)",
        ),
        ({"weights": "DEFAULT"}, r"small_resnet has no pretrained weights .*weights=null"),
    ],
)
def test_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        create_encoder(builtin(**overrides))


def test_unknown_source_names_the_builtin_one() -> None:
    with pytest.raises(UserError, match="'torchvision', 'timm' or 'builtin'"):
        EncoderConfig(source="keras")


@pytest.mark.parametrize("name", ["small_resnet", "small_resnet_halves"])
@pytest.mark.parametrize("attention", ["none", "soft", "topdown"])
def test_a_captioning_model_trains_its_encoder_end_to_end(attention: str, name: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        builtin(name=name, freeze=False),
        DecoderConfig(embed_dim=8, hidden_size=16, attention=attention, attention_dim=8),
    )
    model, _ = build_model(config, 12)
    images = torch.rand(2, 3, 64, 64)
    captions = torch.tensor([[1, 4, 5, 2], [1, 6, 2, 0]])
    logits = model(images, captions, torch.tensor([4, 3]))
    logits = logits[0] if isinstance(logits, tuple) else logits
    logits.logsumexp(-1).sum().backward()
    assert model.encoder.backbone.conv1.weight.grad.abs().sum() > 0


def test_the_demo_checkpoint_captions_without_importing_torchvision(tmp_path: Path) -> None:
    """The builtin encoder, like the torchvision-free ResNets, keeps ``captioner caption`` off
    torchvision's 1 s import (captioner.models.backbones says why that matters)."""
    import json
    import subprocess
    import sys
    import textwrap

    from test_backbones import FRESH_PROCESS, sample_images

    from captioner.checkpoint import model_payload, save_checkpoint
    from captioner.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab.build(["a red circle left of a blue square", "a small green circle"])
    config = ModelConfig(builtin(), DecoderConfig(embed_dim=8, hidden_size=16))
    model, pre = build_model(config, len(vocab), pretrained=False)
    checkpoint = save_checkpoint(model_payload(model, vocab, pre), tmp_path / "demo.pt")
    image = tmp_path / "image.png"
    sample_images()[0].save(image)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH_PROCESS), str(image), str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backbone"] == "captioner.models.small_resnet"
    assert not (report["after_import"] or report["after_rebuild"] or report["after_caption"])
    assert isinstance(report[f"caption {checkpoint}"], str)
