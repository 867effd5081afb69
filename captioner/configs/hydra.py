"""Hydra: where the configs live (``conf/``), the configs Python registers in the ConfigStore, and
composing a config as the CLI would."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from captioner.configs.decode import DecodeConfig


def config_dir() -> Path:
    """Absolute path of the Hydra config directory, from any working directory.

    A source checkout or editable install has it at the top level (``conf/``); a wheel ships it
    inside the package (``captioner/conf``). An absolute path also keeps ``@hydra.main`` working
    from a console script, where a relative one would be turned into ``pkg://``.
    """
    here = Path(__file__).resolve().parents[1]  # the captioner package
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"captioner's Hydra configs (conf/train.yaml) not found near {here}")


def register_configs() -> None:
    """Put the configs that Python defines into Hydra's ConfigStore (idempotent): the decoding
    defaults, read by ``train.yaml`` (``trainer.val_decode``) and ``evaluate.yaml`` (``decode``)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="decode_defaults", node=asdict(DecodeConfig()))


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config as the CLI would, without running anything (the ``hydra`` node is left
    out: nothing outside it interpolates into it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def default_cache_dir() -> Path:
    """Where frozen-encoder features are cached unless ``trainer.cache_dir`` says otherwise:
    ``$XDG_CACHE_HOME/captioner/features``, else ``~/.cache/captioner/features`` (the user cache
    that torch hub and Hugging Face use too; datasets are often on read-only storage)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captioner" / "features"
