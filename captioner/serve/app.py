"""``captioner serve``: caption images over HTTP (FastAPI + uvicorn, ``pip install
'captioner[serve]'``).

- ``POST /caption``: images as multipart file parts; decoding options as form or query fields
  with the CLI's names (``beam-size`` or ``beam_size``, ``n-best``, ``sample``, ...) and limits,
  plus ``attention`` for attention maps. JSON out: ``{"results": [...]}``, one entry per image in
  ``captioner caption --json``'s schema.
- ``GET /health``, ``GET /model`` (what is loaded, its scores, the server's limits).
- ``GET /``: a self-contained web page (no CDN) to try the model.

Concurrent requests are gathered into micro-batches (:class:`MicroBatcher`): up to
``max_batch`` images, waiting at most ``max_wait_ms`` for more, decoded together on one model
thread. Images are checked and preprocessed per request before they join a batch, so one
request's bad image is that request's 4xx and never touches the others. Every bad input is a
4xx JSON ``{"error": "..."}`` naming the problem.
"""

import argparse
import asyncio
import base64
import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from importlib import resources
from typing import TYPE_CHECKING, Any

from captioner import __version__
from captioner.checkpoint import DEFAULT_RUNS, find_checkpoint
from captioner.cli.caption import OptionError, OptionParser, add_decoding_options, decode_config
from captioner.configs.decode import DecodeConfig
from captioner.datasets.images import ImageLoadError, load_image_bytes
from captioner.decoding import Hypothesis
from captioner.errors import UserError

if TYPE_CHECKING:  # annotations naming these are strings: fastapi and torch load on use
    import torch
    from fastapi import FastAPI

    from captioner.inference import Captioner

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TRUE, FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no", "")


