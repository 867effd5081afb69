"""``captioner serve``: every endpoint and every bad input through FastAPI's test client,
micro-batching (gathering, bounds, isolation), and a real server process driven by a real
headless Chromium through the page."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="captioner serve needs the serve extra")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import chromium_driver  # noqa: E402
from test_caption import bomb_png  # noqa: E402
from test_pretrained import images, variant_checkpoint  # noqa: E402

from captioner.configs.decode import DecodeConfig  # noqa: E402
from captioner.decoding import Hypothesis
from captioner.inference import Captioner  # noqa: E402
from captioner.pretrained import export_pretrained  # noqa: E402
from captioner.serve.app import create_app  # noqa: E402
from captioner.serve.batcher import MicroBatcher  # noqa: E402
from captioner.serve.settings import ServeSettings  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported folders of a pooled LSTM and a GRU with soft attention."""
    d = tmp_path_factory.mktemp("models")
    return {
        "pooled": export_pretrained(variant_checkpoint(d / "p"), d / "pooled"),
        "attends": export_pretrained(variant_checkpoint(d / "a", "gru", "soft"), d / "attends"),
    }


@pytest.fixture(scope="module")
def pics(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return images(tmp_path_factory.mktemp("pics"), 4)


@pytest.fixture(scope="module")
def pooled(models: dict[str, Path]) -> Captioner:
    return Captioner.from_pretrained(models["pooled"], device="cpu")


@pytest.fixture(scope="module")
def client(pooled: Captioner):
    with TestClient(create_app(pooled, ServeSettings(max_upload_mb=0.05, max_images=4))) as c:
        yield c


def upload(*paths: Path, field: str = "image") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (p.name, p.read_bytes(), "image/png")) for p in paths]


def expected(captioner: Captioner, paths: list[Path], config: DecodeConfig) -> list[dict]:
    """What ``captioner caption --json`` prints for these files (named by their file name)."""
    out = []
    for res in captioner.caption(paths, config):
        res.source = Path(res.source).name
        out.append(res.to_dict())
    return out


# -- endpoints ---------------------------------------------------------------------------------


def test_health_model_and_page(client: TestClient, pooled: Captioner) -> None:
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/model").json()
    assert info["encoder"] == {"source": "torchvision", "name": "resnet18", "input_size": 64}
    assert info["decoder"]["cell"] == "lstm" and info["attends"] is False
    assert info["vocab_size"] == len(pooled.vocab)
    assert info["scores"] == {"val_bleu4": 0.25, "val_cider_d": 0.7, "val_loss": 2.5}
    assert info["decoding"]["strategy"] == "beam"  # the model card's default decoding
    assert info["limits"]["max_images"] == 4 and info["batching"]["max_batch"] == 32
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'id="file"' in html and 'fetch("caption"' in html
    for external in ("http://", "https://", "//cdn", "<link", "@import"):
        assert external not in html  # self-contained: works offline


