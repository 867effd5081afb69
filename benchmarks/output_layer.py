"""The output layer's training step by vocabulary size: a linear layer to V words and the
cross-entropy, forward and backward, on one thread, sizes interleaved round by round so the
machine's load falls on all alike, each size in ``--copies`` separately allocated layers (a
figure that moves with where its tensors happen to lie shows up as a spread between them).

    python benchmarks/output_layer.py                      # 2,719-2,728 and 6,828-6,832 words
    python benchmarks/output_layer.py --sizes 9487 9488 --tokens 3000 --hidden 512

Why it exists: ``scale.py``'s epoch at 30,000 images with the vocabulary "held" (2,719 words
against 6,000 images' 2,720) ran 10-19% slower per step on identical batches; this shows the
size alone does that (a size off a multiple of 8 leaves the matrix kernels a tail to do).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import cpu_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[2719, 2720, 2721, 2724, 2728, 6828, 6829, 6832]
    )
    p.add_argument("--tokens", type=int, default=1648, help="target tokens a batch")
    p.add_argument("--hidden", type=int, default=32, help="the decoder's output size")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--copies", type=int, default=3, help="layers of each size")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = []
    for _ in range(args.copies):
        for v in args.sizes:
            x = torch.randn(args.tokens, args.hidden, requires_grad=True)
            y = torch.randint(0, v, (args.tokens,))
            layers.append((v, torch.nn.Linear(args.hidden, v), x, y))
    times: list[list[float]] = [[] for _ in layers]
    for _ in range(args.rounds):
        for (_, linear, x, y), spent in zip(layers, times, strict=True):
            t0 = time.process_time()
            F.cross_entropy(linear(x), y).backward()
            spent.append(time.process_time() - t0)
    medians: dict[int, list[float]] = {v: [] for v in args.sizes}
    for (v, *_), spent in zip(layers, times, strict=True):
        medians[v].append(1e3 * statistics.median(spent))
    print(
        f"{cpu_name()}, torch {torch.__version__}, one thread, {args.tokens} tokens x "
        f"{args.hidden} -> V, median of {args.rounds} rounds (CPU time)\n"
    )
    print(f"| V | V mod 8 | ms a step, each of {args.copies} layers |")
    print("|---:|---:|---|")
    for v, ms in medians.items():
        print(f"| {v} | {v % 8} | {' / '.join(f'{m:.2f}' for m in ms)} |")


if __name__ == "__main__":
    main()
