"""``captioner serve``'s connection bounds against a real server on 127.0.0.1: a request's head
must arrive within ``--header-timeout`` (a client sending its headers a byte at a time, or
nothing, holds no connection longer), and connections over ``--max-connections`` are answered
503 and closed as they open, while the clients already connected keep being served."""

from __future__ import annotations

import asyncio
import http.client
import select
import socket
import time
from unittest import mock
from urllib.parse import urlparse

import pytest

pytest.importorskip("fastapi", reason="captioner serve needs the serve extra")
from test_pretrained import variant_checkpoint  # noqa: E402
from test_serve import _response, start_server, stop  # noqa: E402

from captioner.pretrained import export_pretrained  # noqa: E402
from captioner.serve import limits  # noqa: E402

HEADER_TIMEOUT, MAX_CONNECTIONS = 1.0, 16
SLACK = 3.0  # the machine may be busy: how late past a deadline an answer may come


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real server with a 1 s header timeout and 16 connections at most -> (host, port)."""
    d = tmp_path_factory.mktemp("limits")
    model = export_pretrained(variant_checkpoint(d), d / "pooled")
    args = ("--header-timeout", str(HEADER_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS))
    proc, url, _ = start_server(model, *args, log=d / "stderr.log")
    u = urlparse(url)
    yield u.hostname, u.port
    stop(proc)


def drip_until_answered(sock: socket.socket, head: bytes, for_s: float) -> float | None:
    """Send ``head``, then one header byte every 0.1 s for up to ``for_s`` seconds (never the
    blank line that ends a head) -> seconds until the server answered or closed, or None."""
    t0 = time.monotonic()
    sock.sendall(head)
    while time.monotonic() - t0 < for_s:
        if select.select([sock], [], [], 0.1)[0]:
            return time.monotonic() - t0
        try:
            sock.sendall(b"x")
        except OSError:  # closed by the server
            return time.monotonic() - t0
    return None


def health(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/health")
    response = conn.getresponse()
    response.read()
    return response.status


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_timeout(server) -> None:
    start = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    # a new connection's first request
    with socket.create_connection(server, timeout=10) as sock:
        took = drip_until_answered(sock, start, HEADER_TIMEOUT + SLACK + 3)
        assert took is not None, "the server never cut off a head sent a byte at a time"
        assert HEADER_TIMEOUT - 0.1 <= took <= HEADER_TIMEOUT + SLACK
        status, headers, body = _response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert b"request headers did not arrive within 1 s" in body
        assert sock.recv(1) == b""  # closed
    # the next request on a keep-alive connection: its deadline starts at the previous response
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _response(sock)[0] == 200
        took = drip_until_answered(sock, start, HEADER_TIMEOUT + SLACK + 3)
        assert took is not None and took <= HEADER_TIMEOUT + SLACK
        assert _response(sock)[0] == 408
    # a connection that sends nothing at all is closed without a word (as an idle keep-alive
    # one is: a client about to reuse it must not read an answer to a request it never sent)
    with socket.create_connection(server, timeout=HEADER_TIMEOUT + SLACK) as sock:
        t0 = time.monotonic()
        assert sock.recv(1) == b""
        assert HEADER_TIMEOUT - 0.1 <= time.monotonic() - t0 <= HEADER_TIMEOUT + SLACK


def test_a_request_sent_in_time_is_not_cut_off_while_it_is_served(server) -> None:
    """The deadline is the head's: a request whose head came in time is served however long
    it then takes, and a keep-alive connection serves request after request."""
    conn = http.client.HTTPConnection(*server, timeout=10)
    for _ in range(3):
        assert health(conn) == 200
        time.sleep(HEADER_TIMEOUT / 2)
    conn.close()


def test_a_client_refused_over_the_cap_reads_its_503_then_an_orderly_close(server) -> None:
    """A client refused at the cap has sent its request by then: the server closes in stages
    (its answer, a FIN, then it reads and drops what comes), so the client reads the 503 and
    then an end of stream. A plain close with the request unread answers with a reset (7 in 10
    here before the staged close), on which a client may lose the 503 it had not read yet."""
    held = [socket.create_connection(server, timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # all of them accepted: the server is at its cap
        ends = []
        for _ in range(20):
            with socket.create_connection(server, timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                status, headers, _ = _response(sock)
                assert status == 503 and headers["connection"] == "close"
                try:
                    ends.append(sock.recv(1))
                except ConnectionResetError as exc:
                    ends.append(exc)
        assert ends == [b""] * 20, ends
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)  # the held connections' places are free again for the next test


def answers(socks: list[socket.socket], within_s: float) -> dict[socket.socket, tuple[int, float]]:
    """Each socket's response status (0: closed without one) and when it came (seconds from
    now), for those answered within ``within_s``."""
    t0, out = time.monotonic(), {}
    while len(out) < len(socks) and (left := within_s - (time.monotonic() - t0)) > 0:
        waiting = [s for s in socks if s not in out]
        for sock in select.select(waiting, [], [], left)[0]:
            closed = sock.recv(1, socket.MSG_PEEK) == b""
            out[sock] = (0 if closed else _response(sock)[0], time.monotonic() - t0)
    return out


def test_a_connection_flood_is_refused_at_the_cap_and_connected_clients_keep_working(
    server,
) -> None:
    good = http.client.HTTPConnection(*server, timeout=10)
    assert health(good) == 200  # connected before the flood
    flood = [socket.create_connection(server, timeout=10) for _ in range(10 * MAX_CONNECTIONS)]
    try:
        t0 = time.monotonic()
        assert health(good) == 200 and time.monotonic() - t0 < SLACK
        got = answers(flood, HEADER_TIMEOUT + SLACK)
        assert len(got) == len(flood), f"{len(flood) - len(got)} connections held open"
        refused = [t for status, t in got.values() if status == 503]
        closed = [t for status, t in got.values() if status == 0]
        # over the cap (the good client holds one place): refused as they opened...
        assert len(refused) == len(flood) - (MAX_CONNECTIONS - 1)
        # ...the rest, which never sent a byte, closed at the header timeout, without a word
        assert len(closed) == MAX_CONNECTIONS - 1
        assert max(refused) < min(closed)
        for sock in flood:
            assert sock.recv(1) == b""
        fresh = http.client.HTTPConnection(*server, timeout=10)  # served again
        assert health(fresh) == 200
        fresh.close()
    finally:
        for sock in flood:
            sock.close()
        good.close()


@pytest.mark.parametrize("half_close", [True, False])
def test_a_staged_close_sends_a_fin_drains_and_closes_at_the_deadline(monkeypatch, half_close):
    """The close's stages on a transport, without a network: one that can half-close (TCP)
    writes its FIN, keeps reading, and closes at the deadline (or never twice, once the socket
    is gone); one that cannot (TLS) closes at once. The connection's own callback runs once."""
    monkeypatch.setattr(limits, "LINGER_S", 0.05)
    loop = asyncio.new_event_loop()

    def transport() -> mock.Mock:
        raw = mock.Mock(spec=asyncio.Transport)
        raw.can_write_eof.return_value = half_close
        raw.is_closing.side_effect = lambda: raw.close.called
        return raw

    try:
        raw, on_close = transport(), mock.Mock()
        staged = limits.StagedClose(raw, loop, on_close)
        staged.write(b"answer")  # everything but closing is the transport's own
        raw.write.assert_called_once_with(b"answer")
        staged.close()
        staged.close()
        on_close.assert_called_once_with()
        assert staged.is_closing()
        if not half_close:
            raw.close.assert_called_once_with()
            raw.write_eof.assert_not_called()
            return
        raw.write_eof.assert_called_once_with()
        raw.resume_reading.assert_called_once_with()
        raw.close.assert_not_called()  # still reading what the client sends
        loop.run_until_complete(asyncio.sleep(0.2))
        raw.close.assert_called_once_with()  # the deadline
        raw = transport()
        staged = limits.StagedClose(raw, loop, on_close)
        staged.close()
        staged.connection_lost()  # the client's FIN closed it first: the deadline is dropped
        loop.run_until_complete(asyncio.sleep(0.2))
        raw.close.assert_not_called()
    finally:
        loop.close()
