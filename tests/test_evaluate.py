"""``captioner evaluate``: the run files (metrics.json, results.json, per_image.jsonl), BLEU from
the same code path as training validation, data overrides, decode settings, and user errors."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
from conftest import tiny_overrides
from PIL import Image

from captioner.cli import main
from captioner.configs.hydra import compose
from captioner.errors import UserError
from captioner.evaluation import metrics as metrics_module
from captioner.evaluation.evaluate import evaluate
from captioner.evaluation.metrics import bleu_from_text, sentence_bleu_from_text
from captioner.training.train import train

FAST = ["device=cpu", "coco_metrics=false", "batch_size=4"]


def run_eval(checkpoint: Path, out_dir: Path, *overrides: str) -> dict:
    cfg = compose("evaluate", [f"checkpoint={checkpoint}", *FAST, *overrides])
    evaluate(cfg, out_dir)
    return read_run(out_dir)


def read_run(out_dir: Path) -> dict:
    return {
        "dir": out_dir,
        "metrics": json.loads((out_dir / "metrics.json").read_text()),
        "results": json.loads((out_dir / "results.json").read_text()),
        "rows": [json.loads(ln) for ln in (out_dir / "per_image.jsonl").read_text().splitlines()],
    }


@pytest.fixture(scope="module")
def default_run(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default evaluation: the checkpoint's own dataset, test split, greedy."""
    return run_eval(tiny_checkpoint, tmp_path_factory.mktemp("eval_test"))


def test_metrics_json(default_run: dict) -> None:
    m = default_run["metrics"]
    for n in range(1, 5):
        assert isinstance(m[f"bleu{n}"], float) and 0.0 <= m[f"bleu{n}"] <= 1.0
    assert m["bleu1"] >= m["bleu2"] >= m["bleu3"] >= m["bleu4"]  # cumulative BLEU-n
    assert m["split"] == "test" and m["num_images"] == 8
    assert m["decode"]["strategy"] == "greedy" and m["decode"]["max_len"] == 20
    assert "cider" not in m  # coco_metrics=false
    assert m["cider_d"] >= 0.0  # CIDEr-D needs no Java


def test_per_image_rows_use_the_training_dataset(default_run: dict, tiny_demo: Path) -> None:
    rows = default_run["rows"]
    ann = json.loads((tiny_demo / "annotations" / "captions_test.json").read_text())
    refs: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    assert len(rows) == 8 and {r["image_id"] for r in rows} == set(refs)
    for r in rows:
        assert r["references"] == refs[r["image_id"]]  # ALL references, as text
        assert isinstance(r["caption"], str) and r["caption"]
        # no <pad>/<start>/<end> in the text; evaluate scores the decoding it was given, so an
        # undertrained model's <unk> is a word like any other here
        assert not {"<pad>", "<start>", "<end>"} & set(r["caption"].split())
        assert Path(r["file"]).parent == tiny_demo / "images" / "test"
        assert r["bleu4"] == pytest.approx(
            sentence_bleu_from_text(r["caption"], r["references"])["bleu4"]
        )


def test_bleu_is_the_training_validation_bleu(default_run: dict) -> None:
    rows = default_run["rows"]
    expected = bleu_from_text([r["caption"] for r in rows], [r["references"] for r in rows])
    for n in range(1, 5):
        assert default_run["metrics"][f"bleu{n}"] == pytest.approx(expected[f"bleu{n}"], abs=1e-9)


def test_results_json_loads_with_pycocotools(default_run: dict, tiny_demo: Path) -> None:
    from pycocotools.coco import COCO

    results = default_run["results"]
    assert all(set(r) == {"image_id", "caption"} for r in results)
    assert [r["caption"] for r in results] == [r["caption"] for r in default_run["rows"]]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tiny_demo / "annotations" / "captions_test.json"))
        res = gt.loadRes(str(default_run["dir"] / "results.json"))
    assert set(res.getImgIds()) == {r["image_id"] for r in results} == set(gt.getImgIds())


