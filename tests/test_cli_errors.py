"""User errors through the real CLI (subprocess): one ``error:`` line naming the file, a non-zero
exit, never a traceback; a corrupt training image is skipped and counted, not fatal.

The ``train`` runs are slow to start (torch import), so a module fixture launches them all at
once and each test checks its own run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "captioner", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_split(root: Path, split: str, n: int) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i % 256, 90, 200)).save(root / split / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        anns += [
            {"image_id": i, "caption": f"a square number {i}"},
            {"image_id": i, "caption": "a blue square"},
        ]
    (root / f"captions_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns})
    )


def make_dataset(root: Path) -> Path:
    write_split(root, "train", 6)
    write_split(root, "val", 2)
    return root


def train_args(root: Path, run_dir: Path) -> list[str]:
    return [
        "train",
        "data.demo=null",
        f"data.root={root}",
        "data.train_annotations=captions_train.json",
        "data.train_images=train",
        "data.val_annotations=captions_val.json",
        "data.val_images=val",
        "data.batch_size=4",
        "data.num_workers=0",
        "model.encoder.resize=16",
        "model.encoder.crop=16",
        "model.decoder.embed_dim=16",
        "model.decoder.hidden_size=32",
        "trainer.max_epochs=1",
        f"trainer.cache_dir={run_dir.parent / 'cache'}",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
    ]


def _break(case: str, root: Path) -> str:
    """Spoil a fresh dataset as ``case`` says; return the file name the error must name."""
    ann = root / "captions_train.json"
    data = json.loads(ann.read_text())
    if case == "missing_annotations":
        ann.unlink()
        return "captions_train.json"
    if case == "not_coco":
        ann.write_text(json.dumps([{"image": "0.png", "text": "a square"}]))
        return "captions_train.json"
    if case == "missing_image":
        (root / "train" / "2.png").unlink()
        return "2.png"
    if case == "empty_caption":
        data["annotations"][3]["caption"] = " . "
        ann.write_text(json.dumps(data))
        return "captions_train.json"
    if case == "non_utf8":
        data["annotations"][0]["caption"] = "un caf\u00e9"
        ann.write_bytes(json.dumps(data, ensure_ascii=False).encode("latin-1"))
        return "captions_train.json"
    if case == "corrupt_image":
        raw = (root / "train" / "1.png").read_bytes()
        (root / "train" / "1.png").write_bytes(raw[: len(raw) // 2])  # truncated
        (root / "train" / "4.png").write_text("not an image")
        return "1.png"
    raise AssertionError(case)


ERROR_CASES = ["missing_annotations", "not_coco", "missing_image", "empty_caption", "non_utf8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, str]]:
    procs = {}
    for case in [*ERROR_CASES, "corrupt_image"]:
        base = tmp_path_factory.mktemp(case)
        root = make_dataset(base / "data")
        needle = _break(case, root)
        run_dir = base / "run"
        proc = subprocess.Popen(
            [sys.executable, "-m", "captioner", *train_args(root, run_dir)],
            cwd=base,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        procs[case] = (proc, run_dir, needle)
    out = {}
    for case, (proc, run_dir, needle) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[case] = (Run(proc.returncode, stdout, stderr, run_dir), needle)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_dataset_is_one_error_line(runs: dict, case: str) -> None:
    run, needle = runs[case]
    assert run.returncode not in (0, None), run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, run.stderr
    assert needle in errors[0], errors[0]
    assert not (run.run_dir / "last.pt").exists()


@pytest.mark.slow
def test_error_lines_say_what_is_wrong(runs: dict) -> None:
    said = {case: runs[case][0].stderr for case in ERROR_CASES}
    assert "not found" in said["missing_annotations"]
    assert "not a COCO captions file" in said["not_coco"]
    assert "missing" in said["missing_image"]
    assert "empty caption" in said["empty_caption"]
    assert "UTF-8" in said["non_utf8"]


@pytest.mark.slow
def test_corrupt_training_image_is_skipped_not_fatal(runs: dict) -> None:
    run, needle = runs["corrupt_image"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert metrics["skipped_images"] >= 2, metrics  # both spoiled images, each seen >= once
    assert needle in run.stdout + run.stderr  # the warning names the file
    assert (run.run_dir / "best.pt").is_file()


def test_top_level_help_lists_train(tmp_path: Path) -> None:
    res = cli("--help", cwd=tmp_path)
    assert res.returncode == 0
    assert any(ln.split()[:1] == ["train"] for ln in res.stdout.splitlines()), res.stdout


def test_train_help_shows_config_groups(tmp_path: Path) -> None:
    res = cli("train", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Configuration groups" in res.stdout
    groups = {ln.split(":")[0].strip() for ln in res.stdout.splitlines() if ":" in ln}
    assert {"data", "model", "optim"} <= groups
    assert not (tmp_path / "outputs").exists()  # --help runs nothing


def test_unknown_command(tmp_path: Path) -> None:
    res = cli("bogus", cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert any(ln.startswith("error:") and "bogus" in ln for ln in res.stderr.splitlines()), (
        res.stderr
    )


def test_no_arguments_prints_usage(tmp_path: Path) -> None:
    res = cli(cwd=tmp_path)
    assert res.returncode == 0
    assert "usage:" in res.stdout and "train" in res.stdout


BAD_VALUES = {
    "batch_size": (["train", "data.batch_size=0"], "error: data.batch_size must be >= 1, got 0"),
    "lr": (
        ["train", "optim.lr=-1"],
        "error: optim: Invalid learning rate: -1 "
        "(torch.optim.Adam with optim.lr=-1, optim.weight_decay=0.0)",
    ),
    "scst": (
        ["train", "trainer.scst.start_epoch=0"],
        "error: trainer.scst.start_epoch=0 needs init_from=<checkpoint>: self-critical training "
        "fine-tunes a model that teacher forcing trained first",
    ),
    "split": (
        ["evaluate", "split=bogus"],
        "error: split must be one of train, val, test, got 'bogus'",
    ),
}


@pytest.mark.slow
def test_bad_values_fail_in_one_line_before_any_work(tmp_path: Path) -> None:
    """Through the real CLI: one error line, exit 2, and nothing read or written first (the demo
    dataset is not generated, no run directory appears)."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "captioner", *args, f"hydra.run.dir={tmp_path / name}"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in BAD_VALUES.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr
        assert stderr.strip() == BAD_VALUES[name][1]
    assert not (tmp_path / "data").exists()  # train never got to generating the demo data


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    """``captioner train --help | head -3``: the pipe closes before the page is written; the
    command ends quietly with 141 (128 + SIGPIPE, what a shell reports) instead of a
    ``BrokenPipeError`` traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "captioner", "train", "--help"],
            cwd=tmp_path,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
