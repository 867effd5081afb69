"""``captioner caption`` and the :class:`Captioner` API: one line per image, per-image errors that
never stop the others, every bad input as one ``error:`` line and a non-zero exit, no traceback.

Most CLI tests call ``captioner.cli.main`` in-process (fast); a module fixture runs the real
command as subprocesses (in parallel) to prove the exit codes and the absence of tracebacks.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.configs.decode import DecodeConfig
from captioner.errors import UserError
from captioner.inference import Captioner

# -- image files -------------------------------------------------------------------------------


def _rgb(i: int) -> Image.Image:
    arr = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A tiny PNG whose header claims ``width x height`` (beyond Pillow's bomb limit)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)  # IHDR data starts after sig+len+type
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def good_images(d: Path) -> list[Path]:
    """Images in every mode a user meets: all of them must be captioned."""
    d.mkdir(parents=True, exist_ok=True)
    made = {
        "rgb.jpg": _rgb(0),
        "gray.png": _rgb(1).convert("L"),
        "rgba.png": _rgb(2).convert("RGBA"),
        "palette.gif": _rgb(3).convert("P"),
        "cmyk.jpg": _rgb(4).convert("CMYK"),
        "gray16.png": Image.fromarray(np.full((30, 30), 40000, np.uint16)),
        "tiny1x1.png": Image.new("RGB", (1, 1), (200, 10, 10)),
    }
    for name, img in made.items():
        img.save(d / name)
    assert Image.open(d / "gray16.png").mode.startswith("I")  # really 16-bit on disk
    assert Image.open(d / "cmyk.jpg").mode == "CMYK"
    return [d / name for name in made]


def bad_image(case: str, d: Path) -> tuple[str, str]:
    """Create the bad input ``case`` in ``d`` -> (argument, what the error must say)."""
    d.mkdir(parents=True, exist_ok=True)
    if case == "missing":
        return str(d / "nope.jpg"), "no such file"
    if case == "empty_dir":
        (d / "empty").mkdir()
        (d / "empty" / "notes.txt").write_text("no images here")
        return str(d / "empty"), "no images"
    if case == "not_image":
        (d / "text.png").write_text("this is not a PNG\n")
        return str(d / "text.png"), "not an image"
    if case == "empty_file":
        (d / "zero.jpg").write_bytes(b"")
        return str(d / "zero.jpg"), "not an image"
    if case in ("truncated_png", "truncated_jpg"):
        ext = case.split("_")[1]
        buf = io.BytesIO()
        _rgb(9).save(buf, "PNG" if ext == "png" else "JPEG")
        (d / f"half.{ext}").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        return str(d / f"half.{ext}"), "corrupt"
    if case == "bomb":
        return str(bomb_png(d / "bomb.png")), "too large"
    if case == "no_glob_match":
        return str(d / "*.webp"), "no image matches"
    raise AssertionError(case)


BAD_IMAGES = [
    "missing",
    "empty_dir",
    "not_image",
    "empty_file",
    "truncated_png",
    "truncated_jpg",
    "bomb",
    "no_glob_match",
]


# -- helpers -----------------------------------------------------------------------------------


def caption_cli(
    capsys: pytest.CaptureFixture, *args: str | Path
) -> tuple[int, list[str], list[str]]:
    """Run ``captioner caption ARGS`` in-process -> (exit code, stdout lines, stderr lines)."""
    with pytest.raises(SystemExit) as exc:
        main(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return exc.value.code, out.splitlines(), err.splitlines()


def errors(err: list[str]) -> list[str]:
    return [ln for ln in err if ln.startswith("error:")]


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return good_images(tmp_path_factory.mktemp("images"))


# -- the Python API ----------------------------------------------------------------------------


def test_api_one_result_per_input_in_order(
    captioner: Captioner, images: list[Path], tmp_path: Path
) -> None:
    bad, _ = bad_image("not_image", tmp_path)
    inputs = [images[0], bad, images[1], tmp_path / "missing.png", images[2]]
    results = captioner.caption(inputs, batch_size=2)
    assert [r.source for r in results] == [str(p) for p in inputs]
    assert [r.error is None for r in results] == [True, False, True, False, True]
    assert "not an image" in results[1].error and "no such file" in results[3].error
    for r in results[::2]:
        assert isinstance(r.caption, str) and r.caption.strip()
        assert r.score is not None and r.score <= 0
        assert "<" not in r.caption  # no <start>/<end>/<pad> in the text
    # batching and neighbours do not change a greedy caption
    alone = captioner.caption([images[2]])[0]
    assert (alone.caption, alone.score) == pytest.approx((results[4].caption, results[4].score))


def test_api_every_image_mode_is_captioned(captioner: Captioner, images: list[Path]) -> None:
    results = captioner.caption(images)
    assert [r.error for r in results] == [None] * len(images)
    assert all(r.caption for r in results)


def test_api_decode_strategies(captioner: Captioner, images: list[Path]) -> None:
    greedy = captioner.caption(images[:3], DecodeConfig(strategy="greedy"))
    beam1 = captioner.caption(images[:3], DecodeConfig(strategy="beam", beam_size=1))
    assert [r.caption for r in beam1] == [r.caption for r in greedy]

    nbest = captioner.caption(images[:3], DecodeConfig(strategy="beam", beam_size=4, n_best=3))
    for r in nbest:
        scores = [s for _, s in r.hypotheses]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert (r.caption, r.score) == r.hypotheses[0]

    def sampled(seed: int) -> list[str]:
        cfg = DecodeConfig(strategy="sample", seed=seed, temperature=1.5)
        return [r.caption for r in captioner.caption(images[:3], cfg)]

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)


def test_api_in_memory_image_is_preprocessed_like_a_file(
    captioner: Captioner, tmp_path: Path
) -> None:
    """A PIL image goes through the same RGB conversion as a file (transparency on white)."""
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    arr = np.asarray(rgba).copy()
    arr[8:24, 8:24] = (255, 0, 0, 255)
    rgba = Image.fromarray(arr, "RGBA")
    rgba.save(tmp_path / "x.png")
    from_file, in_memory = captioner.caption([tmp_path / "x.png", rgba])
    assert in_memory.source == "<image>"
    assert in_memory.score == pytest.approx(from_file.score, abs=1e-5)


# -- the CLI: good input -----------------------------------------------------------------------


def test_cli_one_tab_separated_line_per_image(
    capsys, tiny_checkpoint: Path, images: list[Path]
) -> None:
    code, out, err = caption_cli(
        capsys, *images, "--checkpoint", tiny_checkpoint, "--device", "cpu"
    )
    assert code == 0, err
    assert not errors(err)
    assert [ln.split("\t")[0] for ln in out] == [str(p) for p in images]
    assert all(len(ln.split("\t")) == 2 and ln.split("\t")[1].strip() for ln in out)


def test_cli_ensemble_decodes_every_member_as_one(
    capsys, tiny_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """``--ensemble``: with a member that says one word with probability ~1, every caption is
    that word; with a copy of the model itself, the model's captions (the mean of two equal
    distributions is that distribution)."""
    from test_ensemble import WORD, biased_copy

    copy, biased = tmp_path / "copy.pt", biased_copy(tiny_checkpoint, tmp_path / "biased.pt")
    shutil.copyfile(tiny_checkpoint, copy)
    _, alone, _ = caption_cli(capsys, *images, "--checkpoint", tiny_checkpoint, "--device", "cpu")
    code, out, err = caption_cli(
        capsys, *images, "--checkpoint", tiny_checkpoint, "--ensemble", copy, "--device", "cpu"
    )
    assert code == 0, err
    assert out == alone
    code, out, err = caption_cli(
        capsys, *images, "-c", tiny_checkpoint, "--ensemble", biased, "--max-len", "4"
    )
    assert code == 0, err
    assert [ln.split("\t")[1] for ln in out] == [" ".join([WORD] * 4)] * len(images)


def test_cli_ensemble_member_of_another_vocabulary_is_one_error_line(
    capsys, tiny_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["vocab"] = [*ckpt["vocab"][:-1], "zebra"]
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    code, out, err = caption_cli(
        capsys, images[0], "-c", tiny_checkpoint, "--ensemble", other, "--device", "cpu"
    )
    assert code not in (0, None) and out == []
    assert len(errors(err)) == 1 and "other.pt has another vocabulary" in errors(err)[0], err


def test_cli_control_characters_in_names_are_escaped_not_records(
    capsys, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A name with a tab and a newline would forge a record; a backslash would make the escapes
    ambiguous: each is written as its escape, so every image is one line of two fields."""
    names = ["a\tforged caption\nb.png", "back\\slash.png", "bell\x07.png"]
    for i, name in enumerate(names):
        _rgb(i).save(tmp_path / name, "PNG")
    (tmp_path / "bad\nname.png").write_text("not an image")
    args = [*(tmp_path / n for n in names), tmp_path / "bad\nname.png"]
    code, out, err = caption_cli(capsys, *args, "-c", tiny_checkpoint, "--device", "cpu")
    assert code == 1
    assert len(out) == 3 and all(len(ln.split("\t")) == 2 for ln in out), out
    escaped = ["a\\tforged caption\\nb.png", "back\\\\slash.png", "bell\\x07.png"]
    assert [ln.split("\t")[0] for ln in out] == [f"{tmp_path}/{e}" for e in escaped]
    assert err == [f"error: {tmp_path}/bad\\nname.png: not an image"], err


