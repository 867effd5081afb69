"""Hostile images: a few bytes that would exhaust memory, photos stored sideways (EXIF), float
and 32-bit TIFFs, and preprocessing values read from a file that are out of range.

The memory cases run in a subprocess under an address-space limit (``RLIMIT_AS``) a little above
the baseline it measures after its imports, so a regression fails fast with ``MemoryError``
instead of eating the machine."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.configs.preprocessing import INTERPOLATIONS, MAX_SIZE, Preprocessing
from captioner.datasets.images import (
    PIL_FILTERS,
    EvalTransform,
    build_transform,
    from_pil,
    load_image,
    load_image_bytes,
    model_view,
)
from captioner.errors import UserError

# -- a few bytes, a huge resize -----------------------------------------------------------------

# What the subprocess runs: every way an image is prepared (evaluation / caption / serve's
# transform, the attention map's view, training's augmenting transform) on 1 x 1,000,000 and
# 1,000,000 x 1 PNGs (about 4 KB each). Before the fix the eval transform resized the short side
# to 256, i.e. a 256 x 256,000,000 image: MemoryError under the limit.
MEMORY_SCRIPT = """
import resource, sys
from pathlib import Path
import numpy as np, torch, torchvision  # the baseline includes every import the work needs
from PIL import Image
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.images import build_transform, load_image, load_image_bytes, model_view

torch.set_num_threads(1)  # no thread pool reserving address space after the limit is set
folder = Path(sys.argv[1])
pre = Preprocessing(256, 224)
evaluate = build_transform(pre)
augment = build_transform(pre, train=True, augment=True)
evaluate(Image.new("RGB", (300, 200)))  # warm every code path before the baseline
augment(Image.new("RGB", (300, 200)))
vm = dict(line.split(":", 1) for line in open("/proc/self/status"))
baseline = int(vm["VmSize"].split()[0]) * 1024
limit = baseline + HEADROOM
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for name in ("tall.png", "wide.png"):
    img = load_image(folder / name)
    upload = load_image_bytes((folder / name).read_bytes(), name)
    assert evaluate(img).shape == evaluate(upload).shape == (3, 224, 224), name
    assert model_view(img, pre).size == (224, 224), name
    assert augment(img).shape == (3, 224, 224), name
print("ok", baseline // 2**20, "MiB baseline")
"""

# The source image as RGB is 3 MB, its decoded PNG rows a few more; resizing the full image the
# old way needs 256 * 256e6 * 3 bytes = 196 GB. 256 MiB above the baseline is ~40x what the
# bounded path needs and 1/700 of what the old one asked for.
HEADROOM = 256 * 2**20


def test_extreme_aspect_ratios_are_prepared_in_bounded_memory(tmp_path: Path) -> None:
    Image.new("L", (1, 1_000_000), 128).save(tmp_path / "tall.png")
    Image.new("L", (1_000_000, 1), 128).save(tmp_path / "wide.png")
    assert (tmp_path / "tall.png").stat().st_size < 5_000  # a few bytes...
    script = MEMORY_SCRIPT.replace("HEADROOM", str(HEADROOM))
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


def smooth_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A photo-like image: random colours on a coarse grid, bicubic-upscaled."""
    coarse = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)


