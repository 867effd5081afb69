"""The micro-batcher: the images of concurrent requests gathered into batches decoded together
on one model thread (:class:`MicroBatcher`), and the C heap's free memory handed back to the
system once the server goes idle (:func:`release_free_memory`)."""

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from captioner.configs.decode import DecodeConfig
from captioner.decoding import Hypothesis

if TYPE_CHECKING:  # annotations naming it are strings: torch loads on use
    import torch

log = logging.getLogger(__name__)


@dataclass
class _Job:
    tensors: "list[torch.Tensor]"
    config: DecodeConfig
    attention: bool
    key: Hashable
    future: asyncio.Future = field(repr=False)


M_ARENA_MAX = -8  # glibc's mallopt parameter: how many malloc arenas threads may create


@functools.cache
def _glibc(name: str) -> Callable[..., int] | None:
    """The C library's function ``name`` where it is glibc's, else None (musl has neither
    ``malloc_trim`` nor ``mallopt``'s arenas; macOS and Windows no glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already has: its C library's
    except OSError:
        return None
    function = getattr(libc, name, None)
    if function is not None:
        function.restype = ctypes.c_int
    return function


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Let glibc's malloc create at most ``arenas`` arenas. By default each thread that
    allocates gets its own (up to 8 per core), and each keeps the peak of what its thread once
    held: a server whose request threads vary holds the sum of their peaks. Takes effect for
    arenas not yet created: call it before threads start. True where it was applied."""
    mallopt = _glibc("mallopt")
    return bool(mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(arenas))) if mallopt else False


def release_free_memory() -> bool:
    """Collect the garbage in reference cycles (a refused request's exception and traceback),
    then hand the free pages of every malloc arena back to the system (glibc keeps what it freed
    for reuse: the memory of a burst of requests would stay with the server); the second part is
    a no-op where the C library has no ``malloc_trim``. True if memory was handed back."""
    gc.collect()
    trim = _glibc("malloc_trim")
    return bool(trim(ctypes.c_size_t(0))) if trim is not None else False


Decode = Callable[[list["torch.Tensor"], DecodeConfig, bool], list[list[Hypothesis]]]


class MicroBatcher:
    """Gathers the images of concurrent requests into batches decoded on one model thread.

    A batch starts with the oldest waiting request and takes the next ones until it holds
    ``max_batch`` images, or ``max_wait_s`` has passed since it started, or no other request is
    on its way (:meth:`arriving`). A request never splits: one that would overflow the batch
    starts the next. Requests decode together only when their
    options agree; a seeded sampling request decodes alone, so its captions are the CLI's.
    """

    def __init__(
        self,
        decode: Decode,
        max_batch: int = 32,
        max_wait_s: float = 0.01,
        idle_release_s: float | None = 1.0,
    ):
        self.decode = decode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # once no request has come for this long after a batch, the heap's free memory is
        # handed back (:func:`release_free_memory`, on the model thread); None: never
        self.idle_release_s = idle_release_s
        self.releases = 0
        self._busy = False  # a batch has run since the last release
        self.batches = 0  # decodes run, and images in them: /health reports the mean batch
        self.images = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None
        self._arriving = 0  # requests being parsed and preprocessed, about to be queued
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start gathering (again, after :meth:`stop`: an app may be started more than once)."""
        self._queue, self._carry = asyncio.Queue(), None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="captioner-model")
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:  # a decode in progress finishes on its thread
            self._executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's parsing and preprocessing: while any request is on its way, a
        batch waits (up to ``max_wait_s``) for it; when none is, a batch is decoded at once, so a
        lone client never pays the wait."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def enqueue(
        self, tensors: "list[torch.Tensor]", config: DecodeConfig, attention: bool
    ) -> asyncio.Future:
        """Queue one request's images -> a future of their hypotheses, per image."""
        assert self._queue is not None, "MicroBatcher.start() was not awaited"
        key: Hashable = (tuple(asdict(config).items()), attention)
        if config.strategy == "sample" and config.seed is not None:
            key = object()  # never merged: the seed gives the same captions as the CLI
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(tensors, config, attention, key, future))
        return future

    async def submit(
        self, tensors: "list[torch.Tensor]", config: DecodeConfig, attention: bool
    ) -> list[list[Hypothesis]]:
        """Per image of ``tensors``, its hypotheses, once its batch has been decoded."""
        return await self.enqueue(tensors, config, attention)

    async def _next_job(self) -> _Job:
        """The oldest waiting request; while there is none, once the server has been idle for
        ``idle_release_s`` after a batch, the heap's free memory is handed back."""
        assert self._queue is not None
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if self._busy and self.idle_release_s is not None:
            try:
                return await asyncio.wait_for(self._queue.get(), self.idle_release_s)
            except asyncio.TimeoutError:
                self._busy = False
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, release_free_memory)
                self.releases += 1
        return await self._queue.get()

    async def _gather(self) -> list[_Job]:
        assert self._queue is not None
        first = await self._next_job()
        jobs, count = [first], len(first.tensors)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0 or not self._arriving:
                    break
                await asyncio.sleep(min(left, 0.001))
                continue
            if count + len(job.tensors) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            count += len(job.tensors)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            groups: dict[Hashable, list[_Job]] = {}
            for job in await self._gather():
                if not job.future.done():  # a cancelled request is not decoded
                    groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                self._busy = True
                tensors = [t for job in jobs for t in job.tensors]
                try:
                    hyps = await loop.run_in_executor(
                        self._executor, self.decode, tensors, jobs[0].config, jobs[0].attention
                    )
                except Exception as exc:  # noqa: BLE001 - a bug: those requests get a 500
                    log.exception("decoding a batch of %d images failed", len(tensors))
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                self.batches += 1
                self.images += len(tensors)
                start = 0
                for job in jobs:
                    end = start + len(job.tensors)
                    if not job.future.done():
                        job.future.set_result(hyps[start:end])
                    start = end
