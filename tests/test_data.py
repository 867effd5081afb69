"""Data: COCO / Karpathy loading on fixtures built here, images, transform, collate, samplers,
and every bad-input case turning into a one-line UserError that names the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.configs.data import DataConfig
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.annotations import CaptionRecord, load_coco_captions, load_karpathy_split
from captioner.datasets.captions import (
    CaptionTrainDataset,
    ResumableSampler,
    collate_captions,
    encode_caption,
    load_split,
)
from captioner.datasets.images import ImageDataset, ImageLoadError, build_transform, load_image
from captioner.errors import UserError
from captioner.typed import from_dict
from captioner.vocab import Vocab

# -- fixture builders ---------------------------------------------------------------------------


def write_image(path: Path, color=(200, 30, 30), size=(8, 8), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


COCO = {
    "images": [
        {"id": 30, "file_name": "c.png"},
        {"id": 10, "file_name": "a.jpg"},
        {"id": 20, "file_name": "b.png"},  # no caption: dropped
    ],
    "annotations": [
        {"id": 1, "image_id": 10, "caption": "A red square."},
        {"id": 2, "image_id": 30, "caption": "a blue circle"},
        {"id": 3, "image_id": 10, "caption": "a small red square"},
        {"image_id": 30, "caption": "A circle that is blue ."},  # no id: still loaded
    ],
}


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    write_image(root / "images" / "a.jpg", fmt="JPEG")
    write_image(root / "images" / "b.png")
    write_image(root / "images" / "c.png", color=(0, 0, 255))
    write_json(root / "annotations" / "captions_train.json", COCO)
    return root


def sentences(*raws: str) -> list[dict]:
    return [{"raw": r, "tokens": r.lower().split()} for r in raws]


@pytest.fixture
def flickr_dir(tmp_path: Path) -> Path:
    """dataset_flickr8k.json style: no filepath, no restval."""
    root = tmp_path / "flickr"
    images = [
        ("1.jpg", "train", ["a dog runs", "a brown dog"]),
        ("2.jpg", "val", ["a cat sleeps"]),
        ("3.jpg", "train", ["two birds", "birds fly", "a sky"]),
        ("4.jpg", "test", ["a car"]),
    ]
    data = {"dataset": "flickr8k", "images": []}
    for i, (name, split, raws) in enumerate(images):
        write_image(root / "Flicker8k_Dataset" / name, fmt="JPEG")
        data["images"].append(
            {"filename": name, "imgid": i, "split": split, "sentences": sentences(*raws)}
        )
    write_json(root / "dataset_flickr8k.json", data)
    return root


@pytest.fixture
def karpathy_coco_dir(tmp_path: Path) -> Path:
    """dataset_coco.json style: filepath + cocoid + restval."""
    root = tmp_path / "kcoco"
    images = [
        ("train2014", "t1.jpg", 101, "train"),
        ("val2014", "r1.jpg", 201, "restval"),
        ("val2014", "v1.jpg", 202, "val"),
        ("val2014", "s1.jpg", 203, "test"),
        ("train2014", "t2.jpg", 102, "train"),
    ]
    data = {"dataset": "coco", "images": []}
    for i, (fp, name, cocoid, split) in enumerate(images):
        write_image(root / fp / name, fmt="JPEG")
        data["images"].append(
            {
                "filepath": fp,
                "filename": name,
                "imgid": i,
                "cocoid": cocoid,
                "split": split,
                "sentences": sentences(f"image {name} one", f"image {name} two"),
            }
        )
    write_json(root / "dataset_coco.json", data)
    return root


# -- COCO format --------------------------------------------------------------------------------


def test_load_coco_records_order_captions_paths(coco_dir: Path) -> None:
    ann = coco_dir / "annotations" / "captions_train.json"
    records = load_coco_captions(ann, coco_dir / "images")
    assert [r.image_id for r in records] == [30, 10]  # order of 'images'; uncaptioned 20 dropped
    assert records[0].captions == ["a blue circle", "A circle that is blue ."]
    assert records[1].captions == ["A red square.", "a small red square"]
    assert records[1].path == coco_dir / "images" / "a.jpg"
    assert all(r.path.is_file() for r in records)


def test_load_coco_prints_nothing(coco_dir: Path, capsys: pytest.CaptureFixture) -> None:
    load_coco_captions(coco_dir / "annotations" / "captions_train.json", coco_dir / "images")
    assert capsys.readouterr().out == ""


def test_load_split_coco_and_karpathy(coco_dir: Path, flickr_dir: Path) -> None:
    coco = {
        "root": str(coco_dir),
        "format": "coco",
        "demo": None,
        "train_annotations": "annotations/captions_train.json",
        "train_images": "images",
        "val_annotations": None,
        "val_images": None,
    }
    cfg = from_dict(DataConfig, coco, "data")
    assert [r.image_id for r in load_split(cfg, "train")] == [30, 10]
    with pytest.raises(UserError, match="data.val_annotations"):
        load_split(cfg, "val")
    with pytest.raises(UserError, match="data.format"):
        from_dict(DataConfig, {**coco, "format": "nope"}, "data")

    kcfg = from_dict(
        DataConfig,
        {
            "root": str(flickr_dir),
            "format": "karpathy",
            "split_file": "dataset_flickr8k.json",
            "images": "Flicker8k_Dataset",
            "restval_in_train": True,
        },
        "data",
    )
    assert [r.path.name for r in load_split(kcfg, "train")] == ["1.jpg", "3.jpg"]
    assert [r.path.name for r in load_split(kcfg, "test")] == ["4.jpg"]


# -- Karpathy format ----------------------------------------------------------------------------


def test_karpathy_flickr_without_filepath(flickr_dir: Path) -> None:
    images = flickr_dir / "Flicker8k_Dataset"
    train = load_karpathy_split(flickr_dir / "dataset_flickr8k.json", images, "train")
    assert [r.path for r in train] == [images / "1.jpg", images / "3.jpg"]
    assert [r.image_id for r in train] == [0, 2]
    assert train[1].captions == ["two birds", "birds fly", "a sky"]
    val = load_karpathy_split(flickr_dir / "dataset_flickr8k.json", images, "val")
    assert [(r.path.name, r.captions) for r in val] == [("2.jpg", ["a cat sleeps"])]


@pytest.mark.parametrize(
    ("split", "restval", "names"),
    [
        ("train", True, ["t1.jpg", "r1.jpg", "t2.jpg"]),
        ("train", False, ["t1.jpg", "t2.jpg"]),
        ("val", True, ["v1.jpg"]),
        ("test", True, ["s1.jpg"]),
    ],
)
def test_karpathy_coco_filepath_and_restval(
    karpathy_coco_dir: Path, split: str, restval: bool, names: list[str]
) -> None:
    recs = load_karpathy_split(
        karpathy_coco_dir / "dataset_coco.json", karpathy_coco_dir, split, restval_in_train=restval
    )
    assert [r.path.name for r in recs] == names
    assert all(r.path.is_file() and r.path.parent.name in ("train2014", "val2014") for r in recs)
    if split == "train" and restval:
        assert [r.image_id for r in recs] == [101, 201, 102]
        assert recs[1].path == karpathy_coco_dir / "val2014" / "r1.jpg"
        assert recs[1].captions == ["image r1.jpg one", "image r1.jpg two"]


def test_karpathy_tokens_only_sentences_and_bad_split(tmp_path: Path) -> None:
    write_image(tmp_path / "x.jpg", fmt="JPEG")
    f = write_json(
        tmp_path / "d.json",
        {
            "images": [
                {"filename": "x.jpg", "split": "train", "sentences": [{"tokens": ["a", "dog"]}]}
            ]
        },
    )
    assert load_karpathy_split(f, tmp_path, "train")[0].captions == ["a dog"]
    with pytest.raises(UserError, match="split"):
        load_karpathy_split(f, tmp_path, "restval")
    with pytest.raises(UserError, match=r"d\.json.*no images in split 'val'"):
        load_karpathy_split(f, tmp_path, "val")


# -- bad input: one-line UserError naming the file ------------------------------------------------


def assert_one_line(exc: BaseException, *needles: str) -> None:
    msg = str(exc)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        load_coco_captions(tmp_path / "captions_nope.json", tmp_path)
    assert_one_line(info.value, "captions_nope.json", "not found")


def test_unreadable_annotation_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ann = write_json(tmp_path / "locked.json", COCO)

    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(UserError) as info:
        load_coco_captions(ann, tmp_path)
    assert_one_line(info.value, "locked.json", "Permission denied")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"images": [], "annotations": [', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "not a COCO captions file"),
        ('{"images": []}', "'annotations'"),
        ('{"annotations": []}', "'images'"),
        ('{"images": [{"id": 1}], "annotations": []}', "images[0]"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
            "annotations[0]",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"caption": "a dog"}]}',
            "'image_id'",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], '
            '"annotations": [{"image_id": 1, "caption": 5}]}',
            "'caption'",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], '
            '"annotations": [{"image_id": 1, "caption": "a dog"}, {"image_id": 7, "caption": "a cat"}]}',
            "image_id 7",
        ),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}', "no captioned images"),
        (
            '{"images": [{"id": "a1", "file_name": "a.jpg"}], '
            '"annotations": [{"image_id": "a1", "caption": "a dog"}]}',
            "non-integer 'id' 'a1'",
        ),
        ('{"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []}', "images[0]"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], '
            '"annotations": [{"image_id": [1], "caption": "a dog"}]}',
            "image_id [1]",
        ),
    ],
)
def test_not_coco_captions(tmp_path: Path, content: str, says: str) -> None:
    write_image(tmp_path / "a.jpg", fmt="JPEG")
    ann = tmp_path / "bad_captions.json"
    ann.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_coco_captions(ann, tmp_path)
    assert_one_line(info.value, "bad_captions.json", says)


def test_referenced_image_missing_counts_the_rest(coco_dir: Path) -> None:
    (coco_dir / "images" / "a.jpg").unlink()
    (coco_dir / "images" / "c.png").unlink()
    ann = coco_dir / "annotations" / "captions_train.json"
    with pytest.raises(UserError) as info:
        load_coco_captions(ann, coco_dir / "images")
    assert_one_line(
        info.value,
        "captions_train.json",
        str(coco_dir / "images" / "c.png"),
        "missing",
        "(and 1 more)",
    )
    assert len(load_coco_captions(ann, coco_dir / "images", check_images=False)) == 2


def test_single_missing_image_has_no_and_more(coco_dir: Path) -> None:
    (coco_dir / "images" / "a.jpg").unlink()
    with pytest.raises(UserError) as info:
        load_coco_captions(coco_dir / "annotations" / "captions_train.json", coco_dir / "images")
    assert_one_line(info.value, "a.jpg", "missing")
    assert "more" not in str(info.value)


def test_karpathy_missing_image(karpathy_coco_dir: Path) -> None:
    (karpathy_coco_dir / "train2014" / "t2.jpg").unlink()
    with pytest.raises(UserError) as info:
        load_karpathy_split(karpathy_coco_dir / "dataset_coco.json", karpathy_coco_dir, "train")
    assert_one_line(info.value, "dataset_coco.json", "t2.jpg")


@pytest.mark.parametrize("caption", ["", " . ", "   ", "!!"])
def test_empty_caption(tmp_path: Path, caption: str) -> None:
    write_image(tmp_path / "a.jpg", fmt="JPEG")
    ann = write_json(
        tmp_path / "captions_empty.json",
        {
            "images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [
                {"image_id": 1, "caption": "a dog"},
                {"image_id": 1, "caption": caption},
            ],
        },
    )
    with pytest.raises(UserError) as info:
        load_coco_captions(ann, tmp_path)
    assert_one_line(info.value, "captions_empty.json", "annotations[1]", "empty caption")


@pytest.mark.parametrize("raw", ["", " . "])
def test_karpathy_empty_caption_and_no_sentences(tmp_path: Path, raw: str) -> None:
    write_image(tmp_path / "x.jpg", fmt="JPEG")
    f = write_json(
        tmp_path / "split.json",
        {"images": [{"filename": "x.jpg", "split": "train", "sentences": [{"raw": raw}]}]},
    )
    with pytest.raises(UserError) as info:
        load_karpathy_split(f, tmp_path, "train")
    assert_one_line(info.value, "split.json", "sentences[0]", "empty caption")
    write_json(f, {"images": [{"filename": "x.jpg", "split": "train", "sentences": []}]})
    with pytest.raises(UserError) as info:
        load_karpathy_split(f, tmp_path, "train")
    assert_one_line(info.value, "split.json", "sentences")


@pytest.mark.parametrize("loader", ["coco", "karpathy"])
def test_non_utf8_annotation_file(tmp_path: Path, loader: str) -> None:
    write_image(tmp_path / "a.jpg", fmt="JPEG")
    if loader == "coco":
        text = '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "un caf\u00e9"}]}'
    else:
        text = '{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "un caf\u00e9"}]}]}'
    f = tmp_path / "latin1.json"
    f.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError) as info:
        if loader == "coco":
            load_coco_captions(f, tmp_path)
        else:
            load_karpathy_split(f, tmp_path, "train")
    assert_one_line(info.value, "latin1.json", "UTF-8")


@pytest.mark.parametrize("extra", [{"imgid": "x"}, {"cocoid": None}, {"filepath": 5}])
def test_karpathy_bad_id_or_filepath(tmp_path: Path, extra: dict) -> None:
    image = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a dog"}], **extra}
    f = write_json(tmp_path / "ids.json", {"images": [image]})
    with pytest.raises(UserError) as info:
        load_karpathy_split(f, tmp_path, "train", check_images=False)
    assert_one_line(info.value, "ids.json", "images[0]")


def test_karpathy_not_a_split_file(tmp_path: Path) -> None:
    f = write_json(tmp_path / "weird.json", {"annotations": []})
    with pytest.raises(UserError) as info:
        load_karpathy_split(f, tmp_path, "train")
    assert_one_line(info.value, "weird.json", "'images'")
    with pytest.raises(UserError) as info:
        load_karpathy_split(tmp_path / "absent.json", tmp_path, "train")
    assert_one_line(info.value, "absent.json", "not found")


# -- duplicate and uncaptioned images ----------------------------------------------------------


def test_coco_image_id_listed_with_another_file_is_refused(coco_dir: Path) -> None:
    data = json.loads(json.dumps(COCO))
    data["images"] += [{"id": 10, "file_name": "c.png"}, {"id": 30, "file_name": "b.png"}]
    ann = write_json(coco_dir / "annotations" / "dup.json", data)
    with pytest.raises(UserError) as info:
        load_coco_captions(ann, coco_dir / "images")
    # scored against the first entry's references otherwise: refused, every clashing id named
    assert_one_line(info.value, "dup.json", "image id 10", "'a.jpg'", "'c.png'", "ids: 10, 30")


def test_coco_exact_repeat_is_kept_once_with_a_warning(
    coco_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = json.loads(json.dumps(COCO))
    data["images"] += [{"id": 10, "file_name": "a.jpg"}, {"id": 10, "file_name": "a.jpg"}]
    ann = write_json(coco_dir / "annotations" / "repeat.json", data)
    with caplog.at_level(logging.WARNING, logger="captioner.datasets.annotations"):
        records = load_coco_captions(ann, coco_dir / "images")
    assert [r.image_id for r in records] == [30, 10]  # counted once, in first-listed order
    assert records[1].captions == ["A red square.", "a small red square"]
    assert "repeat.json" in caplog.text and "listed more than once" in caplog.text
    assert "10" in caplog.text


def test_coco_uncaptioned_images_are_left_out_with_a_warning(
    coco_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = json.loads(json.dumps(COCO))
    data["images"] += [{"id": 40 + i, "file_name": "b.png"} for i in range(7)]
    ann = write_json(coco_dir / "annotations" / "sparse.json", data)
    with caplog.at_level(logging.WARNING, logger="captioner.datasets.annotations"):
        records = load_coco_captions(ann, coco_dir / "images")
    assert [r.image_id for r in records] == [30, 10]
    [message] = [r.getMessage() for r in caplog.records]
    assert "sparse.json: 8 images without a caption left out" in message
    assert "20, 40, 41, 42, 43 (and 3 more)" in message


def karpathy_file(tmp_path: Path, *entries: tuple[int, str, str]) -> Path:
    images = [
        {"filename": name, "cocoid": cocoid, "split": "test", "sentences": sentences(raw)}
        for cocoid, name, raw in entries
    ]
    return write_json(tmp_path / "dataset_coco.json", {"images": images})


def test_karpathy_duplicate_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = karpathy_file(tmp_path, (1, "a.jpg", "a dog"), (2, "b.jpg", "a cat"), (1, "c.jpg", "x"))
    with pytest.raises(UserError) as info:
        load_karpathy_split(f, tmp_path, "test", check_images=False)
    assert_one_line(info.value, "dataset_coco.json", "image id 1", "'a.jpg'", "'c.jpg'")
    f = karpathy_file(tmp_path, (1, "a.jpg", "a dog"), (1, "a.jpg", "a big dog"))
    with pytest.raises(UserError, match="image id 1 .*different"):  # same file, other sentences
        load_karpathy_split(f, tmp_path, "test", check_images=False)
    f = karpathy_file(tmp_path, (1, "a.jpg", "a dog"), (2, "b.jpg", "a cat"), (1, "a.jpg", "a dog"))
    with caplog.at_level(logging.WARNING, logger="captioner.datasets.annotations"):
        records = load_karpathy_split(f, tmp_path, "test", check_images=False)
    assert [(r.image_id, r.captions) for r in records] == [(1, ["a dog"]), (2, ["a cat"])]
    assert "dataset_coco.json" in caplog.text and "listed more than once" in caplog.text


# -- images -------------------------------------------------------------------------------------


def pixel(img: Image.Image) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel((1, 1))


def test_load_image_grayscale(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 100).save(tmp_path / "g.png")
    assert pixel(load_image(tmp_path / "g.png")) == (100, 100, 100)


def test_load_image_rgba_transparent_becomes_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((2, 2), (0, 0, 255, 255))
    img.save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert pixel(out) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (0, 0, 255)


def test_load_image_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 10, 200, 10] + [0] * (256 * 3 - 6))
    img.putpixel((2, 2), 1)
    img.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert pixel(out) == (255, 255, 255)  # transparent black -> white, not black
    assert out.getpixel((2, 2)) == (10, 200, 10)


def test_load_image_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    r, g, b = pixel(load_image(tmp_path / "c.jpg"))
    assert r > 230 and g < 30 and b < 30


def test_load_image_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    r, g, b = pixel(load_image(tmp_path / "d.png"))
    assert r == g == b and abs(r - 128) <= 1


def _noise_jpeg(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG")
    return path.read_bytes()


def test_load_image_truncated_jpeg(tmp_path: Path) -> None:
    data = _noise_jpeg(tmp_path / "full.jpg")
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "trunc.jpg")
    assert isinstance(info.value, UserError)
    assert_one_line(info.value, str(tmp_path / "trunc.jpg"), "corrupt")


def test_load_image_text_file_renamed_jpg(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "notes.jpg")
    assert_one_line(info.value, "notes.jpg", "not an image")


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="gone.png"):
        load_image(tmp_path / "gone.png")


@pytest.mark.parametrize("limit", [10, 40])  # 64 px: > 2x limit (error) and > limit (warning)
def test_load_image_decompression_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    write_image(tmp_path / "big.png", size=(8, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "big.png")
    assert_one_line(info.value, "big.png", "too large")


def test_image_dataset_skips_unreadable_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageDataset(
        [tmp_path / "ok.png", tmp_path / "bad.jpg"], build_transform(Preprocessing(8, 8))
    )
    with caplog.at_level(logging.WARNING, logger="captioner.datasets.captions"):
        good, bad = ds[0], ds[1]
    assert good[0].shape == (3, 8, 8) and good[1] == 0
    assert bad == (None, 1)
    assert "bad.jpg" in caplog.text


# -- transform ----------------------------------------------------------------------------------


def test_build_transform_shape_and_normalisation(tmp_path: Path) -> None:
    pre = Preprocessing(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    img = Image.new("RGB", (80, 60), (255, 0, 128))
    x = build_transform(pre)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = torch.tensor([(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (128 / 255 - 0.5) / 1.0])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)


def test_build_transform_eval_is_deterministic_and_shared() -> None:
    pre = Preprocessing(resize=24, crop=16)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    a = build_transform(pre)(img)
    torch.manual_seed(0)
    b = build_transform(pre, train=True, augment=False)(img)
    torch.manual_seed(1)
    c = build_transform(pre)(img)
    assert torch.equal(a, b) and torch.equal(a, c)
    aug = build_transform(pre, train=True, augment=True)
    assert aug(img).shape == (3, 16, 16)
    assert any(not torch.equal(aug(img), a) for _ in range(5))


def test_preprocessing_round_trip_and_validation() -> None:
    pre = Preprocessing(resize=40, crop=32)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(UserError):
        Preprocessing(resize=16, crop=32)


# -- encode / datasets / collate ------------------------------------------------------------------


@pytest.fixture
def vocab() -> Vocab:
    return Vocab.build(["one two three four five six seven eight nine ten"])


def test_encode_caption_truncation_keeps_end(vocab: Vocab) -> None:
    text = "one two three four five six seven eight nine ten"
    ids = encode_caption(vocab, text, max_len=5)
    assert len(ids) == 5
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == ["one", "two", "three"]
    assert encode_caption(vocab, "one two", max_len=5) == vocab.encode("one two")
    assert len(encode_caption(vocab, text, max_len=12)) == 12  # exactly fits: no cut


def test_collate_pads_lengths_and_skips(vocab: Vocab) -> None:
    img = torch.zeros(3, 4, 4)
    batch = [
        (img + 1, [[1, 5, 2], [1, 5, 6, 7, 8, 2]], 4),
        (None, [[1, 9, 2]], 7),  # unreadable image: dropped, counted
        (img + 2, [[1, 2], [1, 6, 6, 2]], 9),
    ]
    out = collate_captions(batch, pad_id=0)
    assert out["skipped"] == [7]  # record indices, so an image is counted once per epoch
    assert out["inputs"].shape == (2, 3, 4, 4)
    assert out["captions"].shape == (4, 6)
    assert out["lengths"].tolist() == [3, 6, 2, 4]
    assert out["lengths"].dtype == torch.int64 and out["lengths"].device.type == "cpu"
    assert out["image_of_caption"].tolist() == [0, 0, 1, 1]
    assert out["index"].tolist() == [4, 9]
    assert out["captions"][0].tolist() == [1, 5, 2, 0, 0, 0]
    assert out["captions"][2].tolist() == [1, 2, 0, 0, 0, 0]
    assert torch.equal(out["inputs"][out["image_of_caption"][3]], img + 2)
    out7 = collate_captions([(img, [[1, 2]], 0)], pad_id=7)
    assert out7["captions"].tolist() == [[1, 2]]
    out7 = collate_captions([(img, [[1, 2], [1, 5, 5, 2]], 0)], pad_id=7)
    assert out7["captions"][0].tolist() == [1, 2, 7, 7]


def test_collate_all_unreadable() -> None:
    out = collate_captions([(None, [[1, 2]], 0), (None, [[1, 2]], 1), (None, [[1, 3]], 1)])
    assert out["skipped"] == [0, 1] and len(out["lengths"]) == 0 and out["captions"].shape[0] == 0


def _records(n_caps: list[int]) -> list[CaptionRecord]:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    return [
        CaptionRecord(i, Path(f"{i}.png"), [f"{words[j]} {words[i]}" for j in range(n)])
        for i, n in enumerate(n_caps)
    ]


def test_train_dataset_pair_mode(vocab: Vocab) -> None:
    recs = _records([2, 3, 1])
    images = [torch.full((2,), float(i)) for i in range(3)]
    ds = CaptionTrainDataset(recs, vocab, max_len=10, images=images)
    assert len(ds) == 6
    items = [ds[i] for i in range(len(ds))]
    assert [it[2] for it in items] == [0, 0, 1, 1, 1, 2]
    assert all(len(it[1]) == 1 for it in items)
    assert vocab.decode(items[3][1][0]) == ["two", "two"]
    assert torch.equal(items[4][0], images[1])


def test_train_dataset_captions_per_image(vocab: Vocab) -> None:
    recs = _records([5, 2, 7])
    ds = CaptionTrainDataset(
        recs, vocab, max_len=10, images=[None, None, None], captions_per_image=3, seed=0
    )
    assert len(ds) == 3
    _, caps, idx = ds[1]
    assert idx == 1 and len(caps) == 2  # fewer than k: all
    _, caps, _ = ds[0]
    assert len(caps) == 3 and len({tuple(c) for c in caps}) == 3
    all_caps = {tuple(vocab.encode(c)) for c in recs[0].captions}
    assert {tuple(c) for c in caps} <= all_caps

    def pick(seed: int, epoch: int, i: int = 2) -> list[list[int]]:
        d = CaptionTrainDataset(
            recs, vocab, max_len=10, images=[None] * 3, captions_per_image=3, seed=seed
        )
        d.set_epoch(epoch)
        return d[i][1]

    assert pick(0, 4) == pick(0, 4)
    assert len({str(pick(0, e)) for e in range(6)}) > 1  # changes across epochs
    assert len({str(pick(s, 0)) for s in range(6)}) > 1  # and with the seed


def test_train_dataset_rejects_bad_k(vocab: Vocab) -> None:
    with pytest.raises(UserError, match="captions_per_image"):
        CaptionTrainDataset(_records([1]), vocab, 10, images=[None], captions_per_image=0)


# -- sampler ------------------------------------------------------------------------------------


def _order(
    n: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world: int = 1
) -> list[int]:
    s = ResumableSampler(list(range(n)), seed=seed, rank=rank, world_size=world)
    s.set_position(epoch, start)
    out = list(s)
    assert len(s) == len(out)
    return out


def test_sampler_deterministic_per_seed_and_epoch() -> None:
    a = _order(50, seed=3, epoch=1)
    assert sorted(a) == list(range(50))
    assert a == _order(50, seed=3, epoch=1)
    assert a != _order(50, seed=3, epoch=2)
    assert a != _order(50, seed=4, epoch=1)


def test_sampler_start_index_skips_exactly() -> None:
    full = _order(20, seed=0, epoch=5)
    assert _order(20, seed=0, epoch=5, start=7) == full[7:]
    assert _order(20, seed=0, epoch=5, start=20) == []


def test_sampler_shards_disjoint_across_ranks() -> None:
    r0 = _order(20, seed=0, epoch=0, rank=0, world=2)
    r1 = _order(20, seed=0, epoch=0, rank=1, world=2)
    assert len(r0) == len(r1) == 10
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == list(range(20))
    assert _order(20, seed=0, epoch=0, start=4, rank=1, world=2) == r1[4:]


def test_sampler_no_shuffle_is_identity() -> None:
    s = ResumableSampler(list(range(6)), seed=0, shuffle=False)
    s.set_position(3, 2)
    assert list(s) == [2, 3, 4, 5]


# -- feature cache ------------------------------------------------------------------------------


def tiny_encoder():
    from torch import nn

    from captioner.models.encoders import Encoder

    return Encoder(nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1)), 4)


def test_feature_cache_written_whole_with_nothing_left_behind(tmp_path: Path) -> None:
    from captioner.features import build_feature_cache

    paths = [write_image(tmp_path / "a.png"), tmp_path / "missing.png"]
    pre = Preprocessing(resize=8, crop=8)
    cache = build_feature_cache(tiny_encoder(), pre, paths, tmp_path / "cache", desc="val images")
    assert len(cache) == 2 and cache.dim == 4
    assert cache[0] is not None and cache[1] is None
    assert sorted(p.name for p in cache.directory.iterdir()) == [
        ".lock",  # its builders' lock (captioner/features.py)
        "features.npy",
        "meta.json",
        "valid.npy",
    ]


def test_feature_cache_of_no_readable_image_is_a_user_error(tmp_path: Path) -> None:
    from captioner.features import build_feature_cache

    paths = [tmp_path / "gone.jpg", (tmp_path / "text.jpg")]
    paths[1].write_text("not an image")
    with pytest.raises(UserError) as info:
        build_feature_cache(
            tiny_encoder(), Preprocessing(8, 8), paths, tmp_path / "cache", desc="val images"
        )
    assert_one_line(info.value, "feature cache", "val images", "2 files", "gone.jpg", "cache")
    (directory,) = (tmp_path / "cache").iterdir()
    assert str(directory) in str(info.value)
    # no features.npy, no temp file, no meta.json: only its builders' lock
    assert [p.name for p in directory.iterdir()] == [".lock"]
