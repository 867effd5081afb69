"""Hydra configs: every option of every group composes, resolves and builds what it names."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from captioner.configs.data import LAYOUT_FIELDS, DataConfig, DemoConfig
from captioner.configs.decode import DecodeConfig
from captioner.configs.evaluate import EvaluateConfig
from captioner.configs.hydra import compose, config_dir
from captioner.configs.model import ModelConfig
from captioner.configs.training import (
    RunConfig,
    TrainerConfig,
    default_cache_dir,
    parse_train_config,
)
from captioner.errors import UserError

GROUPS = {
    "data": ["coco", "demo", "flickr8k", "karpathy"],
    "experiment": [
        "coco_resnet50",
        "flickr8k",
        "flickr8k_attention",
        "flickr8k_finetune",
        "flickr8k_scst",
        "flickr8k_topdown",
        "flickr8k_topdown_finetune",
        "flickr8k_topdown_scst",
    ],
    "model": ["demo", "resnet50", "timm"],
    "optim": ["adam", "adamw"],
    "scheduler": ["constant", "cosine", "step"],
}


def test_groups_on_disk_are_the_tested_ones() -> None:
    """A new option file must be added here (and so gets tested below)."""
    on_disk = {
        group: sorted(p.stem for p in (config_dir() / group).glob("*.yaml")) for group in GROUPS
    }
    assert on_disk == GROUPS


def test_default_config() -> None:
    cfg = compose("train")
    assert (cfg.data.name, cfg.model.name) == ("demo", "demo")
    assert cfg.optim._target_ == "torch.optim.Adam"
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert cfg.scheduler.T_max == cfg.trainer.max_epochs
    assert cfg.resume is None and cfg.seed == 0
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_feature_cache_defaults_to_the_user_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not inside the dataset (often read-only): $XDG_CACHE_HOME, else ~/.cache, as torch hub."""
    config = parse_train_config(compose("train"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.trainer.feature_cache_dir == tmp_path / "xdg" / "captioner" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "captioner" / "features"
    moved = parse_train_config(compose("train", [f"trainer.cache_dir={tmp_path / 'c'}"]))
    assert moved.trainer.feature_cache_dir == tmp_path / "c"


def test_decoding_defaults_have_one_source() -> None:
    """trainer.val_decode, evaluate's decode and the caption CLI take DecodeConfig's defaults."""
    from captioner.cli.caption import build_parser, decode_config

    defaults = asdict(DecodeConfig())
    assert OmegaConf.to_container(compose("train").trainer.val_decode) == defaults
    assert OmegaConf.to_container(compose("evaluate").decode) == {**defaults, "seed": 0}
    assert decode_config(build_parser().parse_args(["x.png"])) == DecodeConfig()


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"encoder.name": "resnet18", ...}``: every non-mapping value of a nested mapping."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
    return out


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in ("data", "model") for o in GROUPS[g]]
)
def test_an_option_file_holds_only_what_differs_from_the_schema(group: str, option: str) -> None:
    """One home per default: what a conf/data or conf/model file does not set is the dataclass's
    default, and what it sets of the schema's keys is set to something else."""
    schema = {
        "data": {k: v for k, v in asdict(DataConfig()).items() if k not in LAYOUT_FIELDS},
        "model": {"name": None, **asdict(ModelConfig())},
    }[group]
    own = OmegaConf.to_container(OmegaConf.load(config_dir() / group / f"{option}.yaml"))
    own.pop("defaults", None)
    composed = OmegaConf.to_container(compose("train", [f"{group}={option}"])[group])
    set_here, defaults = _leaves(own), _leaves(schema)
    for name, default in defaults.items():
        if name in set_here:
            assert set_here[name] != default, f"{group}/{option}.yaml repeats {name}'s default"
        else:
            assert _leaves(composed)[name] == default, name
    if (group, option) == ("data", "demo"):
        assert composed["demo"] == asdict(DemoConfig())


def test_train_and_evaluate_defaults_are_the_schemas() -> None:
    """train.yaml sets no trainer.* or top-level default (the demo data preset brings its own
    schedule: max_epochs and the learning rate, dropped with it); evaluate.yaml only decode.seed
    and the data overrides (all null)."""
    train = OmegaConf.to_container(compose("train", ["data=coco"]))
    assert train["trainer"] == asdict(TrainerConfig())
    demo = OmegaConf.to_container(compose("train"))
    assert demo["trainer"] == {**asdict(TrainerConfig()), "max_epochs": 10}
    assert {k: train[k] for k in ("seed", "device", "resume", "init_from")} == asdict(RunConfig())
    evaluate = OmegaConf.to_container(compose("evaluate"))
    expected = asdict(EvaluateConfig())
    expected["decode"]["seed"] = 0
    assert {k: evaluate[k] for k in expected if k != "data"} == {
        k: v for k, v in expected.items() if k != "data"
    }
    assert set(evaluate["data"].values()) == {None}


