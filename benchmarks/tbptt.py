"""Truncated BPTT (``trainer.tbptt_steps``): peak memory and time of one training step against
caption length, with and without truncation, side by side in one run.

    python benchmarks/tbptt.py [--lengths 16 64 256] [--steps 8 4] [--attention none soft]

Each (decoder, caption length, K) runs in a fresh process, so that each peak is its own: the
Flickr8k preset's decoder sizes (512-d embedding, 512 LSTM units, 2,541 words, 1,280-d
features; a 7 x 7 grid with soft attention), a batch of 32 synthetic captions all of the given
length, one intra-op thread. Memory is the process's peak RSS above its resident state after a
first short step (weights, gradients, AdamW's moments): what the step's graph and logits add.
Time is the median over the measured steps (forward, backward, clipping, AdamW) of the process's
CPU time, which on one thread is the work a step does whatever else the machine runs (the
wall time, also printed, is not, on a shared machine)."""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_name

BATCH, VOCAB, FEATURES, GRID = 32, 2541, 1280, 49


def rss_mb() -> float:
    """The current resident set (Linux /proc), MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def one_config(attention: str, length: int, k: int | None, repeats: int) -> dict:
    """The child's measurement (run in its own process)."""
    import torch

    from captioner.configs.model import DecoderConfig
    from captioner.models.decoders import build_decoder
    from captioner.training.objectives import TeacherForcing, backpropagate, loss_parts

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = DecoderConfig(embed_dim=512, hidden_size=512, dropout=0.5, attention=attention)
    decoder = build_decoder(cfg, FEATURES, VOCAB)

    class Model(torch.nn.Module):  # the objective's view: model(inputs, captions, ...)
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, inputs, captions, lengths, image_of_caption, features, **kwargs):
            return self.decoder(inputs[image_of_caption], captions, lengths, **kwargs)

    model = Model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4)
    objective = TeacherForcing(pad_id=0, tbptt_steps=k)

    def batch(n: int) -> dict:
        shape = (BATCH, GRID, FEATURES) if attention != "none" else (BATCH, FEATURES)
        captions = torch.randint(4, VOCAB, (BATCH, n))
        captions[:, 0], captions[:, -1] = 1, 2  # <start> ... <end>
        lengths = torch.full((BATCH,), n)
        index = torch.arange(BATCH)
        return {
            "inputs": torch.randn(shape),
            "captions": captions,
            "lengths": lengths,
            "image_of_caption": index,
        }

    def step(b: dict) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        parts = loss_parts(objective, model, b, features=True)
        backpropagate(parts, lambda loss: loss.backward(), contextlib.nullcontext)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay resident, as in the baseline
        return time.perf_counter() - start, time.process_time() - cpu

    step(batch(3))  # weights, gradients and AdamW's moments become resident
    base = rss_mb()
    data = batch(length)
    times = [step(data) for _ in range(repeats)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB
    return {
        "attention": attention,
        "length": length,
        "k": k,
        "wall_s": statistics.median(wall for wall, _ in times),
        "cpu_s": statistics.median(cpu for _, cpu in times),
        "peak_mb": peak - base,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument(
        "--steps", type=int, nargs="+", default=[8, 4], help="the K to compare with full BPTT"
    )
    ap.add_argument("--attention", nargs="+", default=["none", "soft"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--child", nargs=3, metavar=("ATTENTION", "LENGTH", "K"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        attention, length, k = args.child
        row = one_config(attention, int(length), None if k == "full" else int(k), args.repeats)
        print(json.dumps(row))
        return

    print(f"# {cpu_name()}, 1 thread, batch {BATCH}; peak MB above the resident model state")
    print(
        "| decoder | tokens | K | CPU s / step | wall s / step | peak MB | CPU time vs full | memory vs full |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for attention in args.attention:
        for length in args.lengths:
            full = None
            for k in ["full", *map(str, args.steps)]:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--repeats",
                        str(args.repeats),
                        "--child",
                        attention,
                        str(length),
                        k,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                full = full or row
                name = "pooled" if attention == "none" else attention
                print(
                    f"| {name} | {length} | {k} | {row['cpu_s']:.3f} | {row['wall_s']:.3f} "
                    f"| {row['peak_mb']:.0f} | {row['cpu_s'] / full['cpu_s']:.2f}x | "
                    f"{row['peak_mb'] / max(full['peak_mb'], 1e-9):.2f}x |",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
