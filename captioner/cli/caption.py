r"""``captioner caption IMAGE [IMAGE ...]``: print a caption for each image.

One line per image on stdout (``path<TAB>caption``, or JSON with ``--json``), printed batch by
batch as each is captioned; a bad image gets a one-line ``error:`` on stderr, the others are still
captioned, and the exit status is 1.

In the plain output every field is escaped (:func:`escape`) so that a file name can neither forge
a record nor stop the output: a backslash, tab, newline and carriage return are written ``\\``,
``\t``, ``\n``, ``\r``; any other control character, and each byte of a name that is not valid
UTF-8, ``\xNN``. A character stdout's encoding cannot write is backslash-escaped too.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.checkpoint import DEFAULT_RUNS, find_checkpoint
from captioner.configs import decode_options
from captioner.configs.decode import DecodeConfig
from captioner.configs.decode_options import DECODE_OPTIONS
from captioner.datasets.images import IMAGE_EXTENSIONS
from captioner.datasets.trained_on import describe_trained_on
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
        dest="source",
        metavar="PATH",
        help="the model: a checkpoint (best.pt, last.pt), a run directory (its best.pt, else its "
        "last.pt), a folder written by `captioner export` or its Hugging Face Hub id (owner/name; "
        f"needs huggingface_hub) (default: the newest best.pt under {DEFAULT_RUNS}/)",
    )
    source.add_argument(
        "--model",
        "-m",
        dest="source",
        metavar="PATH_OR_HUB_ID",
        help="the same as --checkpoint: either takes any of them",
    )
    p.add_argument(
        "--ensemble",
        action="append",
        default=[],
        metavar="PATH",
        help="one more model decoded with the first as one (repeat it for more): the mean of "
        "their word probabilities at every step; one vocabulary, one frozen encoder, e.g. the "
        "seeds of one preset",
    )
    add_decoding_options(p)
    p.add_argument(
        "--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:1 ..."
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images decoded together, and printed together as each batch is done; larger is "
        "faster on a GPU and needs more memory (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--attention-map",
        type=Path,
        metavar="DIR",
        help="write DIR/<image>.png per image: the image and, for every word, where the model "
        "looked (a model with model.decoder.attention=soft or topdown)",
    )
    return p


def add_decoding_options(p: argparse.ArgumentParser) -> None:
    """Add the decoding flags, one per row of :data:`DECODE_OPTIONS` (the table ``captioner
    serve`` parses its request fields with). Options not given stay absent from the namespace,
    so that :func:`decode_config` lays them over a model's own default decoding."""
    g = p.add_argument_group(
        "decoding",
        "Default: how the model was selected in training (trainer.val_decode; greedy unless its "
        "preset says otherwise), never emitting <unk>; the options given are laid over it. --temperature, --top-k, "
        "--top-p and --seed apply to sampling only: without --sample (or a model that samples by "
        "default) they are refused, never ignored; --length-penalty likewise needs a beam.",
    )
    for option in DECODE_OPTIONS:
        if option.type is bool:
            kind: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": option.type}
        g.add_argument(
            option.flag, dest=option.name, default=argparse.SUPPRESS, help=option.help_text, **kind
        )


# the options that only one strategy reads: given with another, they are refused
STRATEGY_OPTIONS = {
    "sample": ("temperature", "top_k", "top_p", "seed"),
    "beam": ("length_penalty",),
}
_HOW = {"sample": "add --sample", "beam": "add --beam-size N"}


