"""``captioner serve``'s web page in headless Chromium (issue 23, section 3): each image its own
caption or error, feedback while captioning, the keyboard path to the picker, phone widths, the
beam list, top-p, drops outside the drop zone; and what ``/model`` says the model was trained on.

The browser tests need Debian's chromium and chromium-driver: skipped without them, failed when
``CI`` is set. ``CAPTIONER_SCREENSHOT_DIR`` keeps the screenshots the layout test takes."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="captioner serve needs the serve extra")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import chromium_driver  # noqa: E402
from test_pretrained import images, variant_checkpoint  # noqa: E402

from captioner.checkpoint import save_checkpoint  # noqa: E402
from captioner.configs.decode import DecodeConfig  # noqa: E402
from captioner.inference import Captioner  # noqa: E402
from captioner.pretrained import export_pretrained  # noqa: E402
from captioner.serve.app import create_app  # noqa: E402
from captioner.serve.routes import model_name  # noqa: E402
from captioner.serve.settings import ServeSettings  # noqa: E402
from captioner.vocab import SPECIALS  # noqa: E402

DEMO = "trained on the synthetic shapes demo: it captions coloured shapes, not photos"
END, UNK = SPECIALS.index("<end>"), SPECIALS.index("<unk>")  # vocabulary ids
SETTINGS = ServeSettings(max_upload_mb=0.05)  # 52 kB: a test image is ~10 kB


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported LSTM trained (by its checkpoint's account) on the demo data, its random
    weights pushed to long captions that differ between images and hold no ``<unk>`` (a random
    model's greedy caption is often empty)."""
    d = tmp_path_factory.mktemp("page")
    path = variant_checkpoint(d / "p")
    ckpt = torch.load(path, weights_only=True)
    weights = ckpt["model"]
    weights["decoder.out.bias"][[END, UNK]] -= torch.tensor([1.0, 30.0])
    weights["decoder.out.weight"] *= 4
    for name in ("decoder.init_h.weight", "decoder.init_c.weight"):
        weights[name] *= 30  # the image decides more
    save_checkpoint(ckpt, path)
    return export_pretrained(path, d / "shapes-model")


@pytest.fixture(scope="module")
def captioner(model_dir: Path) -> Captioner:
    return Captioner.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def pics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three images, a text file named .png and a file over the server's upload limit."""
    d = tmp_path_factory.mktemp("pics")
    good = images(d, 3)
    (d / "notes.png").write_text("not an image")
    (d / "huge.png").write_bytes(os.urandom(80_000))
    return {"a": good[0], "b": good[1], "c": good[2], "bad": d / "notes.png", "big": d / "huge.png"}


@pytest.fixture(scope="module")
def url(captioner: Captioner) -> Iterator[str]:
    """The app served by uvicorn on a thread of this process, on a free port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(captioner, SETTINGS), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    yield from chromium_driver("1200,900")


def open_page(browser, url: str, width: int = 1200, height: int = 900):
    """The page loaded at a viewport of ``width`` CSS px, its model described -> a waiter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "words" in d.find_element(By.ID, "model").text)
    return wait


def pick(browser, *paths: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in paths))


def settled(wait, n: int) -> list:
    """The ``n`` result cards once none is still waiting for its answer."""
    from selenium.webdriver.common.by import By

    def done(d):
        cards = d.find_elements(By.CSS_SELECTOR, "#results .card")
        finished = d.find_elements(By.CSS_SELECTOR, "#results .card.done, #results .card.failed")
        return cards if len(cards) == n == len(finished) else False

    return wait.until(done)


def js(browser, script: str, *args):
    return browser.execute_script(script, *args)


# -- what /model and the header say -------------------------------------------------------------


def test_model_says_what_it_was_trained_on_and_its_name_not_its_path(
    captioner: Captioner, model_dir: Path, tmp_path: Path
) -> None:
    with TestClient(create_app(captioner, SETTINGS)) as client:
        answer = client.get("/model")
    assert str(model_dir.parent) not in answer.text
    info = answer.json()
    assert info["trained_on"]["dataset"] == "demo"
    assert info["trained_on_summary"] == DEMO + " (weights of epoch 3)"
    assert info["name"] == "shapes-model"
    ckpt = tmp_path / "run-7" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    assert model_name(str(ckpt)) == "run-7/best.pt"
    assert model_name("owner/captioner-coco") == "owner/captioner-coco"  # a Hub id, no such path


