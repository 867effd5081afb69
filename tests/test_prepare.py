"""``captioner prepare``: Flickr8k/Flickr30k/Karpathy converters and the resumable COCO download.

Downloads run against a local HTTP server on 127.0.0.1 (``ThreadingHTTPServer``, port 0) that
serves tiny zips, honours ``Range`` unless told not to, and records every request.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import FileServer, make_zip, serving

from captioner.cli.prepare import main
from captioner.datasets.coco_download import prepare_coco
from captioner.datasets.download import Archive, download
from captioner.datasets.prepare import prepare_flickr8k, prepare_flickr30k, prepare_karpathy
from captioner.datasets.sources import normalize_caption
from captioner.errors import UserError

# ---------------------------------------------------------------------------------------------
# helpers


def load(path: Path, images: Path) -> dict[int, tuple[str, list[str]]]:
    """Load through the pipeline's loader and pycocotools: {image id: (file name, captions)}."""
    from pycocotools.coco import COCO

    from captioner.datasets.annotations import load_coco_captions

    records = load_coco_captions(path, images)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == sorted(r.image_id for r in records)
    return {r.image_id: (r.path.relative_to(images).as_posix(), r.captions) for r in records}


def touch_images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\xff\xd8 not decoded by prepare")
    return folder


FLICKR8K_TOKENS = "\n".join(
    [
        "\ufeffa.jpg#0\tA  child   in a pink dress .",
        "a.jpg#1\ta child in a PINK dress .",  # duplicate: case differs
        "a.jpg#2\t  A girl\tclimbs stairs\u00a0 ",  # odd whitespace
        "b.jpg#0\tA black dog and a spotted dog are fighting",
        "b.jpg#1\tA black dog and a spotted dog are fighting",  # exact duplicate
        "c.jpg#0\tA little girl .",
        "d.jpg#0\tA man on a bike .",
        "e.jpg#0\tA test caption .",
        "nosplit.jpg#0\tAn image in no split .",
        "2258277193_586949ec62.jpg.1#0\tThe token file's famous stray entry .",
        "",
        "a.jpg#3\tA girl going into a wooden building .",  # the image referenced again later
    ]
)