def decode_config(args: argparse.Namespace, base: DecodeConfig | None = None) -> DecodeConfig:
    """The decoding options given in ``args`` laid over ``base`` (default: greedy), as
    :func:`captioner.configs.decode_options.decode_config` does. An option the resulting
    strategy does not read (``--top-p`` without sampling) is a :class:`UserError`."""
    given = {o.name: getattr(args, o.name) for o in DECODE_OPTIONS if hasattr(args, o.name)}
    config = decode_options.decode_config(given, base)
    flags = {o.name: o.flag for o in DECODE_OPTIONS}
    for strategy, names in STRATEGY_OPTIONS.items():
        unread = [flags[n] for n in names if n in given]
        if unread and config.strategy != strategy:
            kind = "sampling" if strategy == "sample" else "beam search"
            raise UserError(
                f"{unread[0]} applies to {kind} only, and this decoding is {config.strategy}: "
                f"{_HOW[strategy]}"
            )
    return config


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
        print(f"error: {escape(err)}", file=sys.stderr)

    from captioner.inference import Captioner

    checkpoint = args.source or find_checkpoint()
    if args.ensemble:
        captioner = Captioner.ensemble([checkpoint, *args.ensemble], device=args.device)
    else:
        captioner = Captioner.load(checkpoint, device=args.device)
    if args.source is None:  # say which model answers, and what it knows
        trained_on = describe_trained_on(captioner.info.trained_on if captioner.info else None)
        print(f"using checkpoint {checkpoint}, {trained_on}", file=sys.stderr)
    maps = args.attention_map
    if maps is not None:
        if not captioner.model.attends:
            raise UserError(
                f"--attention-map: {checkpoint} does not attend (model.decoder.attention=none): "
                "train with model.decoder.attention=soft or topdown for attention maps"
            )
        try:
            maps.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--attention-map: cannot create {maps}: {exc.strerror}") from exc
    config = decode_config(args, captioner.info.decoding if captioner.info else None)
    if isinstance(sys.stdout, io.TextIOWrapper):  # a name stdout's encoding lacks: escaped
        sys.stdout.reconfigure(errors="backslashreplace")
    failed = len(errors)
    names: set[str] = set()
    size = args.batch_size
    for start in range(0, len(paths), size):  # printed batch by batch: a stop keeps what is done
        batch = paths[start : start + size]
        for res in captioner.caption(batch, config, batch_size=size, attention=maps is not None):
            failed += not _print_result(res, args.json, config, maps, captioner, names)
        sys.stdout.flush()
    return 1 if failed else 0


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
# a backslash, the C0 and C1 control characters and DEL, and os.fsdecode's escapes of the bytes of
# a name that is not valid UTF-8 (U+DC80..U+DCFF)
_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def escape(text: str) -> str:
    r"""``text`` as one field of one line: ``\\``, ``\t``, ``\n``, ``\r``, else ``\xNN`` for a
    control character or a byte of a non-UTF-8 name."""

    def one(match: re.Match[str]) -> str:
        char = match.group()
        code = ord(char)
        return _ESCAPES.get(char) or f"\\x{code - 0xDC00 if code >= 0xDC80 else code:02x}"

    return _UNSAFE.sub(one, text)


def _print_result(
    res: CaptionResult,
    as_json: bool,
    config: DecodeConfig,
    maps: Path | None,
    captioner: Captioner,
    names: set[str],
) -> bool:
    """Print one image's result (an error on stderr too); False if it failed."""
    record = res.to_dict()
    if maps is not None and res.error is None:
        record["attention_map"] = str(_write_map(maps, res, captioner, names))
    if res.error is not None:
        print(f"error: {escape(res.error)}", file=sys.stderr)
    if as_json:
        print(json.dumps(record))  # JSON's own escapes (ASCII only)
    elif res.error is None:
        n_best = config.n_best > 1 and config.strategy == "beam"
        for text, score in res.hypotheses if n_best else [(res.caption, res.score)]:
            extra = f"\t{score:.3f}" if n_best else ""
            print(f"{escape(res.source)}\t{escape(text)}{extra}")
    return res.error is None


def _write_map(directory: Path, res: CaptionResult, captioner: Captioner, names: set[str]) -> Path:
    """DIR/<image stem>.png (-2, -3 ... when two images share a name)."""
    from captioner.datasets.images import load_image, model_view
    from captioner.evaluation.attention_maps import save_attention_figure

    stem, n = Path(res.source).stem, 1
    while (name := stem if n == 1 else f"{stem}-{n}") in names:
        n += 1
    names.add(name)
    assert res.attention is not None
    view = model_view(
        load_image(res.source, captioner.preprocessing.draft_to), captioner.preprocessing
    )
    return save_attention_figure(directory / f"{name}.png", view, res.words, res.attention)
