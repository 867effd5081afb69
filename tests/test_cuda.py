"""The CUDA paths (issue 24): autocast (bf16, and fp16 with a gradient scaler) for every decoder,
decoding on the device against the CPU, checkpoints across devices, exact resume and SCST on
the device. Marked ``cuda``; skipped where CUDA is absent, so CI (no GPU) skips them all.

``CAPTIONER_TEST_DEVICE=cpu pytest -m cuda`` runs the same tests with the CPU as "the device"
(autocast exists there too), to check the tests themselves on a machine without a GPU; on a GPU
machine ``pytest -m cuda`` (``benchmarks/gpu.sh`` runs it).
"""

from __future__ import annotations

import itertools
import math
import os
import signal
from pathlib import Path

import pytest
import torch

# cuBLAS is deterministic only with a fixed workspace, set before its first use in the process
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEVICE = os.environ.get("CAPTIONER_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not DEVICE, reason="no CUDA device (CAPTIONER_TEST_DEVICE=cpu checks the tests)"
    ),
]

from test_decoding import IDS, product_decoder, rounding, tokens_of  # noqa: E402
from test_training import assert_same_run_end, interrupt_at  # noqa: E402

from captioner.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from captioner.configs.decode import DecodeConfig  # noqa: E402
from captioner.configs.model import DecoderConfig  # noqa: E402
from captioner.datasets.captions import pad_captions  # noqa: E402
from captioner.decoding import beam_search, greedy  # noqa: E402
from captioner.models.decoders import build_decoder  # noqa: E402
from captioner.runtime import autocast  # noqa: E402
from captioner.training.losses import caption_loss  # noqa: E402
from captioner.training.runlog import read_metrics  # noqa: E402
from captioner.training.setup import Optimization  # noqa: E402
from captioner.training.train import TrainingInterrupted, train  # noqa: E402

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
CELLS, ATTENTION = ("lstm", "gru", "rnn"), ("none", "soft", "topdown")
V, FEAT, PAD, START, END = 12, 8, 0, 1, 2
CAPTIONS = [[START, 4, 5, 6, END], [START, 7, 8, END], [START, 9, 10, 11, 4, END]]


def skip_fp16_on_a_cpu(precision: str) -> None:
    """fp16 autocast is a GPU's: oneDNN's CPU LSTM kernels refuse it on some CPUs, so the check
    of the tests on a CPU runs their bf16 cases only."""
    if precision == "fp16" and torch.device(DEVICE).type == "cpu":
        pytest.skip("fp16 autocast is checked on CUDA only")


