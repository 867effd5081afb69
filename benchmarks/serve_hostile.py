#!/usr/bin/env python
"""``captioner serve`` under round one's load while hostile uploads arrive: no 5xx, and the
server's memory back to its baseline afterwards.

    python benchmarks/serve_hostile.py --model outputs/train/<run>/best.pt   # or an exported folder
    python benchmarks/serve_hostile.py        # trains a 2-epoch demo checkpoint first (~1 min)

One real server on loopback (micro-batching on, the defaults; ``--body-timeout 5`` and
``--header-timeout 2`` so that stalled bodies and heads come round several times in a run,
``--max-upload-mb 1`` so that a chunked body reaches the limit, 17 MB, in a fraction of a second). The good load is ``serve_load.py``'s top level: 64
clients, each on its own keep-alive connection, ``--requests`` requests of one demo test image
each (greedy). Meanwhile ``--hostile-threads`` threads per kind (2) send hostile requests, each
at most ``--hostile-rate`` a second (10), until the good load is done:

- ``chunked``: ``Transfer-Encoding: chunked`` beside ``Content-Length: 5``, streaming up to 300 MB
- ``oversize``: a ``Content-Length`` of 1 GB, a few bytes sent
- ``stalled``: half a body, then nothing (a 408 after ``--body-timeout``)
- ``disconnect``: half a body, then the connection closed (no answer to read)
- ``wide_png``: a 1 x 100,000 px PNG (its preparation must stay bounded)
- ``corrupt``: a PNG cut in half
- ``bad_options``: a good image with ``beam-size=three``
- ``slow_head``: a request's headers sent a byte every 0.2 s (closed with a 408 after
  ``--header-timeout``)
- ``flood``: 100 connections opened at once that never send a byte (closed after
  ``--header-timeout``; a flood over ``--max-connections`` is ``tests/test_serve_limits.py``'s)

Printed: requests and status counts per kind, p50/p99 latency of the good requests, the server's
RSS (``/proc/PID/status``, sampled every 50 ms) before the load (after a warm-up), at its peak and
after it (``--settle`` seconds idle, as the baseline), with the anonymous and file-backed parts,
and its log's size. Exit status 1 if any answer is a 5xx, a good request
failed, or the RSS after is more than ``--rss-slack-mb`` over the baseline.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import cpu_name, demo_checkpoint
from serve_load import DEMO_IMAGES, connect, multipart, post_caption

Address = tuple[str, int]
PART = (
    b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)


def start_server(model: str, log: Path, *args: str) -> tuple[subprocess.Popen, Address]:
    """``captioner serve`` on a free port, its stderr to ``log`` -> (process, address)."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "captioner", "serve", "--model", model, "--port", "0", *args],
            stderr=err,
            stdout=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("serving "):
                url = line.split(" at ", 1)[1].split(" ", 1)[0]
                host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
                wait_healthy((host, int(port)), deadline)
                return proc, (host, int(port))
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def wait_healthy(address: Address, deadline: float) -> None:
    """Until ``GET /health`` answers (uvicorn listens a moment after the line on stderr)."""
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(*address, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server did not answer /health")


def proc_status(pid: int) -> dict[str, int]:
    """``/proc/PID/status``'s numeric fields (kB for the memory ones)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.split() and value.split()[0].isdigit():
            out[key] = int(value.split()[0])
    return out


def rss_mb(pid: int) -> float:
    return proc_status(pid)["VmRSS"] / 1024


def memory_line(pid: int) -> str:
    """The RSS's parts: anonymous memory (the heap: what a leak grows), file pages (libraries'
    code paged in on first use), and the thread count."""
    st = proc_status(pid)
    return (
        f"RSS {st['VmRSS'] / 1024:.0f} MB = anon {st['RssAnon'] / 1024:.0f} + file "
        f"{st['RssFile'] / 1024:.0f} + shmem {st['RssShmem'] / 1024:.0f}; {st['Threads']} threads"
    )


def read_status(sock: socket.socket) -> str:
    """The status code of the response on ``sock``, or what happened instead."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return "closed"
            data += chunk
    except TimeoutError:
        return "timeout"
    except OSError:
        return "reset"
    return data.split(b" ", 2)[1].decode()


