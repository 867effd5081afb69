"""report.html (unit tests, the evaluate hook, and a render in real headless Chromium) and the
training curves."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from helpers import chromium_driver
from omegaconf import OmegaConf
from PIL import Image

from captioner.configs.hydra import compose
from captioner.configs.preprocessing import Preprocessing
from captioner.datasets.images import model_view
from captioner.evaluation.attention_maps import heat_overlay, jet_lut, quantized_maps, view_box
from captioner.evaluation.report import (
    CURVES,
    plot_training_curves,
    training_curves_figure,
    training_curves_svg,
    write_report,
)

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


class Curves(HTMLParser):
    """The lines matplotlib drew in a page or SVG, by their id ``curve-<metrics.jsonl key>``:
    ``{id: {"points": [(x, y), ...] of the line's path, "markers": number of markers}}``, in
    document order. SVG y grows downwards."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.curves: dict[str, dict] = {}
        self._open: list[str | None] = []  # per open <g>: the curve it belongs to, if any
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        curve = self._open[-1] if self._open else None
        if tag == "g":
            if (found.get("id") or "").startswith("curve-"):
                curve = found["id"]
                self.curves[curve] = {"points": [], "markers": 0}
            self._open.append(curve)
        elif curve and tag == "path" and not self.curves[curve]["points"]:  # the line itself
            xy = re.findall(r"[ML] (-?[\d.]+) (-?[\d.]+)", found.get("d") or "")
            self.curves[curve]["points"] = [(float(x), float(y)) for x, y in xy]
        elif curve and tag == "use":  # one marker per data point
            self.curves[curve]["markers"] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "g":
            self._open.pop()


def external_references(text: str) -> list[str]:
    """URLs in ``text`` apart from XML namespace names (xmlns="http://www.w3.org/2000/svg"),
    which are identifiers that nothing fetches."""
    return re.findall(r"(?:https?|file)://\S*", re.sub(r'xmlns(:\w+)?="[^"]*"', "", text))


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
    history = write_history(tmp_path / "metrics.jsonl")
    path = write_report(tmp_path / "run", METRICS, rows, metrics_log=history)
    assert path == tmp_path / "run" / "report.html"
    text = path.read_text("utf-8")
    entries = Entries(text).entries
    assert [e["data-image-id"] for e in entries] == ["3", "1", "4", "0", "2"]
    assert [float(e["data-bleu4"]) for e in entries] == sorted(BLEUS)
    assert text.count('src="data:image/jpeg;base64,') == 4  # every image but the missing one
    assert text.count('class="missing"') == 1
    assert external_references(text) == [] and 'src="file' not in text
    assert "<image" not in text and "<link" not in text and "@import" not in text
    assert text.count("<svg") == 1  # the training curves, inline
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


SERIES = ["curve-train_loss", "curve-val_loss", "curve-val_bleu4"]


def test_report_embeds_the_training_curves(tmp_path: Path, rows: list[dict]) -> None:
    """The curves are matplotlib's SVG inside the page: the three series, one point per epoch,
    loss falling (val above train), BLEU rising, with their titles and legend as text."""
    history = write_history(tmp_path / "metrics.jsonl", epochs=5)
    text = write_report(tmp_path / "run", METRICS, rows, metrics_log=history).read_text("utf-8")
    assert "<h2>Training curves</h2>" in text
    figure = text[text.index('<div class="curves"><svg') :]
    assert not figure.startswith("<?xml") and "<!DOCTYPE svg" not in text  # inlined, no prolog
    curves = Curves(text).curves
    assert list(curves) == SERIES
    assert all(len(c["points"]) == c["markers"] == 5 for c in curves.values())
    for c in curves.values():
        xs = [x for x, _ in c["points"]]
        assert xs == sorted(xs) and len(set(xs)) == 5  # one point per epoch, in order
    train, val, bleu = ([y for _, y in curves[k]["points"]] for k in SERIES)
    assert train == sorted(train) and val == sorted(val)  # falling loss: y grows downwards
    assert all(v < t for v, t in zip(val, train, strict=True))  # val loss above train loss
    assert bleu == sorted(bleu, reverse=True)  # rising BLEU
    for label in ("Loss", "Validation BLEU-4", "train", "val", "val BLEU-4", "epoch"):
        assert f">{label}</text>" in text  # text stays text (searchable, crisp)
    ids = re.findall(r' id="([^"]+)"', text)
    assert len(ids) == len(set(ids)) and ids.count("grid") == 1  # no clash with the page's ids
    assert 'class="curves"' not in write_report(tmp_path / "bare", METRICS, rows).read_text()


def test_training_curves(tmp_path: Path) -> None:
    log = write_history(tmp_path / "metrics.jsonl")
    written = plot_training_curves(log, tmp_path / "plots" / "curves.png")
    assert written == tmp_path / "plots" / "curves.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "plots" / "curves.svg").exists()  # one file, the one asked for
    assert plot_training_curves(log, tmp_path / "c.svg") == tmp_path / "c.svg"
    curves = Curves((tmp_path / "c.svg").read_text()).curves
    assert list(curves) == SERIES and all(c["markers"] == 4 for c in curves.values())
    assert plot_training_curves(log, tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    fig = training_curves_figure([json.loads(line) for line in log.read_text().splitlines()[:4]])
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["Loss", "Validation BLEU-4"]
    assert [line.get_label() for line in fig.axes[0].lines] == ["train", "val"]


def test_training_curves_edge_cases(tmp_path: Path) -> None:
    assert training_curves_svg([]) == "" and training_curves_figure([]) is None
    assert training_curves_svg([{"epoch": 1, "lr": 0.1}]) == ""  # nothing to draw
    one = training_curves_svg([{"epoch": 1, "train_loss": 2.0}])  # one point, one panel
    assert list(Curves(one).curves) == ["curve-train_loss"]
    assert Curves(one).curves["curve-train_loss"]["markers"] == 1
    assert ">Loss</text>" in one and "Validation BLEU-4" not in one
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no epoch"):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_report_module_imports_no_plot_library(tmp_path: Path) -> None:
    """matplotlib loads only when a curve is drawn, and never pyplot (nor a GUI backend)."""
    code = (
        "import sys\n"
        "import captioner.evaluation.report as r\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert r.training_curves_svg([{'epoch': 1, 'train_loss': 1.0}]).startswith('<svg')\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {**os.environ, "MPLBACKEND": "TkAgg"}  # a GUI default must not matter either
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


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
    from captioner.evaluation.evaluate import evaluate
    from captioner.training.train import train

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
    assert "curve-train_loss" in Curves(text).curves
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
    # the curves were drawn: every series' colour (its markers' fill) is on the screen
    counts = {rgb: n for n, rgb in colors}
    for _, lines in CURVES:
        for label, color, _ in lines:
            rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
            assert counts.get(rgb, 0) > 50, (label, color)
    if os.environ.get("REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])


# ---------------------------------------------------------------------------------------------
# attention maps: stored once per caption as bytes, drawn by the page when opened (issue 20: a
# JPEG per word made 5,000 entries 208 MB)

PRE = Preprocessing(resize=48, crop=48)


def peaked_maps(words: int, h: int = 3, w: int = 4) -> torch.Tensor:
    """Word i looks at cell i of the grid (row-major), a little everywhere else."""
    maps = torch.full((words, h, w), 0.02)
    for i in range(words):
        maps[i].view(-1)[i % (h * w)] = 1.0
    return maps / maps.sum((1, 2), keepdim=True)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (48, 48), (300, 50), (33, 97)])
def test_view_box_is_the_model_view(size: tuple[int, int]) -> None:
    """The box the page crops from the thumbnail is the region ``model_view`` keeps: an image
    whose pixels encode their own coordinates shows the box's corners at the view's corners."""
    w, h = size
    xs = np.broadcast_to(np.linspace(0, 255, w, dtype=np.float32), (h, w))
    ys = np.broadcast_to(np.linspace(0, 255, h, dtype=np.float32)[:, None], (h, w))
    image = Image.fromarray(np.stack([xs, ys, xs * 0], -1).round().astype(np.uint8))
    pre = Preprocessing(resize=40, crop=32, interpolation="nearest")
    view = np.asarray(model_view(image, pre)).astype(float)
    left, top, right, bottom = view_box(w, h, pre.resize, pre.crop)
    assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
    # the view's first and last column (row) sample the box's edges, half a view pixel in (to a
    # source pixel: the image's value at x is 255 x / (n - 1))
    for got, lo, hi, n in ((view[0, :, 0], left, right, w), (view[:, 0, 1], top, bottom, h)):
        step = (hi - lo) / pre.crop
        want = [
            255 * (lo + step / 2) * n / max(n - 1, 1),
            255 * (hi - step / 2) * n / max(n - 1, 1),
        ]
        assert got[0] == pytest.approx(want[0], abs=255 / max(n - 1, 1) + 2)
        assert got[-1] == pytest.approx(want[1], abs=255 / max(n - 1, 1) + 2)


def test_report_stores_each_captions_maps_once_as_bytes(tmp_path: Path, rows: list[dict]) -> None:
    """One ``details.attention`` per caption with its words, the grids (bytes on the caption's
    one scale) and the view's box, no image per word; a few hundred bytes per caption."""
    words = ["a", "dog", "<unk>", "runs", EVIL]
    maps = peaked_maps(len(words))
    attention = {r["image_id"]: (words, maps) for r in rows}
    attention[0] = ([], torch.zeros(0, 3, 4))  # an empty caption: no strip
    plain = write_report(tmp_path / "plain", METRICS, rows).stat().st_size
    path = write_report(tmp_path / "maps", METRICS, rows, attention=attention, preprocessing=PRE)
    text = path.read_text("utf-8")
    assert text.count('<details class="attention"') == 4
    assert text.count("<img") == 4 and "<script>window" not in text
    assert (path.stat().st_size - plain - len(jet_lut()) * 4 / 3) / 4 < 500
    found = re.search(
        r'data-words="([^"]*)" data-grid="3 4" data-box="([^"]*)" data-maps="([^"]*)"', text
    )
    assert found and json.loads(html.unescape(found[1])) == words
    grids = np.frombuffer(base64.b64decode(found[3]), np.uint8).reshape(len(words), 3, 4)
    assert (grids == quantized_maps(maps)).all() and grids.max() == 255
    assert (quantized_maps(maps.numpy()) == grids).all()  # an array is taken as well
    assert quantized_maps(torch.tensor([[[float("nan"), 0.5]]])).tolist() == [[[0, 255]]]
    assert grids[1, 0, 1] == 255 and grids[1, 0, 0] < 10  # word 1 looked at cell 1
    image_3 = Image.open(rows[3]["file"]).size  # the worst entry, shown first
    assert [float(v) for v in found[2].split()] == pytest.approx(
        view_box(*image_3, 48, 48), abs=1e-4
    )
    with pytest.raises(ValueError, match="5 words but 2 attention maps"):
        write_report(tmp_path / "bad", METRICS, rows, attention={3: (words, maps[:2])})


@pytest.fixture
def driver():
    yield from chromium_driver("1200,900")


def panel_pixels(driver, entry: int, panel: int) -> np.ndarray:
    data = driver.execute_script(
        "const c = document.querySelectorAll('.entry')[arguments[0]]"
        ".querySelectorAll('details.attention canvas')[arguments[1]];"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
        entry,
        panel,
    )
    side = int(round((len(data) / 4) ** 0.5))
    return np.array(data, dtype=float).reshape(side, side, 4)[..., :3]


def test_report_draws_the_maps_as_heat_overlay_when_opened(
    driver, tmp_path: Path, rows: list[dict]
) -> None:
    """In Chromium: nothing drawn until an entry's maps are opened, then one panel per word,
    named by it, whose pixels are ``heat_overlay``'s over the model's view of the thumbnail
    (a grey image: the map itself; a striped one: the box, not the whole thumbnail)."""
    grey, stripes = tmp_path / "grey.png", tmp_path / "stripes.png"
    Image.new("RGB", (60, 60), (128, 128, 128)).save(grey)
    band = np.zeros((48, 96, 3), np.uint8)
    band[:, :24, 1] = band[:, 72:, 1] = 255  # green | red | blue | green; the view: red | blue
    band[:, 24:48, 0] = band[:, 48:72, 2] = 255
    Image.fromarray(band).save(stripes)
    page_rows = [dict(rows[0], file=str(grey), bleu4=0.1), dict(rows[2], file=str(stripes))]
    words = ["a", "dog", "runs"]
    attention = {
        rows[0]["image_id"]: (words, peaked_maps(3)),
        rows[2]["image_id"]: (["x"], torch.zeros(1, 2, 2)),
    }
    path = write_report(
        tmp_path / "run", METRICS, page_rows, attention=attention, preprocessing=PRE
    )
    driver.get(path.as_uri())
    assert driver.execute_script("return document.querySelectorAll('canvas').length") == 0
    driver.execute_script(
        "document.querySelectorAll('details.attention').forEach(d => d.open = true)"
    )
    driver.execute_async_script(  # "toggle" fires after the change; the drawing follows it
        "const done = arguments[0], wait = () =>"
        " document.querySelectorAll('details[data-drawn]').length == 2 ? done() : setTimeout(wait, 10);"
        "wait();"
    )
    labels = driver.execute_script(
        "return Array.from(document.querySelectorAll('.entry')[0].querySelectorAll('canvas'))"
        ".map(c => c.getAttribute('aria-label') + '/' + c.nextSibling.textContent)"
    )
    assert labels == [f"attention for {w}/{w}" for w in words]
    maps = peaked_maps(3)
    for i in range(3):
        want = heat_overlay(Image.new("RGB", (80, 80), (128, 128, 128)), maps[i], float(maps.max()))
        diff = np.abs(panel_pixels(driver, 0, i) - np.asarray(want, dtype=float))
        assert diff.mean() < 2 and np.percentile(diff, 99) < 8, (i, diff.mean())
    # zero weights: jet's bottom (dark blue) over the view, red then blue; no green of the edges
    striped = panel_pixels(driver, 1, 0)
    assert striped[40, 8].round().tolist() == pytest.approx([115, 0, 70], abs=12)
    assert striped[40, 72].round().tolist() == pytest.approx([0, 0, 185], abs=12)
    assert (
        driver.execute_script(
            "sortCards('best'); return document.querySelectorAll('canvas').length"
        )
        == 4
    )