@pytest.fixture(scope="module")
def device():
    """The device; while this module's tests run, fp32 means fp32 there: no TF32 in matmuls or
    cuDNN (the CPU has none). The settings are restored after the module."""
    dev = torch.device(DEVICE)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    yield dev
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def deterministic():
    """Deterministic kernels (cuDNN, scatter-adds) for the length of a test: exact resume. An op
    with no deterministic CUDA kernel warns (naming itself) instead of failing the run, so a
    resume that differs says which op to look at."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


# -- every decoder under autocast -------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "attention", "precision"), list(itertools.product(CELLS, ATTENTION, PRECISIONS))
)
def test_every_decoder_learns_a_few_captions_under_autocast(
    device: torch.device, cell: str, attention: str, precision: str
) -> None:
    """Optimizer steps under autocast (fp16 through the product's gradient scaler): every loss
    finite, and the tiny model learns the three captions well enough to decode them."""
    skip_fp16_on_a_cpu(precision)
    torch.manual_seed(0)
    config = DecoderConfig(16, 32, dropout=0.0, cell=cell, attention=attention, attention_dim=8)
    decoder = build_decoder(config, FEAT, V, pad_id=PAD).to(device).train()
    grid = (3, 4, FEAT) if attention != "none" else (3, FEAT)
    feats = torch.randn(grid, generator=torch.Generator().manual_seed(1)).to(device)
    captions, lengths = pad_captions(CAPTIONS, PAD)
    captions = captions.to(device)
    dtype = PRECISIONS[precision]
    params = [p for p in decoder.parameters() if p.requires_grad]
    opt = Optimization(
        torch.optim.Adam(params, lr=1e-2),
        None,  # no schedule: step() does not read it
        dtype,
        torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        None,
    )
    losses = []
    for _ in range(150):
        with autocast(device, dtype):
            logits = decoder(feats, captions, lengths)
        loss = caption_loss(logits.float(), captions, PAD)
        opt.scaler.scale(loss).backward()
        opt.step(decoder, params, grad_clip=1.0)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.1 * losses[0]
    decoder.eval()
    with torch.no_grad(), autocast(device, dtype):
        hyps = greedy(decoder, feats, DecodeConfig(max_len=8), **IDS)
    assert [h.tokens for (h,) in hyps] == [c[1:-1] for c in CAPTIONS]


# -- decoding on the device gives the CPU's captions -------------------------------------------


@pytest.mark.parametrize(
    ("cell", "attention"), [("lstm", "none"), ("gru", "soft"), ("lstm", "topdown")]
)
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_decoding_on_the_device_gives_the_cpus_tokens_at_fp32(
    device: torch.device, cell: str, attention: str, strategy: str
) -> None:
    """The same weights and features: the same tokens, and scores within the rounding tolerance
    of two float32 computations that differ in the order of their arithmetic (test_decoding's
    :func:`rounding`: 2 eps times the score's sensitivity to every stored value)."""
    cpu = product_decoder(cell, attention)
    on_device = product_decoder(cell, attention).to(device)
    shape = (7, 4, 6) if attention != "none" else (7, 6)
    feats = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    search = greedy if strategy == "greedy" else beam_search
    config = DecodeConfig(strategy, max_len=10, beam_size=3)
    with torch.no_grad():
        want = search(cpu, feats, config, **IDS)
        got = search(on_device, feats.to(device), config, **IDS)
    assert tokens_of(got) == tokens_of(want)
    for i, (hyps, wants) in enumerate(zip(got, want, strict=True)):
        for h, w in zip(hyps, wants, strict=True):
            tol, margin = rounding(cpu, feats[i], w)
            if strategy == "greedy":  # the data's choices are clear of rounding on any device
                assert margin > tol
            assert h.score == pytest.approx(w.score, abs=tol)


# -- checkpoints, resume and SCST on the device ------------------------------------------------


@pytest.fixture(scope="module")
def device_run(make_cfg, device: torch.device, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch tiny run on the device in bf16, deterministic kernels."""
    out = tmp_path_factory.mktemp("device_run")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train(make_cfg(f"device={device}", "trainer.precision=bf16"), out)
    finally:
        torch.use_deterministic_algorithms(False)
    return out


@pytest.mark.slow
def test_resume_on_the_device_equals_uninterrupted(
    make_cfg,
    device: torch.device,
    device_run: Path,
    deterministic: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overrides = [f"device={device}", "trainer.precision=bf16"]
    handler = signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, step=4)  # one batch into epoch 2
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(*overrides), tmp_path / "a")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is handler
    train(make_cfg(*overrides, f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert_same_run_end(tmp_path / "b", device_run)


@pytest.mark.slow
def test_a_device_checkpoint_captions_on_the_cpu_and_back(
    make_cfg,
    device: torch.device,
    device_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """best.pt written on the device loads on the CPU with the same weights; a CPU run stopped
    mid-epoch resumes on the device, its optimizer state moved along."""
    ckpt = load_checkpoint(device_run / "best.pt")
    model, _, _ = model_from_checkpoint(ckpt, device=torch.device("cpu"))
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu"
        assert torch.equal(tensor, ckpt["model"][name].cpu()), name
    interrupt_at(monkeypatch, step=4)
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(), tmp_path / "cpu")
    monkeypatch.undo()
    train(make_cfg(f"device={device}", f"resume={tmp_path / 'cpu'}"), tmp_path / "moved")
    rows = read_metrics(tmp_path / "moved" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    moved = load_checkpoint(tmp_path / "moved" / "last.pt")
    assert moved["global_step"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_an_scst_epoch_under_autocast_on_the_device(
    make_cfg, device: torch.device, tmp_path: Path, precision: str
) -> None:
    skip_fp16_on_a_cpu(precision)
    switch = [
        "trainer.scst.start_epoch=1",
        "trainer.scst.samples=3",
        "trainer.scst.max_len=8",
        "trainer.monitor=val_cider_d",
    ]
    train(make_cfg(f"device={device}", f"trainer.precision={precision}", *switch), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    scst = rows[1]
    assert all(math.isfinite(v) for k, v in scst.items() if k.startswith(("scst_", "val_")))
    assert 0.0 < scst["scst_distinct"] <= 1.0
    # bf16 has float32's range: no step overflows; fp16's scaler skips the steps that overflow
    # while it finds its scale, never all of them
    assert scst["grad_nonfinite"] == 0.0 if precision == "bf16" else scst["grad_nonfinite"] < 1.0


@pytest.mark.slow
def test_serve_answers_on_the_device(
    device: torch.device, device_run: Path, tiny_demo: Path
) -> None:
    """``captioner serve``'s app with the model on the device: a request's captions are the ones
    the model gives on the CPU (both fp32; TF32 off)."""
    pytest.importorskip("fastapi", reason="captioner serve needs the serve extra")
    from fastapi.testclient import TestClient

    from captioner.inference import Captioner
    from captioner.serve.app import create_app
    from captioner.serve.settings import ServeSettings

    on_device = Captioner.from_checkpoint(device_run / "best.pt", device=str(device))
    assert next(on_device.model.parameters()).device.type == device.type
    pics = sorted((tiny_demo / "images" / "test").glob("*.png"))[:3]
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in pics]
    with TestClient(create_app(on_device, ServeSettings())) as client:
        answer = client.post("/caption", files=files)
    assert answer.status_code == 200, answer.text
    on_cpu = Captioner.from_checkpoint(device_run / "best.pt", device="cpu")
    want = [r.caption for r in on_cpu.caption(pics, on_device.default_decoding)]
    assert [r["caption"] for r in answer.json()["results"]] == want
