"""The stages of ``scale.py`` after training, at COCO's val size: ``evaluate`` over the val
images from the feature cache, ``report=true`` over 5,000 entries (with and without attention
maps: its size, the time to write it and to open it in headless Chromium) and one SCST batch's
rewards (see benchmarks/README.md, "scale.py"). Each runs in its own process, as every stage of
``scale.py``, which imports this module only in that process."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scale import load, make_trainer, prefill, timed, timed_cpu, vocab_of
from scale_data import log

SCST_IMAGES, SCST_SAMPLES, SCST_BATCHES = 50, 5, 20
GRID = 7  # the attention grid of a ResNet at 224 px
OPEN_LIMIT = 600  # seconds Chromium is given to open a report


def stage_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate(cfg)`` (what ``captioner evaluate`` runs) over the val images from the feature
    cache of the run that saved the checkpoint, greedy, the untrained tiny model (its captions
    run to ``max_len``), no report."""
    from captioner.configs.hydra import compose
    from captioner.evaluation.evaluate import evaluate

    trainer = make_trainer(args)
    prefill(trainer)
    checkpoint = trainer.save_last()
    cfg = compose(
        "evaluate",
        [f"checkpoint={checkpoint}", "split=val", "device=cpu", "coco_metrics=false"],
    )
    metrics, sec, cpu = timed_cpu(lambda: evaluate(cfg, args.root / f"eval_{args.n}"))
    out = {"s": sec, "cpu_s": cpu, "images": metrics["num_images"], "bleu4": metrics["bleu4"]}
    return {**out, "vocab": len(trainer.vocab)}


def photo_rows(photos: Path, count: int) -> list[dict[str, Any]]:
    """``count`` per-image rows of real photos (Flickr8k's, 224 px): a caption of another image
    as the hypothesis, the image's own captions as references, a random sentence BLEU-4."""
    anns: dict[int, list[str]] = {}
    files: dict[int, str] = {}
    for name in ("captions_train.json", "captions_val.json"):
        data = json.loads((photos / "annotations" / name).read_text())
        files.update({im["id"]: im["file_name"] for im in data["images"]})
        for a in data["annotations"]:
            anns.setdefault(a["image_id"], []).append(a["caption"])
    ids = sorted(anns)[:count]
    if len(ids) < count:
        raise SystemExit(f"{photos}: {len(ids)} images, the report stage needs {count}")
    rng = np.random.default_rng(0)
    return [
        {
            "image_id": i,
            "file": str(photos / "images" / files[i]),
            "caption": anns[ids[(k + 1) % len(ids)]][0],
            "references": anns[i],
            "bleu4": float(rng.random()),
        }
        for k, i in enumerate(ids)
    ]


def attention_grids(rows: list[dict[str, Any]]) -> dict[Any, tuple[list[str], Any]]:
    """Per image id: the caption's words and a [words, 7, 7] attention map per word (a softmax
    of smooth random logits: a peak or two, as a trained model's)."""
    import torch

    from captioner.vocab import tokenize

    gen = torch.Generator().manual_seed(0)
    out = {}
    for row in rows:
        words = tokenize(row["caption"])
        logits = torch.randn(len(words), 1, 3, 3, generator=gen) * 2.5
        logits = torch.nn.functional.interpolate(logits, size=(GRID, GRID), mode="bilinear")
        out[row["image_id"]] = (words, logits.flatten(1).softmax(1).view(-1, GRID, GRID))
    return out


def report_attention(rows: list[dict[str, Any]], pre: Any) -> dict[Any, Any]:
    """What ``evaluate`` hands ``write_report`` for an attending model: per image id, its
    caption's words and their maps; before 2e8329a's successor, a JPEG per word drawn over the
    model's view of the image (run with that tree on ``PYTHONPATH`` to measure it)."""
    from captioner.evaluation import attention_maps

    grids = attention_grids(rows)
    if not hasattr(attention_maps, "attention_panels"):
        return grids
    from captioner.datasets.images import load_image, model_view

    files = {r["image_id"]: r["file"] for r in rows}
    out = {}
    for image_id, (words, maps) in grids.items():
        view = model_view(load_image(files[image_id]), pre)
        out[image_id] = list(zip(words, attention_maps.attention_panels(view, maps), strict=True))
    return out


def open_in_chromium(path: Path) -> dict[str, Any]:
    """Headless Chromium (selenium) opening ``path``: seconds until the page's script has sorted
    the entries, the browser's own load time, then one re-sort and one entry's maps opened."""
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.command_executor._client_config.timeout = 2 * OPEN_LIMIT  # selenium's default: 120 s
    try:
        driver.set_page_load_timeout(OPEN_LIMIT)
        driver.set_script_timeout(OPEN_LIMIT)  # a script waited over 30 s on a 200 MB page
        start = time.perf_counter()
        try:
            driver.get(path.as_uri())  # returns at the load event
        except TimeoutException:
            return {"open_s": None, "open_limit_s": OPEN_LIMIT}
        while not driver.execute_script("return document.getElementById('grid').dataset.sorted"):
            time.sleep(0.01)
        opened = time.perf_counter() - start
        log(f"  opened in {opened:.1f} s")
        timing = driver.execute_script(
            "const t = performance.timing; const p = performance.getEntriesByType('paint');"
            "return [t.loadEventEnd - t.navigationStart,"
            " (p.find(e => e.name == 'first-contentful-paint') || {}).startTime,"
            " t.domContentLoadedEventEnd - t.navigationStart];"
        )
        resort = driver.execute_script(
            "const t = performance.now(); sortCards('best'); document.body.offsetHeight;"
            "return performance.now() - t;"
        )
        # one entry's maps opened, until drawn and the next frame painted (the JPEG panels of
        # the old page are decoded then; the new page's script draws them on "toggle")
        maps = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const d = document.querySelector('details.attention'); if (!d) return done(null);"
            "const t = performance.now(); d.open = true;"
            "const wait = () => requestAnimationFrame(() => d.dataset.maps && !d.dataset.drawn"
            " ? wait() : requestAnimationFrame(() => done(performance.now() - t)));"
            "wait();"
        )
        entries = driver.execute_script("return document.querySelectorAll('.entry').length")
    finally:
        driver.quit()
    out = {"open_s": opened, "load_event_s": timing[0] / 1000, "entries_in_dom": entries}
    out["script_ran_s"] = timing[2] / 1000  # parsed, the page's script run: sorted, usable
    out.update(first_paint_s=(timing[1] or 0) / 1000, resort_s=resort / 1000)
    out["open_maps_s"] = None if maps is None else maps / 1000
    return out


