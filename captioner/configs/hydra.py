"""Hydra: where the configs live (``conf/``), the schemas' defaults in the ConfigStore, and
composing a config as the CLI would."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from captioner.configs.data import LAYOUT_FIELDS, DataConfig, DemoConfig
from captioner.configs.evaluate import EvaluateConfig
from captioner.configs.model import ModelConfig
from captioner.configs.training import RunConfig, TrainerConfig


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
    """Put the schemas' defaults into Hydra's ConfigStore (idempotent), so that a YAML file holds
    only what differs from its dataclass; each file lists its node first in its defaults list,
    before ``_self_``:

    | node | dataclass | read by |
    |---|---|---|
    | ``train_defaults`` | :class:`RunConfig` and ``trainer``: :class:`TrainerConfig` | ``train.yaml`` |
    | ``data_defaults`` | :class:`DataConfig` less :data:`LAYOUT_FIELDS` | ``data/*.yaml`` |
    | ``demo_defaults`` | :class:`DemoConfig` | ``data/demo.yaml`` (``data.demo``) |
    | ``model_defaults`` | :class:`ModelConfig` and ``name`` | ``model/*.yaml`` |
    | ``evaluate_defaults`` | :class:`EvaluateConfig` | ``evaluate.yaml`` |

    Plain dicts, not the dataclasses: a typed node would make OmegaConf check the values first,
    with its own messages, where the configs' checks name the key in one line (and it would
    refuse keys and nulls that the YAML files have). The nodes have no ``hydra`` group, so
    ``--help`` lists the same options as the files.
    """
    from hydra.core.config_store import ConfigStore

    data = {k: v for k, v in asdict(DataConfig()).items() if k not in LAYOUT_FIELDS}
    nodes = {
        "train_defaults": {"trainer": asdict(TrainerConfig()), **asdict(RunConfig())},
        "data_defaults": data,
        "demo_defaults": asdict(DemoConfig()),
        "model_defaults": {"name": None, **asdict(ModelConfig())},  # name: the option's label
        "evaluate_defaults": asdict(EvaluateConfig()),
    }
    for name, node in nodes.items():
        ConfigStore.instance().store(name=name, node=node)


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config as the CLI would, without running anything (the ``hydra`` node is left
    out: nothing outside it interpolates into it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
