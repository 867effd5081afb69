"""A ``POST /caption`` read and checked: its size and type, its images (each decoded and
preprocessed before it joins a batch) and its decoding options, parsed from the table the CLI
shares (:data:`~captioner.configs.decode_options.DECODE_OPTIONS`). Every problem is a
:class:`RequestError`, answered as a 4xx ``{"error": ...}`` naming it."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from captioner.configs.decode import DecodeConfig
from captioner.configs.decode_options import DECODE_OPTIONS, DecodeOption, decode_config
from captioner.datasets.images import ImageLoadError, load_image_bytes
from captioner.errors import UserError
from captioner.serve.settings import ServeSettings
from captioner.serve.state import ServeState

if TYPE_CHECKING:  # annotations naming these are strings: torch loads on use
    import torch

    from captioner.inference import Captioner

TRUE, FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no", "")
ATTENTION = "attention"  # not a decoding option: attention maps drawn over each image
BY_QUERY: dict[str, DecodeOption] = {o.query: o for o in DECODE_OPTIONS}
OPTION_NAMES: tuple[str, ...] = tuple(sorted([*BY_QUERY, ATTENTION]))
FLAGS = frozenset([*(o.query for o in DECODE_OPTIONS if o.type is bool), ATTENTION])


# answers given before the body was read to its end: the connection closes, so that the rest of
# the body is never read (uvicorn would otherwise read and drop it for as long as it comes)
UNREAD_BODY = frozenset({408, 411, 413})


class RequestError(Exception):
    """A client's mistake: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(exc: RequestError) -> JSONResponse:
    """``{"error": message}`` with the error's status (closing the connection when the body may
    be unread)."""
    response = JSONResponse({"error": exc.message}, status_code=exc.status)
    if exc.status in UNREAD_BODY:
        response.headers["connection"] = "close"
    return response


@dataclass
class CaptionRequest:
    """A checked ``POST /caption``: per image its name, the model's view of it (attention maps
    are drawn over it; else None) and its input tensor; and how to decode them."""

    names: list[str]
    views: list[Any]
    tensors: "list[torch.Tensor]"
    config: DecodeConfig
    attention: bool


def check_limits(config: DecodeConfig, settings: ServeSettings) -> str | None:
    """What in ``config`` is over the server's limits (a message), or None."""
    if config.strategy == "beam" and config.beam_size > settings.max_beam_size:
        return f"beam-size: at most {settings.max_beam_size} on this server, got {config.beam_size}"
    if config.max_len > settings.max_len:
        return f"max-len: at most {settings.max_len} on this server, got {config.max_len}"
    return None


def _flag(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word not in TRUE + FALSE:
        raise RequestError(400, f"{name}: expected true or false, got {value!r}")
    return word in TRUE


def _typed(name: str, value: str) -> Any:
    """``value`` as the option's type; the message is the CLI's (argparse's) for the flag."""
    kind = BY_QUERY[name].type
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{name}: invalid {kind.__name__} value: {value!r}") from None


def parse_options(
    fields: Sequence[tuple[str, str]], base: DecodeConfig, settings: ServeSettings
) -> tuple[DecodeConfig, bool]:
    """Form/query fields -> (decoding, attention): the names first (each known, once; a flag
    true or false), then the values; a bad field is a 400 naming it."""
    flags: dict[str, bool] = {}
    values: list[tuple[str, str]] = []
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
            flags[name] = _flag(name, value)
        else:
            values.append((name, value))
    attention = flags.pop(ATTENTION, False)
    given = {BY_QUERY[name].name: on for name, on in flags.items()}
    given.update((BY_QUERY[name].name, _typed(name, value)) for name, value in values)
    try:
        config = decode_config(given, base)
    except UserError as exc:  # DecodeConfig's checks
        raise RequestError(400, str(exc)) from exc
    problem = check_limits(config, settings)
    if problem:
        raise RequestError(400, problem)
    return config, attention


def check_headers(request: Request, settings: ServeSettings) -> None:
    """A body of known size (no chunked upload), within the limits, and multipart."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():  # a chunked body's size is known too late
        raise RequestError(411, "send the request with a Content-Length (no chunked upload)")
    if int(length) > settings.max_body_bytes:
        raise RequestError(
            413,
            f"request of {int(length) / 2**20:.1f} MB is over the limit of {settings.body_limit}",
        )
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(
            415,
            "send the images as multipart/form-data file fields (e.g. curl -F image=@cat.jpg)",
        )


async def read_form(request: Request, settings: ServeSettings) -> FormData:
    """The multipart form, at most ``max_images`` files (close it when done)."""
    try:
        return await request.form(max_files=settings.max_images, max_fields=64)
    except HTTPException as exc:  # starlette's multipart parser: too many parts, bad body
        if "too many files" in str(exc.detail).lower():
            raise RequestError(
                413,
                f"too many images: at most {settings.max_images} per request (--max-images)",
            ) from exc
        raise RequestError(400, f"bad multipart body: {exc.detail}") from exc


async def read_request(request: Request, state: ServeState) -> CaptionRequest:
    """Check a POST /caption and preprocess its images; any problem is a :class:`RequestError`."""
    check_headers(request, state.settings)
    form = await read_form(request, state.settings)
    try:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = [
            (k, v)
            for k, v in [*request.query_params.multi_items(), *form.multi_items()]
            if not isinstance(v, UploadFile)
        ]
        config, attention = parse_options(fields, state.base, state.settings)
        if not uploads:
            raise RequestError(400, "no image: send one or more multipart file fields")
        if attention and not state.captioner.model.attends:
            raise RequestError(
                400, "attention: this model does not attend (model.decoder.attention=none)"
            )
        job = CaptionRequest([], [], [], config, attention)
        for i, upload in enumerate(uploads):
            await read_upload(upload, upload.filename or f"image {i + 1}", state, job)
        return job
    finally:
        await form.close()  # the spooled uploads' temporary files


async def read_upload(
    upload: UploadFile, name: str, state: ServeState, job: CaptionRequest
) -> None:
    """Read one image within the upload limit, decode and preprocess it (on a worker thread,
    a bounded number at once) and add it to ``job``."""
    settings = state.settings
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise RequestError(
            413, f"{name}: over the upload limit of {settings.max_upload_mb:g} MB (--max-upload-mb)"
        )
    try:
        async with state.decoding_slots:
            view, tensor = await run_in_threadpool(
                prepare, state.captioner, data, name, job.attention
            )
    except ImageLoadError as exc:
        raise RequestError(422, str(exc)) from exc
    job.views.append(view)
    job.tensors.append(tensor)
    job.names.append(name)


def prepare(captioner: "Captioner", data: bytes, name: str, attention: bool) -> tuple[Any, Any]:
    """Decode and preprocess one upload -> (the model's view of the image when attention maps
    are drawn over it, else None; the input tensor)."""
    image = load_image_bytes(data, name, captioner.preprocessing.draft_to)
    if not attention:
        return None, captioner.transform(image)
    view = captioner.transform.geometry(image)  # resized and cropped once for both
    return view, captioner.transform.to_tensor(view)
