"""``captioner serve``: load a model and serve it over HTTP with uvicorn (the app itself is
:func:`captioner.serve.app.create_app`; it needs the serve extra, ``pip install
'captioner[serve]'``)."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from dataclasses import fields

from captioner.checkpoint import DEFAULT_RUNS, find_checkpoint
from captioner.errors import UserError
from captioner.serve.settings import ServeSettings

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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
        help="a checkpoint (best.pt, last.pt), a run directory (its best.pt, else its last.pt), "
        "a folder written by `captioner export` or its Hub id "
        f"(default: the newest best.pt under {DEFAULT_RUNS}/)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s, this machine only)",
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port, 0: any free port (default: %(default)s)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA > MPS > CPU), cpu, cuda ... (default: %(default)s)",
    )
    add_limits(p.add_argument_group("batching and limits"), s)
    return p


def add_limits(g: argparse._ArgumentGroup, s: ServeSettings) -> None:
    """The flags of :class:`ServeSettings`, with its defaults."""
    g.add_argument(
        "--max-batch",
        type=int,
        default=s.max_batch,
        help="images decoded together, 1: no micro-batching (default: %(default)s)",
    )
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=s.max_wait_ms,
        help="how long a batch waits for more requests (default: %(default)s)",
    )
    g.add_argument(
        "--max-images",
        type=int,
        default=s.max_images,
        help="images per request (default: %(default)s)",
    )
    g.add_argument(
        "--max-upload-mb",
        type=float,
        default=s.max_upload_mb,
        help="size limit per image (default: %(default)s)",
    )
    g.add_argument(
        "--max-beam-size",
        type=int,
        default=s.max_beam_size,
        help="largest beam a request may ask for (default: %(default)s)",
    )
    g.add_argument(
        "--max-len",
        type=int,
        default=s.max_len,
        help="longest caption a request may ask for (default: %(default)s)",
    )
    g.add_argument(
        "--body-timeout",
        dest="body_timeout_s",
        type=float,
        default=s.body_timeout_s,
        metavar="SECONDS",
        help="a request's body must arrive within this once the server starts reading it, "
        "else a 408: a stalled upload holds no connection longer (default: %(default)s)",
    )
    g.add_argument(
        "--header-timeout",
        dest="header_timeout_s",
        type=float,
        default=s.header_timeout_s,
        metavar="SECONDS",
        help="a request's headers must arrive within this of its connection opening (or of the "
        "previous response on it), else the connection closes: a client sending them a byte at "
        "a time holds none longer (default: %(default)s)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=s.max_connections,
        help="connections open at once; one more is answered 503 and closed as it opens "
        "(default: %(default)s)",
    )


def check_serve_extra() -> None:
    """FastAPI, its form parser and uvicorn are installed, else a UserError saying what to do."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 - FastAPI's form parser
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"captioner serve needs the serve extra ({exc.name} is missing): "
            "pip install 'captioner[serve]'"
        ) from exc


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free one); a UserError if it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot bind ({exc.strerror})") from exc
    return sock


def announce(source: str, host_arg: str, sock: socket.socket, settings: ServeSettings) -> None:
    """On stderr: a warning when reachable from other machines, then where the server is."""
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    if host_arg not in LOCAL_HOSTS:
        print(
            f"warning: bound to {host_arg}, reachable from other machines; the server has no "
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


def reserve_files(connections: int) -> None:
    """Raise the soft limit on open files to what ``connections`` sockets and the server's own
    files need (up to the hard limit), else a UserError naming --max-connections."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return
    needed = connections + 64  # the model's files, the log, the listening socket, torch's
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    try:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (ValueError, OSError):  # over the hard limit, or the kernel's
        raise UserError(
            f"--max-connections {connections} needs {needed} open files, over this system's "
            f"limit (ulimit -Hn: {hard}): lower --max-connections"
        ) from None


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    settings = ServeSettings(**{f.name: getattr(args, f.name) for f in fields(ServeSettings)})
    check_serve_extra()
    reserve_files(settings.max_connections)
    import uvicorn

    from captioner.inference import Captioner
    from captioner.serve.app import create_app
    from captioner.serve.batcher import limit_malloc_arenas
    from captioner.serve.limits import bounded_protocol

    # one malloc arena for the whole server (before any thread starts): with an arena per
    # worker thread, a burst of concurrent requests left its memory with the server
    limit_malloc_arenas(1)

    source = args.model
    if source is None:
        source = str(find_checkpoint())
        print(f"using checkpoint {source}", file=sys.stderr)
    captioner = Captioner.load(source, device=args.device)
    app = create_app(captioner, settings)
    sock = bind(args.host, args.port)
    announce(source, args.host, sock, settings)
    config = uvicorn.Config(
        app, http=bounded_protocol(settings), log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