def test_cli_a_name_that_is_not_utf8_is_escaped_not_fatal(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-UTF-8 name under a strict UTF-8 stdout: its bytes are written as \\xNN and the
    other captions still come."""
    d = tmp_path / "photos"
    d.mkdir()
    for i, name in enumerate([b"caf\xe9.png", "z\u00e9.png".encode()]):
        _rgb(i).save(os.path.join(os.fsencode(d), name), "PNG")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    with pytest.raises(SystemExit) as code:
        main(["caption", str(d), "-c", str(tiny_checkpoint), "--device", "cpu"])
    stdout.flush()
    out = stdout.buffer.getvalue().decode("utf-8").splitlines()
    assert code.value.code == 0
    assert [ln.split("\t")[0] for ln in out] == [f"{d}/caf\\xe9.png", f"{d}/z\u00e9.png"]


def test_cli_prints_each_batch_as_it_is_ready(
    capsys, tiny_checkpoint: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run interrupted while captioning its second batch has printed the first."""
    caption = Captioner.caption

    def interrupted(self, paths, *args, **kwargs):
        if str(images[2]) in map(str, paths):
            raise KeyboardInterrupt
        return caption(self, paths, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption", interrupted)
    with pytest.raises(SystemExit) as code:  # ctrl-c: "error: interrupted", exit 130
        main(["caption", *map(str, images[:4]), "-c", str(tiny_checkpoint), "--batch-size", "2"])
    assert code.value.code == 130
    out = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in out] == [str(p) for p in images[:2]]


def test_cli_directory_and_glob_expand_to_images(
    capsys, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("b.png", "a.PNG", "c.jpg"):
        _rgb(len(name)).save(d / name, "PNG" if name.lower().endswith("png") else "JPEG")
    (d / "notes.txt").write_text("not an image")
    code, out, err = caption_cli(capsys, d, "-c", tiny_checkpoint, "--device", "cpu")
    assert code == 0, err
    assert [ln.split("\t")[0] for ln in out] == [str(d / n) for n in ("a.PNG", "b.png", "c.jpg")]

    code, out, err = caption_cli(capsys, str(d / "*.jpg"), "-c", tiny_checkpoint, "--device", "cpu")
    assert code == 0, err
    assert [ln.split("\t")[0] for ln in out] == [str(d / "c.jpg")]

    # a glob, like a directory, expands to the images it matches: notes.txt is not one
    (d / "sub").mkdir()
    code, out, err = caption_cli(capsys, str(d / "*"), "-c", tiny_checkpoint, "--device", "cpu")
    assert code == 0, err
    assert [ln.split("\t")[0] for ln in out] == [str(d / n) for n in ("a.PNG", "b.png", "c.jpg")]


def test_cli_json_and_n_best_scores(capsys, tiny_checkpoint: Path, images: list[Path]) -> None:
    base = [*images[:2], "-c", tiny_checkpoint, "--device", "cpu"]
    code, out, err = caption_cli(capsys, *base, "--json")
    assert code == 0, err
    rows = [json.loads(ln) for ln in out]
    assert [r["image"] for r in rows] == [str(p) for p in images[:2]]
    assert all(isinstance(r["caption"], str) and isinstance(r["score"], float) for r in rows)

    code, out, err = caption_cli(capsys, *base, "--json", "--beam-size", "3", "--n-best", "3")
    assert code == 0, err
    for row in map(json.loads, out):
        hyps = row["hypotheses"]
        assert len(hyps) == 3
        assert [h["score"] for h in hyps] == sorted((h["score"] for h in hyps), reverse=True)
        assert (row["caption"], row["score"]) == (hyps[0]["caption"], hyps[0]["score"])

    code, out, err = caption_cli(capsys, *base, "--beam-size", "3", "--n-best", "2")
    assert code == 0, err
    assert len(out) == 4 and all(len(ln.split("\t")) == 3 for ln in out)  # path, caption, score
    assert all(float(ln.split("\t")[2]) <= 0 for ln in out)


def test_cli_sample_with_seed_is_reproducible(
    capsys, tiny_checkpoint: Path, images: list[Path]
) -> None:
    args = [
        *images[:3],
        "-c",
        tiny_checkpoint,
        "--device",
        "cpu",
        "--sample",
        "--temperature",
        "1.5",
    ]
    runs = [caption_cli(capsys, *args, "--seed", seed) for seed in ("7", "7", "8")]
    assert all(code == 0 for code, _, _ in runs)
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]


def test_cli_max_len_and_batch_size(capsys, tiny_checkpoint: Path, images: list[Path]) -> None:
    base = [*images, "-c", tiny_checkpoint, "--device", "cpu"]
    code, short, _ = caption_cli(capsys, *base, "--max-len", "3")
    assert code == 0
    assert all(1 <= len(ln.split("\t")[1].split()) <= 3 for ln in short)  # <end> counts in max_len
    _, full, _ = caption_cli(capsys, *base)
    _, one_by_one, _ = caption_cli(capsys, *base, "--batch-size", "1")
    assert one_by_one == full


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--sample", "--beam-size", "3"], "exclusive"),
        (["--sample", "--top-p", "0"], "top_p"),
        (["--sample", "--top-p", "1.5"], "top_p"),
        (["--sample", "--temperature", "0"], "temperature"),
        (["--sample", "--top-k", "-1"], "top_k"),
        (["--max-len", "0"], "max_len"),
        (["--beam-size", "2", "--n-best", "3"], "n_best"),
        (["--batch-size", "0"], "batch-size"),
        (["--device", "bogus"], "bogus"),
    ],
)
def test_cli_bad_options_are_one_line(
    capsys, tiny_checkpoint: Path, images: list[Path], options: list[str], needle: str
) -> None:
    code, out, err = caption_cli(capsys, images[0], "-c", tiny_checkpoint, *options)
    assert code not in (0, None)
    assert out == []
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--top-p", "0.9"], "--top-p applies to sampling only, and this decoding is greedy"),
        (["--seed", "1"], "--seed applies to sampling only"),
        (["--top-k", "5", "--no-sample"], "--top-k applies to sampling only"),
        (["--temperature", "0.5", "--beam-size", "3"], "--temperature applies to sampling only"),
        (["--length-penalty", "0.7"], "--length-penalty applies to beam search only"),
        (["--sample", "--length-penalty", "0.7"], "this decoding is sample: add --beam-size N"),
    ],
)
def test_cli_option_of_another_strategy_is_refused_not_ignored(
    capsys, tiny_checkpoint: Path, images: list[Path], options: list[str], needle: str
) -> None:
    """Issue 23: `--top-p 0.9` without `--sample` was silently ignored (greedy captions)."""
    code, out, err = caption_cli(
        capsys, images[0], "-c", tiny_checkpoint, "--device", "cpu", *options
    )
    assert code == 2 and out == []
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_cli_sampling_options_apply_to_a_model_that_samples_by_default(
    capsys, tiny_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """The rule is about the decoding that results: over a sampling default, --top-p alone is
    read (and --seed makes it reproducible)."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["train_config"]["trainer"]["val_decode"]["strategy"] = "sample"
    torch.save(ckpt, tmp_path / "samples.pt")
    base = [*images[:3], "-c", tmp_path / "samples.pt", "--device", "cpu", "--top-p", "0.9"]
    runs = [caption_cli(capsys, *base, "--seed", seed) for seed in ("3", "3")]
    assert [code for code, _, _ in runs] == [0, 0], runs
    assert runs[0][1] == runs[1][1] and len(runs[0][1]) == 3


def test_cli_batch_size_has_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    page = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE images decoded together" in page
    assert "(default: 16)" in page
    assert "--top-p and --seed apply to sampling only" in page  # the rule above, said


# -- what a checkpoint path names: one rule for every command ------------------------------------


@pytest.fixture
def run_dir(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A run directory whose best.pt is good and whose last.pt is broken: a command that reads
    last.pt fails."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(tiny_checkpoint.read_bytes())
    (run / "last.pt").write_text("a broken last.pt: whoever reads it fails\n")
    return run


@pytest.mark.parametrize("flag", ["--checkpoint", "--model"])
def test_cli_run_directory_is_its_best_pt(
    capsys, run_dir: Path, tiny_checkpoint: Path, images: list[Path], flag: str
) -> None:
    """Issue 23: `caption --checkpoint RUN_DIR` read last.pt while export and serve read best.pt."""
    code, out, err = caption_cli(capsys, *images[:2], flag, run_dir, "--device", "cpu")
    assert code == 0, err
    _, want, _ = caption_cli(capsys, *images[:2], "-c", tiny_checkpoint, "--device", "cpu")
    assert out == want


def test_every_reader_takes_a_run_directory_as_its_best_pt(
    capsys, run_dir: Path, tmp_path: Path
) -> None:
    """The API, `serve --model` (Captioner.load) and `export` read the same file as caption."""
    best = str(run_dir / "best.pt")
    assert Captioner.from_checkpoint(run_dir, device="cpu").info.source == best
    assert Captioner.load(run_dir, device="cpu").info.source == best
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), str(tmp_path / "exported")])
    assert exc.value.code == 0, capsys.readouterr().err
    assert "val_bleu4" in json.loads((tmp_path / "exported" / "config.json").read_text())["scores"]


def test_a_run_stopped_before_validating_is_its_last_pt(
    capsys, tiny_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "last.pt").write_bytes((tiny_checkpoint.parent / "last.pt").read_bytes())
    assert Captioner.from_checkpoint(run, device="cpu").info.source == str(run / "last.pt")
    code, out, err = caption_cli(capsys, images[0], "-c", run, "--device", "cpu")
    assert code == 0 and len(out) == 1, err


def test_cli_model_and_checkpoint_each_take_both_kinds(
    capsys, tiny_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    """Issue 23: `caption --model best.pt` refused a checkpoint that `serve --model` took."""
    from captioner.pretrained import export_pretrained

    exported = export_pretrained(tiny_checkpoint, tmp_path / "exported")
    outs = []
    for flag in ("--model", "--checkpoint"):
        for source in (tiny_checkpoint, exported):
            code, out, err = caption_cli(capsys, *images[:3], flag, source, "--device", "cpu")
            assert code == 0, (flag, source, err)
            outs.append(out)
    assert len(outs[0]) == 3 and all(out == outs[0] for out in outs)


def test_cli_export_of_an_exported_folder_is_one_error_line(
    capsys, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from captioner.pretrained import export_pretrained

    exported = export_pretrained(tiny_checkpoint, tmp_path / "exported")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(exported), str(tmp_path / "again")])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {exported}: already an exported folder"), err


# -- the CLI: attention maps -------------------------------------------------------------------


@pytest.fixture(scope="module")
def attention_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ResNet-18 (64 px: a 2 x 2 grid) + GRU with soft attention."""
    from captioner.checkpoint import model_payload, save_checkpoint
    from captioner.configs.model import DecoderConfig, EncoderConfig, ModelConfig
    from captioner.models.captioning import build_model
    from captioner.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab.build(["a dog runs on the grass", "a red ball"])
    config = ModelConfig(
        EncoderConfig(name="resnet18", weights=None, resize=64, crop=64),
        DecoderConfig(embed_dim=8, hidden_size=12, cell="gru", attention="soft"),
    )
    model, pre = build_model(config, len(vocab), pretrained=False)
    path = tmp_path_factory.mktemp("attention") / "best.pt"
    return save_checkpoint(model_payload(model, vocab, pre), path)


def test_cli_attention_map_writes_one_png_per_image_with_a_panel_per_word(
    capsys, attention_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    maps = tmp_path / "maps"
    dup = tmp_path / "other" / images[0].name  # two inputs with one file name
    dup.parent.mkdir()
    dup.write_bytes(images[0].read_bytes())
    args = [images[0], images[1], dup, "-c", attention_checkpoint, "--max-len", "7"]
    code, out, _ = caption_cli(capsys, *args, "--attention-map", maps, "--json")
    assert code == 0
    rows = [json.loads(line) for line in out]
    stem = images[0].stem
    assert [Path(r["attention_map"]).name for r in rows] == [
        f"{stem}.png",
        f"{images[1].stem}.png",
        f"{stem}-2.png",
    ]
    for row in rows:
        words = row["caption"].split()
        assert words, row
        with Image.open(row["attention_map"]) as png:
            png.load()
            # the image, then one panel per word, 5 panels a row of 230 px (2.3 in at 100 dpi)
            assert png.height == 230 * -(-(len(words) + 1) // 5), (png.size, words)
    api = Captioner.from_checkpoint(attention_checkpoint, device="cpu")
    (res,) = api.caption([images[0]], DecodeConfig(max_len=7), attention=True)
    assert res.attention is not None and res.attention.shape == (len(res.words), 2, 2)
    torch.testing.assert_close(res.attention.sum(dim=(1, 2)), torch.ones(len(res.words)))


def test_cli_attention_map_of_a_pooled_model_is_one_error_line(
    capsys, tiny_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    maps = tmp_path / "maps"
    code, out, err = caption_cli(capsys, images[0], "-c", tiny_checkpoint, "--attention-map", maps)
    assert code not in (0, None) and out == []
    assert len(err) == 1 and "--attention-map" in err[0] and "attention=none" in err[0], err
    assert not maps.exists()
    api = Captioner.from_checkpoint(tiny_checkpoint, device="cpu")
    with pytest.raises(UserError, match="attention=soft"):
        api.caption([images[0]], attention=True)


# -- the CLI: bad images -----------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_cli_bad_image_is_one_error_others_captioned(
    capsys, tiny_checkpoint: Path, images: list[Path], tmp_path: Path, case: str
) -> None:
    arg, needle = bad_image(case, tmp_path)
    code, out, err = caption_cli(
        capsys, images[0], arg, images[1], "-c", tiny_checkpoint, "--device", "cpu"
    )
    assert code == 1
    assert [ln.split("\t")[0] for ln in out] == [str(images[0]), str(images[1])]
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert arg in err[0] and needle in err[0], err[0]


def test_cli_all_inputs_bad_still_fails_cleanly(
    capsys, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    args = [bad_image(case, tmp_path / case)[0] for case in BAD_IMAGES]
    code, out, err = caption_cli(capsys, *args, "-c", tiny_checkpoint, "--json")
    assert code == 1
    assert len(errors(err)) == len(BAD_IMAGES) == len(err)


# -- the CLI: bad checkpoints ------------------------------------------------------------------


class _Payload:
    """Unpickling this would create ``marker``: a loader that executes pickles is caught."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def bad_checkpoint(case: str, d: Path, good: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{case}.pt"
    if case == "missing":
        return path
    if case == "truncated":
        raw = good.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif case == "image":
        _rgb(0).save(path, "PNG")
    elif case == "plain_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "dir_without_last":
        path.mkdir()
    else:
        raise AssertionError(case)
    return path


BAD_CHECKPOINTS = {
    "missing": "not found",
    "truncated": "not a readable checkpoint",
    "empty": "not a readable checkpoint",
    "text": "not a",
    "image": "not a",
    "plain_dict": "not a captioner checkpoint",
    "dir_without_last": "not found",
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_cli_bad_checkpoint_is_one_error_line(
    capsys, tiny_checkpoint: Path, images: list[Path], tmp_path: Path, case: str
) -> None:
    ckpt = bad_checkpoint(case, tmp_path, tiny_checkpoint)
    code, out, err = caption_cli(capsys, images[0], "--checkpoint", ckpt, "--device", "cpu")
    assert code not in (0, None)
    assert out == []
    assert len(errors(err)) == 1, err
    assert ckpt.name in errors(err)[0] and BAD_CHECKPOINTS[case] in errors(err)[0], err


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_cli_unsafe_pickle_is_refused_not_executed(
    capsys, images: list[Path], tmp_path: Path, how: str
) -> None:
    marker = tmp_path / "EXECUTED"
    payload = {"format": "captioner/1", "model": _Payload(marker)}
    ckpt = tmp_path / "evil.pt"
    if how == "pickle":
        ckpt.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, ckpt)
    assert not marker.exists()
    code, out, err = caption_cli(capsys, images[0], "--checkpoint", ckpt, "--device", "cpu")
    assert not marker.exists(), "the checkpoint's pickle was executed"
    assert code not in (0, None) and out == []
    assert len(errors(err)) == 1, err
    assert "refused" in errors(err)[0] and "not a plain" in errors(err)[0], err


# -- the CLI: default checkpoint ---------------------------------------------------------------


def test_cli_default_checkpoint_is_newest_best(
    capsys, monkeypatch, tiny_checkpoint: Path, images: list[Path], tmp_path: Path
) -> None:
    runs = tmp_path / "outputs" / "train"
    newest, older = runs / "a_newer" / "best.pt", runs / "z_older" / "best.pt"
    for path in (newest, older):
        path.parent.mkdir(parents=True)
    newest.write_bytes(tiny_checkpoint.read_bytes())
    older.write_text("stale and broken: picking me fails")  # last by name, but older
    os.utime(older, (1_000_000_000, 1_000_000_000))
    monkeypatch.chdir(tmp_path)
    code, out, err = caption_cli(capsys, images[0], "--device", "cpu")
    assert code == 0, err
    assert len(out) == 1
    assert any(str(Path("outputs/train/a_newer/best.pt")) in ln for ln in err), err


def test_cli_no_checkpoint_says_how_to_train(
    capsys, monkeypatch, images: list[Path], tmp_path: Path
) -> None:
    (tmp_path / "outputs" / "train" / "run").mkdir(parents=True)
    (tmp_path / "outputs" / "train" / "run" / "last.pt").write_bytes(b"")  # not a best.pt
    monkeypatch.chdir(tmp_path)
    code, out, err = caption_cli(capsys, images[0], "--device", "cpu")
    assert code not in (0, None) and out == []
    assert len(err) == 1 and err[0].startswith("error:") and "captioner train" in err[0], err


# -- the real command --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subprocess_runs(
    tiny_checkpoint: Path, images: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """Three real ``python -m captioner caption`` runs, started together."""
    base = tmp_path_factory.mktemp("subprocess")
    bad = [
        bad_image(case, base / case)[0]
        for case in ("missing", "not_image", "truncated_png", "bomb")
    ]
    marker = base / "EXECUTED"
    torch.save({"format": "captioner/1", "model": _Payload(marker)}, base / "evil.pt")
    ckpt = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    glob_arg = str(images[0].parent / "*.png")  # quoted: the command expands it, not a shell
    commands = {
        "mixed": [str(images[0]), *bad, glob_arg, *ckpt],
        "good_json": [
            glob_arg,
            str(images[0]),
            *ckpt,
            "--json",
            "--beam-size",
            "2",
            "--n-best",
            "2",
        ],
        "evil": [str(images[0]), "--checkpoint", str(base / "evil.pt"), "--device", "cpu"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "captioner", "caption", *args],
            cwd=base,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for name, args in commands.items()
    }
    outputs = {name: p.communicate(timeout=180) for name, p in procs.items()}
    runs = {name: (procs[name].returncode, *outputs[name]) for name in procs}
    return {"runs": runs, "bad": bad, "marker": marker}


@pytest.mark.slow
def test_subprocess_mixed_inputs(subprocess_runs: dict, images: list[Path]) -> None:
    code, stdout, stderr = subprocess_runs["runs"]["mixed"]
    assert code == 1, stderr
    assert "Traceback" not in stderr
    pngs = sorted(p for p in images if p.suffix == ".png")
    assert [ln.split("\t")[0] for ln in stdout.splitlines()] == [str(p) for p in [images[0], *pngs]]
    errs = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    bad = subprocess_runs["bad"]
    assert len(errs) == len(bad)
    for arg in bad:
        assert sum(arg in ln for ln in errs) == 1, (arg, errs)


@pytest.mark.slow
def test_subprocess_good_inputs_exit_zero(subprocess_runs: dict, images: list[Path]) -> None:
    code, stdout, stderr = subprocess_runs["runs"]["good_json"]
    assert code == 0, stderr
    assert "Traceback" not in stderr and "error:" not in stderr
    rows = [json.loads(ln) for ln in stdout.splitlines()]
    pngs = sorted(str(p) for p in images if p.suffix == ".png")
    assert [r["image"] for r in rows] == [*pngs, str(images[0])]
    assert all(len(r["hypotheses"]) == 2 for r in rows)


@pytest.mark.slow
def test_subprocess_unsafe_checkpoint_refused(subprocess_runs: dict) -> None:
    code, stdout, stderr = subprocess_runs["runs"]["evil"]
    assert code == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not subprocess_runs["marker"].exists()
    errs = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "refused" in errs[0], stderr
