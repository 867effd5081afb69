"""The endpoints (:data:`router`): ``POST /caption``, ``GET /health``, ``GET /model`` and the
web page at ``GET /``; each gets the app's :class:`~captioner.serve.state.ServeState` from the
:func:`~captioner.serve.state.serve_state` dependency."""

import base64
import threading
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from captioner.datasets.trained_on import describe_trained_on
from captioner.decoding import Hypothesis
from captioner.inference import CaptionResult
from captioner.serve.requests import OPTION_NAMES, read_request
from captioner.serve.settings import ServeSettings
from captioner.serve.state import ServeState, serve_state

if TYPE_CHECKING:  # an annotation naming it is a string
    from captioner.inference import Captioner

router = APIRouter()
State = Annotated[ServeState, Depends(serve_state)]
_FIGURE_LOCK = threading.Lock()  # matplotlib is not thread-safe


def read_page() -> str:
    """The self-contained web page (no CDN) served at ``/``."""
    page = resources.files("captioner.serve").joinpath("static/index.html")
    return page.read_text(encoding="utf-8")


def model_name(source: str) -> str:
    """How the page names a model: a folder's name, a checkpoint's folder and file name, a Hub id
    as given; never the server's absolute path."""
    path = Path(source)
    if not path.exists():  # a Hugging Face Hub id: owner/name
        return source
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.is_file() else path.name


def model_summary(captioner: "Captioner", settings: ServeSettings) -> dict[str, Any]:
    """``GET /model``: what is loaded and how the server decodes."""
    config = captioner.model.config
    info = captioner.info
    enc, dec = config.encoder, config.decoder
    return {
        # the server's path to the model stays on the server (its log line names it)
        "name": model_name(info.source) if info else None,
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
        # "trained on the synthetic shapes demo: it captions coloured shapes, not photos (...)"
        "trained_on_summary": describe_trained_on(info.trained_on if info else None),
        "decoding": asdict(captioner.default_decoding),
        "options": list(OPTION_NAMES),
        "limits": {
            "max_images": settings.max_images,
            "max_upload_mb": settings.max_upload_mb,
            "max_beam_size": settings.max_beam_size,
            "max_len": settings.max_len,
            "body_timeout_s": settings.body_timeout_s,
        },
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms},
    }


@router.api_route(
    "/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False
)
async def index(state: State) -> HTMLResponse:
    return HTMLResponse(state.page)


@router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: curl -I, load balancers
async def health(state: State) -> Any:
    batcher = state.batcher
    if not batcher.running:
        return JSONResponse({"status": "down", "error": "the batcher stopped"}, 503)
    return {
        "status": "ok",
        "batches": batcher.batches,
        "images": batcher.images,
    }


@router.api_route("/model", methods=["GET", "HEAD"])
async def model(state: State) -> dict[str, Any]:
    return state.summary


@router.post("/caption")
async def caption(request: Request, state: State) -> JSONResponse:
    """Images in, ``{"results": [...]}`` out, one entry per image in ``captioner caption
    --json``'s schema (with ``words`` and an ``attention_map`` PNG when asked)."""
    with state.batcher.arriving():
        job = await read_request(request, state)
        future = state.batcher.enqueue(job.tensors, job.config, job.attention)
    hyps = await future
    results = [
        await _record(state.captioner, name, view, image_hyps, job.attention)
        for name, view, image_hyps in zip(job.names, job.views, hyps, strict=True)
    ]
    return JSONResponse({"results": results})


async def _record(
    captioner: "Captioner", name: str, view: Any, hyps: list[Hypothesis], attention: bool
) -> dict[str, Any]:
    """One image's entry in the answer."""
    res = captioner.fill_result(CaptionResult(source=name), hyps)
    record = res.to_dict()
    if attention:
        assert res.attention is not None
        record["words"] = res.words
        record["attention_map"] = await run_in_threadpool(figure, view, res.words, res.attention)
    return record


def figure(view: Any, words: list[str], maps: Any) -> str:
    """The figure ``captioner caption --attention-map`` writes, as a PNG data URI."""
    from captioner.evaluation.attention_maps import attention_png

    with _FIGURE_LOCK:
        png = attention_png(view, words, maps)
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
