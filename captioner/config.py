"""Where the Hydra configs live, and composing them from Python (tests, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig


def config_dir() -> Path:
    """Absolute path of the Hydra config directory, from any working directory.

    A source checkout or editable install has it at the top level (``conf/``); a wheel ships it
    inside the package (``captioner/conf``). An absolute path also keeps ``@hydra.main`` working
    from a console script, where a relative one would be turned into ``pkg://``.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"captioner's Hydra configs (conf/train.yaml) not found near {here}")


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config as the CLI would, without running anything (the ``hydra`` node is left
    out: nothing outside it interpolates into it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
