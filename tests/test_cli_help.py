"""The help pages (issue 23): ``train --help`` and ``evaluate --help`` say what the command does,
its main options with the values in use and examples, and ``evaluate``'s lists no training-only
group; ``serve --help`` shows its defaults; a ``--key value`` given to a Hydra command is one
error line with its ``key=value`` spelling instead of Hydra's usage dump."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from captioner.cli import main
from captioner.cli.hydra_help import HYDRA_FLAGS, PAGES, show
from captioner.configs.hydra import compose

_ABSENT = object()


def page(capsys: pytest.CaptureFixture, *args: str) -> str:
    main(list(args))
    out, err = capsys.readouterr()
    assert err == "", err
    return out


def settings(text: str) -> dict[str, str]:
    """The ``  key=value  what it does`` rows of a page's main options."""
    rows = re.findall(r"^  ([\w.]+)=(\S+)", text.split("Main options", 1)[1], re.M)
    return dict(rows)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_help_says_what_the_command_does_its_options_and_an_example(
    capsys, monkeypatch, tmp_path: Path, command: str
) -> None:
    monkeypatch.chdir(tmp_path)
    text = page(capsys, command, "--help")
    assert PAGES[command].summary.split(":")[0] in " ".join(text.split())
    shown = settings(text)
    assert list(shown) == [key for key, _ in PAGES[command].options]
    cfg = compose(command)
    for key, value in shown.items():
        want = OmegaConf.select(cfg, key, default=_ABSENT)
        assert want is not _ABSENT, f"{key} is no option of {command}"
        assert value == show(want), key
    examples = text.split("Examples:", 1)[1]
    assert f"  captioner {command} " in examples
    assert "--cfg job" in text  # where every option is
    assert "Config ==" not in text and "powered by Hydra" not in text  # not Hydra's YAML dump
    assert not (tmp_path / "outputs").exists()  # --help runs nothing


def test_train_help_lists_the_groups_and_the_values_the_overrides_give(capsys) -> None:
    text = page(capsys, "train", "experiment=flickr8k", "trainer.max_epochs=3", "--help")
    groups = dict(re.findall(r"^  (\w+):\s+(.+)$", text, re.M))
    assert set(groups) == {"data", "model", "optim", "scheduler", "experiment"}
    assert "flickr8k*" in groups["experiment"].split(", ")
    assert "demo*" not in groups["data"].split(", ")
    assert settings(text)["trainer.max_epochs"] == "3"
    assert settings(text)["data.root"] == str(
        OmegaConf.select(compose("train", ["experiment=flickr8k"]), "data.root")
    )


def test_evaluate_help_lists_no_training_only_group(capsys) -> None:
    text = page(capsys, "evaluate", "--help")
    assert "Configuration groups" not in text
    for group in ("optim", "scheduler", "experiment", "model"):
        assert not re.search(rf"^\s*{group}[:=]", text, re.M), group
    assert settings(text)["checkpoint"] == "null" and settings(text)["split"] == "test"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_every_help_example_composes_and_parses(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from captioner.configs.evaluate import EvaluateConfig
    from captioner.configs.training import parse_train_config
    from captioner.typed import from_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "train" / "x").mkdir(parents=True)
    (tmp_path / "outputs" / "train" / "x" / "last.pt").touch()  # what resume= names
    for example, _ in PAGES[command].examples:
        overrides = example.replace("<run>", "x").split()[2:]
        cfg = compose(command, overrides)
        if command == "train":
            parse_train_config(cfg)
        else:
            from_dict(EvaluateConfig, OmegaConf.to_container(cfg, resolve=True), "")


def test_hydra_flags_are_hydras_own() -> None:
    from hydra._internal.utils import get_args_parser

    own = {s for action in get_args_parser()._actions for s in action.option_strings}
    assert own == HYDRA_FLAGS


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["evaluate", "--checkpoint", "runs/x/best.pt"],
            "error: --checkpoint is not an option of captioner evaluate: its settings are "
            "KEY=VALUE overrides: checkpoint=runs/x/best.pt",
        ),
        (
            ["evaluate", "--beam-size=3"],
            "error: --beam-size is not an option of captioner evaluate: its settings are "
            "KEY=VALUE overrides: decode.beam_size=3",
        ),
        (
            ["train", "--max-epochs", "3"],
            "error: --max-epochs is not an option of captioner train: its settings are "
            "KEY=VALUE overrides: trainer.max_epochs=3",
        ),
        (
            ["evaluate", "-c", "best.pt"],
            "error: -c is Hydra's --cfg (job, hydra or all); a checkpoint is given as "
            "checkpoint=best.pt",
        ),
    ],
)
def test_a_flag_spelling_is_answered_with_the_override_spelling(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], line: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""
    assert err.splitlines() == [line]  # no usage dump, no "unrecognized arguments"
    assert not (tmp_path / "outputs").exists()


def test_serve_help_shows_every_default(capsys) -> None:
    from captioner.cli.serve import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        if action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            continue
        assert f"(default: {action.default}" in text, action.dest
    assert "(default: 8000)" in text and "(default: 127.0.0.1" in text
