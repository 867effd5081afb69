"""``captioner prepare flickr8k --download``: the Flickr8k images and text release fetched from a
public mirror and converted into the layout the ``flickr8k`` data config reads::

    OUT/images/NAME.jpg                    the 8,091 photos of Flickr8k_Dataset.zip
    OUT/Flickr8k_text/                     Flickr8k.token.txt and Flickr_8k.*Images.txt
    OUT/annotations/captions_{train,val,test}.json   the official splits (dev becomes val)
    OUT/downloads/NAME.done                what was unpacked from where (a re-run skips it)

The archives go through :mod:`captioner.datasets.download`: streamed with a progress bar, resumed
with HTTP Range requests, unpacked through a staging directory. Neither the mirror nor the
dataset's authors publish sizes or checksums of these zips, so none is hard-coded; the checks are
the CRC-32 of every member (while unpacking), the text release holding its four files, and the
image archive holding every image that the split lists name. An archive that fails one is
deleted before anything of it reaches ``OUT``. ``__MACOSX/`` entries are skipped. The conversion
is :func:`captioner.datasets.prepare.prepare_flickr8k`, the same as for files got by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from captioner.datasets.download import Archive, fetch_archive
from captioner.datasets.prepare import FLICKR8K_SPLIT_FILES, prepare_flickr8k
from captioner.datasets.sources import read_image_list

# Jason Brownlee's copy of the release: the mirror most tutorials use
FLICKR8K_BASE_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
TEXT_ZIP, IMAGES_ZIP = "Flickr8k_text.zip", "Flickr8k_Dataset.zip"
TEXT_DIR, IMAGES_DIR = "Flickr8k_text", "images"
TOKEN_FILE = "Flickr8k.token.txt"
TEXT_FILES = (TOKEN_FILE, *FLICKR8K_SPLIT_FILES.values())


def _member_name(member: str) -> str | None:
    """A member's file name, or None for macOS metadata (``__MACOSX/``, ``._NAME``)."""
    parts = member.replace("\\", "/").split("/")
    name = parts[-1]
    if "__MACOSX" in parts or name.startswith("._"):
        return None
    return name


def _text_member(member: str) -> str | None:
    name = _member_name(member)
    return f"{TEXT_DIR}/{name}" if name in TEXT_FILES else None


def _image_member(member: str) -> str | None:
    name = _member_name(member)
    return f"{IMAGES_DIR}/{name}" if name and name.lower().endswith(".jpg") else None


def _check_text(staging: Path) -> str | None:
    missing = [name for name in TEXT_FILES if not (staging / TEXT_DIR / name).is_file()]
    return f"it lacks {', '.join(missing)}" if missing else None


def _images_check(text_dir: Path) -> Callable[[Path], str | None]:
    """The image archive's check: every image a split list in ``text_dir`` names is in it."""

    def check(staging: Path) -> str | None:
        listed = [
            name
            for split_file in FLICKR8K_SPLIT_FILES.values()
            for name in read_image_list(text_dir / split_file)
        ]
        missing = [name for name in listed if not (staging / IMAGES_DIR / name).is_file()]
        if not missing:
            return None
        return (
            f"it lacks {len(missing)} of the {len(listed)} images that the split lists of "
            f"{text_dir} name, e.g. {missing[0]}"
        )

    return check


def flickr8k_archives(out: str | Path, base_url: str = FLICKR8K_BASE_URL) -> list[Archive]:
    """The text release, then the images (whose check reads the text release's split lists)."""
    base = base_url.rstrip("/")
    return [
        Archive(f"{base}/{TEXT_ZIP}", _text_member, check=_check_text),
        Archive(f"{base}/{IMAGES_ZIP}", _image_member, check=_images_check(Path(out) / TEXT_DIR)),
    ]


def download_flickr8k(
    out: str | Path = "data/flickr8k",
    base_url: str = FLICKR8K_BASE_URL,
    keep_archives: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> tuple[dict[str, Path], str]:
    """Download, check and unpack Flickr8k into ``out``, then write its COCO captions files;
    returns them and the Hydra overrides (those of the ``flickr8k`` data config).

    Archives whose stamp ``out/downloads/NAME.done`` exists (and whose files are still there)
    are not fetched again; an interrupted download resumes from ``out/downloads/NAME.part``.
    """
    out = Path(out)
    for archive in flickr8k_archives(out, base_url):
        fetch_archive(
            archive,
            out,
            out / "downloads",
            keep_archive=keep_archives,
            timeout=timeout,
            progress=progress,
        )
    text = out / TEXT_DIR
    return prepare_flickr8k(text / TOKEN_FILE, text, out / IMAGES_DIR, out)
