"""The embedded demo dataset: scenes, captions and the COCO-format files on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioner.datasets import synthetic
from captioner.datasets.synthetic import (
    COLORS,
    DEMO_SPLITS,
    POSITIONS,
    SHAPES,
    SIZES,
    describe_scene,
    ensure_demo_dataset,
    generate_scene,
    render_scene,
    sample_scene,
)
from captioner.errors import UserError
from captioner.vocab import tokenize

SMALL = {"train": 20, "val": 5, "test": 5}


def _colours_in_pixels(image: Image.Image, min_pixels: int = 20) -> set[str]:
    """Palette colours that cover at least ``min_pixels`` pixels (shapes are drawn unblended)."""
    pixels = np.asarray(image, dtype=np.float32)
    found = set()
    for name, rgb in COLORS.items():
        close = np.linalg.norm(pixels - np.asarray(rgb, np.float32), axis=-1) < 40
        if close.sum() >= min_pixels:
            found.add(name)
    return found


def _words(captions: list[str], vocabulary) -> set[str]:
    return {w for c in captions for w in tokenize(c) if w in vocabulary}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", splits=SMALL)


# -- scenes and captions -----------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_generate_scene_gives_an_rgb_image_and_five_distinct_captions(image_size):
    rng = random.Random(1)
    for _ in range(30):
        image, captions = generate_scene(rng, image_size)
        assert image.mode == "RGB" and image.size == (image_size, image_size)
        assert len(captions) == 5
        assert len({tuple(tokenize(c)) for c in captions}) == 5, captions
        assert all(isinstance(c, str) and c.strip() for c in captions)


def test_generate_scene_rejects_tiny_images():
    with pytest.raises(ValueError, match="image_size"):
        generate_scene(random.Random(0), 16)


def test_captions_name_exactly_what_the_scene_holds():
    rng = random.Random(2)
    seen_counts = set()
    for _ in range(200):
        scene = sample_scene(rng, 64)
        captions = describe_scene(scene, rng)
        seen_counts.add(len(scene.shapes))
        colours = {s.color for s in scene.shapes}
        shapes = {s.shape for s in scene.shapes}
        sizes = {s.size for s in scene.shapes}
        for caption in captions:
            # every caption names every colour and shape, and nothing else
            assert _words([caption], COLORS) == colours, (caption, scene)
            assert _words([caption], SHAPES) == shapes, (caption, scene)
            assert _words([caption], SIZES) <= sizes, (caption, scene)
        assert _words(captions, SIZES) == sizes  # sizes are said in some captions
        if len(scene.shapes) == 1:
            phrase = synthetic._GRID[scene.position][2]
            assert sum(phrase in c.lower() for c in captions) >= 3, captions
        else:
            left, right = scene.shapes
            assert left.cx < right.cx
            for caption in captions:  # the left shape is named first unless the caption says so
                words = tokenize(caption)
                if "right" not in words and "left" not in words:
                    first = min(i for i, w in enumerate(words) if w in COLORS)
                    assert words[first] == left.color, (caption, scene)
    assert seen_counts == {1, 2}


def test_rendered_pixels_match_the_captions():
    rng = random.Random(3)
    for _ in range(100):
        scene = sample_scene(rng, 64)
        image = render_scene(scene, 64, rng)
        captions = describe_scene(scene, rng)
        assert _colours_in_pixels(image) == _words(captions, COLORS), (captions, scene)
        pixels = np.asarray(image, dtype=np.float32)
        if len(scene.shapes) == 1:
            # the shape's pixel centroid lies in the grid cell that the caption names
            (s,) = scene.shapes
            near = np.linalg.norm(pixels - np.asarray(COLORS[s.color], np.float32), axis=-1) < 40
            ys, xs = np.nonzero(near)
            column, row, _ = synthetic._GRID[scene.position]
            assert int(xs.mean() * 3 // 64) == column and int(ys.mean() * 3 // 64) == row
        else:
            left, right = scene.shapes
            if left.color != right.color:
                near = np.linalg.norm(pixels - np.asarray(COLORS[left.color], np.float32), axis=-1)
                assert np.nonzero(near < 40)[1].max() < 32  # all of it in the left half


def test_all_attribute_values_occur():
    rng = random.Random(4)
    scenes = [sample_scene(rng, 64) for _ in range(500)]
    shapes = [s for scene in scenes for s in scene.shapes]
    assert {s.shape for s in shapes} == set(SHAPES)
    assert {s.color for s in shapes} == set(COLORS)
    assert {s.size for s in shapes} == set(SIZES)
    assert {scene.position for scene in scenes if scene.position} == set(POSITIONS)


# -- the dataset on disk -----------------------------------------------------------------------
def test_default_splits():
    assert set(DEMO_SPLITS) == {"train", "val", "test"}
    assert DEMO_SPLITS["train"] > DEMO_SPLITS["val"] > 0


def test_layout_and_coco_format(demo: Path):
    manifest = json.loads((demo / "demo.json").read_text())
    assert manifest["splits"] == SMALL and manifest["seed"] == 0 and manifest["image_size"] == 64
    for split, count in SMALL.items():
        coco = COCO(str(demo / "annotations" / f"captions_{split}.json"))
        img_ids = coco.getImgIds()
        assert len(img_ids) == count
        for img in coco.loadImgs(img_ids):
            path = demo / "images" / split / img["file_name"]
            assert path.is_file()
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"]) == (64, 64)
                assert im.mode == "RGB"
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            captions = [a["caption"] for a in anns]
            assert len(captions) == 5
            assert len({tuple(tokenize(c)) for c in captions}) == 5
            with Image.open(path) as im:
                assert _colours_in_pixels(im.convert("RGB")) == _words(captions, COLORS)
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) == 5 * count
        assert coco.dataset["licenses"] == [] and "info" in coco.dataset
        files = sorted(p.name for p in (demo / "images" / split).iterdir())
        assert files == [f"{split}_{i:05d}.png" for i in range(count)]


def test_splits_are_disjoint(demo: Path):
    names, digests = {}, {}
    for split in SMALL:
        paths = sorted((demo / "images" / split).iterdir())
        names[split] = {p.name for p in paths}
        digests[split] = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert not names["train"] & names["val"] and not names["train"] & names["test"]
    assert not names["val"] & names["test"]
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_deterministic(tmp_path):
    a = ensure_demo_dataset(tmp_path / "a", seed=7, splits=SMALL)
    b = ensure_demo_dataset(tmp_path / "b", seed=7, splits=SMALL)
    c = ensure_demo_dataset(tmp_path / "c", seed=8, splits=SMALL)
    tree_a, tree_b = _tree(a), _tree(b)
    assert tree_a.keys() == tree_b.keys()
    for name in tree_a:
        if name.endswith(".json"):
            assert tree_a[name] == tree_b[name], name
    for split in SMALL:
        for p in (a / "images" / split).iterdir():
            with Image.open(p) as x, Image.open(b / "images" / split / p.name) as y:
                assert np.array_equal(np.asarray(x), np.asarray(y)), p.name
    for split in SMALL:
        name = f"annotations/captions_{split}.json"
        assert _tree(c)[name] != tree_a[name]


def test_idempotent_second_call_writes_nothing(tmp_path, caplog):
    root = tmp_path / "demo"
    with caplog.at_level(logging.INFO, logger="captioner.datasets.synthetic"):
        assert ensure_demo_dataset(root, splits=SMALL) == root
    assert any("generating demo dataset in" in r.getMessage() for r in caplog.records)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="captioner.datasets.synthetic"):
        assert ensure_demo_dataset(str(root), splits=dict(SMALL)) == root
    assert not caplog.records
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_incomplete_dataset_is_regenerated(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo", splits=SMALL)
    reference = _tree(root)
    (root / "demo.json").unlink()
    (root / "images" / "val" / "val_00000.png").unlink()
    ensure_demo_dataset(root, splits=SMALL)
    assert _tree(root) == reference


def test_other_settings_replace_the_old_dataset(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo", splits=SMALL)
    ensure_demo_dataset(root, splits={"train": 3, "val": 2}, image_size=48)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["train", "val"]
    assert len(list((root / "images" / "train").iterdir())) == 3
    with Image.open(root / "images" / "val" / "val_00001.png") as im:
        assert im.size == (48, 48)
    assert json.loads((root / "demo.json").read_text())["splits"] == {"train": 3, "val": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp or old dirs left


def test_crash_mid_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real = synthetic._write_split

    def crash_on_val(root, split, *args):
        if split == "val":
            raise RuntimeError("disk full")
        real(root, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", crash_on_val)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_dataset(tmp_path / "demo", splits=SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "_write_split", real)
    root = ensure_demo_dataset(tmp_path / "demo", splits=SMALL)
    assert (root / "demo.json").is_file()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UserError, match="refusing to overwrite"):
        ensure_demo_dataset(root, splits=SMALL)
    assert (root / "holiday.jpg").read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"splits": {"train": -1}}, "split"),
        ({"splits": {"../x": 2}}, "split"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_bad_settings_are_user_errors(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        ensure_demo_dataset(tmp_path / "demo", **kwargs)
    assert list(tmp_path.iterdir()) == []