def test_the_demo_brings_its_schedule_and_only_the_demo() -> None:
    """conf/schedule_for_data/demo.yaml: 10 epochs at Adam 2e-3 with data=demo (what trains the
    demo in under 3 minutes); another dataset keeps the schema's 20 epochs and optim's 1e-3, and
    the command line wins over the demo's values, whichever optimizer is chosen."""
    demo = compose("train")
    assert (demo.trainer.max_epochs, demo.optim.lr, demo.scheduler.T_max) == (10, 2e-3, 10)
    for data in ("coco", "flickr8k", "karpathy"):
        other = compose("train", [f"data={data}"])
        assert (other.trainer.max_epochs, other.optim.lr) == (20, 1e-3), data
    mine = compose("train", ["optim=adamw", "optim.lr=5e-4", "trainer.max_epochs=3"])
    assert (mine.trainer.max_epochs, mine.optim.lr, mine.scheduler.T_max) == (3, 5e-4, 3)
    assert compose("train", ["optim=adamw"]).optim.lr == 2e-3


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("demo", {"format": "coco", "root": "data/demo", "min_freq": 1}),
        (
            "coco",
            {
                "format": "coco",
                "root": "data/coco",
                "train_annotations": "annotations/captions_train2017.json",
                "val_images": "val2017",
            },
        ),
        ("karpathy", {"format": "karpathy", "split_file": "dataset_coco.json", "min_freq": 5}),
        (
            "flickr8k",
            {
                "format": "coco",
                "root": "data/flickr8k",
                "test_annotations": "annotations/captions_test.json",
            },
        ),
    ],
)
def test_data_options(option: str, expected: dict) -> None:
    cfg = compose("train", [f"data={option}"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data["name"] == option
    assert {k: data[k] for k in expected} == expected
    assert data["batch_size"] > 0 and data["max_caption_len"] > 2
    if option == "coco":  # the year is one knob
        cfg = compose("train", ["data=coco", "data.year=2014"])
        assert cfg.data.train_annotations == "annotations/captions_train2014.json"


@pytest.mark.parametrize(
    ("option", "source", "name", "weights", "freeze"),
    [
        ("demo", "builtin", "small_resnet_halves", None, False),
        ("resnet50", "torchvision", "resnet50", "DEFAULT", True),
        ("timm", "timm", "efficientnet_lite0", "pretrained", True),
    ],
)
def test_model_options(
    option: str, source: str, name: str, weights: str | None, freeze: bool
) -> None:
    cfg = compose("train", [f"model={option}"])
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    enc = model.encoder
    assert (enc.source, enc.name, enc.weights, enc.freeze) == (source, name, weights, freeze)
    assert model.decoder.feature_mode == "init_state"
    assert ModelConfig.from_dict(model.to_dict()) == model  # the checkpoint round trip


def test_unknown_model_option_is_user_error() -> None:
    cfg = compose("train", ["+model.encoder.bogus=1"])  # '+' gets past Hydra, not the typed config
    with pytest.raises(UserError, match="model.encoder.bogus"):
        ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


@pytest.mark.parametrize(
    ("option", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_optim_options_instantiate(option: str, cls: type) -> None:
    cfg = compose("train", [f"optim={option}"])
    param = torch.nn.Parameter(torch.zeros(3))
    opt = instantiate(cfg.optim, params=[param])
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(cfg.optim.weight_decay)


@pytest.mark.parametrize(
    ("option", "cls"),
    [
        ("constant", torch.optim.lr_scheduler.ConstantLR),
        ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
        ("step", torch.optim.lr_scheduler.StepLR),
    ],
)
def test_scheduler_options_instantiate(option: str, cls: type) -> None:
    cfg = compose("train", [f"scheduler={option}", "trainer.max_epochs=6", "optim.lr=0.1"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=cfg.optim.lr)
    sched = instantiate(cfg.scheduler, optimizer=opt)
    assert type(sched) is cls
    lrs = []
    for _ in range(6):  # stepped once per epoch
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    if option == "constant":
        assert lrs == [pytest.approx(0.1)] * 6
    elif option == "cosine":  # T_max follows trainer.max_epochs: eta_min at the last epoch
        assert sched.T_max == 6 and lrs[-1] == pytest.approx(cfg.scheduler.eta_min, abs=1e-9)
    else:
        assert lrs[cfg.scheduler.step_size - 1] == pytest.approx(0.1 * cfg.scheduler.gamma)


def test_experiment_coco_resnet50() -> None:
    cfg = compose("train", ["experiment=coco_resnet50"])
    assert (cfg.data.name, cfg.model.name) == ("coco", "resnet50")
    assert cfg.optim._target_ == "torch.optim.AdamW"
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert (cfg.trainer.max_epochs, cfg.trainer.label_smoothing) == (15, 0.1)
    assert cfg.scheduler.T_max == 15
    assert cfg.trainer.patience == 5  # untouched settings keep their defaults
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    # the command line still wins over the preset
    cfg = compose("train", ["experiment=coco_resnet50", "trainer.max_epochs=3", "data.root=/x"])
    assert (cfg.trainer.max_epochs, cfg.scheduler.T_max) == (3, 3)
    assert cfg.data.root == "/x" and cfg.trainer.cache_dir is None  # the cache stays outside


@pytest.mark.parametrize("data", ["coco", "karpathy", "flickr8k"])
def test_real_data_defaults_to_a_pretrained_resnet50(data: str) -> None:
    cfg = compose("train", [f"data={data}"])
    assert (cfg.model.name, cfg.model.encoder.weights, cfg.model.encoder.freeze) == (
        "resnet50",
        "DEFAULT",
        True,
    )
    assert compose("train", [f"data={data}", "model=timm"]).model.name == "timm"  # CLI wins
    assert compose("train", ["model=demo", f"data={data}"]).model.name == "demo"


def test_experiment_flickr8k() -> None:
    cfg = compose("train", ["experiment=flickr8k", "model.encoder.weights_file=/w.pth"])
    assert (cfg.data.name, cfg.model.name) == ("flickr8k", "timm")
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    assert (model.encoder.name, model.encoder.freeze) == ("tf_efficientnet_lite2", True)
    assert model.encoder.weights_file == "/w.pth"
    assert (model.decoder.hidden_size, model.decoder.dropout) == (512, 0.5)
    assert (cfg.optim.lr, cfg.trainer.max_epochs, cfg.trainer.patience) == (4e-4, 10, None)
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.ConstantLR"
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("override", ["trainer.bogus=1", "model.encoder.bogus=1", "bogus=1"])
def test_unknown_override_key_fails(override: str) -> None:
    with pytest.raises(ConfigCompositionException, match="bogus"):
        compose("train", [override])


def test_unknown_group_option_fails() -> None:
    with pytest.raises(MissingConfigException, match="data/nope"):
        compose("train", ["data=nope"])


def test_config_dir_found_from_another_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_dir().is_absolute() and (config_dir() / "train.yaml").is_file()
    assert compose("train", ["model=resnet50"]).model.encoder.name == "resnet50"
    assert list(tmp_path.iterdir()) == []  # composing writes nothing


def test_cli_help_from_another_cwd(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "captioner", "train", "--help"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = {  # "  data:        coco, demo*, ...": the group's options, * marking the one in use
        line.split(":")[0].strip(): line.split(":", 1)[1].replace("*", "").strip()
        for line in proc.stdout.splitlines()
        if line.startswith("  ") and line.split(":")[0].strip() in GROUPS
    }
    assert listed == {group: ", ".join(options) for group, options in GROUPS.items()}
    assert list(tmp_path.iterdir()) == []  # --help creates no run directory


BAD_TRAIN_VALUES = [
    ("data.batch_size=0", r"^data\.batch_size must be >= 1, got 0$"),
    ("data.batch_size=abc", r"^data\.batch_size: expected an integer, got 'abc'$"),
    ("data.num_workers=-1", r"^data\.num_workers must be >= 0"),
    ("data.min_freq=0", r"^data\.min_freq must be >= 1"),
    ("data.captions_per_image=0", r"^data\.captions_per_image must be >= 1"),
    ("data.format=csv", r"^data\.format must be 'coco' or 'karpathy'"),
    ("optim.lr=-1", r"^optim: Invalid learning rate: -1 \(torch\.optim\.Adam with optim\.lr=-1,"),
    ("optim.weight_decay=-0.5", r"^optim: Invalid weight_decay value: -0\.5"),
    ("+optim.nonsense=1", r"^optim: .*nonsense"),
    ("scheduler.eta_min=abc", r"^scheduler: "),
    ("trainer.max_epochs=0", r"^trainer\.max_epochs must be >= 1"),
    ("trainer.patience=0", r"^trainer\.patience must be >= 1"),
    ("trainer.grad_clip=0", r"^trainer\.grad_clip must be > 0 or null"),
    ("trainer.label_smoothing=1.0", r"^trainer\.label_smoothing must be in \[0, 1\)"),
    ("trainer.precision=fp8", r"^trainer\.precision must be one of auto, fp32, bf16, fp16"),
    ("trainer.cache_features=maybe", r"^trainer\.cache_features must be one of auto, true, false"),
    ("trainer.tensorboard=sometimes", r"^trainer\.tensorboard: expected true or false"),
    ("trainer.val_decode.top_p=0", r"^trainer\.val_decode: top_p must be in \(0, 1\]"),
    ("+trainer.val_decode.beams=2", r"^trainer\.val_decode\.beams: unknown option"),
    ("trainer.val_decode.beam_size=abc", r"^trainer\.val_decode\.beam_size: expected an integer"),
    ("+data.demo.colour=1", r"^data\.demo\.colour: unknown option"),
    ("optim.lr=abc", r"^optim\.lr: expected a number or true/false, got 'abc'$"),
    ("trainer.cache_features=true", r"^trainer\.cache_features=true needs a frozen encoder"),
    ("model.decoder.hidden_size=0", r"^model\.decoder\.hidden_size must be >= 1"),
    ("model.encoder.finetune_from_epoch=0", r"^model\.encoder\.finetune_from_epoch is 1-based"),
    ("model.encoder.lr=0", r"^model\.encoder\.lr must be > 0 or null"),
    ("seed=abc", r"^seed: expected an integer, got 'abc'$"),
    ("trainer.monitor=val_loss", r"^trainer\.monitor must be one of val_bleu4, val_cider_d"),
    ("trainer.scst.samples=0", r"^trainer\.scst\.samples must be >= 1, got 0$"),
    ("trainer.scst.samples=1", r"^trainer\.scst\.baseline=mean needs trainer\.scst\.samples >= 2"),
    ("trainer.scst.baseline=max", r"^trainer\.scst\.baseline must be one of mean, greedy"),
    ("trainer.scst.start_epoch=-1", r"^trainer\.scst\.start_epoch must be >= 0, got -1$"),
    (
        "trainer.scst.start_epoch=10",
        r"^trainer\.scst\.start_epoch must be < trainer\.max_epochs=10",
    ),
    ("trainer.scst.start_epoch=0", r"^trainer\.scst\.start_epoch=0 needs init_from=<checkpoint>"),
    ("trainer.scst.lr=0", r"^trainer\.scst\.lr must be > 0 or null, got 0"),
    ("trainer.scst.warmup_steps=-1", r"^trainer\.scst\.warmup_steps must be >= 0, got -1$"),
    ("trainer.scst.batch_size=0", r"^trainer\.scst\.batch_size must be >= 1, got 0$"),
    ("trainer.scst.max_len=abc", r"^trainer\.scst\.max_len: expected an integer"),
    ("init_from=/nonexistent/best.pt", r"^init_from: /nonexistent/best\.pt: checkpoint not found$"),
    ("experiment=flickr8k_scst", r"^trainer\.scst\.start_epoch=0 needs init_from=<checkpoint>"),
]


@pytest.mark.parametrize(("override", "message"), BAD_TRAIN_VALUES)
def test_bad_train_values_are_one_line_user_errors(override: str, message: str) -> None:
    """Parsed once at start-up: the error names the key and what is allowed, in one line."""
    with pytest.raises(UserError, match=message) as info:
        parse_train_config(compose("train", [override]))
    assert "\n" not in str(info.value)


def test_parsed_train_config_is_typed() -> None:
    config = parse_train_config(compose("train", ["experiment=flickr8k"]))
    assert config.data.batch_size == 64 and config.trainer.max_epochs == 10
    assert config.trainer.val_decode == DecodeConfig(strategy="beam", beam_size=3)
    assert config.trainer.ema_decay == 0.999 and config.trainer.patience is None
    assert config.model.decoder.tie_weights and config.model.encoder.flip_average
    assert config.trainer.cache_features == "auto"
    flag = parse_train_config(
        compose("train", ["trainer.cache_features=true", "model.encoder.freeze=true"])
    )
    assert flag.trainer.cache_features == "true"  # YAML's boolean, normalised


def test_tensorboard_missing_is_caught_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"captioner\[tensorboard\]"):
        parse_train_config(compose("train", ["trainer.tensorboard=true"]))
