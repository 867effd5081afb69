"""The help of the Hydra commands, ``captioner train --help`` and ``captioner evaluate --help``,
and the one-line answer to a ``--key value`` that a Hydra command does not take.

Hydra's own page is a generic header and a YAML dump of the composed config without the
comments that document it, and it lists every config group under ``conf/``, the training-only
ones on ``evaluate``'s page too. These pages say what the command does, the groups it reads, its
main options with their values read from the config composed with the overrides given (so a
default is never written twice), and examples. ``--cfg job`` still prints every option,
``--hydra-help`` Hydra's own flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from captioner.errors import UserError, first_line

# Hydra 1.3's own command-line flags (hydra._internal.utils.get_args_parser), which pass through
HYDRA_FLAGS = frozenset(
    {
        *("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve"),
        *("--package", "-p", "--run", "-r", "--multirun", "-m", "--shell-completion", "-sc"),
        *("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"),
        *("--experimental-rerun", "--info", "-i"),
    }
)
WIDTH = 100  # columns of a help page
_CFG_CHOICES = ("job", "hydra", "all")  # what --cfg/-c takes


@dataclass(frozen=True)
class Page:
    """One command's help: what it does, the groups it reads, its main options (key, what it
    does), examples (command, what it does) and where to read more."""

    summary: str
    groups: tuple[str, ...]
    options: tuple[tuple[str, str], ...]
    examples: tuple[tuple[str, str], ...]
    more: str


PAGES = {
    "train": Page(
        summary="Train a captioner: a CNN encoder (torchvision or timm) and a recurrent decoder, "
        "trained with teacher forcing; each epoch is validated by free-running decoding, and "
        "the best val score (trainer.monitor) is kept as best.pt. The settings are Hydra's: "
        "conf/train.yaml, its groups and the KEY=VALUE overrides given. A run writes "
        "outputs/train/<date>_<time>/: best.pt, last.pt (resume=), metrics.jsonl, train.log.",
        groups=("data", "model", "optim", "scheduler", "experiment"),
        options=(
            ("data.root", "the dataset's folder (the demo is generated there on first use)"),
            ("data.batch_size", "images per batch"),
            (
                "model.encoder.name",
                "the CNN: a torchvision name (source=timm: a timm one; builtin: small_resnet_halves)",
            ),
            ("model.encoder.freeze", "keep the encoder's weights fixed (its features cached)"),
            ("model.decoder.hidden_size", "the decoder's hidden units"),
            ("model.decoder.attention", "none | soft | topdown"),
            ("optim.lr", "learning rate"),
            ("trainer.max_epochs", "epochs at most"),
            ("trainer.patience", "epochs without a better trainer.monitor before stopping"),
            ("trainer.monitor", "what selects best.pt: val_bleu4 | val_cider_d"),
            ("trainer.val_decode.strategy", "how val captions are decoded: greedy|beam|sample"),
            ("trainer.cache_dir", "the feature cache (null: ~/.cache/captioner/features)"),
            ("seed", "the run's seed"),
            ("device", "auto (CUDA > MPS > CPU) | cpu | cuda | cuda:1 | mps"),
            ("resume", "a run directory or its last.pt: continue that run exactly"),
            ("init_from", "a checkpoint whose weights (only) start this run"),
        ),
        examples=(
            ("captioner train", "the shapes demo, a few minutes on a CPU"),
            ("captioner train trainer.max_epochs=5 data.batch_size=64 optim.lr=3e-4", ""),
            (
                "captioner train experiment=flickr8k model.encoder.weights_file=null",
                "Flickr8k (captioner prepare flickr8k first)",
            ),
            ("captioner train resume=outputs/train/<run>", "continue an interrupted run"),
        ),
        more="`captioner train --cfg job` prints every option; docs/training.md explains them.",
    ),
    "evaluate": Page(
        summary="Score a trained model on a split: every image is decoded once and scored with "
        "corpus BLEU-1..4 against all its references, CIDEr-D and distinct (with the "
        "coco-eval extra and Java, also the official METEOR, ROUGE-L and CIDEr). The table "
        "goes to stdout; outputs/evaluate/<date>_<time>/ gets metrics.json, results.json (the "
        "COCO results format) and per_image.jsonl. It reads no config group: the model and, "
        "unless data.* is given, its dataset come from the checkpoint.",
        groups=(),
        options=(
            (
                "checkpoint",
                "a checkpoint, a run directory (its best.pt, else last.pt) or an exported "
                "folder; null: the newest best.pt under outputs/train/",
            ),
            ("split", "train | val | test"),
            ("decode.strategy", "greedy | beam | sample"),
            ("decode.beam_size", "beams, with decode.strategy=beam"),
            ("decode.max_len", "longest caption in tokens, <end> included"),
            ("max_images", "the first N images only (null: all)"),
            ("batch_size", "images decoded together"),
            ("coco_metrics", "also coco-caption's official scorers (pycocoevalcap and Java)"),
            ("report", "also write report.html: thumbnails, captions, sentence BLEU"),
            ("cache_features", "read the encoder's features from the feature cache"),
            ("cache_dir", "the feature cache (null: the one the checkpoint's training used)"),
            ("device", "auto (CUDA > MPS > CPU) | cpu | cuda | cuda:1 | mps"),
            ("data.root", "another dataset (null: the checkpoint's); with data.test_*"),
        ),
        examples=(
            ("captioner evaluate checkpoint=outputs/train/<run> split=test", ""),
            (
                "captioner evaluate checkpoint=outputs/train/<run> decode.strategy=beam "
                "decode.beam_size=3 report=true",
                "",
            ),
            (
                "captioner evaluate checkpoint=outputs/train/<run> data.root=/data/coco "
                "data.test_annotations=annotations/captions_val2017.json data.test_images=val2017",
                "another COCO-format split",
            ),
        ),
        more="`captioner evaluate --cfg job` prints every option; docs/inference.md explains "
        "the scores.",
    ),
}


def show(value: Any) -> str:
    """A config value as an override spells it: null, true, false, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def compose_with_choices(command: str, overrides: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """The config ``command`` composes with ``overrides`` and the option chosen in each group;
    a composition error (an unknown group option, a bad override) is a :class:`UserError`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from captioner.configs.hydra import config_dir, register_configs

    register_configs()
    given = [o for o in overrides if not o.startswith(("-", "hydra.", "hydra/", "+hydra"))]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name=command, overrides=given, return_hydra_config=True)
    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors have no common base
        raise UserError(f"captioner {command} --help: {first_line(exc)}") from exc
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return cfg, dict(choices) if isinstance(choices, dict) else {}


def help_page(command: str, overrides: Sequence[str] = ()) -> str:
    """``captioner COMMAND --help``: the page of :data:`PAGES`, with each option's value and
    each group's choice read from the config composed with ``overrides``."""
    import textwrap

    from omegaconf import OmegaConf

    from captioner.configs.hydra import config_dir

    page = PAGES[command]
    cfg, choices = compose_with_choices(command, overrides)
    lines = [
        f"usage: captioner {command} [KEY=VALUE ...] [--cfg job] [--multirun] [--hydra-help]",
        "",
        *textwrap.wrap(page.summary, WIDTH),
        "",
    ]
    if page.groups:
        lines.append("Configuration groups (GROUP=OPTION; * marks the one in use):")
        for group in page.groups:
            options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
            marked = [f"{o}*" if o == choices.get(group) else o for o in options]
            lines.append(f"  {group + ':':<12} {', '.join(marked)}")
        lines.append("")
    lines.append("Main options (KEY=VALUE; the value shown is the one in use):")
    shown = [(f"{key}={show(OmegaConf.select(cfg, key))}", text) for key, text in page.options]
    width = max(len(setting) for setting, _ in shown) + 4
    for setting, text in shown:
        wrapped = textwrap.wrap(text, max(WIDTH - width, 30)) or [""]
        lines.append(f"  {setting:<{width - 2}}{wrapped[0]}".rstrip())
        lines += [" " * width + more for more in wrapped[1:]]
    lines += ["", "Examples:"]
    for example, text in page.examples:
        lines += [f"  # {text}"] if text else []
        lines.append(f"  {example}")
    lines += ["", *textwrap.wrap(page.more, WIDTH)]
    return "\n".join(lines)


def flag_hint(command: str, argv: Sequence[str]) -> str | None:
    """The error for the first ``--key[=value]`` (or ``-c PATH``) in ``argv`` that Hydra does
    not take, with its ``key=value`` spelling; None when there is none."""
    for i, word in enumerate(argv):
        flag, eq, value = word.partition("=")
        if not flag.startswith("-") or "=" in flag:
            continue
        if flag in ("-c", "--cfg") and not eq:
            following = argv[i + 1] if i + 1 < len(argv) else ""
            if following in _CFG_CHOICES:
                continue
            if command == "evaluate" and following and not following.startswith("-"):
                return (
                    f"{flag} is Hydra's --cfg (job, hydra or all); a checkpoint is given as "
                    f"checkpoint={following}"
                )
            continue  # Hydra's own message says what --cfg takes
        if flag in HYDRA_FLAGS or not flag.startswith("--"):
            continue
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1] if "=" not in argv[i + 1] else ""
        said = f"{flag} is not an option of captioner {command}: its settings are KEY=VALUE"
        keys = config_keys(command, flag[2:])
        if not keys:
            return f"{said} overrides (`captioner {command} --help` lists the main ones)"
        spelled = [f"{key}={value or '...'}" for key in keys]
        if len(spelled) == 1:
            return f"{said} overrides: {spelled[0]}"
        return f"{said} overrides: one of {', '.join(spelled)}"
    return None


def config_keys(command: str, name: str) -> list[str]:
    """The keys of ``command``'s default config that the flag name ``name`` may mean: itself
    (``batch-size``: ``batch_size``; ``data-root``: ``data.root``), else the keys whose last
    parts it is (``max-epochs``: ``trainer.max_epochs``; ``lr``: ``optim.lr`` and the other
    ``lr``); at most four."""
    from omegaconf import OmegaConf

    from captioner.configs.hydra import compose

    def leaves(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return [prefix]
        return [k for key, value in node.items() for k in leaves(value, f"{prefix}.{key}")]

    keys = [k.lstrip(".") for k in leaves(OmegaConf.to_container(compose(command)), "")]
    for spelling in (name.replace("-", "_"), name.replace("-", ".")):
        if spelling in keys:
            return [spelling]
    found = [k for k in keys if k.endswith(f".{name.replace('-', '_')}")]
    return found if len(found) <= 4 else []
