"""``captioner serve``'s FastAPI app (``pip install 'captioner[serve]'``): :func:`create_app`.

- ``POST /caption``: images as multipart file parts; decoding options as form or query fields
  with the CLI's names (``beam-size`` or ``beam_size``, ``n-best``, ``sample``, ...) and limits,
  plus ``attention`` for attention maps. JSON out: ``{"results": [...]}``, one entry per image in
  ``captioner caption --json``'s schema.
- ``GET /health``, ``GET /model`` (what is loaded, its scores, the server's limits).
- ``GET /``: a self-contained web page (no CDN) to try the model.

Concurrent requests are gathered into micro-batches (:class:`~captioner.serve.batcher.MicroBatcher`,
started and stopped by the app's lifespan): up to ``max_batch`` images, waiting at most
``max_wait_ms`` for more, decoded together on one model thread. Images are checked and
preprocessed per request before they join a batch (:mod:`captioner.serve.requests`), so one
request's bad image is that request's 4xx and never touches the others. Every bad input is a
4xx JSON ``{"error": "..."}`` naming the problem. The endpoints are in
:mod:`captioner.serve.routes`; the command line in :mod:`captioner.cli.serve`.
"""

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from captioner import __version__
from captioner.errors import UserError
from captioner.serve.batcher import MicroBatcher
from captioner.serve.limits import BodyLimits
from captioner.serve.requests import RequestError, check_limits, error_response
from captioner.serve.routes import model_summary, read_page, router
from captioner.serve.settings import ServeSettings
from captioner.serve.state import ServeState

if TYPE_CHECKING:  # an annotation naming it is a string
    from captioner.inference import Captioner


def create_app(captioner: "Captioner", settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``captioner`` (run it with uvicorn, or FastAPI's TestClient as a
    context manager so that the batcher starts)."""
    settings = settings or ServeSettings()
    base = captioner.default_decoding
    problem = check_limits(base, settings)
    if problem:  # every request without options would be refused for it
        raise UserError(f"the model's default decoding is over the server's limits: {problem}")
    batcher = MicroBatcher(
        captioner.decode_tensors, settings.max_batch, settings.max_wait_ms / 1000
    )
    app = FastAPI(title="captioner", version=__version__, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.serve = ServeState(
        captioner, settings, base, batcher, model_summary(captioner, settings), read_page()
    )
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(router)
    app.add_middleware(BodyLimits, settings=settings)  # bounds every body as it arrives
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The batcher runs while the app does (an app may be started more than once). What is
    alive at start-up (the model, the modules) lives as long as the server: it is kept out of the
    garbage collector's scans (``gc.freeze``), so the collection the batcher runs when the server
    goes idle takes a millisecond instead of ~0.4 s of the interpreter's time."""
    batcher: MicroBatcher = app.state.batcher
    gc.freeze()
    await batcher.start()
    yield
    await batcher.stop()


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    response = error(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. a 405's Allow
    return response


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, str(exc.errors()[0].get("msg", "invalid request")))