def test_source_box_path_equals_the_whole_image_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The box path (only the kept region of the source is resampled) against the exact path
    (resize the whole image, then crop), forced onto the same normal images.

    Both compute the same sample positions, differing only by float rounding (Pillow takes the
    box as float32). With the non-negative filters (bilinear, hamming) a weight difference that
    small moves an output by at most one rounding of its 8-bit result in each of Pillow's two
    passes, and the second pass cannot amplify the first's (weights >= 0 summing to 1): at most
    2 levels of 255. (Filters with negative lobes clip their 8-bit intermediate and nearest / box
    break exact half-pixel ties, so they differ more on noise; they are not compared here.)"""
    rng = np.random.default_rng(0)
    sizes = [(97, 61), (61, 97), (40, 40), (33, 47), (5, 9), (300, 7), (640, 480), (7, 300)]
    for interpolation in ("bilinear", "hamming"):
        for resize, crop in [(40, 33), (64, 56), (11, 8), (256, 224)]:
            pre = Preprocessing(resize, crop, interpolation=interpolation)
            for w, h in sizes:
                img = smooth_image(rng, w, h)
                monkeypatch.setattr(EvalTransform, "max_resized_pixels", 10**12)
                exact = np.asarray(model_view(img, pre), dtype=np.int16)
                monkeypatch.setattr(EvalTransform, "max_resized_pixels", 0)
                boxed = np.asarray(model_view(img, pre), dtype=np.int16)
                assert exact.shape == boxed.shape == (crop, crop, 3)
                assert np.abs(exact - boxed).max() <= 2, (interpolation, resize, crop, (w, h))


def test_box_path_keeps_the_centre_of_an_extreme_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 x 20,000 strip, black but for its middle 20 rows: the model sees the white middle."""
    arr = np.zeros((20_000, 2), dtype=np.uint8)
    arr[9_990:10_010] = 255
    monkeypatch.setattr(EvalTransform, "max_resized_pixels", 0)
    view = model_view(Image.fromarray(arr), Preprocessing(32, 32))
    assert view.size == (32, 32)
    # resize 32 scales by 16: the middle 20 rows become 320, the 32-row crop lies inside them
    assert np.asarray(view).min() == 255


# -- preprocessing read from a file -------------------------------------------------------------

GOOD = {"resize": 256, "crop": 224, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}


@pytest.mark.parametrize(
    "bad, says",
    [
        ({"resize": 100_000, "crop": 224}, f"resize must be an integer in 1..{MAX_SIZE}"),
        ({"resize": 256, "crop": 0}, "crop must be an integer in 1..256"),
        ({"resize": 256, "crop": 300}, "crop must be an integer in 1..256"),
        ({"resize": "256"}, "resize must be an integer"),
        ({"resize": True}, "resize must be an integer"),
        ({"mean": [0.5, 0.5]}, "mean must be 3 numbers"),
        ({"mean": [0.5, "x", 0.5]}, "mean must be 3 numbers"),
        ({"mean": 0.5}, "mean must be 3 numbers"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be 3 numbers > 0"),
        ({"std": [0.2, -1, 0.2]}, "std must be 3 numbers > 0"),
        ({"std": [0.2, float("nan"), 0.2]}, "std must be 3 numbers > 0"),
        ({"interpolation": "cubic-ish"}, "interpolation must be one of"),
        ({"extra": 1}, "unknown key 'extra'"),
    ],
)
def test_preprocessing_values_from_a_file_are_checked(bad: dict, says: str) -> None:
    with pytest.raises(UserError) as info:
        Preprocessing.from_dict({**GOOD, **bad})
    message = str(info.value)
    assert says in message and "\n" not in message
    assert message.startswith("preprocessing")


def test_preprocessing_missing_key() -> None:
    with pytest.raises(UserError, match="preprocessing: missing 'crop'"):
        Preprocessing.from_dict({"resize": 256})


def test_every_interpolation_a_preprocessing_accepts_has_a_filter() -> None:
    assert set(PIL_FILTERS) == set(INTERPOLATIONS)
    for name in INTERPOLATIONS:
        assert EvalTransform(Preprocessing(8, 8, interpolation=name))(
            Image.new("RGB", (9, 12))
        ).shape == (3, 8, 8)


# -- EXIF orientation ---------------------------------------------------------------------------


def upright() -> Image.Image:
    """3 wide x 2 tall, every pixel different: any rotation or mirror shows."""
    arr = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 13
    return Image.fromarray(arr)


# orientation tag -> how the camera stored the upright picture (its inverse is what
# ImageOps.exif_transpose applies)
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # "rotate 90 clockwise to display": stored turned left
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied_where_images_are_opened(
    tmp_path: Path, orientation: int
) -> None:
    stored = upright().transpose(STORED[orientation])
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    want = np.asarray(upright())
    assert np.array_equal(np.asarray(load_image(path)), want)
    assert np.array_equal(np.asarray(load_image_bytes(path.read_bytes(), "upload")), want)


def test_exif_orientation_of_an_image_the_caller_opened(tmp_path: Path) -> None:
    """``Captioner.caption`` takes opened PIL images too (``from_pil``): they are turned upright
    like the files it opens, and the caller's image is not modified."""
    stored = upright().transpose(STORED[6])
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    with Image.open(tmp_path / "phone.png") as opened:
        before = np.asarray(opened).copy()
        assert np.array_equal(np.asarray(from_pil(opened)), np.asarray(upright()))
        assert np.array_equal(np.asarray(opened), before)
        assert from_pil(opened).size == upright().size


def test_exif_orientation_reaches_the_model_input(tmp_path: Path) -> None:
    """A tall picture, red on its left, green on its right, stored wide with orientation 6: the
    eval transform's input has red on the left, not on top."""
    arr = np.zeros((30, 10, 3), dtype=np.uint8)
    arr[:, :5, 0], arr[:, 5:, 1] = 255, 255
    stored = Image.fromarray(arr).transpose(Image.Transpose.ROTATE_90)  # 30 wide x 10 tall
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "side.png", exif=exif)
    x = build_transform(Preprocessing(10, 10, mean=(0, 0, 0), std=(1, 1, 1)))(
        load_image(tmp_path / "side.png")
    )
    assert x[0, :, :5].min() == 1 and x[0, :, 5:].max() == 0
    assert x[1, :, 5:].min() == 1 and x[1, :, :5].max() == 0


