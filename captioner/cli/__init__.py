"""The ``captioner`` command: ``train`` and ``evaluate`` are Hydra apps; ``caption``,
``export``, ``serve`` and ``prepare`` are argparse.

Thin: each command parses its arguments and calls the library function that does the work.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from captioner.errors import UserError

COMMANDS = {
    "train": "train a captioner (Hydra app: KEY=VALUE overrides; `captioner train --help`)",
    "evaluate": "BLEU-1..4, CIDEr-D (+ COCO metrics) of a model on a split (Hydra app; `--help`)",
    "caption": "print a caption for each image (`captioner caption --help`)",
    "export": "write a checkpoint as a shareable folder: safetensors + JSON (`--help`)",
    "serve": "serve a model over HTTP with a web page (`captioner serve --help`)",
    "prepare": "convert Flickr8k/30k/Karpathy files to COCO format, download COCO (`--help`)",
}

USAGE = (
    "usage: captioner <command> [arguments]\n\ncommands:\n"
    + "".join(f"  {name:<10} {text}\n" for name, text in COMMANDS.items())
    + "\n`python -m captioner` is the same command."
)


def fail(message: str, code: int = 2) -> None:
    """A user's mistake: one line on stderr, non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_hydra_app(config_name: str, task: Callable[[Any], Any], argv: Sequence[str]) -> None:
    """Run ``task(cfg)`` as a Hydra app over ``argv`` (overrides, --help, --multirun ...)."""
    import hydra

    from captioner.configs.hydra import config_dir, register_configs

    register_configs()

    @hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")
    def _app(cfg: Any) -> Any:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: only rank 0 talks
            logging.getLogger().setLevel(logging.WARNING)
        try:
            return task(cfg)
        except UserError as exc:
            fail(str(exc))

    saved = sys.argv
    sys.argv = [f"captioner {config_name}", *argv]
    try:
        _app()
    finally:
        sys.argv = saved


def _train_task(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from captioner.training.train import TrainingInterrupted, train

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        result = train(cfg, out_dir)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", "0")) == 0 and result:
        print(
            f"best {result['monitor']} {result['best_score']:.4f} (epoch {result['best_epoch']}); "
            f"checkpoint: {os.path.join(result['out_dir'], 'best.pt')}"
        )


def _evaluate_task(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from captioner.evaluation.evaluate import evaluate, format_table

    metrics = evaluate(cfg, HydraConfig.get().runtime.output_dir)
    print(format_table(metrics))
    print(f"written to {metrics['out_dir']}")


def _run_argparse_command(
    run: Callable[[Sequence[str]], int], argv: Sequence[str], level: int
) -> None:
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    try:
        code = run(argv)
    except UserError as exc:
        fail(str(exc))
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    try:
        _dispatch(argv[0], argv[1:])
    except KeyboardInterrupt:  # Ctrl-C outside training's own handling (which saves last.pt)
        fail("interrupted", 130)
    except BrokenPipeError:  # the reader went away (`captioner ... | head`): nothing to say
        # point stdout at /dev/null so that the interpreter's last flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell reports it


def _hydra_command(command: str, task: Callable[[Any], Any], rest: list[str]) -> None:
    """``--help``: this package's page (:mod:`captioner.cli.hydra_help`); a ``--key value``
    Hydra does not take: one line with its ``key=value`` spelling; else the Hydra app."""
    from captioner.cli.hydra_help import flag_hint, help_page

    try:
        if "--help" in rest or "-h" in rest:
            print(help_page(command, rest))
            return
        hint = flag_hint(command, rest)
    except UserError as exc:
        fail(str(exc))
    if hint is not None:
        fail(hint)
    run_hydra_app(command, task, rest)


def _dispatch(command: str, rest: list[str]) -> None:
    if command == "train":
        _hydra_command("train", _train_task, rest)
    elif command == "evaluate":
        _hydra_command("evaluate", _evaluate_task, rest)
    elif command == "caption":
        from captioner.cli.caption import run as caption

        _run_argparse_command(caption, rest, logging.WARNING)
    elif command == "export":
        from captioner.cli.export import run as export

        _run_argparse_command(export, rest, logging.WARNING)
    elif command == "serve":
        from captioner.cli.serve import run as serve

        _run_argparse_command(serve, rest, logging.INFO)
    elif command == "prepare":
        from captioner.cli.prepare import main as prepare

        _run_argparse_command(prepare, rest, logging.INFO)
    else:
        print(USAGE, file=sys.stderr)
        fail(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