@pytest.mark.parametrize(
    ("fields", "config"),
    [
        # the model's own default decoding; <unk> is kept out of captions shown to people
        ({}, DecodeConfig("beam", beam_size=2, suppress_unk=True)),
        ({"beam-size": "1"}, DecodeConfig(suppress_unk=True)),
        (
            {"beam_size": "3", "n_best": "3"},
            DecodeConfig("beam", beam_size=3, n_best=3, suppress_unk=True),
        ),
        (
            {"sample": "true", "seed": "5", "top-k": "4"},
            DecodeConfig("sample", seed=5, top_k=4, suppress_unk=True),
        ),
        ({"beam-size": "1", "max-len": "3"}, DecodeConfig(max_len=3, suppress_unk=True)),
    ],
)
def test_caption_json_is_the_cli_schema(
    client: TestClient, pooled: Captioner, pics: list[Path], fields: dict, config: DecodeConfig
) -> None:
    r = client.post("/caption", files=upload(*pics[:3]), data=fields)
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    want = expected(pooled, pics[:3], config)
    assert [g["image"] for g in got] == [w["image"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        assert g["caption"] == w["caption"]
        assert g["score"] == pytest.approx(w["score"], abs=1e-4)
        if "hypotheses" in w:
            assert [h["caption"] for h in g["hypotheses"]] == [
                h["caption"] for h in w["hypotheses"]
            ]


def test_options_in_the_query_string(
    client: TestClient, pooled: Captioner, pics: list[Path]
) -> None:
    r = client.post("/caption?beam-size=3&n-best=2", files=upload(pics[0]))
    assert r.status_code == 200
    assert len(r.json()["results"][0]["hypotheses"]) == 2


def test_attention_maps_of_a_model_that_attends(
    models: dict[str, Path], pics: list[Path], tmp_path: Path
) -> None:
    from captioner.datasets.images import load_image, model_view
    from captioner.evaluation.attention_maps import save_attention_figure

    captioner = Captioner.from_pretrained(models["attends"], device="cpu")
    with TestClient(create_app(captioner)) as c:
        assert c.get("/model").json()["attends"] is True
        r = c.post(
            "/caption", files=upload(*pics[:2]), data={"attention": "true", "beam-size": "1"}
        )
    assert r.status_code == 200, r.text
    direct = captioner.caption(pics[:2], DecodeConfig(suppress_unk=True), attention=True)
    for res, want in zip(r.json()["results"], direct, strict=True):
        assert res["caption"] == want.caption and res["words"] == want.words
        head, _, data = res["attention_map"].partition(",")
        assert head == "data:image/png;base64"
        figure = Image.open(io.BytesIO(base64.b64decode(data)))
        # the figure `captioner caption --attention-map` writes: image + one panel per word
        cli = save_attention_figure(
            tmp_path / "cli.png",
            model_view(load_image(pics[0]), captioner.preprocessing),
            want.words,
            want.attention,
        )
        assert figure.format == "PNG" and figure.size == Image.open(cli).size


# -- bad input: a 4xx JSON error naming the problem, and the server keeps serving --------------


def _bad(tmp_path: Path, case: str) -> tuple[dict, int, str]:
    """-> (post kwargs, status, what the error says)."""
    good = images(tmp_path / "good", 1)[0]
    if case == "not_image":
        return (
            {"files": [("image", ("notes.txt", b"hello", "text/plain"))]},
            422,
            "notes.txt: not an image",
        )
    if case == "empty_file":
        return (
            {"files": [("image", ("zero.jpg", b"", "image/jpeg"))]},
            422,
            "zero.jpg: not an image",
        )
    if case == "truncated":
        data = good.read_bytes()
        return (
            {"files": [("image", ("half.png", data[: len(data) // 2], "image/png"))]},
            422,
            "half.png: corrupt",
        )
    if case == "bomb":
        bomb = bomb_png(tmp_path / "bomb.png")
        return {"files": upload(bomb)}, 422, "bomb.png: image is too large"
    if case == "over_size_limit":
        big = Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3))
        big.save(tmp_path / "big.png")  # ~120 kB of noise, over the 0.05 MB limit
        return (
            {"files": upload(tmp_path / "big.png")},
            413,
            "big.png: over the upload limit of 0.05 MB",
        )
    if case == "too_many_images":
        return {"files": upload(*[good] * 5)}, 413, "too many images: at most 4 per request"
    if case == "no_image":  # a multipart form with an option and no file
        body = b'--b\r\nContent-Disposition: form-data; name="beam-size"\r\n\r\n2\r\n--b--\r\n'
        headers = {"content-type": "multipart/form-data; boundary=b"}
        return {"content": body, "headers": headers}, 400, "no image"
    if case == "chunked":  # no Content-Length: its size would be known only once read

        def chunks():
            yield b"--b\r\n"

        headers = {"content-type": "multipart/form-data; boundary=b"}
        return {"content": chunks(), "headers": headers}, 411, "Content-Length"
    if case == "not_multipart":
        return {"json": {"image": "cat.jpg"}}, 415, "multipart/form-data"
    option_cases = {
        "unknown_option": ({"beams": "3"}, "unknown option 'beams'"),
        "not_an_int": ({"beam-size": "three"}, "beam-size: invalid int value: 'three'"),
        "not_a_bool": ({"sample": "perhaps"}, "sample: expected true or false"),
        "n_best_over_beam": (
            {"beam-size": "2", "n-best": "3"},
            "n_best must be between 1 and beam_size=2",
        ),
        "sample_and_beam": (
            {"sample": "1", "beam-size": "3"},
            "--sample and --beam-size are exclusive",
        ),
        "bad_top_p": ({"sample": "1", "top-p": "1.5"}, "top_p must be in (0, 1]"),
        "beam_over_server_limit": ({"beam-size": "17"}, "beam-size: at most 16 on this server"),
        "max_len_over_server_limit": ({"max-len": "101"}, "max-len: at most 100 on this server"),
        "twice": ({"beam-size": ["2", "3"]}, "given twice"),
        "negative_temperature": ({"sample": "1", "temperature": "-1"}, "temperature must be in"),
        "huge_seed": ({"sample": "1", "seed": str(10**20)}, "seed must fit in 64 bits"),
        "huge_length_penalty": ({"length-penalty": "600"}, "length_penalty must be in [-10, 10]"),
        "nan_temperature": ({"sample": "1", "temperature": "nan"}, "temperature must be in"),
        "image_as_text": ({"image": "cat.jpg"}, "send the file itself"),
        "attention_of_pooled_model": ({"attention": "true"}, "this model does not attend"),
    }
    fields, says = option_cases[case]
    return {"files": upload(good), "data": fields}, 400, says


BAD = [
    "not_image",
    "empty_file",
    "truncated",
    "bomb",
    "over_size_limit",
    "too_many_images",
    "no_image",
    "not_multipart",
    "unknown_option",
    "not_an_int",
    "not_a_bool",
    "n_best_over_beam",
    "sample_and_beam",
    "bad_top_p",
    "beam_over_server_limit",
    "max_len_over_server_limit",
    "twice",
    "negative_temperature",
    "huge_seed",
    "huge_length_penalty",
    "nan_temperature",
    "image_as_text",
    "attention_of_pooled_model",
    "chunked",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_4xx_json_error(
    client: TestClient, pics: list[Path], tmp_path: Path, case: str
) -> None:
    kwargs, status, says = _bad(tmp_path, case)
    r = client.post("/caption", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and says in body["error"] and "\n" not in body["error"]
    again = client.post("/caption", files=upload(pics[0]))  # still serving
    assert again.status_code == 200 and "caption" in again.json()["results"][0]


def test_request_over_the_body_limit_is_refused_before_parsing(client: TestClient) -> None:
    r = client.post(
        "/caption",
        content=b"x" * 100,
        headers={"content-type": "multipart/form-data; boundary=b", "content-length": str(10**9)},
    )
    assert r.status_code == 413 and "over the limit of 4 images x 0.05 MB" in r.json()["error"]


def test_unknown_route_and_method(client: TestClient) -> None:
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json()
    r = client.get("/caption")
    assert r.status_code == 405 and "error" in r.json() and r.headers["allow"] == "POST"


# -- micro-batching ----------------------------------------------------------------------------


class RecordingDecode:
    """A stand-in for the model: records each batch, answers one hypothesis per image."""

    def __init__(self, fail_on: int | None = None, delay: float = 0.0):
        self.batches: list[list[int]] = []
        self.fail_on, self.delay = fail_on, delay

    def __call__(self, tensors, config, attention):
        ids = [int(t.item()) for t in tensors]
        self.batches.append(ids)
        time.sleep(self.delay)
        if self.fail_on in ids:
            raise RuntimeError("boom")
        return [[Hypothesis([i], -1.0, True)] for i in ids]


async def _submit_all(batcher: MicroBatcher, jobs: list[tuple[list[int], DecodeConfig]]):
    await batcher.start()
    try:
        tasks = [
            asyncio.create_task(batcher.submit([torch.tensor(i) for i in ids], config, False))
            for ids, config in jobs
        ]
        return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_requests_share_bounded_batches() -> None:
    decode = RecordingDecode()
    batcher = MicroBatcher(decode, max_batch=4, max_wait_s=0.05)
    g = DecodeConfig()
    out = asyncio.run(_submit_all(batcher, [([i], g) for i in range(6)]))
    assert decode.batches == [[0, 1, 2, 3], [4, 5]]
    assert [[h[0].tokens for h in o] for o in out] == [[[i]] for i in range(6)]  # each its own
    assert (batcher.batches, batcher.images) == (2, 6)


def test_a_request_never_splits_and_overflow_starts_the_next_batch() -> None:
    decode = RecordingDecode()
    batcher = MicroBatcher(decode, max_batch=4, max_wait_s=0.05)
    g = DecodeConfig()
    asyncio.run(_submit_all(batcher, [([0, 1], g), ([2, 3, 4], g), ([5], g)]))
    assert decode.batches == [[0, 1], [2, 3, 4, 5]]


def test_only_requests_with_equal_options_decode_together() -> None:
    decode = RecordingDecode()
    batcher = MicroBatcher(decode, max_batch=32, max_wait_s=0.05)
    g, b = DecodeConfig(), DecodeConfig("beam", beam_size=2)
    s1, s2 = DecodeConfig("sample", seed=1), DecodeConfig("sample", seed=1)
    jobs = [([0], g), ([1], b), ([2], g), ([3], s1), ([4], s2), ([5], b)]
    asyncio.run(_submit_all(batcher, jobs))
    # seeded sampling decodes alone: the same captions as the CLI's for that request
    assert sorted(decode.batches) == [[0, 2], [1, 5], [3], [4]]


def test_a_batch_waits_only_while_another_request_is_on_its_way() -> None:
    decode = RecordingDecode()
    batcher = MicroBatcher(decode, max_batch=32, max_wait_s=5.0)

    async def scenario() -> float:
        await batcher.start()
        try:
            t0 = time.monotonic()
            await batcher.submit([torch.tensor(0)], DecodeConfig(), False)  # nobody else coming
            alone = time.monotonic() - t0

            async def late() -> None:  # parsed for 50 ms, then queued
                with batcher.arriving():
                    await asyncio.sleep(0.05)
                    future = batcher.enqueue([torch.tensor(2)], DecodeConfig(), False)
                await future

            task = asyncio.create_task(late())
            await asyncio.sleep(0)  # `late` is now on its way
            await batcher.submit([torch.tensor(1)], DecodeConfig(), False)
            await task
            return alone
        finally:
            await batcher.stop()

    alone = asyncio.run(scenario())
    assert alone < 1.0  # not the 5 s wait
    assert decode.batches == [[0], [1, 2]]


def test_a_batch_waits_at_most_max_wait() -> None:
    decode = RecordingDecode()
    batcher = MicroBatcher(decode, max_batch=32, max_wait_s=0.05)

    async def scenario() -> None:
        await batcher.start()
        try:

            async def slow() -> None:  # on its way for 0.5 s, 10x the wait
                with batcher.arriving():
                    await asyncio.sleep(0.5)
                    future = batcher.enqueue([torch.tensor(1)], DecodeConfig(), False)
                await future

            task = asyncio.create_task(slow())
            await asyncio.sleep(0)
            t0 = time.monotonic()
            await batcher.submit([torch.tensor(0)], DecodeConfig(), False)
            assert time.monotonic() - t0 < 0.4  # decoded after the wait, not with `slow`
            await task
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert decode.batches == [[0], [1]]


def test_an_app_starts_twice_and_health_says_when_the_batcher_is_down(
    pooled: Captioner, pics
) -> None:
    app = create_app(pooled)
    for _ in range(2):
        with TestClient(app) as c:
            assert c.post("/caption", files=upload(pics[0])).status_code == 200
    with TestClient(app) as c:
        app.state.batcher._task.cancel()  # noqa: SLF001 - a batcher that died
        time.sleep(0.05)
        r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "down"


def test_false_flags_turn_off_a_model_default(pooled: Captioner) -> None:
    from captioner.serve.requests import parse_options

    settings = ServeSettings()
    sampling = DecodeConfig("sample", top_k=3, suppress_unk=True)
    config, _ = parse_options([("sample", "false"), ("suppress-unk", "0")], sampling, settings)
    assert config.strategy == "greedy" and config.suppress_unk is False
    config, attention = parse_options(
        [("n_best", "4")], DecodeConfig("beam", beam_size=2), settings
    )
    assert (config.strategy, config.beam_size, config.n_best, attention) == ("beam", 4, 4, False)
    config, _ = parse_options([("beam-size", "1")], DecodeConfig("beam", n_best=2), settings)
    assert (config.strategy, config.n_best) == ("greedy", 1)


def test_no_batching_and_no_wait() -> None:
    decode = RecordingDecode()
    asyncio.run(
        _submit_all(MicroBatcher(decode, 1, 0.05), [([i], DecodeConfig()) for i in range(3)])
    )
    assert decode.batches == [[0], [1], [2]]


def test_a_failing_batch_fails_only_its_requests() -> None:
    decode = RecordingDecode(fail_on=1)
    batcher = MicroBatcher(decode, max_batch=2, max_wait_s=0.05)
    out = asyncio.run(_submit_all(batcher, [([i], DecodeConfig()) for i in range(4)]))
    assert [isinstance(o, RuntimeError) for o in out] == [True, True, False, False]
    assert [h[0].tokens for h in out[2] + out[3]] == [[2], [3]]


def test_the_heap_is_handed_back_once_per_idle_spell_after_batches() -> None:
    """A burst's freed memory goes back to the system once the server is idle: one release per
    idle spell that follows batches, none while requests keep coming, none without batches."""

    async def scenario() -> tuple[int, int, int]:
        batcher = MicroBatcher(RecordingDecode(), max_batch=4, max_wait_s=0, idle_release_s=0.5)
        await batcher.start()
        try:
            await asyncio.sleep(0.7)  # idle from the start: nothing to hand back
            before = batcher.releases
            for i in range(5):  # requests 0.02 s apart: never idle for 0.5 s
                await batcher.submit([torch.tensor(i)], DecodeConfig(), False)
                await asyncio.sleep(0.02)
            during = batcher.releases
            await asyncio.sleep(2.0)  # one idle spell, however long: one release
            return before, during, batcher.releases
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == (0, 0, 1)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim and mallopt's arenas are glibc's",
)
def test_glibc_arenas_are_limited_and_trimmed_in_a_fresh_process() -> None:
    script = (
        "from captioner.serve.batcher import limit_malloc_arenas, release_free_memory\n"
        "blocks = [bytearray(200_000) for _ in range(500)]\n"  # 100 MB on the heap, freed
        "del blocks\n"
        "print(limit_malloc_arenas(1), release_free_memory())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["True", "True"], done.stderr[-2000:]


def test_concurrent_clients_get_their_own_captions_and_a_bad_one_fails_alone(
    pooled: Captioner, pics: list[Path]
) -> None:
    app = create_app(pooled, ServeSettings(max_batch=32, max_wait_ms=300))
    config = DecodeConfig(suppress_unk=True)  # serve keeps <unk> out of captions by default
    want = {p.name: pooled.caption([p], config)[0] for p in pics}
    with TestClient(app) as c:

        def post(i: int):
            if i % 4 == 3:
                return c.post("/caption", files=[("image", ("bad.png", b"junk", "image/png"))])
            return c.post("/caption", files=upload(pics[i % 4]), data={"beam-size": "1"})

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(16)))
        health = c.get("/health").json()
    for i, r in enumerate(responses):
        if i % 4 == 3:
            assert r.status_code == 422 and "bad.png: not an image" in r.json()["error"]
        else:
            (res,) = r.json()["results"]
            assert res["image"] == pics[i % 4].name
            assert res["caption"] == want[res["image"]].caption
            assert res["score"] == pytest.approx(want[res["image"]].score, abs=1e-4)
    assert health["images"] == 12
    assert health["batches"] < 12  # requests were gathered into shared batches


# -- the command -------------------------------------------------------------------------------


def start_server(
    model: Path, *args: str, log: Path | None = None
) -> tuple[subprocess.Popen, str, list[str]]:
    """A real ``captioner serve`` on a free port -> (process, base URL, its stderr lines so far).
    Its stderr goes to ``log`` (a temporary file by default), read as it grows."""
    if log is None:
        fd, name = tempfile.mkstemp(prefix="serve-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "captioner", "serve", "--model", str(model), "--port", "0"]
            + list(args),
            stderr=err,
            stdout=subprocess.DEVNULL,
            text=True,
        )
    deadline = time.monotonic() + 120
    lines: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines(keepends=True)
        serving = [line for line in lines if line.startswith("serving ")]
        if not serving:
            time.sleep(0.1)
            continue
        url = serving[0].split(" at ", 1)[1].split(" ", 1)[0]
        for _ in range(100):  # uvicorn is up once /health answers
            try:
                with urllib.request.urlopen(url + "health", timeout=5) as r:
                    if json.load(r)["status"] == "ok":
                        return proc, url, lines
            except OSError:
                time.sleep(0.1)
        break
    proc.kill()
    raise AssertionError("server did not start: " + log.read_text())


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


# -- hostile clients: raw sockets against a real server -----------------------------------------

HOSTILE_LIMIT = 2 * int(0.05 * 2**20) + 2**20  # --max-images 2 --max-upload-mb 0.05: the body limit
PART = (
    b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)


@pytest.fixture(scope="module")
def hostile(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A real server with small limits and a 1 s body timeout -> ((host, port), its log)."""
    log = tmp_path_factory.mktemp("hostile") / "stderr.log"
    limits = ("--max-upload-mb", "0.05", "--max-images", "2", "--body-timeout", "1")
    proc, url, _ = start_server(models["pooled"], *limits, log=log)
    u = urlparse(url)
    yield (u.hostname, u.port), log
    stop(proc)


def _head(length: int | None, chunked: bool = False) -> bytes:
    lines = [b"POST /caption HTTP/1.1", b"Host: 127.0.0.1"]
    lines.append(b"Content-Type: multipart/form-data; boundary=b")
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of the response on ``sock`` (its socket timeout bounds the
    wait)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def _lines_after(log: Path, start: int, settle_s: float = 1.5) -> list[str]:
    """The server's log lines from line ``start``, once it has had ``settle_s`` to write them."""
    time.sleep(settle_s)
    return log.read_text().splitlines()[start:]


def test_a_chunked_body_is_cut_off_at_the_limit_whatever_content_length_says(hostile) -> None:
    address, log = hostile
    start = len(log.read_text().splitlines())
    chunk = os.urandom(2**16)
    sent = 0
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(_head(5, chunked=True) + b"%x\r\n%s\r\n" % (len(PART), PART))
        try:
            while sent < 64 * 2**20:  # stop sending once the server has answered
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server answered and closed the connection
            pass
        status, headers, body = _response(sock)
    assert status == 413 and headers.get("connection") == "close"
    error = json.loads(body)["error"]
    assert "request body over the limit" in error and "--max-upload-mb" in error
    # what the server read, plus what the loopback buffers held, is far under the 64 MB sent
    assert sent < HOSTILE_LIMIT + 16 * 2**20
    assert _lines_after(log, start) == []


def test_a_stalled_body_is_answered_408_within_the_body_timeout(hostile) -> None:
    address, log = hostile
    start = len(log.read_text().splitlines())
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(_head(10_000) + PART)  # then nothing more
        t0 = time.monotonic()
        status, headers, body = _response(sock)
        took = time.monotonic() - t0
        assert sock.recv(1) == b""  # and the connection is closed
    assert status == 408 and headers.get("connection") == "close"
    assert "--body-timeout" in json.loads(body)["error"] and took < 8
    assert _lines_after(log, start) == []


def test_a_client_that_disconnects_mid_request_costs_one_log_line(hostile, pics) -> None:
    address, log = hostile
    start = len(log.read_text().splitlines())
    for _ in range(3):
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(_head(10_000) + PART)
        time.sleep(0.2)
    lines = _lines_after(log, start)
    assert len(lines) <= 3, "\n".join(lines)
    assert all("disconnected" in line for line in lines), lines
    body = PART + pics[0].read_bytes() + b"\r\n--b--\r\n"
    with socket.create_connection(address, timeout=30) as sock:  # still serving
        sock.sendall(_head(len(body)) + body)
        status, _, answer = _response(sock)
    assert status == 200 and json.loads(answer)["results"][0]["image"] == "big.png"


def test_head_answers_on_the_get_routes(hostile) -> None:
    (host, port), _ = hostile
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for path in ("/health", "/model", "/"):
            conn.request("HEAD", path)
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, b""), path
    finally:
        conn.close()


@pytest.mark.slow
def test_serve_binds_localhost_by_default_and_warns_otherwise(
    models: dict[str, Path], pics: list[Path]
) -> None:
    proc, url, head = start_server(models["pooled"])
    try:
        assert url.startswith("http://127.0.0.1:")
        assert not any("warning" in line for line in head)
        assert "micro-batches of up to 32 images, 10 ms wait" in head[-1]
    finally:
        stop(proc)
    proc, url, head = start_server(models["pooled"], "--host", "0.0.0.0", "--max-batch", "1")
    try:
        assert url.startswith("http://0.0.0.0:") and "no micro-batching" in head[-1]
        assert any(
            line.startswith("warning: bound to 0.0.0.0, reachable from other machines")
            for line in head
        )
    finally:
        stop(proc)


def test_serve_without_the_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], models: dict[str, Path]
) -> None:
    from captioner.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(SystemExit) as code:
        main(["serve", "--model", str(models["pooled"])])
    assert code.value.code == 2
    assert "pip install 'captioner[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--max-upload-mb", "0"], "--max-upload-mb must be a number > 0"),
        (["--max-upload-mb", "inf"], "--max-upload-mb must be a number > 0"),
        (["--max-wait-ms", "nan"], "--max-wait-ms must be in [0, 10000]"),
        (["--body-timeout", "0"], "--body-timeout must be in (0, 3600] seconds"),
        (["--header-timeout", "nan"], "--header-timeout must be in (0, 3600] seconds"),
        (["--max-connections", "0"], "--max-connections must be >= 1"),
        (["--max-connections", "100000000"], "--max-connections 100000000 needs 100000064 open"),
        (["--max-len", "10"], "default decoding is over the server's limits: max-len: at most 10"),
        (["--model", "/no/such/model"], "no such folder"),
        (["--port", "70000"], "--port must be between 0 and 65535"),
    ],
)
def test_serve_bad_arguments(
    capsys: pytest.CaptureFixture[str], models: dict[str, Path], args: list[str], says: str
) -> None:
    from captioner.cli import main

    with pytest.raises(SystemExit) as code:
        main(["serve", "--model", str(models["pooled"]), *args])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err