def raw_request(address: Address, head: bytes, parts: Callable[[], object], answer=True) -> str:
    """Send ``head`` then each of ``parts()`` until the server answers -> its status."""
    with socket.create_connection(address, timeout=60) as sock:
        try:
            sock.sendall(head)
            for part in parts():
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(part)
        except OSError:  # the server answered and closed the connection
            pass
        return read_status(sock) if answer else "sent"


def _head(length: int, chunked: bool = False) -> bytes:
    lines = [
        b"POST /caption HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Content-Type: multipart/form-data; boundary=b",
        b"Content-Length: %d" % length,
    ]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def slow_head(address: Address) -> str:
    """A request's headers a byte every 0.2 s, until the server answers -> its status."""
    with socket.create_connection(address, timeout=60) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while not select.select([sock], [], [], 0.2)[0]:
                sock.sendall(b"x")
        except OSError:
            pass
        return read_status(sock)


def flood(address: Address, connections: int) -> str:
    """``connections`` connections that send nothing, held until the server closes them -> what
    each got ("closed": closed without an answer)."""
    socks = [socket.create_connection(address, timeout=60) for _ in range(connections)]
    try:
        return "+".join(sorted({read_status(sock) for sock in socks}))
    finally:
        for sock in socks:
            sock.close()


def post(address: Address, body: bytes, ctype: str) -> str:
    conn = http.client.HTTPConnection(*address, timeout=120)
    try:
        conn.request("POST", "/caption", body=body, headers={"Content-Type": ctype})
        response = conn.getresponse()
        response.read()
        return str(response.status)
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def hostile_kinds(address: Address, good_png: Path, workdir: Path) -> dict[str, Callable[[], str]]:
    """Each hostile kind: a function that sends one such request -> its status."""
    from PIL import Image

    wide = workdir / "wide.png"
    Image.frombytes("RGB", (1, 100_000), os.urandom(300_000)).save(wide)
    half = workdir / "half.png"
    data = good_png.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    wide_body, half_body = multipart(wide), multipart(half)
    bad_body, bad_type = multipart(good_png)
    bad_body = bad_body.replace(b'name="beam-size"\r\n\r\n1', b'name="beam-size"\r\n\r\nthree')
    chunk = os.urandom(2**16)

    def chunks():
        yield b"%x\r\n%s\r\n" % (len(PART), PART)
        for _ in range(4800):  # 300 MB, as the client sent
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)

    return {
        "chunked": lambda: raw_request(address, _head(5, chunked=True), chunks),
        "oversize": lambda: raw_request(address, _head(10**9), lambda: [PART]),
        "stalled": lambda: raw_request(address, _head(100_000), lambda: [PART]),
        "disconnect": lambda: raw_request(address, _head(100_000), lambda: [PART], answer=False),
        "slow_head": lambda: slow_head(address),
        "flood": lambda: flood(address, 100),
        "wide_png": lambda: post(address, *wide_body),
        "corrupt": lambda: post(address, *half_body),
        "bad_options": lambda: post(address, bad_body, bad_type),
    }


