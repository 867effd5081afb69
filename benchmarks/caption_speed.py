"""Captioning speed: images/s for greedy and beam search, batched vs one image at a time, and the
cold-start time of ``captioner caption`` on one image (process start to caption printed).

    python benchmarks/caption_speed.py --checkpoint outputs/train/<run>/best.pt
    python benchmarks/caption_speed.py            # trains a small demo checkpoint first (~1 min)

All figures are measured in this run, side by side; the machine's noise is reduced by taking the
median of ``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import demo_checkpoint

from captioner.configs.decode import DecodeConfig
from captioner.datasets.synthetic import ensure_demo_dataset
from captioner.inference import Captioner


def images_per_second(
    captioner: Captioner, images: list[Path], config: DecodeConfig, batch_size: int, repeats: int
) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = captioner.caption(images, config, batch_size=batch_size)
        elapsed = time.perf_counter() - start
        assert all(r.error is None for r in results)
        rates.append(len(images) / elapsed)
    return statistics.median(rates)


def cold_start(checkpoint: Path, image: Path, repeats: int) -> float:
    """Seconds from launching `captioner caption IMAGE` to its caption on stdout."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "captioner",
                "caption",
                str(image),
                "--checkpoint",
                str(checkpoint),
                "--device",
                "cpu",
            ],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, help="default: train a small demo checkpoint")
    p.add_argument("--images", type=Path, help="a folder of images (default: demo test images)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        demo = ensure_demo_dataset(workdir / "demo")
        checkpoint = args.checkpoint or demo_checkpoint(workdir)
        folder = args.images or demo / "images" / "test"
        images = sorted(f for f in folder.iterdir() if f.is_file())[: args.num_images]
        captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
        captioner.caption(images[:2])  # warm-up

        print(f"checkpoint: {checkpoint}")
        print(
            f"{len(images)} images from {folder}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; median of {args.repeats}"
        )
        print(f"{'decoding':<10} {'batched img/s':>14} {'one-by-one img/s':>17} {'speed-up':>9}")
        for name, config in (
            ("greedy", DecodeConfig()),
            ("beam 3", DecodeConfig(strategy="beam", beam_size=3)),
        ):
            batched = images_per_second(captioner, images, config, args.batch_size, args.repeats)
            single = images_per_second(captioner, images, config, 1, args.repeats)
            print(f"{name:<10} {batched:>14.1f} {single:>17.1f} {batched / single:>8.1f}x")
        seconds = cold_start(checkpoint, images[0], args.repeats)
        print(f"cold start of `captioner caption` on one image: {seconds:.2f} s")


if __name__ == "__main__":
    main()