def report_stage(args: argparse.Namespace, maps: bool) -> dict[str, Any]:
    from captioner.configs.preprocessing import Preprocessing
    from captioner.evaluation.report import write_report

    rows = photo_rows(args.photos, args.val)  # as many entries as val images
    pre = Preprocessing(resize=256, crop=224)  # the maps cover the model's view of the photo
    attention, maps_s = timed(lambda: report_attention(rows, pre)) if maps else (None, 0.0)
    old = attention and isinstance(next(iter(attention.values())), list)  # JPEG panels
    out_dir = args.root / f"report_{'maps' if maps else 'plain'}"
    metrics = {"split": "val", "decode": {"strategy": "greedy", "max_len": 20}}
    view = {} if old else {"preprocessing": pre}
    path, sec = timed(lambda: write_report(out_dir, metrics, rows, attention=attention, **view))
    out = {"s": maps_s + sec, "write_s": sec, "maps_s": maps_s, "images": len(rows)}
    out["mb"] = path.stat().st_size / 1e6
    out.update(open_in_chromium(path))
    return out


def stage_report(args: argparse.Namespace) -> dict[str, Any]:
    """``write_report`` over ``--val`` (5,000) entries of real photos, no attention maps."""
    return report_stage(args, maps=False)


def stage_report_maps(args: argparse.Namespace) -> dict[str, Any]:
    """The same with an attention map per word (7 x 7 grids), as an attending model's report."""
    return report_stage(args, maps=True)


def stage_scst(args: argparse.Namespace) -> dict[str, Any]:
    """``SelfCritical.rewards`` of one batch: K = 5 samples for each of 50 images, CIDEr-D with
    the document frequencies over the N images' train references (built first, untimed). The
    first batch (its images' reference vectors computed) and the mean of 20 batches of other
    images. Samples: captions of the image itself or of another one, half and half."""
    from captioner.configs.training import SCSTConfig
    from captioner.decoding.common import Hypothesis
    from captioner.training.scst import SelfCritical

    records = load(args.root, args.n)
    vocab = vocab_of(records, args.min_freq, args.max_vocab)
    scst = SelfCritical(vocab, records, SCSTConfig(), max_len=20)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))
    batches = []
    for b in range(SCST_BATCHES):
        images = [int(i) for i in order[b * SCST_IMAGES : (b + 1) * SCST_IMAGES]]
        images = [i for i in images for _ in range(SCST_SAMPLES)]
        owners = [i if rng.random() < 0.5 else int(rng.integers(len(records))) for i in images]
        texts = [records[o].captions[int(rng.integers(len(records[o].captions)))] for o in owners]
        hyps = [Hypothesis(vocab.encode(t, add_specials=False), 0.0, True) for t in texts]
        batches.append((hyps, images))
    seconds = []
    for hyps, images in batches:
        start = time.perf_counter()
        rewards = scst.rewards(hyps, images)
        seconds.append(time.perf_counter() - start)
        assert rewards.shape == (len(hyps),)
    out = {"s": seconds[0], "images": SCST_IMAGES, "mean_s": float(np.mean(seconds))}
    out.update(samples=SCST_IMAGES * SCST_SAMPLES, batches=SCST_BATCHES)
    return out


def table(results: dict[str, Any]) -> list[str]:
    """The figures the main table does not show: the report's size and Chromium times, SCST's
    mean batch."""
    lines = []
    for stage in ("report", "report_maps"):
        for n, r in sorted(results.get(stage, {}).items()):
            line = f"{stage} (N={n}): {r['mb']:.1f} MB, written in {r['write_s']:.1f} s"
            line += f" (+{r['maps_s']:.1f} s drawing maps); Chromium: "
            if r["open_s"] is None:
                lines.append(line + f"not open after {r['open_limit_s']} s")
                continue
            line += f"open {r['open_s']:.1f} s (load event {r['load_event_s']:.1f} s, first "
            line += f"paint {r['first_paint_s']:.1f} s, script run "
            line += f"{r.get('script_ran_s', float('nan')):.1f} s), re-sort {r['resort_s']:.2f} s"
            if r["open_maps_s"] is not None:
                line += f", one entry's maps {r['open_maps_s']:.3f} s"
            lines.append(line)
    for n, r in sorted(results.get("scst", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"scst (N={n}): first batch {r['s']:.3f} s, mean of {r['batches']} {r['mean_s']:.3f} s"
        )
    return lines
