"""What a model was trained on, said where the model is named: the phrase and ``caption``'s line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from captioner.cli import main
from captioner.configs.hydra import config_dir
from captioner.datasets.trained_on import DATASETS, describe_trained_on

DEMO = "the synthetic shapes demo: it captions coloured shapes, not photos"


def test_the_demo_says_it_knows_shapes_not_photos() -> None:
    assert describe_trained_on({"dataset": "demo", "epoch": 3}) == (
        f"trained on {DEMO} (weights of epoch 3)"
    )
    assert describe_trained_on({"dataset": "flickr8k", "epoch": 10, "self_critical": True}) == (
        "trained on Flickr8k: real photos, mostly of people and animals "
        "(weights of epoch 10, fine-tuned self-critically on CIDEr-D)"
    )
    assert describe_trained_on({"dataset": "mine"}) == "trained on the 'mine' dataset"
    assert (
        describe_trained_on({}) == describe_trained_on(None) == "trained on an unrecorded dataset"
    )


def test_every_data_preset_is_described() -> None:
    """A new conf/data preset needs its words here, or it would be shown as a bare name."""
    names = {
        OmegaConf.load(path).get("name") for path in sorted((config_dir() / "data").glob("*.yaml"))
    }
    assert names and names <= set(DATASETS), names - set(DATASETS)


def test_caption_names_the_default_checkpoint_and_what_it_was_trained_on(
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tiny_checkpoint: Path,
    tiny_demo: Path,
    tmp_path: Path,
) -> None:
    run = tmp_path / "outputs" / "train" / "run"
    run.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run / "best.pt")
    image = sorted((tiny_demo / "images" / "test").iterdir())[0]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["caption", str(image), "--device", "cpu"])
    captured = capsys.readouterr()
    assert exc.value.code == 0, captured.err
    assert captured.err.splitlines() == [
        f"using checkpoint {Path('outputs/train/run/best.pt')}, trained on {DEMO} "
        "(weights of epoch 1)"
    ]
    assert captured.out.startswith(f"{image}\t")


def test_export_says_what_the_model_was_trained_on(
    capsys: pytest.CaptureFixture, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tiny_checkpoint), str(tmp_path / "exported")])
    captured = capsys.readouterr()
    assert exc.value.code == 0, captured.err
    assert captured.out.startswith(f"exported to {tmp_path / 'exported'} (model.safetensors ")
    assert captured.out.rstrip().endswith(f"MiB), trained on {DEMO} (weights of epoch 1)")
