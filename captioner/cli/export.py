"""``captioner export``: the command line of
:func:`captioner.pretrained.export_pretrained`, which writes a trained model as a folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from captioner.datasets.trained_on import describe_trained_on
from captioner.errors import UserError
from captioner.manifest import read_manifest
from captioner.pretrained import CONFIG, FILES, WEIGHTS, export_pretrained


def run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="captioner export",
        description=f"Write a trained model as a folder ({', '.join(FILES)}) that "
        "`captioner caption --model`, `captioner serve --model` and Captioner.from_pretrained "
        "load with no training code, config or pickle.",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        help="best.pt or last.pt, or a run directory (its best.pt, else its last.pt)",
    )
    p.add_argument("out_dir", type=Path, help="the folder to write (created if needed)")
    p.add_argument("--half", action="store_true", help="store float16 weights (half the size)")
    args = p.parse_args(argv)
    if (args.checkpoint / CONFIG).is_file():
        raise UserError(
            f"{args.checkpoint}: already an exported folder ({CONFIG}): `captioner caption "
            "--model` and `captioner serve --model` load it as it is"
        )
    out = export_pretrained(args.checkpoint, args.out_dir, half=args.half)
    size = (out / WEIGHTS).stat().st_size / 2**20
    trained_on = describe_trained_on(read_manifest(out).trained_on)
    print(f"exported to {out} ({WEIGHTS} {size:.1f} MiB), {trained_on}")
    return 0
