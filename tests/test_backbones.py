"""The caption path without torchvision: the native ResNets of :mod:`captioner.models.backbones` and the
eval transform of :mod:`captioner.datasets.captions` against torchvision's own, bit for bit, and a fresh
process that rebuilds and runs a checkpoint's model without importing torchvision."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

from captioner.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
    save_checkpoint,
)
from captioner.configs.model import DecoderConfig, EncoderConfig, ModelConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.images import (
    PIL_FILTERS,
    EvalTransform,
    build_transform,
    model_view,
    to_rgb,
)
from captioner.errors import UserError
from captioner.features import encoder_fingerprint
from captioner.models import backbones, encoders
from captioner.models.backbones import RESNET_WEIGHTS, RESNETS, resnet
from captioner.models.captioning import build_model
from captioner.models.encoders import (
    Encoder,
    _strip_torchvision_head,
    _torchvision_backbone,
    create_encoder,
)
from captioner.vocab import Vocab

NAMES = list(RESNETS)


def torchvision_resnet(name: str) -> torch.nn.Module:
    """What ``_torchvision_backbone`` built before: torchvision's model, head stripped."""
    return _strip_torchvision_head(torchvision.models.get_model(name, weights=None))


def randomise_batchnorm(net: torch.nn.Module, seed: int) -> None:
    """Fresh BatchNorms are the identity in eval mode (mean 0, var 1, weight 1, bias 0): give
    them values, so that a BatchNorm swapped or skipped shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture
def use_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``_torchvision_backbone`` take torchvision's path for every name, as it did."""
    monkeypatch.setattr(encoders, "RESNETS", {})


