"""The micro-batcher: the images of concurrent requests gathered into batches decoded together
on one model thread (:class:`MicroBatcher`)."""

import asyncio
import contextlib
import logging
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


Decode = Callable[[list["torch.Tensor"], DecodeConfig, bool], list[list[Hypothesis]]]


class MicroBatcher:
    """Gathers the images of concurrent requests into batches decoded on one model thread.

    A batch starts with the oldest waiting request and takes the next ones until it holds
    ``max_batch`` images, or ``max_wait_s`` has passed since it started, or no other request is
    on its way (:meth:`arriving`). A request never splits: one that would overflow the batch
    starts the next. Requests decode together only when their
    options agree; a seeded sampling request decodes alone, so its captions are the CLI's.
    """

    def __init__(self, decode: Decode, max_batch: int = 32, max_wait_s: float = 0.01):
        self.decode = decode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
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

    async def _gather(self) -> list[_Job]:
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
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
