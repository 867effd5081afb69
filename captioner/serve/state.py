"""What a server's routes share, one per app: :class:`ServeState`, kept in ``app.state.serve``
and handed to the routes by the :func:`serve_state` dependency."""

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from captioner.configs.decode import DecodeConfig
from captioner.serve.batcher import MicroBatcher
from captioner.serve.settings import ServeSettings

if TYPE_CHECKING:  # an annotation naming it is a string: torch loads on use
    from captioner.inference import Captioner


def _decoding_slots() -> asyncio.Semaphore:
    # uploads decoded at once: a decoded image can take hundreds of MB (Pillow's bomb limit is
    # 89 megapixels), so their number is bounded, not the thread pool's 40
    return asyncio.Semaphore(max(2, os.cpu_count() or 2))


@dataclass
class ServeState:
    """The model, the server's settings, its default decoding and batcher, the answers of
    ``GET /model`` and ``GET /``, and the bound on uploads decoded at once."""

    captioner: "Captioner"
    settings: ServeSettings
    base: DecodeConfig  # a request's decoding before its options: the model's default
    batcher: MicroBatcher
    summary: dict[str, Any]
    page: str
    decoding_slots: asyncio.Semaphore = field(default_factory=_decoding_slots)


async def serve_state(request: Request) -> ServeState:
    """The app's :class:`ServeState` (a dependency of every route)."""
    state: ServeState = request.app.state.serve
    return state