# -- the native ResNets -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_native_resnet_has_torchvisions_state_dict_and_initialisation(name: str) -> None:
    torch.manual_seed(7)
    want = torchvision_resnet(name)
    torch.manual_seed(7)
    got = resnet(name)
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert list(got_sd) == list(want_sd)  # same keys, same order
    for key, value in want_sd.items():
        assert got_sd[key].shape == value.shape, key
        assert got_sd[key].dtype == value.dtype, key
        # created and initialised in torchvision's order: the same random values
        assert torch.equal(got_sd[key], value), key
    # the same RNG state afterwards: what is built next (the decoder) is initialised alike
    after_native = torch.rand(3)
    torch.manual_seed(7)
    torchvision_resnet(name)
    assert torch.equal(after_native, torch.rand(3))
    assert [n for n, _ in got.named_children()] == [n for n, _ in want.named_children()]
    assert type(got).__name__ == type(want).__name__ == "ResNet"  # the feature cache's tag


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])  # 101/152: same blocks
def test_native_resnet_computes_what_torchvisions_does(name: str) -> None:
    torch.manual_seed(0)
    reference = torchvision_resnet(name)
    randomise_batchnorm(reference, seed=1)
    native = resnet(name)  # other random weights, overwritten by the reference's
    native.load_state_dict(reference.state_dict())
    reference.eval(), native.eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        want, got = reference(images), native(images)
        assert got.shape == (2, 512 if name in ("resnet18", "resnet34") else 2048)
        assert torch.equal(got, want)
        # the map soft attention reads (Encoder.feature_map: conv1 .. layer4)
        want_map = Encoder(reference, 0).feature_map(images)
        got_map = Encoder(native, 0).feature_map(images)
        assert got_map.shape == want_map.shape == (2, got.shape[1], 2, 3)
        assert torch.equal(got_map, want_map)
    assert encoder_fingerprint(Encoder(native, 0)) == encoder_fingerprint(Encoder(reference, 0))
    assert len(Encoder(native, 0).stages()) == len(Encoder(reference, 0).stages()) == 6


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("spatial", [False, True])
def test_checkpoint_rebuild_is_native_and_equals_the_torchvision_build(
    name: str, spatial: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = EncoderConfig(name=name, weights=None, resize=64, crop=64, grid=None)
    torch.manual_seed(3)
    native, native_pre = create_encoder(cfg, pretrained=False, spatial=spatial)
    assert type(native.backbone) is backbones.ResNet  # not torchvision's class
    monkeypatch.setattr(encoders, "RESNETS", {})
    torch.manual_seed(3)
    reference, reference_pre = create_encoder(cfg, pretrained=False, spatial=spatial)
    assert type(reference.backbone) is torchvision.models.ResNet
    assert native_pre == reference_pre
    assert (native.feature_dim, native.grid_shape) == (
        reference.feature_dim,
        reference.grid_shape,
    )
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(native.eval()(images), reference.eval()(images))


def resnet_weight_choices() -> list[tuple[str, str | None]]:
    names = [(n, w) for n in NAMES for w in [None, *torchvision.models.get_model_weights(n)]]
    return [(n, w if w is None else w.name) for n, w in names] + [(n, "DEFAULT") for n in NAMES]


@pytest.mark.parametrize(("name", "weights"), resnet_weight_choices())
def test_native_path_returns_the_preprocessing_torchvisions_metadata_gives(
    name: str, weights: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the preprocessing does not depend on the network: build a small one either way
    monkeypatch.setattr(encoders, "resnet", lambda name: torch.nn.Linear(1, 1))
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights: small_resnet())
    cfg = EncoderConfig(name=name, weights=weights)
    _, got = _torchvision_backbone(cfg, pretrained=False)
    monkeypatch.setattr(encoders, "RESNETS", {})
    _, want = _torchvision_backbone(cfg, pretrained=False)
    assert got == want


def small_resnet() -> torch.nn.Module:
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


def test_weights_table_is_torchvisions() -> None:
    for name in NAMES:
        enum = torchvision.models.get_model_weights(name)
        assert list(RESNET_WEIGHTS[name]) == list(enum.__members__)
        for key, resize in RESNET_WEIGHTS[name].items():
            tf = enum[key].transforms()
            assert (tf.resize_size, tf.crop_size) == ([resize], [backbones.RESNET_CROP]), key
            assert tuple(tf.mean) == Preprocessing(8, 8).mean
            assert tuple(tf.std) == Preprocessing(8, 8).std
            assert tf.interpolation.value == "bilinear"


def test_unknown_weights_is_the_same_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = EncoderConfig(name="resnet50", weights="IMAGENET9K_V9")
    with pytest.raises(UserError, match="model.encoder.weights") as native:
        _torchvision_backbone(cfg, pretrained=False)
    monkeypatch.setattr(encoders, "RESNETS", {})
    with pytest.raises(UserError) as reference:
        _torchvision_backbone(cfg, pretrained=False)
    assert str(native.value) == str(reference.value)


def test_pretrained_and_other_models_still_use_torchvision() -> None:
    backbone, _ = _torchvision_backbone(EncoderConfig(name="resnet18", weights=None), True)
    assert type(backbone) is torchvision.models.ResNet
    backbone, _ = _torchvision_backbone(EncoderConfig(name="resnext50_32x4d", weights=None), False)
    assert type(backbone) is torchvision.models.ResNet


# -- the eval transform -------------------------------------------------------------------------


def torchvision_eval_transform(pre: Preprocessing) -> T.Compose:
    """The eval transform as build_transform made it with torchvision."""
    interp = T.InterpolationMode(pre.interpolation)
    return T.Compose(
        [
            T.Resize(pre.resize, interpolation=interp, antialias=True),
            T.CenterCrop(pre.crop),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def test_every_interpolation_torchvision_knows_is_mapped_to_its_pil_filter() -> None:
    from torchvision.transforms.functional import pil_modes_mapping

    assert set(PIL_FILTERS) == {m.value for m in T.InterpolationMode}
    for mode, pil in pil_modes_mapping.items():
        assert PIL_FILTERS[mode.value] == pil, mode


def sample_images() -> list[Image.Image]:
    """Odd sizes, portrait and landscape, smaller than the crop (upscaled), already at the
    resize size, grayscale and palette images (converted to RGB as load_image does)."""
    rng = np.random.default_rng(0)

    def noise(w: int, h: int) -> Image.Image:
        smooth = rng.integers(0, 256, (h // 3 + 2, w // 3 + 2, 3), dtype=np.uint8)
        big = Image.fromarray(smooth).resize((w, h), Image.Resampling.BICUBIC)
        return Image.fromarray(
            np.clip(
                np.asarray(big, dtype=np.int16) + rng.integers(-40, 41, (h, w, 3)), 0, 255
            ).astype(np.uint8)
        )

    images = [noise(w, h) for w, h in [(97, 61), (61, 97), (40, 40), (33, 47), (5, 9), (300, 7)]]
    images.append(to_rgb(noise(57, 43).convert("L")))
    images.append(to_rgb(noise(45, 70).convert("P")))
    return images


PREPROCESSINGS = [
    Preprocessing(40, 40),  # the tiny runs' square input
    Preprocessing(40, 33, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3)),  # odd center offsets
    Preprocessing(64, 56),
    Preprocessing(11, 8),
]


@pytest.mark.parametrize("interpolation", list(PIL_FILTERS))
def test_eval_transform_equals_torchvisions_bit_for_bit(interpolation: str) -> None:
    for pre in PREPROCESSINGS:
        pre = Preprocessing(pre.resize, pre.crop, pre.mean, pre.std, interpolation)
        ours, theirs = build_transform(pre), torchvision_eval_transform(pre)
        for img in sample_images():
            got, want = ours(img), theirs(img)
            assert got.dtype == want.dtype == torch.float32
            assert got.shape == want.shape == (3, pre.crop, pre.crop), (img.size, pre)
            assert torch.equal(got, want), (img.size, pre)
            # the attention map's backdrop: the same pixels, before ToTensor
            view = model_view(img, pre)
            want_view = T.Compose(torchvision_eval_transform(pre).transforms[:2])(img)
            assert view.size == want_view.size
            assert np.array_equal(np.asarray(view), np.asarray(want_view)), (img.size, pre)


def test_eval_transform_is_the_shared_eval_path_and_pickles() -> None:
    pre = Preprocessing(48, 40, interpolation="bicubic")
    transform = build_transform(pre, train=True, augment=False)
    assert isinstance(transform, EvalTransform)
    clone = pickle.loads(pickle.dumps(transform))  # DataLoader workers get a copy
    img = sample_images()[0]
    assert torch.equal(clone(img), torchvision_eval_transform(pre)(img))
    with pytest.raises(UserError, match="interpolation"):  # Preprocessing itself refuses it
        EvalTransform(Preprocessing(8, 8, interpolation="cubic-ish"))


# -- no torchvision on the caption path ---------------------------------------------------------

FRESH_PROCESS = """
import json, sys
import torch
torch.set_num_threads(1)
import captioner.cli.caption, captioner.inference, captioner.checkpoint, captioner.pretrained
report = {"after_import": "torchvision" in sys.modules}
from captioner.checkpoint import load_checkpoint, model_from_checkpoint
from captioner.inference import Captioner
image, checkpoints = sys.argv[1], sys.argv[2:]
for checkpoint in checkpoints:
    model, vocab, pre = model_from_checkpoint(load_checkpoint(checkpoint))
    report["after_rebuild"] = "torchvision" in sys.modules
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    report["caption " + checkpoint] = captioner.caption([image])[0].caption
    with torch.no_grad():
        features = model.encode(captioner._tensor(image)[None])
    torch.save(features, checkpoint + ".features")
    report["backbone"] = type(model.encoder.backbone).__module__
report["after_caption"] = "torchvision" in sys.modules
print(json.dumps(report))
"""


def demo_like_checkpoint(path: Path, attention: str) -> Path:
    """A ResNet-18 at 64 px, as the demo model (untrained: it captions all the same)."""
    torch.manual_seed(0)
    vocab = Vocab.build(["a red circle left of a blue square", "a small green circle"])
    config = ModelConfig(
        EncoderConfig(name="resnet18", weights=None, resize=64, crop=64),
        DecoderConfig(embed_dim=8, hidden_size=16, attention=attention, attention_dim=8),
    )
    built, pre = build_model(config, len(vocab), pretrained=False)
    randomise_batchnorm(built, seed=2)
    return save_checkpoint(model_payload(built, vocab, pre), path)


def test_a_fresh_process_captions_without_importing_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = [demo_like_checkpoint(tmp_path / f"{a}.pt", a) for a in ("none", "soft")]
    image = tmp_path / "image.png"
    sample_images()[0].save(image)

    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH_PROCESS), str(image)]
        + [str(c) for c in checkpoints],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["after_import"], "importing the caption path imports torchvision"
    assert not report["after_rebuild"], "rebuilding a ResNet-18 checkpoint imports torchvision"
    assert not report["after_caption"], "captioning imports torchvision"
    assert report["backbone"] == "captioner.models.backbones"
    assert all(isinstance(report[f"caption {c}"], str) for c in checkpoints)

    # the same features (pooled, and the grid attention reads) as torchvision's model and
    # transform give, here
    monkeypatch.setattr(encoders, "RESNETS", {})
    for checkpoint in checkpoints:
        reference, _, reference_pre = model_from_checkpoint(load_checkpoint(checkpoint))
        assert type(reference.encoder.backbone) is torchvision.models.ResNet
        x = torchvision_eval_transform(reference_pre)(to_rgb(Image.open(image)))
        with torch.no_grad():
            want = reference.encode(x[None])
        got = torch.load(f"{checkpoint}.features", weights_only=True)
        assert got.shape == want.shape and torch.equal(got, want), checkpoint
