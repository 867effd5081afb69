"""The fast decode path (``Preprocessing.fast_decode``): JPEGs decoded at a reduced DCT scale and
resized by PyTorch's vectorised kernel, for new models; checkpoints written before it existed
keep the exact path; one decode path for the feature cache, training, evaluation, ``caption``
and ``serve``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.configs.model import EncoderConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.images import (
    EvalTransform,
    ImageDataset,
    build_transform,
    load_image,
    load_image_bytes,
)
from captioner.errors import UserError
from captioner.features import image_source
from captioner.inference import Captioner
from captioner.models.encoders import create_encoder


def smooth_photo(path: Path, size: tuple[int, int] = (640, 480), quality: int = 95) -> Path:
    """A JPEG of smooth colour gradients (what a photo's large areas look like)."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(3 * x + 2 * y)], axis=-1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path, quality=quality)
    return path


def test_old_dicts_read_as_the_exact_path_and_round_trip():
    old = {"resize": 256, "crop": 224}  # a checkpoint written before fast_decode existed
    pre = Preprocessing.from_dict(old)
    assert pre.fast_decode is False and pre.draft_to is None
    # the exact path writes the same dict as before: same checkpoints, config.json, cache keys
    assert "fast_decode" not in pre.to_dict()
    fast = dataclasses.replace(pre, fast_decode=True)
    assert fast.to_dict()["fast_decode"] is True and fast.draft_to == 256
    assert Preprocessing.from_dict(fast.to_dict()) == fast
    with pytest.raises(UserError, match=r"preprocessing\.fast_decode must be true or false"):
        Preprocessing.from_dict({**old, "fast_decode": "yes"})


def test_new_models_take_the_fast_path_unless_configured_off():
    cfg = EncoderConfig(source="builtin", name="small_resnet", weights=None)
    assert create_encoder(cfg, pretrained=False)[1].fast_decode is True
    off = dataclasses.replace(cfg, fast_decode=False)
    assert create_encoder(off, pretrained=False)[1].fast_decode is False


def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_resize(tmp_path):
    path = smooth_photo(tmp_path / "p.jpg")
    assert load_image(path).size == (640, 480)
    assert load_image(path, 232).size == (320, 240)  # 1/2: 240 >= 232
    assert load_image(path, 256).size == (640, 480)  # 1/2 would be 240 < 256
    assert load_image(path, 60).size == (80, 60)  # 1/8, the smallest libjpeg has
    assert load_image_bytes(path.read_bytes(), "p.jpg", 232).size == (320, 240)
    png = tmp_path / "p.png"
    Image.open(path).save(png)
    assert load_image(png, 60).size == (640, 480)  # no DCT to reduce: decoded whole


def test_exif_orientation_is_applied_to_the_reduced_decode(tmp_path):
    img = Image.open(smooth_photo(tmp_path / "p.jpg"))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    img.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "turned.jpg").size == (480, 640)
    assert load_image(tmp_path / "turned.jpg", 232).size == (240, 320)


def test_the_fast_path_sees_the_same_picture(tmp_path):
    path = smooth_photo(tmp_path / "p.jpg")
    exact = Preprocessing(232, 224, interpolation="bilinear")
    fast = dataclasses.replace(exact, fast_decode=True)
    a = EvalTransform(exact)(load_image(path))
    b = EvalTransform(fast)(load_image(path, fast.draft_to))
    assert a.shape == b.shape == (3, 224, 224)
    # Both are low-pass versions of the same smooth picture, sampled at the same positions (the
    # crop's box in source coordinates), and both filters pass a linear gradient unchanged: they
    # differ by the two decodes' JPEG rounding at quality 95 (up to a level each) and the final
    # rounding to 8 bits (half a level each), so at most 3 levels on any pixel, far less on
    # average. Normalised units: levels / 255 / std.
    levels = (a - b).abs() * torch.tensor(exact.std).view(3, 1, 1) * 255
    assert levels.mean() < 1 and levels.max() <= 3 + 1e-3
    # a different decode, not the same one: the flag does something
    assert not torch.equal(a, b)


def test_the_fast_path_resizes_a_png_as_the_exact_path(tmp_path):
    """A PNG has no DCT scale: fast_decode resizes the full image at the exact path's sample
    positions, with PyTorch's port of Pillow's filter (the rounding bound is in the next test)."""
    png = tmp_path / "p.png"
    Image.open(smooth_photo(tmp_path / "p.jpg", quality=100)).save(png)
    exact = Preprocessing(232, 224, interpolation="bicubic")
    fast = dataclasses.replace(exact, fast_decode=True)
    a = EvalTransform(exact)(load_image(png))
    b = EvalTransform(fast)(load_image(png, fast.draft_to))
    levels = (a - b).abs() * torch.tensor(exact.std).view(3, 1, 1) * 255
    assert levels.max() <= 3 + 1e-3


