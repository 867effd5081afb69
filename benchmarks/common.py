"""Pieces the benchmark scripts share. Torch-free: ``cold_start.py`` times processes and must
not import torch itself."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def demo_checkpoint(workdir: Path) -> Path:
    """Train a 2-epoch demo model (the architecture of `captioner train`'s defaults) in
    ``workdir`` for a benchmark that was given no checkpoint -> its best.pt."""
    run_dir = workdir / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "captioner",
            "train",
            f"data.root={workdir / 'demo'}",
            "trainer.max_epochs=2",
            f"hydra.run.dir={run_dir}",
            "device=cpu",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return run_dir / "best.pt"
