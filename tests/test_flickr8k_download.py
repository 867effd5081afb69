"""``captioner prepare flickr8k --download`` against a loopback HTTP server serving tiny fakes of
the mirror's ``Flickr8k_text.zip`` and ``Flickr8k_Dataset.zip`` (never the network): a full
download read back by the data loader, a resumed one, and archives refused in one line."""

from __future__ import annotations

import io
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import FileServer, make_zip, serving
from PIL import Image

from captioner.cli import main as captioner_main
from captioner.cli.prepare import main as prepare_main
from captioner.errors import UserError

SPLITS_OUT = ("train", "val", "test")  # the written files: dev becomes val
SPLITS = {"train": ["a.jpg", "b.jpg", "c.jpg"], "dev": ["d.jpg"], "test": ["e.jpg"]}
TOKENS = (
    "".join(
        f"{name}#{i}\tA photo of {name[0]} number {i} .\n"
        for names in SPLITS.values()
        for name in names
        for i in range(2)
    )
    + "2258277193_586949ec62.jpg.1#0\tThe release's stray entry .\n"
)


def jpeg(seed: int, size: int = 32) -> bytes:
    """A real JPEG of deterministic noise (incompressible: ``size`` sets the archive's length)."""
    img = Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def text_zip(drop: str | None = None) -> bytes:
    """The text release as the mirror ships it: more files than needed, macOS metadata."""
    members = {
        "Flickr8k.token.txt": TOKENS.encode(),
        "Flickr8k.lemma.token.txt": b"not read\n",
        "CrowdFlowerAnnotations.txt": b"not read\n",
        "readme.txt": b"not read\n",
        "__MACOSX/._Flickr8k.token.txt": b"\x00\x05\x16\x07 AppleDouble",
    }
    for split, names in SPLITS.items():
        members[f"Flickr_8k.{split}Images.txt"] = "".join(f"{n}\n" for n in names).encode()
    members.pop(drop, None)
    return make_zip(members)


def images_zip(drop: str | None = None, extra: int = 0) -> bytes:
    members = {"Flicker8k_Dataset/": b""}
    for seed, name in enumerate(n for names in SPLITS.values() for n in names):
        if name != drop:
            members[f"Flicker8k_Dataset/{name}"] = jpeg(seed)
            members[f"__MACOSX/Flicker8k_Dataset/._{name}"] = b"\x00\x05\x16\x07 AppleDouble"
    if extra:  # an image in no split: makes the archive as long as a test needs
        members["Flicker8k_Dataset/z.jpg"] = jpeg(99, size=extra)
    return make_zip(members)


@pytest.fixture
def mirror() -> Iterator[FileServer]:
    with serving() as srv:
        srv.files = {
            "/f8k/Flickr8k_text.zip": text_zip(),
            "/f8k/Flickr8k_Dataset.zip": images_zip(),
        }
        yield srv


def argv(srv: FileServer, out: Path) -> list[str]:
    """``prepare flickr8k --download`` from the loopback mirror into ``out``."""
    base = srv.url("/f8k/")
    return ["flickr8k", "--download", "--base-url", base, "--root", str(out), "--timeout", "10"]


def cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run ``captioner ARGS`` expecting a user error: its one stderr line."""
    with pytest.raises(SystemExit) as exc:
        captioner_main(list(args))
    err = capsys.readouterr().err
    assert exc.value.code not in (0, None) and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_download_unpacks_converts_and_the_data_loader_reads_it(
    mirror: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from captioner.configs.hydra import compose
    from captioner.configs.training import parse_train_config
    from captioner.datasets.captions import load_split
    from captioner.datasets.images import load_image

    out = tmp_path / "flickr8k"
    assert prepare_main(argv(mirror, out)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == [str(out / "annotations" / f"captions_{s}.json") for s in SPLITS_OUT]
    assert printed[3] == f"use: data=flickr8k data.root={out}"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        n for names in SPLITS.values() for n in names
    )  # no AppleDouble files, no symlink: the photos themselves
    assert not (out / "images").is_symlink()
    assert sorted(p.name for p in (out / "Flickr8k_text").iterdir()) == [
        "Flickr8k.token.txt",
        "Flickr_8k.devImages.txt",
        "Flickr_8k.testImages.txt",
        "Flickr_8k.trainImages.txt",
    ]
    assert sorted(p.name for p in (out / "downloads").iterdir()) == [
        "Flickr8k_Dataset.zip.done",
        "Flickr8k_text.zip.done",
    ]  # the zips are deleted once unpacked
    assert not list(out.glob(".*unpacking"))

    # the README's training line composes and reads every split of what was written
    data = parse_train_config(compose("train", ["experiment=flickr8k", f"data.root={out}"])).data
    for split, names in zip(SPLITS_OUT, SPLITS.values(), strict=True):
        records = load_split(data, split)
        assert sorted(r.path.name for r in records) == sorted(names)
        assert all(len(r.captions) == 2 for r in records)
        assert load_image(records[0].path).size == (32, 32)
    first = load_split(data, "train")[0]
    assert first.captions == [f"A photo of {first.path.name[0]} number {i} ." for i in range(2)]

    n = len(mirror.requests)
    assert prepare_main(argv(mirror, out)) == 0  # stamped: nothing is fetched again
    assert len(mirror.requests) == n

    shutil.rmtree(out / "images")
    assert prepare_main(argv(mirror, out)) == 0  # the images are gone: only they come again
    assert [path for path, _ in mirror.requests[n:]] == ["/f8k/Flickr8k_Dataset.zip"]
    assert (out / "images" / "a.jpg").is_file()


def test_interrupted_download_resumes(mirror: FileServer, tmp_path: Path) -> None:
    images = images_zip(extra=400)
    mirror.files["/f8k/Flickr8k_Dataset.zip"] = images
    text_len = len(mirror.files["/f8k/Flickr8k_text.zip"])
    cut = text_len + 1000  # the text zip arrives whole, the image zip is cut after 'cut' bytes
    assert len(images) > cut
    mirror.cut_after = cut
    out = tmp_path / "f8k"
    with pytest.raises(UserError, match=rf"download interrupted at byte {cut} of \d+ .*resume"):
        prepare_main(argv(mirror, out))
    part = out / "downloads" / "Flickr8k_Dataset.zip.part"
    assert part.stat().st_size == cut
    assert not (out / "images").exists()  # nothing unpacked from half an archive

    mirror.cut_after = None
    n = len(mirror.requests)
    assert prepare_main(argv(mirror, out)) == 0
    # the text release is not fetched again; the images continue where they stopped
    assert mirror.requests[n:] == [("/f8k/Flickr8k_Dataset.zip", f"bytes={cut}-")]
    assert (out / "images" / "z.jpg").read_bytes() == jpeg(99, size=400)
    assert (out / "annotations" / "captions_test.json").is_file()


def corrupt(body: bytes) -> bytes:
    """The same size, one flipped byte inside a member: its CRC-32 no longer matches."""
    data = bytearray(body)
    data[data.index(b"JFIF") + 40] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    "damage, says",
    [
        (corrupt, r"corrupt zip archive \(Bad CRC-32 for file 'Flicker8k_Dataset/\w\.jpg'\)"),
        (lambda body: body[: len(body) // 2], r"corrupt zip archive \(File is not a zip file\)"),
    ],
    ids=["bad-crc", "truncated"],
)
def test_corrupt_or_truncated_archive_is_refused_in_one_line(
    mirror: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture, damage, says: str
) -> None:
    good = mirror.files["/f8k/Flickr8k_Dataset.zip"]
    mirror.files["/f8k/Flickr8k_Dataset.zip"] = damage(good)
    out = tmp_path / "f8k"
    line = cli_error(capsys, "prepare", *argv(mirror, out))
    assert f"{out / 'downloads' / 'Flickr8k_Dataset.zip'}: " in line
    assert re.search(says + "; deleted it, run again", line), line
    assert not (out / "images").exists() and not list(out.glob(".*unpacking"))
    assert sorted(p.name for p in (out / "downloads").iterdir()) == ["Flickr8k_text.zip.done"]

    mirror.files["/f8k/Flickr8k_Dataset.zip"] = good  # the mirror is fixed: a re-run succeeds
    assert prepare_main(argv(mirror, out)) == 0
    assert (out / "images" / "e.jpg").is_file()


@pytest.mark.parametrize(
    "path, body, says",
    [
        (
            "/f8k/Flickr8k_text.zip",
            text_zip(drop="Flickr_8k.devImages.txt"),
            "Flickr8k_text.zip: not the expected archive: it lacks Flickr_8k.devImages.txt; "
            "deleted it",
        ),
        (
            "/f8k/Flickr8k_Dataset.zip",
            images_zip(drop="d.jpg"),
            "Flickr8k_Dataset.zip: not the expected archive: it lacks 1 of the 5 images that "
            "the split lists of",
        ),
        (
            "/f8k/Flickr8k_Dataset.zip",
            make_zip({"Flicker8k_Dataset/readme.txt": b"no photos here"}),
            "Flickr8k_Dataset.zip: holds none of the expected files; deleted it",
        ),
    ],
    ids=["text-without-a-split-list", "images-without-a-listed-image", "no-images"],
)
def test_archive_without_the_expected_members_is_refused(
    mirror: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture, path: str, body, says: str
) -> None:
    mirror.files[path] = body
    out = tmp_path / "f8k"
    line = cli_error(capsys, "prepare", *argv(mirror, out))
    assert says in line, line
    assert not (out / "images").exists() and not (out / "annotations").exists()
    assert not (out / "downloads" / Path(path).name).exists()  # deleted: a re-run fetches it
    assert not (out / "downloads" / f"{Path(path).name}.done").exists()


def test_flickr8k_options_are_checked_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    line = cli_error(capsys, "prepare", "flickr8k", "--out", str(tmp_path))
    assert "--token-file, --splits-dir, --images missing: pass --download" in line
    line = cli_error(
        capsys,
        "prepare",
        "flickr8k",
        "--download",
        "--token-file",
        "t.txt",
        "--root",
        str(tmp_path),
    )
    assert "--token-file is for converting your own copy, not --download" in line
    assert not any(tmp_path.iterdir())
    unreachable = ["--base-url", "http://127.0.0.1:1/f8k", "--timeout", "5"]
    line = cli_error(
        capsys, "prepare", "flickr8k", "--download", "--root", str(tmp_path), *unreachable
    )
    assert line.startswith("error: http://127.0.0.1:1/f8k/Flickr8k_text.zip: cannot download")
