"""Load test of ``captioner serve``: N concurrent clients against real servers on loopback, with
micro-batching on (``--max-batch 32 --max-wait-ms 10``) and off (``--max-batch 1``) side by side.

    python benchmarks/serve_load.py --model outputs/train/<run>/best.pt   # or an exported folder
    python benchmarks/serve_load.py --clients 1 4 16 64 --requests 20

Each client sends one image per request over its own keep-alive connection, ``--requests``
requests each (the images cycle over ``--images``), greedy decoding. Printed per level: requests,
throughput (requests/s), p50/p99 latency, errors (must be 0) and the mean batch the server
decoded (from ``/health``). Both servers run during the whole benchmark and the levels alternate
between them, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

DEMO_IMAGES = Path(__file__).resolve().parent.parent / "data" / "demo" / "images" / "test"


def start_server(model: str, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "captioner", "serve", "--model", model, "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("serving "):
            url = line.split(" at ", 1)[1].split(" ", 1)[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
            return proc, url
        print(line, end="", file=sys.stderr)
    raise SystemExit(f"the server for {model} did not start")


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + path.read_bytes()
    body += (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="beam-size"\r\n\r\n1'
        f"\r\n--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


def get_json(url: str, path: str) -> dict:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", path)
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def connect(host: str, port: int) -> http.client.HTTPConnection:
    """A keep-alive connection with Nagle's algorithm off, as curl and urllib3 do (http.client
    sends a request's headers and body in two writes, which Nagle + delayed ACKs stall ~40 ms)."""
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def post_caption(
    conn: http.client.HTTPConnection, body: bytes, ctype: str
) -> tuple[int, str | None]:
    """One ``POST /caption`` on ``conn`` -> (HTTP status, None when a caption came back, else
    what came back instead). A connection that fails raises (OSError, HTTPException, or
    ValueError for a 200 whose body is not the expected JSON)."""
    conn.request("POST", "/caption", body=body, headers={"Content-Type": ctype})
    response = conn.getresponse()
    data = response.read()
    ok = response.status == 200 and "caption" in json.loads(data)["results"][0]
    return response.status, None if ok else f"{response.status} {data[:200]!r}"


def run_level(url: str, bodies: list[tuple[bytes, str]], clients: int, requests: int) -> dict:
    """``clients`` threads, ``requests`` each -> throughput, latencies, errors."""
    u = urlparse(url)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = connect(u.hostname, u.port)
        start_gate.wait()
        for i in range(requests):
            body, ctype = bodies[(k * requests + i) % len(bodies)]
            t0 = time.perf_counter()
            try:
                _, problem = post_caption(conn, body, ctype)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                problem = repr(exc)
                conn.close()
                conn = connect(u.hostname, u.port)
            elapsed = time.perf_counter() - t0
            with lock:
                (errors.append(problem) if problem else latencies.append(elapsed))
        conn.close()

    before = get_json(url, "/health")
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = get_json(url, "/health")
    batches = after["batches"] - before["batches"]
    latencies.sort()
    n = len(latencies)
    return {
        "requests": clients * requests,
        "throughput": n / wall,
        "p50": latencies[n // 2] if n else float("nan"),
        "p99": latencies[min(n - 1, int(0.99 * n))] if n else float("nan"),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "mean_batch": (after["images"] - before["images"]) / max(batches, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint, run directory or exported folder")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=20, help="requests per client per level")
    p.add_argument("--images", type=Path, default=DEMO_IMAGES, help="folder of PNG images")
    p.add_argument("--warmup", type=int, default=20, help="requests per server before timing")
    args = p.parse_args()

    paths = sorted(args.images.glob("*.png"))[:64]
    if not paths:
        raise SystemExit(
            f"{args.images}: no PNG images (run `captioner train` once for the demo data)"
        )
    bodies = [multipart(path) for path in paths]
    servers = {
        "on": start_server(args.model, "--max-batch", "32", "--max-wait-ms", "10"),
        "off": start_server(args.model, "--max-batch", "1"),
    }
    try:
        for _, url in servers.values():
            run_level(url, bodies, 1, args.warmup)
        results: dict[tuple[int, str], dict] = {}
        for clients in args.clients:
            for mode in ("off", "on"):
                results[clients, mode] = run_level(servers[mode][1], bodies, clients, args.requests)
                r = results[clients, mode]
                print(
                    f"clients {clients:>3}  batching {mode:<3}  {r['requests']:>5} requests  "
                    f"{r['throughput']:7.1f} req/s  p50 {r['p50'] * 1000:7.1f} ms  "
                    f"p99 {r['p99'] * 1000:7.1f} ms  errors {r['errors']}  "
                    f"mean batch {r['mean_batch']:.1f}",
                    flush=True,
                )
                if r["first_error"]:
                    print(f"  first error: {r['first_error']}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    print("\nthroughput with micro-batching / without (batch size 1), same clients:")
    for clients in args.clients:
        on, off = results[clients, "on"], results[clients, "off"]
        print(
            f"  {clients:>3} clients: {on['throughput'] / off['throughput']:.2f}x  "
            f"(p99 {on['p99'] * 1000:.0f} ms vs {off['p99'] * 1000:.0f} ms)"
        )
    total_errors = sum(r["errors"] for r in results.values())
    print(f"errors: {total_errors}")
    median_p99 = statistics.median(r["p99"] for r in results.values())
    print(f"median p99 over all levels: {median_p99 * 1000:.0f} ms")


if __name__ == "__main__":
    main()
