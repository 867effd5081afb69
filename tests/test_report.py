"""report.html (unit tests, the evaluate hook, and a render in real headless Chromium) and the
training curves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from omegaconf import OmegaConf
from PIL import Image

from captioner.config import compose
from captioner.report import plot_training_curves, training_curves_svg, write_report

METRICS = {
    "bleu1": 0.61,
    "bleu2": 0.42,
    "bleu3": 0.3,
    "bleu4": 0.21,
    "cider": 0.55,
    "split": "test",
    "num_images": 5,
    "skipped_images": 0,
    "checkpoint": "runs/x/best.pt",
    "decode": {
        "strategy": "beam",
        "beam_size": 3,
        "length_penalty": 0.0,
        "max_len": 20,
        "temperature": 1.0,
    },
}
BLEUS = [0.5, 0.05, 0.9, 0.0, 0.3]  # image 3 is the worst, then 1, 4, 0, 2
EVIL = '<script>window.pwned = 1</script> & "quotes"'


class Entries(HTMLParser):
    """The ``figure.entry`` elements of a page, in document order, as attribute dicts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.entries: list[dict[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "figure" and "entry" in (found.get("class") or "").split():
            self.entries.append(found)


@pytest.fixture
def rows(tmp_path: Path) -> list[dict]:
    """Five rows: four small images of different modes and one missing file (image 4)."""
    modes = ["RGB", "L", "RGBA", "P"]
    out = []
    for i, bleu in enumerate(BLEUS):
        path = tmp_path / "images" / f"{i}.png"
        if i < len(modes):
            path.parent.mkdir(exist_ok=True)
            Image.new(modes[i], (48 + 8 * i, 32), 90).save(path)
        out.append(
            {
                "image_id": i,
                "file": str(path),
                "caption": f"caption {i}",
                "references": [f"reference {i} a", f"reference {i} b"],
                "bleu4": bleu,
            }
        )
    out[1]["caption"] = EVIL
    out[2]["references"].append(EVIL)
    return out


def test_report_is_self_contained_and_worst_first(tmp_path: Path, rows: list[dict]) -> None:
    path = write_report(tmp_path / "run", METRICS, rows)
    assert path == tmp_path / "run" / "report.html"
    text = path.read_text("utf-8")
    entries = Entries(text).entries
    assert [e["data-image-id"] for e in entries] == ["3", "1", "4", "0", "2"]
    assert [float(e["data-bleu4"]) for e in entries] == sorted(BLEUS)
    assert text.count('src="data:image/jpeg;base64,') == 4  # every image but the missing one
    assert text.count('class="missing"') == 1
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and 'src="file' not in text
    # captions and references are user data: escaped, never markup
    assert "<script>window" not in text
    assert text.count("&lt;script&gt;window.pwned = 1&lt;/script&gt; &amp; &quot;quotes&quot;") == 2
    assert text.count("<script>") == 1  # only the sort control
    for shown in ("0.2100", "CIDEr", "beam (beam_size=3", "runs/x/best.pt", "test split"):
        assert shown in text
    assert "temperature" not in text  # settings that beam search ignores are left out


def test_report_max_images_keeps_the_worst(tmp_path: Path, rows: list[dict]) -> None:
    text = write_report(tmp_path, METRICS, rows, max_images=2).read_text("utf-8")
    assert [e["data-image-id"] for e in Entries(text).entries] == ["3", "1"]
    assert "2 of 5 images (the worst)" in text


def test_report_tolerates_odd_rows(tmp_path: Path) -> None:
    odd = [
        {"image_id": "a", "file": None, "caption": "", "references": [], "bleu4": None},
        {
            "image_id": "b",
            "file": str(tmp_path),
            "caption": "dir",
            "references": ["x"],
            "bleu4": float("nan"),
        },
    ]
    text = write_report(tmp_path, {"decode": {}}, odd).read_text("utf-8")
    assert len(Entries(text).entries) == 2 and text.count('class="missing"') == 2


def write_history(path: Path, epochs: int = 4) -> Path:
    lines = [
        json.dumps(
            {"epoch": e, "train_loss": 4.0 / e, "val_loss": 4.2 / e + 0.1, "val_bleu4": 0.05 * e}
        )
        for e in range(1, epochs + 1)
    ]
    path.write_text("\n".join([*lines, '{"torn']) + "\n")
    return path


def test_training_curves(tmp_path: Path) -> None:
    log = write_history(tmp_path / "metrics.jsonl")
    written = plot_training_curves(log, tmp_path / "plots" / "curves.png")
    svg = (tmp_path / "plots" / "curves.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3 and "Validation BLEU-4" in svg
    assert svg.count("<circle") == 3 * 4
    pytest.importorskip("matplotlib")
    assert written == tmp_path / "plots" / "curves.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training_curves(log, tmp_path / "c.svg") == tmp_path / "c.svg"


def test_training_curves_edge_cases(tmp_path: Path) -> None:
    assert training_curves_svg([]) == ""
    assert "<polyline" in training_curves_svg([{"epoch": 1, "train_loss": 2.0}])  # one point
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no epoch"):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_evaluate_report_hook(tiny_demo: Path, tmp_path: Path, one_thread: None) -> None:
    """``captioner evaluate ... report=true``: report.html beside metrics.json, with the curves of
    the checkpoint's training run."""
    from captioner.evaluate import evaluate
    from captioner.train import train

    run = tmp_path / "train"
    train(
        compose(
            "train", tiny_overrides(tiny_demo, tmp_path / "cache", **{"trainer.max_epochs": 1})
        ),
        run,
    )
    cfg = compose(
        "evaluate",
        [f"checkpoint={run / 'best.pt'}", "device=cpu", "report=true", "coco_metrics=false"],
    )
    metrics = evaluate(cfg, tmp_path / "eval")
    report = Path(metrics["report"])
    assert report == tmp_path / "eval" / "report.html"
    text = report.read_text("utf-8")
    assert len(Entries(text).entries) == metrics["num_images"] == 8
    assert "Training curves" in text and "<svg" in text
    assert "report" not in evaluate(OmegaConf.merge(cfg, {"report": False}), tmp_path / "eval2")
    assert not (tmp_path / "eval2" / "report.html").exists()


# ---------------------------------------------------------------------------------------------
# a real browser: Debian's chromium, headless (.ci/run installs it)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("CI is set but chromium is not installed: .ci/run installs Debian's chromium")
    pytest.skip(
        "headless Chromium is not installed (apt-get install chromium chromium-driver); "
        "CI installs it and runs this test"
    )


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("order", ["", "#best", "#id"])
def test_report_renders_in_chromium(
    chromium: str, tmp_path: Path, rows: list[dict], order: str
) -> None:
    """The DOM after the page's script ran: every entry, in the order asked for by the URL."""
    report = write_report(tmp_path / "run", METRICS, rows)
    dom = run_chromium(
        chromium, tmp_path, "--virtual-time-budget=3000", "--dump-dom", report.as_uri() + order
    ).stdout
    assert 'data-sorted="' + (order[1:] or "worst") + '"' in dom  # the script ran
    ids = [e["data-image-id"] for e in Entries(dom).entries]
    assert len(ids) == len(rows)
    want = {
        "": ["3", "1", "4", "0", "2"],
        "#best": ["2", "0", "4", "1", "3"],
        "#id": ["0", "1", "2", "3", "4"],
    }[order]
    assert ids == want
    assert "pwned" in dom and "<script>window" not in dom


def test_report_screenshot(chromium: str, tmp_path: Path, rows: list[dict]) -> None:
    history = write_history(tmp_path / "metrics.jsonl")
    report = write_report(tmp_path / "run", METRICS, rows, metrics_log=history)
    shot = tmp_path / "report.png"
    run_chromium(
        chromium,
        tmp_path,
        "--window-size=1200,900",
        f"--screenshot={shot}",
        "--virtual-time-budget=3000",
        report.as_uri(),
    )
    with Image.open(shot) as img:
        assert img.size == (1200, 900)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert shot.stat().st_size > 10_000 and colors is not None and len(colors) > 50
    if os.environ.get("REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])
