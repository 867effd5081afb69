"""``captioner caption IMAGE [IMAGE ...]``: print a caption for each image.

One line per image on stdout (``path<TAB>caption``, or JSON with ``--json``); a bad image gets a
one-line ``error:`` on stderr, the others are still captioned, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from captioner.checkpoint import DEFAULT_RUNS, find_checkpoint
from captioner.configs.decode import DecodeConfig
from captioner.datasets.images import IMAGE_EXTENSIONS
from captioner.errors import UserError

if TYPE_CHECKING:
    from captioner.inference import Captioner, CaptionResult


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captioner caption",
        description="Caption images with a trained checkpoint. Directories and glob patterns "
        "expand to the images in them.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, directories or globs")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        "-c",
        type=Path,
        help=f"checkpoint (default: the newest best.pt under {DEFAULT_RUNS}/)",
    )
    source.add_argument(
        "--model",
        "-m",
        metavar="PATH_OR_HUB_ID",
        help="a folder written by `captioner export`, or its Hugging Face Hub id (owner/name; "
        "needs the huggingface_hub package)",
    )
    add_decoding_options(p)
    p.add_argument(
        "--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:1 ..."
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--attention-map",
        type=Path,
        metavar="DIR",
        help="write DIR/<image>.png per image: the image and, for every word, where the model "
        "looked (a model with model.decoder.attention=soft)",
    )
    return p


class OptionError(UserError):
    """A bad decoding option (argparse's message, as a one-line error)."""


class OptionParser(argparse.ArgumentParser):
    """Raises :class:`OptionError` instead of printing usage and exiting (``captioner serve``
    parses request fields with it)."""

    def error(self, message: str) -> NoReturn:
        raise OptionError(message)


def add_decoding_options(p: argparse.ArgumentParser) -> None:
    """Add the decoding flags (also the form/query fields of ``captioner serve``). Options not
    given stay absent from the namespace, so that :func:`decode_config` lays them over a
    model's own default decoding."""
    d = DecodeConfig()  # the one source of the decoding defaults
    g = p.add_argument_group(
        "decoding (default: how the model was selected in training, trainer.val_decode; "
        "greedy unless its preset says otherwise)"
    )
    S = argparse.SUPPRESS
    g.add_argument(
        "--beam-size",
        type=int,
        default=S,
        help=f"beam search with this many beams; 1: greedy (with --n-best alone: {d.beam_size}, "
        "or n-best if larger)",
    )
    g.add_argument("--n-best", type=int, default=S, help="beam: print the n best (1)")
    g.add_argument(
        "--length-penalty", type=float, default=S, help=f"beam: GNMT alpha ({d.length_penalty})"
    )
    g.add_argument(
        "--suppress-unk", action=argparse.BooleanOptionalAction, default=S, help="never emit <unk>"
    )
    g.add_argument(
        "--sample",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="sample instead of greedy/beam",
    )
    g.add_argument("--temperature", type=float, default=S, help=f"sampling ({d.temperature})")
    g.add_argument(
        "--top-k", type=int, default=S, help="sample from the k most likely words (0: all)"
    )
    g.add_argument("--top-p", type=float, default=S, help=f"nucleus sampling threshold ({d.top_p})")
    g.add_argument("--seed", type=int, default=S, help="make sampling reproducible")
    g.add_argument(
        "--max-len",
        type=int,
        default=S,
        help=f"max caption length in tokens, <end> included ({d.max_len})",
    )


@functools.cache
def decoding_dests() -> frozenset[str]:
    """The namespace names of the decoding options (``beam_size``, ``sample`` ...)."""
    p = argparse.ArgumentParser(add_help=False)
    add_decoding_options(p)
    return frozenset(a.dest for a in p._actions)  # noqa: SLF001 - argparse's only registry


def decode_config(args: argparse.Namespace, base: DecodeConfig | None = None) -> DecodeConfig:
    """The decoding options given in ``args`` laid over ``base`` (default: greedy).

    ``--sample`` samples. ``--beam-size`` > 1 searches a beam and ``--beam-size 1`` is greedy
    (the n best reset to 1). ``--n-best`` > 1 alone searches a beam of at least n. ``--no-sample``
    over a sampling default is greedy. With none of them, ``base``'s strategy is kept."""
    dests = decoding_dests()
    given = {k: v for k, v in vars(args).items() if k in dests}
    sample = given.pop("sample", None)
    options = {**asdict(base or DecodeConfig()), **given}
    if "beam_size" in given:
        if given["beam_size"] <= 1 and "n_best" not in given:
            options["n_best"] = 1
        options["strategy"] = (
            "beam" if given["beam_size"] > 1 or options["n_best"] > 1 else "greedy"
        )
    elif given.get("n_best", 1) > 1:
        options["beam_size"] = max(options["beam_size"], given["n_best"])
        options["strategy"] = "beam"
    elif sample is False and options["strategy"] == "sample":
        options["strategy"] = "greedy"
    if sample:
        if given.get("beam_size", 1) > 1:
            raise UserError("--sample and --beam-size are exclusive")
        options["strategy"] = "sample"
    return DecodeConfig.from_dict(options, "decoding options")


def expand_inputs(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """-> (image paths, errors). Directories give their images (sorted); globs expand."""
    paths: list[str] = []
    errors: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                errors.append(f"{item}: directory has no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif p.exists():
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(
                f
                for f in glob.glob(item)
                if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                errors.append(f"{item}: no image matches")
            paths.extend(found)
        else:
            errors.append(f"{item}: no such file")
    return paths, errors


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths, errors = expand_inputs(args.images)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)

    from captioner.inference import Captioner

    if args.model is not None:
        checkpoint = args.model
        captioner = Captioner.from_pretrained(args.model, device=args.device)
    else:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = find_checkpoint()
            print(f"using checkpoint {checkpoint}", file=sys.stderr)
        captioner = Captioner.from_checkpoint(checkpoint, device=args.device)
    maps = args.attention_map
    if maps is not None:
        if not captioner.model.attends:
            raise UserError(
                f"--attention-map: {checkpoint} does not attend (model.decoder.attention=none): "
                "train with model.decoder.attention=soft for attention maps"
            )
        try:
            maps.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--attention-map: cannot create {maps}: {exc.strerror}") from exc
    config = decode_config(args, captioner.info.decoding if captioner.info else None)
    failed = len(errors)
    results = captioner.caption(
        paths, config, batch_size=args.batch_size, attention=maps is not None
    )
    names: set[str] = set()
    for res in results:
        record = res.to_dict()
        if maps is not None and res.error is None:
            record["attention_map"] = str(_write_map(maps, res, captioner, names))
        if res.error is not None:
            failed += 1
            print(f"error: {res.error}", file=sys.stderr)
            if args.json:
                print(json.dumps(record), flush=True)
        elif args.json:
            print(json.dumps(record), flush=True)
        else:
            n_best = config.n_best > 1 and config.strategy == "beam"
            for text, score in res.hypotheses if n_best else [(res.caption, res.score)]:
                extra = f"\t{score:.3f}" if n_best else ""
                print(f"{res.source}\t{text}{extra}", flush=True)
    return 1 if failed else 0


def _write_map(directory: Path, res: CaptionResult, captioner: Captioner, names: set[str]) -> Path:
    """DIR/<image stem>.png (-2, -3 ... when two images share a name)."""
    from captioner.datasets.images import load_image, model_view
    from captioner.evaluation.attention_maps import save_attention_figure

    stem, n = Path(res.source).stem, 1
    while (name := stem if n == 1 else f"{stem}-{n}") in names:
        n += 1
    names.add(name)
    assert res.attention is not None
    view = model_view(load_image(res.source), captioner.preprocessing)
    return save_attention_figure(directory / f"{name}.png", view, res.words, res.attention)