@dataclass(frozen=True)
class ServeSettings:
    """The server's batching and limits (``captioner serve --help``)."""

    max_batch: int = 32  # images decoded together at most (1: no micro-batching)
    max_wait_ms: float = 10.0  # how long a batch waits for more requests
    max_images: int = 16  # images per request
    max_upload_mb: float = 10.0  # bytes per image
    max_beam_size: int = 16  # the largest beam (and n-best) a request may ask for
    max_len: int = 100  # the longest caption a request may ask for, in tokens

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_images", "max_beam_size", "max_len"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not 0 <= self.max_wait_ms <= 10_000:  # also refuses nan
            raise UserError(f"--max-wait-ms must be in [0, 10000], got {self.max_wait_ms}")
        if not (self.max_upload_mb > 0 and math.isfinite(self.max_upload_mb)):
            raise UserError(f"--max-upload-mb must be a number > 0, got {self.max_upload_mb}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class RequestError(Exception):
    """A client's mistake: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# micro-batching


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


# ---------------------------------------------------------------------------------------------
# request parsing


def _option_parser() -> OptionParser:
    p = OptionParser(prog="POST /caption", add_help=False)
    add_decoding_options(p)
    p.add_argument("--attention", action="store_true", default=False)
    return p


OPTIONS = _option_parser()  # built once; parse_args keeps no state between calls


def _options() -> tuple[tuple[str, ...], frozenset[str]]:
    """(every option's name, the names of the true/false flags), from the parser itself."""
    actions = [a for a in OPTIONS._actions if a.option_strings]  # noqa: SLF001
    names = tuple(sorted(a.option_strings[0][2:] for a in actions))
    flags = frozenset(a.option_strings[0][2:] for a in actions if a.nargs == 0)
    return names, flags


OPTION_NAMES, FLAGS = _options()


def check_limits(config: DecodeConfig, settings: ServeSettings) -> str | None:
    """What in ``config`` is over the server's limits (a message), or None."""
    if config.strategy == "beam" and config.beam_size > settings.max_beam_size:
        return f"beam-size: at most {settings.max_beam_size} on this server, got {config.beam_size}"
    if config.max_len > settings.max_len:
        return f"max-len: at most {settings.max_len} on this server, got {config.max_len}"
    return None


def parse_options(
    fields: Sequence[tuple[str, str]], base: DecodeConfig, settings: ServeSettings
) -> tuple[DecodeConfig, bool]:
    """Form/query fields -> (decoding, attention), through the CLI's own parser; a bad field is
    a 400 naming it."""
    argv: list[str] = []
    seen: set[str] = set()
    for raw, value in fields:
        name = raw.replace("_", "-")
        if name not in OPTION_NAMES:
            hint = " (send the file itself: -F image=@cat.jpg)" if name == "image" else ""
            raise RequestError(
                400, f"unknown option {raw!r}{hint} (options: {', '.join(OPTION_NAMES)})"
            )
        if name in seen:
            raise RequestError(400, f"option {raw!r} given twice")
        seen.add(name)
        if name in FLAGS:
            word = value.strip().lower()
            if word not in TRUE + FALSE:
                raise RequestError(400, f"{name}: expected true or false, got {value!r}")
            if word in TRUE:
                argv.append(f"--{name}")
            elif name != "attention":
                argv.append(f"--no-{name}")  # false over a model default that is true
        else:
            argv.append(f"--{name}={value}")  # "=": a value like -1 is not taken for an option
    try:
        args = OPTIONS.parse_args(argv)
        config = decode_config(args, base)
    except OptionError as exc:
        raise RequestError(400, str(exc).replace("argument --", "")) from exc
    except UserError as exc:
        raise RequestError(400, str(exc)) from exc
    problem = check_limits(config, settings)
    if problem:
        raise RequestError(400, problem)
    return config, bool(args.attention)


# ---------------------------------------------------------------------------------------------
# the app


def model_summary(captioner: "Captioner", settings: ServeSettings) -> dict[str, Any]:
    """``GET /model``: what is loaded and how the server decodes."""
    config = captioner.model.config
    info = captioner.info
    enc, dec = config.encoder, config.decoder
    return {
        "source": info.source if info else None,
        "encoder": {
            "source": enc.source,
            "name": enc.name,
            "input_size": captioner.preprocessing.crop,
        },
        "decoder": {
            "cell": dec.cell,
            "attention": dec.attention,
            "hidden_size": dec.hidden_size,
            "num_layers": dec.num_layers,
            "embed_dim": dec.embed_dim,
        },
        "attends": captioner.model.attends,
        "vocab_size": len(captioner.vocab),
        "dtype": info.dtype if info else "float32",
        "scores": info.scores if info else {},
        "trained_on": info.trained_on if info else {},
        "decoding": asdict(captioner.default_decoding),
        "options": list(OPTION_NAMES),
        "limits": {
            "max_images": settings.max_images,
            "max_upload_mb": settings.max_upload_mb,
            "max_beam_size": settings.max_beam_size,
            "max_len": settings.max_len,
        },
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms},
    }


def create_app(captioner: "Captioner", settings: ServeSettings | None = None) -> "FastAPI":
    # no ``from __future__ import annotations`` in this module: FastAPI reads the handlers'
    # annotations (``request: Request``), which name this function's locals
    """The FastAPI app serving ``captioner`` (run it with uvicorn, or FastAPI's TestClient as a
    context manager so that the batcher starts)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    settings = settings or ServeSettings()
    base = captioner.default_decoding
    problem = check_limits(base, settings)
    if problem:  # every request without options would be refused for it
        raise UserError(f"the model's default decoding is over the server's limits: {problem}")
    batcher = MicroBatcher(
        captioner.decode_tensors, settings.max_batch, settings.max_wait_ms / 1000
    )
    summary = model_summary(captioner, settings)
    page = resources.files("captioner").joinpath("static/index.html").read_text(encoding="utf-8")

    # uploads decoded at once: a decoded image can take hundreds of MB (Pillow's bomb limit is
    # 89 megapixels), so their number is bounded, not the thread pool's 40
    decoding_slots = asyncio.Semaphore(max(2, os.cpu_count() or 2))
    figure_lock = threading.Lock()  # matplotlib is not thread-safe

    def prepare(data: bytes, name: str, attention: bool) -> tuple[Any, Any]:
        """Decode and preprocess one upload (on a worker thread) -> (the model's view of the
        image when attention maps are drawn over it, else None; the input tensor)."""
        image = load_image_bytes(data, name)
        if not attention:
            return None, captioner.transform(image)
        view = captioner.transform.geometry(image)  # resized and cropped once for both
        return view, captioner.transform.to_tensor(view)

    def figure(view: Any, words: list[str], maps: Any) -> str:
        """The figure ``captioner caption --attention-map`` writes, as a PNG data URI."""
        from captioner.evaluation.attention_maps import attention_png

        with figure_lock:
            png = attention_png(view, words, maps)
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="captioner", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, str(exc.errors()[0].get("msg", "invalid request")))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Any:
        if not batcher.running:
            return JSONResponse({"status": "down", "error": "the batcher stopped"}, 503)
        return {
            "status": "ok",
            "batches": batcher.batches,
            "images": batcher.images,
        }

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return summary

    async def read_request(
        request: Request,
    ) -> tuple[list[str], list[Any], list[Any], DecodeConfig, bool]:
        """Check a POST /caption and preprocess its images -> (names, views for attention maps,
        tensors, decoding, attention); any problem is a :class:`RequestError`."""
        limit = settings.max_upload_bytes
        length = request.headers.get("content-length")
        body_limit = settings.max_images * limit + 2**20  # the images and the form around them
        if length is None or not length.isdigit():  # a chunked body's size is known too late
            raise RequestError(411, "send the request with a Content-Length (no chunked upload)")
        if int(length) > body_limit:
            raise RequestError(
                413,
                f"request of {int(length) / 2**20:.1f} MB is over the limit of "
                f"{settings.max_images} images x {settings.max_upload_mb:g} MB (--max-upload-mb)",
            )
        content_type = request.headers.get("content-type", "").lower()
        if not content_type.startswith("multipart/form-data"):
            raise RequestError(
                415,
                "send the images as multipart/form-data file fields (e.g. curl -F image=@cat.jpg)",
            )
        try:
            form = await request.form(max_files=settings.max_images, max_fields=64)
        except HTTPException as exc:  # starlette's multipart parser: too many parts, bad body
            if "too many files" in str(exc.detail).lower():
                raise RequestError(
                    413,
                    f"too many images: at most {settings.max_images} per request (--max-images)",
                ) from exc
            raise RequestError(400, f"bad multipart body: {exc.detail}") from exc
        try:
            return await read_form(request, form)
        finally:
            await form.close()  # the spooled uploads' temporary files

    async def read_form(
        request: Request, form: Any
    ) -> tuple[list[str], list[Any], list[Any], DecodeConfig, bool]:
        limit = settings.max_upload_bytes
        uploads = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = [
            (k, v)
            for k, v in [*request.query_params.multi_items(), *form.multi_items()]
            if not isinstance(v, UploadFile)
        ]
        config, attention = parse_options(fields, base, settings)
        if not uploads:
            raise RequestError(400, "no image: send one or more multipart file fields")
        if attention and not captioner.model.attends:
            raise RequestError(
                400, "attention: this model does not attend (model.decoder.attention=none)"
            )
        views, tensors, names = [], [], []
        for i, (_, upload) in enumerate(uploads):
            name = upload.filename or f"image {i + 1}"
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise RequestError(
                    413,
                    f"{name}: over the upload limit of {settings.max_upload_mb:g} MB (--max-upload-mb)",
                )
            try:
                async with decoding_slots:
                    view, tensor = await run_in_threadpool(prepare, data, name, attention)
            except ImageLoadError as exc:
                raise RequestError(422, str(exc)) from exc
            views.append(view)
            tensors.append(tensor)
            names.append(name)
        return names, views, tensors, config, attention

    @app.post("/caption")
    async def caption(request: Request) -> JSONResponse:
        with batcher.arriving():
            names, views, tensors, config, attention = await read_request(request)
            future = batcher.enqueue(tensors, config, attention)
        hyps = await future
        from captioner.inference import CaptionResult

        results = []
        for name, view, image_hyps in zip(names, views, hyps, strict=True):
            res = captioner.fill_result(CaptionResult(source=name), image_hyps)
            record = res.to_dict()
            if attention:
                assert res.attention is not None
                record["words"] = res.words
                record["attention_map"] = await run_in_threadpool(
                    figure, view, res.words, res.attention
                )
            results.append(record)
        return JSONResponse({"results": results})

    return app


# ---------------------------------------------------------------------------------------------
# ``captioner serve``


def build_parser() -> argparse.ArgumentParser:
    s = ServeSettings()
    p = argparse.ArgumentParser(
        prog="captioner serve",
        description="Serve a model over HTTP: POST /caption, GET /health, GET /model, and a web "
        "page at /. Needs the serve extra: pip install 'captioner[serve]'.",
    )
    p.add_argument(
        "--model",
        "-m",
        metavar="DIR_OR_CHECKPOINT",
        help="a folder written by `captioner export` (or its Hub id), a checkpoint or a run "
        f"directory (default: the newest best.pt under {DEFAULT_RUNS}/)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda ...")
    g = p.add_argument_group("batching and limits")
    g.add_argument(
        "--max-batch",
        type=int,
        default=s.max_batch,
        help="images decoded together (1: no micro-batching)",
    )
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=s.max_wait_ms,
        help="how long a batch waits for more requests",
    )
    g.add_argument("--max-images", type=int, default=s.max_images, help="images per request")
    g.add_argument(
        "--max-upload-mb", type=float, default=s.max_upload_mb, help="size limit per image"
    )
    g.add_argument(
        "--max-beam-size",
        type=int,
        default=s.max_beam_size,
        help="largest beam a request may ask for",
    )
    g.add_argument(
        "--max-len", type=int, default=s.max_len, help="longest caption a request may ask for"
    )
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    settings = ServeSettings(
        **{f.name: getattr(args, f.name) for f in dataclass_fields(ServeSettings)}
    )
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 - FastAPI's form parser
        import uvicorn
    except ImportError as exc:
        raise UserError(
            f"captioner serve needs the serve extra ({exc.name} is missing): "
            "pip install 'captioner[serve]'"
        ) from exc
    from captioner.inference import Captioner

    source = args.model
    if source is None:
        source = str(find_checkpoint())
        print(f"using checkpoint {source}", file=sys.stderr)
    captioner = Captioner.load(source, device=args.device)
    app = create_app(captioner, settings)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"--host {args.host} --port {args.port}: cannot bind ({exc.strerror})"
        ) from exc
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    if args.host not in LOCAL_HOSTS:
        print(
            f"warning: bound to {args.host}, reachable from other machines; the server has no "
            "authentication (the default --host 127.0.0.1 serves this machine only)",
            file=sys.stderr,
        )
    batching = (
        f"micro-batches of up to {settings.max_batch} images, {settings.max_wait_ms:g} ms wait"
        if settings.max_batch > 1
        else "no micro-batching"
    )
    print(
        f"serving {source} at http://{url_host}:{port}/ ({batching}); ctrl-c stops",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