@pytest.fixture
def flickr8k(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text(FLICKR8K_TOKENS, encoding="utf-8")
    (text / "Flickr_8k.trainImages.txt").write_text("c.jpg\na.jpg\n\na.jpg\n")  # a.jpg twice
    (text / "Flickr_8k.devImages.txt").write_text("b.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("e.jpg\nd.jpg\n")
    images = touch_images(
        tmp_path / "Flicker8k_Dataset", ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    )
    return {"text": text, "images": images, "out": tmp_path / "out"}


# ---------------------------------------------------------------------------------------------
# converters


def test_normalize_caption_collapses_whitespace_and_keeps_case() -> None:
    assert normalize_caption("  A\tDog \n runs\u00a0. ") == "A Dog runs ."


def test_flickr8k_writes_coco_files_with_stable_ids(flickr8k: dict[str, Path]) -> None:
    text, out = flickr8k["text"], flickr8k["out"]
    files, overrides = prepare_flickr8k(text / "Flickr8k.token.txt", text, flickr8k["images"], out)
    assert set(files) == {"train", "val", "test"}
    assert files["val"] == out / "annotations" / "captions_val.json"
    assert (out / "images").resolve() == flickr8k["images"].resolve()  # the symlink
    assert "data.train_images=images" in overrides and f"data.root={out}" in overrides

    loaded = {s: load(p, out / "images") for s, p in files.items()}
    # ids: 1-based rank of the file name over all splits, identical wherever an image appears
    assert loaded["train"] == {
        1: (
            "a.jpg",
            [
                "A child in a pink dress .",
                "A girl climbs stairs",
                "A girl going into a wooden building .",
            ],
        ),
        3: ("c.jpg", ["A little girl ."]),
    }
    assert loaded["val"] == {2: ("b.jpg", ["A black dog and a spotted dog are fighting"])}
    assert sorted(loaded["test"]) == [4, 5]
    ann_ids = [a["id"] for p in files.values() for a in json.loads(p.read_text())["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))  # unique across the split files too


def test_flickr8k_logs_what_it_skipped(
    flickr8k: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    text = flickr8k["text"]
    with caplog.at_level("INFO", logger="captioner.datasets.prepare"):
        prepare_flickr8k(text / "Flickr8k.token.txt", text, flickr8k["images"], flickr8k["out"])
    log = caplog.text
    assert "2 captioned images in no split (skipped)" in log
    assert "2 duplicate captions" in log
    assert "1 images listed twice in a split file" in log


def test_flickr8k_image_in_two_splits_is_an_error(flickr8k: dict[str, Path]) -> None:
    text = flickr8k["text"]
    (text / "Flickr_8k.testImages.txt").write_text("e.jpg\nd.jpg\nb.jpg\n")
    with pytest.raises(UserError, match=r"image b\.jpg is listed in both the 'val' and the 'test'"):
        prepare_flickr8k(text / "Flickr8k.token.txt", text, flickr8k["images"], flickr8k["out"])


def test_flickr8k_user_mistakes_are_one_line_errors(flickr8k: dict[str, Path]) -> None:
    text, images, out = flickr8k["text"], flickr8k["images"], flickr8k["out"]
    with pytest.raises(UserError, match="Flickr_8k.trainImages.txt: image list not found"):
        prepare_flickr8k(text / "Flickr8k.token.txt", text / "nowhere", images, out)
    bad = text / "bad.token.txt"
    bad.write_text("a.jpg#0 A caption without a tab\n")
    with pytest.raises(UserError, match=r"bad.token.txt:1: expected 'IMAGE#N<TAB>caption'"):
        prepare_flickr8k(bad, text, images, out)
    with pytest.raises(UserError, match="images directory not found"):
        prepare_flickr8k(text / "Flickr8k.token.txt", text, text / "no-images", out)
    bad.write_bytes(b"a.jpg#0\t\xff\xfe caption\n")
    with pytest.raises(UserError, match="not valid UTF-8"):
        prepare_flickr8k(bad, text, images, out)


def test_flickr8k_missing_image_files_are_skipped(
    flickr8k: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    text, images = flickr8k["text"], flickr8k["images"]
    (images / "d.jpg").unlink()
    files, _ = prepare_flickr8k(text / "Flickr8k.token.txt", text, images, flickr8k["out"])
    assert sorted(load(files["test"], images)) == [5]  # e.jpg keeps its id
    assert "1 listed images are not in" in caplog.text


def test_flickr30k_with_and_without_karpathy_splits(tmp_path: Path) -> None:
    tokens = tmp_path / "results_20130124.token"
    tokens.write_text(
        "1000092795.jpg#0\tTwo young guys with shaggy hair .\n"
        "1000092795.jpg#1\tTwo young , White males are outside .\n"
        "10002456.jpg#0\tSeveral men in hard hats .\n"
        "1000268201.jpg#0\tA child in a pink dress .\n",
        encoding="utf-8",
    )
    images = touch_images(
        tmp_path / "flickr30k-images", ["1000092795.jpg", "10002456.jpg", "1000268201.jpg"]
    )
    files, overrides = prepare_flickr30k(tokens, images, tmp_path / "all")
    assert list(files) == ["all"] and "captions_all.json" in overrides
    assert len(load(files["all"], images)) == 3

    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(
        json.dumps(
            {
                "images": [
                    {"filename": "1000092795.jpg", "imgid": 0, "split": "train", "sentences": []},
                    {"filename": "10002456.jpg", "imgid": 1, "split": "val", "sentences": []},
                    {"filename": "1000268201.jpg", "imgid": 2, "split": "test", "sentences": []},
                ]
            }
        )
    )
    files, _ = prepare_flickr30k(tokens, images, tmp_path / "split", karpathy=karpathy)
    assert set(files) == {"train", "val", "test"}
    train = load(files["train"], images)
    assert [name for name, _ in train.values()] == ["1000092795.jpg"]
    assert len(next(iter(train.values()))[1]) == 2


def karpathy_file(path: Path) -> Path:
    def entry(i: int, split: str, *raws: str, filepath: str = "val2014") -> dict:
        return {
            "filepath": filepath,
            "filename": f"COCO_{filepath}_{i:012d}.jpg",
            "imgid": i - 1,
            "cocoid": i * 10,
            "split": split,
            "sentences": [{"raw": r, "tokens": r.lower().split()} for r in raws],
        }

    images = [
        entry(1, "train", "A man riding a horse.", filepath="train2014"),
        entry(2, "restval", "A cat  on a mat.", "a cat on a mat"),
        entry(3, "val", "Two dogs."),
        entry(4, "test", "A red bus."),
        entry(1, "train", "A man rides a horse.", filepath="train2014"),  # referenced twice
    ]
    images[3]["sentences"].append({"tokens": ["a", "bus", "parked"]})  # no 'raw'
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def test_karpathy_converter(tmp_path: Path) -> None:
    split_file = karpathy_file(tmp_path / "dataset_coco.json")
    root = touch_images(
        tmp_path / "coco",
        [
            "train2014/COCO_train2014_000000000001.jpg",
            *(f"val2014/COCO_val2014_{i:012d}.jpg" for i in (2, 3, 4)),
        ],
    )
    files, overrides = prepare_karpathy(split_file, root, images_root=root)
    assert set(files) == {"train", "val", "test"}
    assert "data.train_images=." in overrides  # images under OUT: no link needed
    train = load(files["train"], root)
    assert train == {
        10: (
            "train2014/COCO_train2014_000000000001.jpg",
            ["A man riding a horse.", "A man rides a horse."],
        ),
        20: ("val2014/COCO_val2014_000000000002.jpg", ["A cat on a mat."]),
    }
    assert load(files["test"], root)[40][1] == ["A red bus.", "a bus parked"]

    files, _ = prepare_karpathy(split_file, tmp_path / "sep", separate_restval=True)
    assert set(files) == {"train", "restval", "val", "test"}
    assert [i["id"] for i in json.loads(files["restval"].read_text())["images"]] == [20]


def test_karpathy_image_in_two_splits_is_an_error(tmp_path: Path) -> None:
    split_file = karpathy_file(tmp_path / "dataset_coco.json")
    data = json.loads(split_file.read_text())
    data["images"][4]["split"] = "test"
    split_file.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"images\[4\]: image train2014/\S+ is in both"):
        prepare_karpathy(split_file, tmp_path / "out")
    split_file.write_text("{not json")
    with pytest.raises(UserError, match="dataset_coco.json: Karpathy split file is not valid JSON"):
        prepare_karpathy(split_file, tmp_path / "out")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"filename": None}, r"images\[1\] has no 'filename'$"),
        ({"split": "extra"}, r"images\[1\] has split 'extra', not train/val/test/restval$"),
        ({"cocoid": "20"}, r"images\[1\] needs an integer 'cocoid'/'imgid' and a string"),
        ({"filepath": 5}, r"images\[1\] needs an integer 'cocoid'/'imgid' and a string"),
        ({"sentences": None}, r"images\[1\] \(val2014/\S+\) has no 'sentences' list$"),
        ({"sentences": [{}]}, r"images\[1\] \(val2014/\S+\) has a sentence without 'raw'"),
    ],
)
def test_every_karpathy_reader_says_the_same(tmp_path: Path, change: dict, says: str) -> None:
    """One reader behind the converter, the Flickr30k splits and the training loader: the same
    entry is wrong in the same words for all three, whichever split it is in."""
    from captioner.datasets.annotations import load_karpathy_split
    from captioner.datasets.sources import read_karpathy_splits

    split_file = karpathy_file(tmp_path / "dataset_coco.json")
    data = json.loads(split_file.read_text())
    data["images"][1].update(change)  # the restval image: not in the 'test' split
    split_file.write_text(json.dumps(data))
    readers = [
        lambda: prepare_karpathy(split_file, tmp_path / "out"),
        lambda: read_karpathy_splits(split_file),
        lambda: load_karpathy_split(split_file, tmp_path, "test", check_images=False),
    ]
    for read in readers:
        with pytest.raises(UserError, match=rf"^{re.escape(str(split_file))}: {says}"):
            read()


def test_main_prints_written_files(
    flickr8k: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    text, out = flickr8k["text"], flickr8k["out"]
    argv = [
        "flickr8k",
        "--token-file",
        str(text / "Flickr8k.token.txt"),
        "--splits-dir",
        str(text),
        "--images",
        str(flickr8k["images"]),
        "--out",
        str(out),
        "--no-link",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        str(out / "annotations" / f"captions_{s}.json") for s in ("train", "val", "test")
    ]
    assert f"data.train_images={flickr8k['images'].resolve()}" in lines[3]
    assert not (out / "images").exists()
    with pytest.raises(SystemExit):
        main(["coco", "--year", "2015"])


# ---------------------------------------------------------------------------------------------
# downloads against a local server


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serving() as srv:
        yield srv


def coco_captions(ids: list[int], prefix: str) -> bytes:
    return json.dumps(
        {
            "images": [{"id": i, "file_name": f"{prefix}{i:012d}.jpg"} for i in ids],
            "annotations": [
                {"id": i, "image_id": i, "caption": f"A photo number {i} ."} for i in ids
            ],
        }
    ).encode()


def serve_coco(srv: FileServer) -> None:
    jpg = b"\xff\xd8 fake jpeg \xff\xd9"
    srv.files = {
        "/annotations/annotations_trainval2017.zip": make_zip(
            {
                "annotations/captions_train2017.json": coco_captions([1, 2], ""),
                "annotations/captions_val2017.json": coco_captions([3], ""),
                "annotations/instances_val2017.json": b"{}",  # not unpacked: captions only
            }
        ),
        "/zips/train2017.zip": make_zip(
            {
                "train2017/": b"",
                "train2017/000000000001.jpg": jpg,
                "train2017/000000000002.jpg": jpg,
            }
        ),
        "/zips/val2017.zip": make_zip({"val2017/000000000003.jpg": jpg}),
        "/karpathy/caption_datasets.zip": make_zip(
            {
                "dataset_coco.json": b'{"images": []}',
                "dataset_flickr8k.json": b"{}",
            }
        ),
    }


def test_prepare_coco_downloads_and_unpacks(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    serve_coco(server)
    out = tmp_path / "coco"
    argv = [
        "coco",
        "--year",
        "2017",
        "--out",
        str(out),
        "--base-url",
        server.url(""),
        "--karpathy",
        "--karpathy-url",
        server.url("/karpathy/caption_datasets.zip"),
        "--timeout",
        "10",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out / "annotations" / "captions_train2017.json") in printed
    assert load(out / "annotations" / "captions_train2017.json", out / "train2017").keys() == {1, 2}
    assert load(out / "annotations" / "captions_val2017.json", out / "val2017").keys() == {3}
    assert not (out / "annotations" / "instances_val2017.json").exists()
    assert (out / "dataset_coco.json").is_file() and not (out / "dataset_flickr8k.json").exists()
    stamps = sorted(p.name for p in (out / "downloads").iterdir())
    assert stamps == sorted(f"{Path(p).name}.done" for p in server.files)  # archives deleted
    assert not list(out.glob(".*unpacking"))

    n = len(server.requests)
    assert main(argv) == 0  # everything stamped: nothing is fetched again
    assert len(server.requests) == n


def test_resumed_download_is_byte_identical(server: FileServer, tmp_path: Path) -> None:
    body = make_zip({"val2017/x.jpg": bytes(range(256)) * 40})
    server.files = {"/val2017.zip": body}
    (tmp_path / "val2017.zip.part").write_bytes(body[: len(body) // 2])
    path, sha256 = download(Archive(server.url("/val2017.zip")), tmp_path, timeout=10)
    assert server.requests == [("/val2017.zip", f"bytes={len(body) // 2}-")]
    assert path.read_bytes() == body and not (tmp_path / "val2017.zip.part").exists()
    import hashlib

    assert sha256 == hashlib.sha256(body).hexdigest()


def test_server_ignoring_range_restarts_cleanly(server: FileServer, tmp_path: Path) -> None:
    body = make_zip({"a.txt": b"hello" * 100})
    server.files = {"/a.zip": body}
    server.honour_range = False
    (tmp_path / "a.zip.part").write_bytes(b"garbage that must not survive")
    path, _ = download(Archive(server.url("/a.zip")), tmp_path, timeout=10)
    assert server.requests[0][1] == "bytes=29-"  # asked to resume, got the whole file
    assert path.read_bytes() == body


def test_complete_part_file_and_416(server: FileServer, tmp_path: Path) -> None:
    body = make_zip({"a.txt": b"x"})
    server.files = {"/a.zip": body}
    (tmp_path / "a.zip.part").write_bytes(body)
    path, _ = download(Archive(server.url("/a.zip")), tmp_path, timeout=10)
    assert path.read_bytes() == body
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.zip.part").write_bytes(body + b"extra")  # longer than the file
    path, _ = download(Archive(server.url("/a.zip")), tmp_path / "b", timeout=10)
    assert path.read_bytes() == body


def test_interrupted_download_keeps_part_then_resumes(server: FileServer, tmp_path: Path) -> None:
    body = make_zip({"a.txt": b"0123456789" * 200})
    server.files = {"/a.zip": body}
    server.cut_after = 1000
    with pytest.raises(
        UserError, match=r"a\.zip: download interrupted at byte 1000 of \d+ .*resume"
    ):
        download(Archive(server.url("/a.zip")), tmp_path, timeout=10)
    assert (tmp_path / "a.zip.part").stat().st_size == 1000
    server.cut_after = None
    path, _ = download(Archive(server.url("/a.zip")), tmp_path, timeout=10)
    assert server.requests[-1][1] == "bytes=1000-"
    assert path.read_bytes() == body


def test_corrupt_archive_is_rejected_and_not_unpacked(server: FileServer, tmp_path: Path) -> None:
    body = bytearray(make_zip({"val2017/x.jpg": b"A" * 500}))
    body[body.index(b"A" * 500) + 10] ^= 0xFF  # same size, bad CRC
    server.files = {"/zips/val2017.zip": bytes(body)}
    out = tmp_path / "coco"
    archive = Archive(server.url("/zips/val2017.zip"))
    with pytest.raises(UserError, match=r"val2017\.zip: corrupt zip archive \(Bad CRC-32") as err:
        prepare_coco(2017, out, archives=[archive], timeout=10)
    assert "\n" not in str(err.value)
    assert not (out / "val2017").exists() and not list(out.glob(".*unpacking"))
    assert not list((out / "downloads").iterdir())  # no stamp, corrupt archive deleted

    server.files = {"/zips/val2017.zip": make_zip({"val2017/x.jpg": b"A" * 500})}
    with pytest.raises(
        UserError, match=r"size is \d+ bytes, expected 12345; the download was deleted"
    ):
        prepare_coco(2017, out, archives=[Archive(archive.url, size=12345)], timeout=10)
    with pytest.raises(UserError, match="SHA-256 is [0-9a-f]{64}, expected 00"):
        prepare_coco(2017, out, archives=[Archive(archive.url, sha256="00" * 32)], timeout=10)
    assert not (out / "val2017").exists() and not list((out / "downloads").iterdir())


def test_http_errors_are_one_line_user_errors(server: FileServer, tmp_path: Path) -> None:
    url = server.url("/zips/train2014.zip")
    with pytest.raises(UserError) as err:
        prepare_coco(2014, tmp_path, base_url=server.url(""), images=True, timeout=10)
    assert str(err.value).startswith(server.url("/annotations/annotations_trainval2014.zip"))
    assert "HTTP 404" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=rf"^{re.escape(url)}: HTTP 404 Not Found$"):
        download(Archive(url), tmp_path, timeout=10)
    with pytest.raises(UserError, match=r"^http://127\.0\.0\.1:1/x\.zip: cannot download"):
        download(Archive("http://127.0.0.1:1/x.zip"), tmp_path, timeout=5)


def test_prepare_and_its_readers_do_not_import_torch() -> None:
    """``captioner prepare`` starts fast: it, the downloader, the annotation readers and the file
    helpers are torch-free (numpy, PIL and pycocotools are imported only where they are used)."""
    import subprocess
    import sys

    modules = (
        "cli.prepare",
        "datasets.prepare",
        "datasets.sources",
        "datasets.coco_download",
        "datasets.flickr8k_download",
        "datasets.download",
        "datasets.annotations",
        "files",
    )
    code = (
        f"import sys; import {', '.join(f'captioner.{m}' for m in modules)}; "
        "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'pycocotools') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