@pytest.mark.slow
def test_the_header_says_what_the_model_knows_without_the_servers_path(
    browser, url: str, model_dir: Path
) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, url)
    header = browser.find_element(By.TAG_NAME, "header").text
    assert "shapes-model" in header and "LSTM 24" in header
    assert "T" + DEMO[1:] in header
    assert str(model_dir.parent) not in browser.find_element(By.TAG_NAME, "body").text


# -- each image its own answer ------------------------------------------------------------------


@pytest.mark.slow
def test_a_bad_file_among_good_ones_gets_its_own_error(
    browser, url: str, captioner: Captioner, pics: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By

    goods = [pics["a"], pics["b"], pics["c"]]
    results = captioner.caption(goods, DecodeConfig())
    greedy = {p.name: r.caption for p, r in zip(goods, results, strict=True)}
    wait = open_page(browser, url)
    pick(browser, pics["a"], pics["bad"], pics["big"], pics["b"])
    cards = settled(wait, 4)
    names = [c.find_element(By.CSS_SELECTOR, ".name").text for c in cards]
    assert names == ["img0.png", "notes.png", "huge.png", "img1.png"]  # the order picked
    for i in (0, 3):
        assert cards[i].find_element(By.CSS_SELECTOR, ".caption").text == greedy[names[i]]
        assert not cards[i].find_elements(By.CSS_SELECTOR, ".error")
    for card, says in ((cards[1], "not an image"), (cards[2], "over the server's upload limit")):
        assert says in card.find_element(By.CSS_SELECTOR, ".error").text
        assert not card.find_elements(By.CSS_SELECTOR, ".caption")
    assert browser.find_element(By.ID, "status").text == "2 of 4 images captioned, 2 could not be"
    assert browser.find_element(By.ID, "error").text == ""
    # the next pick replaces every earlier result, good or bad
    pick(browser, pics["c"])
    (card,) = settled(wait, 1)
    assert card.find_element(By.CSS_SELECTOR, ".caption").text == greedy["img2.png"]
    assert browser.find_element(By.ID, "status").text == "1 image captioned"


@pytest.mark.slow
def test_the_first_upload_shows_progress_until_its_caption_arrives(
    browser, url: str, pics: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By

    wait = open_page(browser, url)
    js(  # hold POST /caption's answer until the test releases it
        browser,
        """const real = window.fetch;
        window.fetch = (u, o) => u !== "caption" ? real(u, o)
          : new Promise((ok) => { window.release = () => ok(real(u, o)); });""",
    )
    pick(browser, pics["a"])
    wait.until(lambda d: js(d, "return typeof window.release") == "function")
    card = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert "captioning" in card.find_element(By.CSS_SELECTOR, ".pending").text
    thumb = card.find_element(By.CSS_SELECTOR, "img.thumb")
    wait.until(lambda d: thumb.get_attribute("naturalWidth") != "0")  # the image is shown
    assert browser.find_element(By.ID, "status").text.startswith("Captioning 1 image")
    js(browser, "window.release()")
    (card,) = settled(wait, 1)
    assert card.find_element(By.CSS_SELECTOR, ".caption").text
    assert not card.find_elements(By.CSS_SELECTOR, ".pending")


# -- keyboard, phone widths ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_picker_is_reached_by_keyboard(browser, url: str, pics: dict[str, Path]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait = open_page(browser, url)
    js(browser, "document.activeElement.blur()")
    ActionChains(browser).send_keys(Keys.TAB).perform()  # the first stop on the page
    focused = browser.switch_to.active_element
    assert (focused.get_attribute("id"), focused.get_attribute("type")) == ("file", "file")
    ring = "return getComputedStyle(arguments[0]).outlineStyle"
    assert js(browser, ring, browser.find_element(By.ID, "drop")) == "solid"  # a focus ring
    focused.send_keys(str(pics["a"]))  # what Enter's file dialog would hand the input
    (card,) = settled(wait, 1)
    assert card.find_element(By.CSS_SELECTOR, ".caption").text


OVERFLOW = """
const width = document.documentElement.clientWidth;
const out = [...document.querySelectorAll("main *")].filter((el) => {
  const r = el.getBoundingClientRect();
  return r.width && (r.left < -0.5 || r.right > width + 0.5);
}).map((el) => el.id || el.className || el.tagName);
for (const el of document.querySelectorAll("main :not(input)")) {  // text past its box
  if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).display !== "inline") {
    out.push("text past " + (el.id || el.className || el.tagName));
  }
}
if (document.documentElement.scrollWidth > width) out.push("the page scrolls sideways");
return out;
"""


@pytest.mark.slow
@pytest.mark.parametrize("width", [1200, 390, 360])
def test_results_fit_the_width_and_captions_keep_it(
    browser, url: str, pics: dict[str, Path], width: int, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    wait = open_page(browser, url, width)
    browser.find_element(By.CSS_SELECTOR, "input[value=beam]").click()
    pick(browser, pics["a"], pics["bad"], pics["b"])
    cards = settled(wait, 3)
    assert js(browser, OVERFLOW) == []
    inner = js(browser, "return document.documentElement.clientWidth")
    for card in (cards[0], cards[2]):
        caption = card.find_element(By.CSS_SELECTOR, ".caption")
        # beside a fixed 160 px thumbnail a 390 px screen leaves a caption 164 px
        assert caption.rect["width"] >= min(600, 0.8 * inner)
    browser.find_element(By.CSS_SELECTOR, "input[value=sample]").click()  # its four fields
    settled(wait, 3)
    assert js(browser, OVERFLOW) == []
    browser.find_element(By.CSS_SELECTOR, "input[value=beam]").click()
    settled(wait, 3)
    height = js(browser, "return document.documentElement.scrollHeight")
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    shot = tmp_path / f"page-{width}.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("CAPTIONER_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["CAPTIONER_SCREENSHOT_DIR"]) / shot.name)


# -- decoding options and what the numbers mean -------------------------------------------------


@pytest.mark.slow
def test_beam_mode_lists_the_other_beams_below_the_chosen_caption(
    browser, url: str, captioner: Captioner, pics: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By

    beam = captioner.caption([pics["a"]], DecodeConfig("beam", beam_size=3, n_best=3))[0]
    wait = open_page(browser, url)
    browser.find_element(By.CSS_SELECTOR, "input[value=beam]").click()
    pick(browser, pics["a"])
    (card,) = settled(wait, 1)
    assert card.find_element(By.CSS_SELECTOR, ".caption").text == beam.hypotheses[0][0]
    items = card.find_elements(By.CSS_SELECTOR, "li.hypothesis")
    assert [li.text.rsplit(" (", 1)[0] for li in items] == [t for t, _ in beam.hypotheses[1:]]
    assert card.find_element(By.TAG_NAME, "ol").get_attribute("start") == "2"
    score = card.find_element(By.CSS_SELECTOR, ".score").text
    assert score.startswith(f"log-probability {beam.score:.3f}: ") and "chance" in score
    assert "natural logarithm of the chance" in browser.find_element(By.ID, "legend").text


@pytest.mark.slow
def test_top_p_is_sent_and_a_bad_value_is_one_message(
    browser, url: str, captioner: Captioner, pics: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By

    nucleus = DecodeConfig("sample", top_p=0.05, seed=7)
    (want,) = captioner.caption([pics["a"]], nucleus)
    (unfiltered,) = captioner.caption([pics["a"]], DecodeConfig("sample", seed=7))
    assert want.caption != unfiltered.caption  # else this test could not tell top-p was sent
    wait = open_page(browser, url)
    browser.find_element(By.CSS_SELECTOR, "input[value=sample]").click()
    set_value = "arguments[0].value = arguments[1]"
    js(browser, set_value, browser.find_element(By.ID, "seed"), "7")
    js(browser, set_value, browser.find_element(By.ID, "top-p"), "0.05")
    pick(browser, pics["a"])
    (card,) = settled(wait, 1)
    assert card.find_element(By.CSS_SELECTOR, ".caption").text == want.caption
    top_p = browser.find_element(By.ID, "top-p")
    js(browser, set_value + "; arguments[0].dispatchEvent(new Event('change'))", top_p, "0")
    wait.until(lambda d: "top_p must be in (0, 1]" in d.find_element(By.ID, "error").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#results .card") == []


@pytest.mark.slow
def test_a_file_dropped_outside_the_drop_zone_is_captioned_not_opened(
    browser, url: str, pics: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By

    wait = open_page(browser, url)
    png = base64.b64encode(pics["a"].read_bytes()).decode("ascii")
    prevented = js(
        browser,
        """const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        const target = document.getElementById("options");  // not the drop zone
        return ["dragover", "drop"].map((type) => {
          const e = new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true });
          target.dispatchEvent(e);
          return e.defaultPrevented;
        });""",
        png,
    )
    assert prevented == [True, True]  # the browser's own handling (open the file) is off
    (card,) = settled(wait, 1)
    assert card.find_element(By.CSS_SELECTOR, ".name").text == "dropped.png"
    assert card.find_element(By.CSS_SELECTOR, ".caption").text
    assert browser.current_url == url