def noisy_picture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth gradients plus pixel noise: every rounding of the resize is exercised."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(9 * x + 5 * y)], axis=-1) * 200
    noise = rng.integers(0, 56, size=(h, w, 3))
    return Image.fromarray((base + noise).round().astype(np.uint8))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    "size, resize, crop",
    [((320, 240), 232, 224), ((224, 224), 292, 260), ((400, 300), 292, 260), ((237, 411), 64, 56)],
)
def test_the_fast_resize_is_pillows_up_to_rounding(interpolation, size, resize, crop):
    """fast_decode resizes with PyTorch's antialiased 8-bit kernel (AVX2 or scalar code by CPU,
    both run in CI), the exact path with Pillow's: the same filter at the same positions, with
    weights and sums rounded differently. Each of the two separable passes rounds its result to
    8 bits, so one pass alone moves an output by at most a level; the second pass's weights
    spread the first's difference by at most sum |w|, which is 1 for bilinear (weights >= 0) and
    at most 1.25 for Pillow's bicubic (a = -0.5, lobes of -0.0625 at worst): at most 2 levels
    bilinear, 1 + 1.25 + 1 -> 3 bicubic. Differences need a sum near a rounding boundary, so
    they are rare."""
    img = noisy_picture(np.random.default_rng(0), *size)
    exact = Preprocessing(resize, crop, interpolation=interpolation)
    fast = dataclasses.replace(exact, fast_decode=True)
    a = EvalTransform(exact).pixels(img).to(torch.int16)
    b = EvalTransform(fast).pixels(img).to(torch.int16)
    assert a.shape == b.shape == (3, crop, crop)
    diff = (a - b).abs()
    assert diff.max() <= (2 if interpolation == "bilinear" else 3)
    assert (diff > 0).float().mean() < 0.05


def test_the_fast_path_draws_and_reads_the_same_pixels(tmp_path):
    """What an attention map is drawn over (geometry) is what the model reads (the tensor)."""
    img = noisy_picture(np.random.default_rng(1), 320, 240)
    transform = EvalTransform(Preprocessing(232, 224, fast_decode=True))
    assert torch.equal(transform.to_tensor(transform.geometry(img)), transform(img))


@pytest.mark.parametrize(
    "size, interpolation, mode",
    [
        ((3000, 40), "bilinear", "RGB"),
        ((320, 240), "lanczos", "RGB"),
        ((320, 240), "bilinear", "L"),
    ],
)
def test_the_fast_path_falls_back_to_the_crop_only_resample(monkeypatch, size, interpolation, mode):
    """A long strip (its whole resize would be 17x the crop), a filter PyTorch's kernel lacks, a
    one-channel image: Pillow resamples the crop's region alone, PyTorch's resize never runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("PyTorch's resize ran")

    monkeypatch.setattr(torch.nn.functional, "interpolate", refuse)
    img = noisy_picture(np.random.default_rng(2), *size).convert(mode)
    pre = Preprocessing(64, 56, interpolation=interpolation, fast_decode=True)
    w, h = size
    new_w, new_h = (int(64 * w / h), 64) if w > h else (64, int(64 * h / w))
    left, top = round((new_w - 56) / 2), round((new_h - 56) / 2)
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + 56) * sx, (top + 56) * sy)
    want = np.asarray(img.resize((56, 56), EvalTransform(pre).filter, box=box))
    got = EvalTransform(pre).pixels(img)
    assert np.array_equal(got.permute(1, 2, 0).squeeze(-1).numpy(), want)


def test_one_decode_path_for_cache_training_caption_and_serve(tiny_checkpoint, tmp_path):
    from captioner.serve.requests import prepare

    path = smooth_photo(tmp_path / "p.jpg")
    captioner = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    pre = captioner.preprocessing
    assert pre.fast_decode is True  # trained with this version's defaults
    caption_input = captioner._tensor(path)
    dataset = image_source([path], pre, build_transform(pre), None)  # training, evaluation
    assert torch.equal(dataset[0][0], caption_input)
    cache_dataset = ImageDataset([path], build_transform(pre), pre.draft_to)  # the cache's
    assert torch.equal(cache_dataset[0][0], caption_input)
    view, served = prepare(captioner, path.read_bytes(), "p.jpg", attention=False)
    assert view is None and torch.equal(served, caption_input)
    view, served = prepare(captioner, path.read_bytes(), "p.jpg", attention=True)  # map drawn
    assert view.size == (pre.crop, pre.crop) and torch.equal(served, caption_input)


def test_a_checkpoint_from_before_keeps_the_exact_path(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    del ckpt["preprocessing"]["fast_decode"]  # as every checkpoint written before it existed
    old = save_checkpoint(ckpt, tmp_path / "old.pt")
    captioner = Captioner.from_checkpoint(old, device="cpu")
    assert captioner.preprocessing.fast_decode is False
    path = smooth_photo(tmp_path / "p.jpg")
    exact = EvalTransform(captioner.preprocessing)(load_image(path))
    assert torch.equal(captioner._tensor(path), exact)
    new = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    assert not torch.equal(new._tensor(path), exact)