# -- the page in a real browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    yield from chromium_driver("1000,900")


@pytest.mark.slow
def test_page_captions_an_uploaded_image_in_chromium(
    browser, models: dict[str, Path], pics: list[Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    captioner = Captioner.from_pretrained(models["attends"], device="cpu")
    # the page, like the API, keeps <unk> out of captions unless asked
    greedy = captioner.caption([pics[0]], DecodeConfig(suppress_unk=True))[0]
    beam = captioner.caption(
        [pics[0]], DecodeConfig("beam", beam_size=3, n_best=3, suppress_unk=True)
    )[0]
    proc, url, _ = start_server(models["attends"])
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "GRU" in d.find_element(By.ID, "model").text)
        assert browser.find_element(By.ID, "attention-option").is_displayed()
        browser.find_element(By.ID, "file").send_keys(str(pics[0]))
        caption = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card .caption"))
        assert caption[0].text == greedy.caption
        wait.until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, ".card img.map").get_attribute("naturalWidth")
                != "0"
            )
        )
        # beam search with n-best: the page re-captions the same file
        browser.find_element(By.CSS_SELECTOR, "input[value=beam]").click()
        items = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".card li.hypothesis"))
        # the chosen caption is shown once, above the list of the other beams
        assert [li.text.rsplit(" (", 1)[0] for li in items] == [t for t, _ in beam.hypotheses[1:]]
        shot = tmp_path / "serve_page.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("CAPTIONER_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["CAPTIONER_SCREENSHOT_DIR"]) / shot.name)
        # a bad file: its card shows the server's error
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: "not an image" in d.find_element(By.CSS_SELECTOR, ".card .error").text)
    finally:
        stop(proc)