def good_load(address: Address, bodies: list, clients: int, requests: int) -> tuple[list, list]:
    """``clients`` threads, ``requests`` each -> (latencies of the 200s, statuses of all)."""
    latencies: list[float] = []
    statuses: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = connect(*address)
        for i in range(requests):
            body, ctype = bodies[(k * requests + i) % len(bodies)]
            t0 = time.perf_counter()
            try:
                code, problem = post_caption(conn, body, ctype)
                status = "200-bad" if code == 200 and problem else str(code)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                status = type(exc).__name__
                conn.close()
                conn = connect(*address)
            with lock:
                statuses.append(status)
                if status == "200":
                    latencies.append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint, run directory or exported folder (default: demo)")
    p.add_argument("--images", type=Path, default=None, help="folder of PNG images")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=20, help="good requests per client")
    p.add_argument("--hostile-threads", type=int, default=2, help="threads per hostile kind")
    p.add_argument(
        "--hostile-rate", type=float, default=10.0, help="requests/s per hostile thread at most"
    )
    p.add_argument("--kinds", nargs="+", help="only these hostile kinds (default: all)")
    p.add_argument("--body-timeout", type=float, default=5.0)
    p.add_argument("--header-timeout", type=float, default=2.0)
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=1.0,
        help="the server's (body limit: 16x this + 1 MB)",
    )
    p.add_argument("--rss-slack-mb", type=float, default=32.0)
    p.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds idle before the baseline and before the after-RSS is read",
    )
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="serve-hostile-"))
    model, images = args.model, args.images
    if model is None:
        model = str(demo_checkpoint(workdir))
        images = images or workdir / "demo" / "images" / "test"
    paths = sorted((images or DEMO_IMAGES).glob("*.png"))[:64]
    if not paths:
        raise SystemExit(f"{images or DEMO_IMAGES}: no PNG images")
    bodies = [multipart(path) for path in paths]
    log = workdir / "server.log"
    limits = (
        *("--body-timeout", str(args.body_timeout), "--header-timeout", str(args.header_timeout)),
        *("--max-upload-mb", str(args.max_upload_mb)),
    )
    proc, address = start_server(model, log, *limits)
    print(f"{cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    try:
        return run(args, proc, address, bodies, paths[0], workdir, log)
    finally:
        proc.terminate()
        proc.wait(30)


def run(args, proc, address, bodies, good_png, workdir, log) -> int:
    good_load(address, bodies, args.clients, 2)  # warm-up: batches of every size, threads
    time.sleep(args.settle)  # the server idle, as it is after the load
    before = rss_mb(proc.pid)
    print(f"baseline: {memory_line(proc.pid)}")
    log_before = len(log.read_text().splitlines())
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(max(peak[-1], rss_mb(proc.pid)))
            time.sleep(0.05)

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()

    def hostile(kind: str, send: Callable[[], str]) -> None:
        """``send`` at most ``--hostile-rate`` times a second until the good load is done."""
        due = time.monotonic()
        while not done.is_set():
            status = send()
            with lock:
                counts[kind][status] += 1
            due = max(due + 1 / args.hostile_rate, time.monotonic() - 1)
            done.wait(max(0.0, due - time.monotonic()))

    kinds = hostile_kinds(address, good_png, workdir)
    kinds = {k: v for k, v in kinds.items() if k in (args.kinds or kinds)}
    threads = [threading.Thread(target=sample)] + [
        threading.Thread(target=hostile, args=item)
        for item in kinds.items()
        for _ in range(args.hostile_threads)
    ]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    latencies, statuses = good_load(address, bodies, args.clients, args.requests)
    wall = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join()
    time.sleep(args.settle)
    after = rss_mb(proc.pid)
    print(f"after:    {memory_line(proc.pid)}")
    counts["good"] = collections.Counter(statuses)
    return report(args, counts, latencies, wall, (before, peak[-1], after), log, log_before)


def report(args, counts, latencies, wall, rss, log, log_before) -> int:
    latencies.sort()
    n = len(latencies)
    print(f"{sum(sum(c.values()) for c in counts.values())} requests in {wall:.1f} s")
    for kind, counter in counts.items():
        shown = ", ".join(f"{status}: {k}" for status, k in sorted(counter.items()))
        print(f"  {kind:<12} {sum(counter.values()):>5}  {shown}")
    print(
        f"good: {n} answered 200 of {args.clients * args.requests}, "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {latencies[min(n - 1, int(0.99 * n))] * 1000:.0f} ms"
    )
    before, peak, after = rss
    print(f"server RSS: before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB")
    lines = log.read_text().splitlines()[log_before:]
    tracebacks = sum("Traceback" in line for line in lines)
    print(f"server log during the load: {len(lines)} lines, {tracebacks} tracebacks")
    five = sum(k for c in counts.values() for s, k in c.items() if s.startswith("5"))
    failed_good = sum(k for s, k in counts["good"].items() if s != "200")
    back = after <= before + args.rss_slack_mb
    print(
        f"5xx: {five}; good requests failed: {failed_good}; "
        f"RSS back to baseline (+{args.rss_slack_mb:g} MB): {'yes' if back else 'NO'}"
    )
    return 0 if five == 0 and failed_good == 0 and back else 1


if __name__ == "__main__":
    sys.exit(main())
