"""Vanishing gradients, measured on trained models: for each checkpoint, the norm of the gradient
of the last target's loss (``<end>``) at every earlier hidden state, ||dL_T / dh_{T-k}||, against
the distance k, averaged over the first N reference captions of a split of the data the model
was trained on (captioner/evaluation/gradient_flow.py; docs/training.md says how to read it).

    python benchmarks/gradient_flow.py RUN_DIR [RUN_DIR ...] --out DIR
    python benchmarks/gradient_flow.py runs/lstm runs/gru runs/rnn --labels LSTM GRU RNN \\
        --split val --captions 500 --out benchmarks/results/gradient_flow

Each argument is what ``captioner evaluate checkpoint=`` reads: a best.pt / last.pt, a run
directory (its best.pt) or an exported folder (give --data-root). Writes ``gradient_flow.png``
(two log-scale panels: each caption's norm relative to its own at k = 0, and the mean norm) and
``gradient_flow.json`` (every number) into --out, and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from matplotlib.figure import Figure

from captioner.configs.data import SPLITS
from captioner.errors import UserError
from captioner.evaluation.gradient_flow import (
    GradientFlow,
    measure_checkpoint,
    plot_gradient_flow,
)
from captioner.runtime import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoints", nargs="+", help="checkpoints, run directories or exported folders"
    )
    p.add_argument("--labels", nargs="+", help="one name per checkpoint (default: the cell)")
    p.add_argument("--split", default="val", choices=SPLITS)
    p.add_argument("--captions", type=int, default=500, help="reference captions measured (N)")
    p.add_argument("--target", default="end", choices=["end", "last_word"])
    p.add_argument("--data-root", help="the dataset's root, if not the one the model trained on")
    p.add_argument(
        "--cache-dir",
        help="read the encoder's features of the whole split from this feature cache (e.g. the "
        "run's trainer.cache_dir); default: encode only the images the captions need",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--min-count",
        type=int,
        default=20,
        help="plot a distance only when at least this many captions reach it",
    )
    p.add_argument("--out", type=Path, default=Path("gradient_flow"), help="output folder")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.checkpoints):
        p.error(f"--labels: {len(args.labels)} given for {len(args.checkpoints)} checkpoints")
    if args.captions < 1 or args.batch_size < 1 or args.min_count < 1:
        p.error("--captions, --batch-size and --min-count must be >= 1")
    return args


def table(flows: list[GradientFlow], min_count: int) -> str:
    """One line per model: captions, the direct norm, the relative norm at k = 5 and 10, the
    geometric-mean factor per step."""

    def at(flow: GradientFlow, k: int) -> str:
        ok = k < len(flow.count) and flow.count[k] >= min_count
        return f"{flow.relative[k]:.2e}" if ok else "-"

    rows = [f"{'model':<16} {'N':>5} {'|g| k=0':>9} {'rel k=5':>9} {'rel k=10':>9} {'per step':>9}"]
    for flow in flows:
        factor = flow.per_step_factor(min_count)
        rows.append(
            f"{flow.label:<16} {flow.count[0]:>5} {flow.mean_norm[0]:>9.2e} {at(flow, 5):>9} "
            f"{at(flow, 10):>9} {'-' if math.isnan(factor) else f'{factor:.3f}':>9}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    flows = []
    for i, checkpoint in enumerate(args.checkpoints):
        print(f"measuring {checkpoint} on {args.captions} {args.split} captions", file=sys.stderr)
        flows.append(
            measure_checkpoint(
                checkpoint,
                split=args.split,
                num_captions=args.captions,
                target=args.target,
                device=device,
                batch_size=args.batch_size,
                cache_dir=args.cache_dir,
                data_root=args.data_root,
                label=args.labels[i] if args.labels else None,
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(13, 4.5))
    relative_ax, absolute_ax = fig.subplots(1, 2)
    plot_gradient_flow(flows, relative_ax, relative=True, min_count=args.min_count)
    plot_gradient_flow(flows, absolute_ax, relative=False, min_count=args.min_count)
    fig.tight_layout()
    fig.savefig(args.out / "gradient_flow.png", dpi=120)
    record = {
        "split": args.split,
        "captions": args.captions,
        "target": args.target,
        "min_count": args.min_count,
        "models": [
            {
                "checkpoint": str(c),
                **f.to_dict(),
                "per_step_factor": f.per_step_factor(args.min_count),
            }
            for c, f in zip(args.checkpoints, flows, strict=True)
        ],
    }
    (args.out / "gradient_flow.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table(flows, args.min_count))
    print(f"wrote {args.out / 'gradient_flow.png'} and {args.out / 'gradient_flow.json'}")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