# -- float and 32-bit integer images ------------------------------------------------------------


def pattern() -> np.ndarray:
    """An 8-bit grayscale pattern that spans 0..255."""
    arr = (np.arange(64, dtype=np.int64).reshape(8, 8) * 37) % 256
    arr[0, 0], arr[0, 1] = 0, 255
    return arr.astype(np.uint8)


@pytest.mark.parametrize(
    "mode, values",
    [
        ("F", lambda u8: (u8 / 255.0).astype(np.float32)),  # in [0, 1]: taken as 0..1
        ("F", lambda u8: (u8 / 255.0 * 1000).astype(np.float32)),  # [0, 1000]: its range
        ("F", lambda u8: (u8 / 255.0 * 2 - 1).astype(np.float32)),  # [-1, 1]: its range
        ("I", lambda u8: u8.astype(np.int32) * 4000),  # 32-bit beyond 16 bits: its range
    ],
)
def test_float_and_32bit_tiffs_keep_their_picture(tmp_path: Path, mode: str, values) -> None:
    u8 = pattern()
    Image.fromarray(values(u8)).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == mode
    got = np.asarray(load_image(tmp_path / "x.tif"))
    # each value is k/255 of its range up to float32 rounding (relative 6e-8), far from the
    # half-level where rounding to 8 bits could flip: exactly the 8-bit picture
    assert np.array_equal(got, np.repeat(u8[:, :, None], 3, axis=2))


def test_float_image_nan_and_constant(tmp_path: Path) -> None:
    arr = np.full((4, 4), 5.0, dtype=np.float32)
    Image.fromarray(arr).save(tmp_path / "flat.tif")
    assert np.asarray(load_image(tmp_path / "flat.tif")).max() == 0  # no range: black, no crash
    arr[1, 1], arr[2, 2] = np.nan, 10.0
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    got = np.asarray(load_image_bytes(buf.getvalue(), "nan.tif"))[..., 0]
    assert got[2, 2] == 255 and got[0, 0] == 0 and got[1, 1] == 0  # NaN as the minimum


def test_rgb_tensor_of_a_float_image_is_not_black(tmp_path: Path) -> None:
    Image.fromarray((pattern() / 255.0 * 1000).astype(np.float32)).save(tmp_path / "f.tif")
    x = build_transform(Preprocessing(8, 8, mean=(0, 0, 0), std=(1, 1, 1)))(
        load_image(tmp_path / "f.tif")
    )
    torch.testing.assert_close(x[0], torch.from_numpy(pattern()).float() / 255, atol=0, rtol=0)
