"""A request body's bounds, kept as its bytes arrive whatever its headers say:
:class:`BodyLimits`, a pure ASGI middleware around the app.

``Content-Length`` is checked before a body is read (:func:`~captioner.serve.requests.check_headers`),
but a client may send ``Transfer-Encoding: chunked`` beside a small ``Content-Length`` and stream
without end, or send half a body and stall. So every ``receive`` is wrapped: the bytes are
counted, and one over the limit is a 413; the whole body must arrive within ``--body-timeout``
seconds of the app first asking for it, else a 408. Either answer closes the connection (the rest
of the body is never read). A client that disconnects before its body is read is one log line,
not an ASGI traceback.
"""

import asyncio
import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captioner.serve.requests import RequestError, error_response
from captioner.serve.settings import ServeSettings

log = logging.getLogger("uvicorn.error")  # the server's own log, beside uvicorn's lines


class BodyLimits:
    """Counts and times each HTTP request's body as the app reads it: over
    ``settings.max_body_bytes`` it raises a 413 :class:`RequestError` from ``receive``, after
    ``settings.body_timeout_s`` a 408 (the app's handler answers them; one the app lets through
    is answered here)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._bounded(receive), tracking_send)
        except ClientDisconnect:
            client = scope.get("client") or ("?", 0)
            log.warning(
                "%s %s from %s:%s: the client disconnected before its request was read",
                scope["method"],
                scope["path"],
                *client[:2],
            )
        except RequestError as exc:  # raised by receive where no handler answered it
            if started:
                raise
            await error_response(exc)(scope, receive, send)

    def _bounded(self, receive: Receive) -> Receive:
        """``receive``, counting the body's bytes against the limit and its time against the
        deadline until the last chunk has come (then as it is: a disconnect is awaited)."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        read, done, deadline = 0, False, None

        async def bounded() -> Message:
            nonlocal read, done, deadline
            if done:
                return await receive()
            if deadline is None:
                deadline = loop.time() + settings.body_timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise RequestError(
                    408,
                    f"the request body did not arrive within {settings.body_timeout_s:g} s "
                    "(--body-timeout)",
                ) from None
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > settings.max_body_bytes:
                    raise RequestError(413, f"request body over the limit of {settings.body_limit}")
                done = not message.get("more_body", False)
            return message

        return bounded