def test_val_split_and_beam_settings(
    default_run: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    run = run_eval(
        tiny_checkpoint, tmp_path, "split=val", "decode.strategy=beam", "decode.beam_size=2"
    )
    m = run["metrics"]
    assert m["split"] == "val" and m["num_images"] == 8
    assert m["decode"]["strategy"] == "beam" and m["decode"]["beam_size"] == 2
    val_files = {r["file"] for r in run["rows"]}
    assert all("/images/val/" in f for f in val_files)
    assert not val_files & {r["file"] for r in default_run["rows"]}


@pytest.mark.slow
def test_cache_dir_reuses_the_training_features(
    tiny_demo: Path, tiny_checkpoint: Path, tmp_path: Path, encoder_calls: dict[str, int]
) -> None:
    """cache_dir=<the training cache>: val is scored from the features training validated on
    (the encoder never runs, the BLEU is the logged val BLEU), a new split is encoded once, and
    another encoder's checkpoint gets its own entry."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    frozen = {"model.encoder.freeze": "true", "trainer.max_epochs": 1}
    train(compose("train", tiny_overrides(tiny_demo, cache, **frozen)), run)
    entries = sorted(cache.iterdir())
    assert len(entries) == 2  # train and val images

    calls = encoder_calls
    calls["n"] = 0  # count from here: the evaluations only
    use_cache = f"cache_dir={cache}"

    val = run_eval(run / "best.pt", tmp_path / "val", "split=val", use_cache)["metrics"]
    assert calls["n"] == 0 and sorted(cache.iterdir()) == entries
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for n in (1, 4):
        assert val[f"bleu{n}"] == pytest.approx(logged[f"val_bleu{n}"], abs=1e-9)

    first = run_eval(run / "best.pt", tmp_path / "test1", "split=test", use_cache)
    assert calls["n"] > 0 and len(list(cache.iterdir())) == 3
    calls["n"] = 0
    again = run_eval(run / "best.pt", tmp_path / "test2", "split=test", use_cache)
    assert calls["n"] == 0 and again["results"] == first["results"]

    run_eval(tiny_checkpoint, tmp_path / "other", "split=test", use_cache)
    assert calls["n"] > 0 and len(list(cache.iterdir())) == 4

    (tmp_path / "file").write_text("")  # a cache_dir inside a file cannot be created
    with pytest.raises(UserError, match=r"feature cache: cannot create .*file/cache/"):
        run_eval(tiny_checkpoint, tmp_path / "bad", f"cache_dir={tmp_path / 'file' / 'cache'}")


def write_coco_split(root: Path, n: int = 5) -> Path:
    (root / "pics").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        Image.new("RGB", (24, 24), (50 * i % 256, 120, 30)).save(root / "pics" / f"p{i}.jpg")
        images.append({"id": 100 + i, "file_name": f"p{i}.jpg"})
        anns += [
            {"id": 2 * i + 1, "image_id": 100 + i, "caption": "a green square ."},
            {"id": 2 * i + 2, "image_id": 100 + i, "caption": f"shape number {i}"},
        ]
    (root / "caps.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_data_overrides_evaluate_another_coco_split(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = write_coco_split(tmp_path / "other")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    run = run_eval(
        tiny_checkpoint,
        tmp_path / "out",
        f"data.root={root}",
        "data.test_annotations=caps.json",
        "data.test_images=pics",
    )
    assert run["metrics"]["num_images"] == 5
    assert sorted(r["image_id"] for r in run["results"]) == list(range(100, 105))
    assert {r["references"][1] for r in run["rows"]} == {f"shape number {i}" for i in range(5)}
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no demo written there


def test_an_image_listed_twice_is_scored_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A repeated ``images`` entry made results.json hold the id twice, which the product's BLEU
    counted twice (0.6992 against the official scorer's 0.6833 in issue 21)."""
    root = write_coco_split(tmp_path / "other")
    data = json.loads((root / "caps.json").read_text())
    data["images"].append(dict(data["images"][2]))
    (root / "caps.json").write_text(json.dumps(data))
    data_overrides = [
        f"data.root={root}",
        "data.test_annotations=caps.json",
        "data.test_images=pics",
    ]
    run = run_eval(tiny_checkpoint, tmp_path / "out", *data_overrides, "cache_features=false")
    assert run["metrics"]["num_images"] == 5 and len(run["rows"]) == 5
    assert sorted(r["image_id"] for r in run["results"]) == list(range(100, 105))


@pytest.mark.parametrize("cached", [False, True])
def test_unreadable_image_is_left_out_and_counted(
    tiny_checkpoint: Path, tmp_path: Path, cached: bool
) -> None:
    root = write_coco_split(tmp_path / "other")
    (root / "pics" / "p2.jpg").write_bytes(b"not a jpeg")
    data = [f"data.root={root}", "data.test_annotations=caps.json", "data.test_images=pics"]
    cache = [f"cache_dir={tmp_path / 'cache'}"] if cached else ["cache_features=false"]
    run = run_eval(tiny_checkpoint, tmp_path / "out", *data, *cache)
    assert run["metrics"]["num_images"] == 4 and run["metrics"]["skipped_images"] == 1
    assert sorted(r["image_id"] for r in run["results"]) == [100, 101, 103, 104]


def test_missing_coco_eval_warns_once_and_goes_on(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch,
    caplog,
) -> None:
    monkeypatch.setattr(
        metrics_module,
        "_coco_unavailable_reason",
        lambda: "pycocoevalcap is not installed (simulated)",
    )
    monkeypatch.setattr(metrics_module, "_COCO_WARNED", False)
    with caplog.at_level(logging.WARNING):
        for i in range(2):
            run = run_eval(tiny_checkpoint, tmp_path / str(i), "coco_metrics=true", "max_images=3")
            assert run["metrics"]["num_images"] == 3 and "bleu4" in run["metrics"]
            assert "cider" not in run["metrics"]
    warned = [r for r in caplog.records if "pycocoevalcap is not installed" in r.getMessage()]
    assert len(warned) == 1


@pytest.mark.slow
def test_official_coco_metrics_when_available(tiny_checkpoint: Path, tmp_path: Path) -> None:
    if metrics_module._coco_unavailable_reason() is not None:
        pytest.skip(metrics_module._coco_unavailable_reason())
    # the tiny model is trained for one epoch and says <unk>, which the two tokenizers split
    # differently; the demo's own words they split alike
    args = ("coco_metrics=true", "max_images=4", "decode.suppress_unk=true")
    m = run_eval(tiny_checkpoint, tmp_path, *args)["metrics"]
    assert {"coco_bleu4", "rouge_l", "cider"} <= set(m)
    assert all(m[k] >= 0.0 for k in ("coco_bleu4", "rouge_l", "cider"))
    # ours without Java: the official CIDEr-D (PTBTokenizer and ours split demo text alike)
    assert m["cider_d"] == pytest.approx(m["cider"], abs=1e-6)


# -- what checkpoint= names ---------------------------------------------------------------------


def test_a_run_directory_is_its_best_pt(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The one rule of every command (issue 23): a run directory is its best.pt, else its
    last.pt; here last.pt is broken, so reading it would fail."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(tiny_checkpoint.read_bytes())
    (run / "last.pt").write_text("a broken last.pt: whoever reads it fails\n")
    got = run_eval(run, tmp_path / "out", "max_images=2")
    assert got["metrics"]["checkpoint"] == str(run / "best.pt")
    want = run_eval(tiny_checkpoint, tmp_path / "want", "max_images=2")
    assert got["results"] == want["results"]


def test_an_exported_folder_is_evaluated_on_the_data_given(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from captioner.pretrained import export_pretrained

    exported = export_pretrained(tiny_checkpoint, tmp_path / "exported")
    root = write_coco_split(tmp_path / "other")
    data = [f"data.root={root}", "data.test_annotations=caps.json", "data.test_images=pics"]
    got = run_eval(exported, tmp_path / "out", *data, "cache_features=false")
    want = run_eval(tiny_checkpoint, tmp_path / "want", *data, "cache_features=false")
    assert got["metrics"]["checkpoint"] == str(exported)
    assert got["results"] == want["results"]
    with pytest.raises(UserError, match=r"has no training data config.*give data\.root="):
        run_eval(exported, tmp_path / "nodata")


def test_table_labels_the_two_ciders_and_prints_distinct() -> None:
    from captioner.evaluation.evaluate import format_table

    metrics = {
        **{f"bleu{n}": 0.5 for n in range(1, 5)},
        "cider": 0.81234,
        "cider_d": 0.81234,
        "distinct": 0.75,
        "split": "test",
        "num_images": 8,
        "decode": {"strategy": "greedy"},
    }
    rows = {ln.split()[0]: ln for ln in format_table(metrics).splitlines()[1:]}
    assert set(rows) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "cider_d", "distinct"}
    assert "official" in rows["cider"] and "official" not in rows["cider_d"]
    assert "no Java" in rows["cider_d"]
    assert rows["distinct"].split()[1] == "0.7500"


# -- through the CLI ---------------------------------------------------------------------------


def test_cli_writes_run_and_prints_table(
    capsys,
    keep_logging,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    main(
        [
            "evaluate",
            f"checkpoint={tiny_checkpoint}",
            f"hydra.run.dir={run_dir}",
            *FAST,
            "decode.strategy=beam",
            "decode.beam_size=2",
        ]
    )
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "test split, 8 images, beam decoding" in out
    assert any(ln.split()[:1] == ["bleu4"] for ln in out.splitlines()), out
    run = read_run(run_dir)
    assert run["metrics"]["decode"]["beam_size"] == 2 and len(run["results"]) == 8
    table = {
        ln.split()[0]: float(ln.split()[1]) for ln in out.splitlines() if ln.startswith("  bleu")
    }
    assert table == pytest.approx(
        {f"bleu{n}": run["metrics"][f"bleu{n}"] for n in range(1, 5)}, abs=1e-4
    )
    distinct = [ln.split() for ln in out.splitlines() if ln.startswith("  distinct")]
    assert distinct and float(distinct[0][1]) == pytest.approx(run["metrics"]["distinct"], abs=1e-4)


def test_cli_draws_no_progress_bar_into_a_redirected_stream(
    capsys, keep_logging, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """stderr here is no terminal: tqdm's bars (building the feature cache, captioning) would
    only write carriage-return junk into a log (issue 23)."""
    overrides = [f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    main(["evaluate", f"checkpoint={tiny_checkpoint}", *FAST, *overrides])
    _, err = capsys.readouterr()
    assert (tmp_path / "cache").is_dir()  # the cache was built: its bar had its chance
    assert "\r" not in err and "batch/s" not in err and "it/s" not in err, err


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("decode.beam_size=0", "beam_size"),
        ("decode.strategy=nucleus", "strategy"),
        ("decode.top_p=0", "top_p"),
        ("split=bogus", "bogus"),
        ("checkpoint={missing}", "not found"),
    ],
)
def test_cli_bad_settings_are_one_error_line(
    capsys,
    keep_logging,
    tiny_checkpoint: Path,
    tmp_path: Path,
    override: str,
    needle: str,
) -> None:
    override = override.format(missing=tmp_path / "nope.pt")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                f"checkpoint={tiny_checkpoint}",
                f"hydra.run.dir={tmp_path / 'run'}",
                *FAST,
                override,
            ]
        )
    out, err = capsys.readouterr()
    assert exc.value.code not in (0, None)
    assert "Traceback" not in err and out == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert not (tmp_path / "run" / "metrics.json").exists()
