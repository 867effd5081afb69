#!/usr/bin/env python
"""Cold start of ``captioner caption`` on one image against ``python -c "import torch"``.

A fresh process captions one image: its wall time (process start to exit, the caption printed) is
measured in pairs with a fresh ``python -c "import torch"``, the floor of any torch program. The
order inside a pair alternates (torch first, then caption first, ...) so that a drift in machine
load hits both alike; the report gives every run, the medians, and median(caption) /
median(import torch) against the 1.3x target. With ``--model DIR`` (a folder written by
``captioner export CKPT DIR``) the same is measured for ``captioner caption --model DIR IMAGE``.

    python benchmarks/cold_start.py --checkpoint outputs/train/<run>/best.pt
    python benchmarks/cold_start.py --checkpoint best.pt --model exported/ --pairs 9
    python benchmarks/cold_start.py          # trains a 2-epoch demo checkpoint first (~1 min)

The benchmark process itself imports neither torch nor the product's model code: each timed
command runs in its own process, from the same interpreter and virtualenv. Results go to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from common import cpu_name, demo_checkpoint

TARGET = 1.3  # median(caption) / median(import torch) must not exceed this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, help="default: train a small demo checkpoint")
    p.add_argument(
        "--model", type=Path, help="also time `captioner caption --model DIR` (optional)"
    )
    p.add_argument("--image", type=Path, help="default: the demo dataset's first test image")
    p.add_argument("--pairs", type=int, default=5, help="paired runs per command (5)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs of each command first (1): page cache"
    )
    p.add_argument("--device", help="pass --device to `captioner caption` (default: its auto)")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    return args


def caption_command() -> list[str]:
    """The console script beside this interpreter (what a user runs), else ``-m captioner``."""
    script = Path(sys.executable).parent / "captioner"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "captioner"]


def demo_image(workdir: Path) -> Path:
    from captioner.datasets.synthetic import ensure_demo_dataset  # numpy and Pillow, no torch

    root = ensure_demo_dataset(workdir / "demo")
    return sorted((root / "images" / "test").iterdir())[0]


def wall_time(cmd: list[str]) -> float:
    """Seconds from launching ``cmd`` to its exit; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed


def show(cmd: list[str]) -> str:
    """``cmd`` as a person would type it: ``python`` and ``captioner`` without their paths."""
    script = str(Path(sys.executable).parent / "captioner")
    names = {sys.executable: "python", script: "captioner"}
    return shlex.join(names.get(c, c) for c in cmd)


def measure(commands: dict[str, list[str]], pairs: int, warmup: int) -> dict[str, list[float]]:
    """{name: wall times}: ``pairs`` rounds (a pair, or a triple with ``--model``), each
    running every command once, the order reversed every other round; printed as they come."""
    for _ in range(warmup):
        for cmd in commands.values():
            wall_time(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for i in range(pairs):
        order = names if i % 2 == 0 else names[::-1]
        line = []
        for name in order:
            times[name].append(wall_time(commands[name]))
            line.append(f"{name} {times[name][-1]:.3f} s")
        print(f"  round {i + 1}: " + ", ".join(line), flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="captioner-cold-") as tmp:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or demo_checkpoint(workdir)
        image = args.image or demo_image(workdir)
        device = ["--device", args.device] if args.device else []
        caption = [*caption_command(), "caption", str(image), *device]
        commands = {
            "import torch": [sys.executable, "-c", "import torch"],
            "caption -c": [*caption, "--checkpoint", str(checkpoint)],
        }
        if args.model is not None:
            commands["caption --model"] = [*caption, "--model", str(args.model)]

        load_start = os.getloadavg()[0]
        print("captioner cold start: `captioner caption IMAGE` vs `python -c 'import torch'`")
        print(f"  date        {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
        versions = f"Python {platform.python_version()}, torch {metadata.version('torch')}"
        print(f"  machine     {cpu_name()}, {os.cpu_count()} CPUs, {versions}")
        print(f"  checkpoint  {checkpoint}")
        if args.model is not None:
            print(f"  model       {args.model}")
        print(f"  image       {image}")
        for name, cmd in commands.items():
            print(f"  {name:<16}{show(cmd)}")
        print(f"  runs        {args.warmup} warm-up, then {args.pairs} rounds, alternating order")
        times = measure(commands, args.pairs, args.warmup)
        load_end = os.getloadavg()[0]
        print(f"  1-min load average {load_start:.2f} at start, {load_end:.2f} at end")

    base = statistics.median(times["import torch"])
    print(f"\n  {'command':<16} {'median s':>9} {'min s':>7} {'ratio':>7}   every run (s)")
    for name, ts in times.items():
        med = statistics.median(ts)
        runs = " ".join(f"{t:.3f}" for t in ts)
        ratio = f"{med / base:.2f}x"
        print(f"  {name:<16} {med:>9.3f} {min(ts):>7.3f} {ratio:>7}   {runs}")
    worst = max(
        statistics.median(ts) / base for name, ts in times.items() if name != "import torch"
    )
    verdict = "met" if worst <= TARGET else "NOT met"
    print(f"\n  caption / import torch (medians): {worst:.2f}x (target <= {TARGET}x: {verdict})")
    if max(load_start, load_end) >= (os.cpu_count() or 1):
        print("  WARNING: the machine was busy (load average >= its CPU count); rerun when idle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
