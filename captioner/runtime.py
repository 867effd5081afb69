"""Where training and inference run: device selection, the torchrun/DDP process group, mixed
precision, random-number streams and the stop signal.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.util  # its exit hook first: ours, registered later, runs before it
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from captioner.configs.training import PRECISIONS
from captioner.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA > MPS > CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"device: {name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {name!r} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup_runtime(device_name: str) -> Runtime:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Runtime(device, rank, world_size, local_rank)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# mixed precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision`` on ``device`` (None: full fp32)."""
    if precision not in PRECISIONS:
        raise UserError(
            f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# random-number streams (saved per rank, so that a resumed run continues the same streams)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """Python's RNG state comes back from a weights_only checkpoint with lists for tuples."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def gather_rng_states(rt: Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective under DDP)."""
    state = rng_state()
    if not rt.distributed:
        return [state]
    states: list[Any] = [None] * rt.world_size
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------------------------------------
# stopping on a signal


class StopRequested(BaseException):
    """A stop signal ended a long phase (the feature cache, a validation) before its end; the
    run saves ``last.pt`` as it stood before that phase. Like ``KeyboardInterrupt`` it is not an
    error: ``except Exception`` lets it pass, and a failed write is never blamed on it."""


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a flag that the loop checks after each step (the
    feature cache and validation: between batches); a second one exits at once, with one line on stderr and no
    traceback (``last.pt`` keeps its previous save)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # a second signal: give up at once
            sys.stderr.write(f"error: got {name} again: stopped at once, without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        log.warning("got %s: saving last.pt at the next batch (send it again to quit now)", name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, rt: Runtime) -> bool:
        """Whether to stop now; under DDP every rank stops at the same step."""
        if not rt.distributed:
            return self.signum is not None
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=rt.device)
        dist.all_reduce(flag)
        return bool(flag.item())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGINT and SIGTERM (a Ctrl-C or a scheduler
    reaches the whole process group) are left to the main process, which stops and then shuts
    its workers down; a worker killed by one would fail the batch it was loading, and one that
    kept the main process's handler would log the stop itself."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At the interpreter's exit, the daemonic children (loader workers) still alive are killed.

    A loader's workers outlive a run whose iterator is still referenced (a traceback kept for
    printing, a script's global), and PyTorch then relies on multiprocessing's own exit hook,
    which sends its daemonic children SIGTERM and joins them: workers ignoring SIGTERM
    (:func:`ignore_stop_signals`) made that join wait for ever, a stopped run's process alive
    for as long as anyone let it be. Registered after that hook, so it runs first (atexit is
    last in, first out); killing is what the hook would do with a signal they cannot ignore."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    with contextlib.suppress(ValueError):  # PyTorch's SIGCHLD check would call this a failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=5)


atexit.register(_kill_workers_at_exit)
