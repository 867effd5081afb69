"""A request body's bounds, kept as its bytes arrive whatever its headers say:
:class:`BodyLimits`, a pure ASGI middleware around the app; and the bounds a request has before
the app sees it, on its head and on connections (:func:`bounded_protocol`, uvicorn's HTTP
protocol with a header timeout and a connection cap).

``Content-Length`` is checked before a body is read (:func:`~captioner.serve.requests.check_headers`),
but a client may send ``Transfer-Encoding: chunked`` beside a small ``Content-Length`` and stream
without end, or send half a body and stall. So every ``receive`` is wrapped: the bytes are
counted, and one over the limit is a 413; the whole body must arrive within ``--body-timeout``
seconds of the app first asking for it, else a 408. Either answer closes the connection (the rest
of the body is never read). A client that disconnects before its body is read is one log line,
not an ASGI traceback.

Every connection the server closes, it closes in stages (:class:`StagedClose`): a client may
still be sending (the rest of a body answered 413, a request on a connection refused 503) when
the answer goes out, and a socket closed with bytes arriving answers them with a reset, which
can make the client lose the answer it has not read yet.
"""

import asyncio
import json
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


class _Throttled:
    """One log line per ``every_s`` at most for an event a client can repeat at will (a flood
    of connections must not become a flood of log lines): the first, then a count."""

    def __init__(self, message: str, every_s: float = 10.0):
        self.message, self.every_s = message, every_s
        self.count, self.last = 0, -every_s

    def __call__(self, now: float) -> None:
        self.count += 1
        if now - self.last >= self.every_s:
            log.warning("%s (%d since the last such line)", self.message, self.count)
            self.count, self.last = 0, now


LINGER_S = 2.0  # how long a connection the server closed keeps reading what its client sends


class StagedClose:
    """A connection's transport whose ``close`` is HTTP's staged close (RFC 9112, section 9.6):
    what was written goes out, then a FIN (the client reads the answer, then an orderly end),
    and the connection keeps reading, and dropping, what the client still sends until the
    client closes its side or ``LINGER_S`` seconds have passed. A plain ``close`` with bytes
    arriving, or unread, sends an RST instead, and a client that gets one may lose the answer
    that came before it (uvicorn closes at once after any ``connection: close`` answer).
    ``on_close`` runs when the staged close starts (the connection serves nothing more).
    Everything else is the wrapped transport's; a transport that cannot half-close (TLS) closes
    at once."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, on_close):
        self._transport, self._loop, self._on_close = transport, loop, on_close
        self.lingering = False
        self._deadline: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        transport = self._transport
        if self.lingering or transport.is_closing():
            return
        self._on_close()
        if not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        transport.write_eof()  # a FIN once the buffered answer is sent
        transport.resume_reading()  # drain: unread bytes at close would also send an RST
        # the client's own FIN closes it before this (asyncio closes a transport at EOF)
        self._deadline = self._loop.call_later(LINGER_S, transport.close)

    def connection_lost(self) -> None:
        """The socket is closed: the deadline has nothing left to close."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response ``{"error": message}`` that closes the connection, written
    where no request is in progress (so no response either)."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _connection_answers(settings: ServeSettings) -> tuple[bytes, bytes, _Throttled, _Throttled]:
    """What a connection over the limit and a head too slow are answered, and their log lines."""
    max_connections, timeout = settings.max_connections, settings.header_timeout_s
    return (
        _raw_response(503, "Service Unavailable", f"over {max_connections} connections: try again"),
        _raw_response(
            408, "Request Timeout", f"the request headers did not arrive within {timeout:g} s"
        ),
        _Throttled(f"closed connections over --max-connections ({max_connections})"),
        _Throttled(
            f"closed connections whose request headers took over {timeout:g} s (--header-timeout)"
        ),
    )


def bounded_protocol(settings: ServeSettings) -> type[asyncio.Protocol]:
    """uvicorn's h11 HTTP protocol with the two bounds uvicorn lacks, as ``uvicorn.Config``'s
    ``http``:

    - a request's head (request line and headers) must arrive in full within
      ``settings.header_timeout_s`` of the connection opening or of the previous response on it,
      else the connection closes, with a 408 if part of a head came (a client sending its headers
      a byte at a time held its connection forever: uvicorn times only idle keep-alive
      connections, and any byte resets that; a new connection that sent nothing was never
      timed);
    - at most ``settings.max_connections`` connections are open at once: one more is answered
      503 and closed as it opens, before it costs a header timer or a request task. Every close
      is staged (:class:`StagedClose`): a closing connection no longer counts towards the cap.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    too_many, too_slow, refused, timed_out = _connection_answers(settings)

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _timed_cycle: object = None  # the request whose head last arrived in time
        _head_bytes = 0  # bytes of the next request's head received since the timer was armed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            staged = StagedClose(transport, self.loop, lambda: self.connections.discard(self))
            super().connection_made(staged)  # type: ignore[arg-type]
            if len(self.connections) > settings.max_connections:
                refused(self.loop.time())
                staged.write(too_many)
                staged.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:  # closed: what the client still sends is dropped
                return
            self._head_bytes += len(data)
            super().data_received(data)
            self._head_arrived()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request
            if not self.transport.is_closing() and not self._head_arrived():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self.transport.connection_lost()
            super().connection_lost(exc)

        def _head_arrived(self) -> bool:
            """Whether a request whose head has arrived is in progress (its timer stopped)."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return False
            if cycle is not self._timed_cycle:
                self._timed_cycle = cycle
                self._disarm()
            return True

        def _arm(self) -> None:
            self._disarm()
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(settings.header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _too_slow(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self._head_arrived():
                return
            if self._head_bytes:  # part of a head: say why (an idle connection just closes,
                timed_out(self.loop.time())  # as keep-alive's does: a client about to reuse
                self.transport.write(too_slow)  # it must not read an answer it never asked)
            self.transport.close()

    return BoundedH11Protocol
