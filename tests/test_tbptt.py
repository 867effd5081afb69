"""Truncated backpropagation through time (``trainer.tbptt_steps``): one chunk is full BPTT
exactly, shorter chunks give the gradient of a hand-written truncation and none across a chunk
boundary, the parts add up to the batch's loss, and in a run: the same weights as without it when
a chunk covers every caption, an exact resume, and SCST epochs untouched."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioner.checkpoint import load_checkpoint
from captioner.configs.training import TrainerConfig
from captioner.datasets.captions import pad_captions
from captioner.errors import UserError
from captioner.models.captioning import CaptionModel
from captioner.training.objectives import TeacherForcing, backpropagate, loss_parts
from captioner.training.train import Trainer, TrainingInterrupted, train
from captioner.vocab import Vocab

V, FEAT, PAD, START, END = 16, 8, Vocab.pad_id, Vocab.start_id, Vocab.end_id
CELLS = ["lstm", "gru", "rnn"]
ATTENTION = ["none", "soft", "topdown"]
VARIANTS = list(itertools.product(CELLS, ATTENTION))
# lengths 8, 3 and 6: 7 input steps, chunks of 2 or 3 steps cut every caption but the shortest
SEQS = [[START, 4, 5, 6, 7, 8, 9, END], [START, 10, END], [START, 11, 12, 13, 14, END]]


class GridBackbone(nn.Module):
    """A timm-like CNN: ``forward_features`` gives a 4 x 4 feature map of a 16 px image."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, FEAT, 4, stride=4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def tiny_model(cell: str, attention: str, **decoder: object) -> CaptionModel:
    return helpers.tiny_model(
        GridBackbone,
        FEAT,
        V,
        {"name": "grid", "weights": None},
        **{"cell": cell, "attention": attention, "attention_dim": 7, **decoder},
    )


def make_batch(model: CaptionModel) -> dict[str, object]:
    torch.manual_seed(1)
    captions, lengths = pad_captions(SEQS, PAD)
    return {
        "inputs": model.encode(torch.randn(len(SEQS), 3, 16, 16)).detach(),
        "captions": captions,
        "lengths": lengths,
        "image_of_caption": torch.arange(len(SEQS)),
    }


def accumulate(objective: TeacherForcing, model: nn.Module, batch: dict) -> tuple[float, dict]:
    """What the trainer does with one batch: back-propagate every part -> (summed loss, logs)."""
    parts = loss_parts(objective, model, batch, features=True)
    out = backpropagate(parts, lambda loss: loss.backward(), contextlib.nullcontext)
    return float(out.loss), out.logs


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }


def objective(model: CaptionModel, tbptt_steps: int | None) -> TeacherForcing:
    penalty = 0.5 if model.attends else 0.0
    return TeacherForcing(
        PAD, label_smoothing=0.1, attention_penalty=penalty, tbptt_steps=tbptt_steps
    )


# -- one chunk ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "attention"), VARIANTS)
@pytest.mark.parametrize("steps", [7, 1000])  # exactly the batch's 7 input steps, and more
def test_a_chunk_covering_every_caption_is_full_bptt_exactly(
    cell: str, attention: str, steps: int
) -> None:
    """Same operations in the same order, dropout's draws included: bit-identical in one
    process (label smoothing and the attention penalty on, so every term is compared)."""
    model = tiny_model(cell, attention, dropout=0.3).train()
    batch = make_batch(model)

    torch.manual_seed(2)
    full = objective(model, None)(model, batch, features=True)
    full.loss.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(2)
    loss, logs = accumulate(objective(model, steps), model, batch)
    assert loss == float(full.loss.detach()) and logs == full.logs
    for name, grad in grads(model).items():
        assert torch.equal(grad, want[name]), name


# -- shorter chunks ------------------------------------------------------------------------------


class Float64Captioner(nn.Module):
    """The objective's view of a model (``model(inputs, captions, ...)``) on the decoder alone,
    in float64: :class:`CaptionModel` casts features to float32, and float64 makes rounding
    negligible beside the differences these tests look for."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder.double()

    def forward(self, inputs, captions, lengths, image_of_caption, features, **kwargs):
        return self.decoder(inputs[image_of_caption], captions, lengths, **kwargs)


def hand_truncated_loss(decoder: nn.Module, feats: torch.Tensor, k: int) -> torch.Tensor:
    """The truncated loss written out step by step: the decoder's own one-step function, the
    state detached every ``k`` steps (the image memory kept attached), the mean cross-entropy
    over all target tokens, and no attention penalty."""
    captions, lengths = pad_captions(SEQS, PAD)
    state = decoder.init_state(feats)
    n = decoder.cells * decoder.cell_tensors  # the recurrent tensors lead the state
    total = torch.zeros((), dtype=feats.dtype)
    for t in range(captions.shape[1] - 1):
        if t and t % k == 0:
            state = (*(s.detach() for s in state[:n]), *state[n:])
        out, state, _ = decoder._advance(decoder.embed(captions[:, t]), state)
        total = total + F.cross_entropy(
            decoder.out(out), captions[:, t + 1], ignore_index=PAD, reduction="sum"
        )
    return total / int((lengths - 1).sum())


@pytest.mark.parametrize(("cell", "attention"), VARIANTS)
@pytest.mark.parametrize("k", [2, 3])
def test_truncated_gradients_are_a_hand_written_truncation(
    cell: str, attention: str, k: int
) -> None:
    model = tiny_model(cell, attention)
    wrapped = Float64Captioner(model.decoder)
    feats = make_batch(model)["inputs"].double()
    batch = {**make_batch(model), "inputs": feats}
    tf = TeacherForcing(PAD, tbptt_steps=k)

    loss, _ = accumulate(tf, wrapped, batch)
    got = grads(wrapped)
    wrapped.zero_grad(set_to_none=True)
    want_loss = hand_truncated_loss(wrapped.decoder, feats, k)
    want_loss.backward()
    want = grads(wrapped)
    wrapped.zero_grad(set_to_none=True)
    accumulate(TeacherForcing(PAD), wrapped, batch)
    full = grads(wrapped)

    # the recurrence runs in float64, but the product's cross-entropy runs in float32 (as it
    # does under autocast), so the loss and the gradient entering the recurrence carry float32
    # rounding (eps 1.2e-7, times the ~15 tokens summed): 1e-5 relative is far above it and
    # far below the truncation's effect, checked next
    assert loss == pytest.approx(float(want_loss.detach()), rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    moved = max(float((full[n] - want[n]).abs().max()) for n in want)
    assert moved > 1e-3  # truncation changes the gradient: the comparison above can fail


@pytest.mark.parametrize("attention", ATTENTION)
def test_no_gradient_crosses_a_chunk_boundary(attention: str) -> None:
    """The second chunk's loss alone: it reaches the words it reads and the image's memory,
    never the words of the first chunk nor the layers that made the initial state."""
    model = tiny_model("lstm", attention, tie_weights=False)
    batch = make_batch(model)
    first_chunk_words = [START, 4, 5, 11, 12]  # inputs at steps 0-2 of the captions
    second_chunk_words = [6, 7, 8, 13, 14]  # inputs at steps 3-5

    parts = loss_parts(TeacherForcing(PAD, tbptt_steps=3), model, batch, features=True)
    next(parts)  # the first chunk, not back-propagated
    next(parts).loss.backward()
    embed = model.decoder.embed.weight.grad
    assert (embed[first_chunk_words] == 0).all()
    assert (embed[second_chunk_words].abs().sum(dim=1) > 0).all()
    init = [p for n, p in model.decoder.named_parameters() if n.startswith("init_")]
    assert init and all(p.grad is None for p in init)
    if model.attends:  # the grid is read at every step: its projection learns from chunk 2
        assert model.decoder.attention.feature_proj.weight.grad.abs().sum() > 0

    # without truncation the same last words' loss reaches the first chunk's words
    model.zero_grad(set_to_none=True)
    model(batch["inputs"], batch["captions"], batch["lengths"], features=True)[
        :, 3:6
    ].sum().backward()
    assert (model.decoder.embed.weight.grad[[4, 5, 11, 12]].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("attention", ATTENTION)
def test_the_parts_add_up_to_the_batch_loss(attention: str) -> None:
    """Truncation changes gradients, not values: the chunks' losses (and logged figures) sum to
    the full loss. float32: each is a mean of ~15 token losses of magnitude ~log V, so they
    agree to a few float32 eps relative."""
    model = tiny_model("gru", attention)
    batch = make_batch(model)
    full = objective(model, None)(model, batch, features=True)
    for k in (1, 2, 3):
        loss, logs = accumulate(objective(model, k), model, batch)
        assert loss == pytest.approx(full.loss.item(), rel=1e-5)
        assert logs == pytest.approx(full.logs, rel=1e-5)


def test_tbptt_steps_is_checked() -> None:
    with pytest.raises(UserError, match=r"trainer\.tbptt_steps.*1.*got 0"):
        TrainerConfig(tbptt_steps=0)


# -- in a run (the tiny demo: 24 train images, 3 batches of 8 per epoch) ------------------------


def model_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt")["model"]


def rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.mark.slow
def test_a_run_with_a_chunk_covering_every_caption_is_the_plain_run(
    make_cfg, tmp_path: Path
) -> None:
    train(make_cfg(), tmp_path / "plain")
    train(make_cfg("trainer.tbptt_steps=100"), tmp_path / "covering")
    train(make_cfg("trainer.tbptt_steps=2"), tmp_path / "truncated")
    plain, covering = model_tensors(tmp_path / "plain"), model_tensors(tmp_path / "covering")
    assert all(torch.equal(plain[k], covering[k]) for k in plain)
    assert rows(tmp_path / "covering") == rows(tmp_path / "plain")
    truncated = rows(tmp_path / "truncated")
    assert truncated[1]["train_loss"] < truncated[0]["train_loss"]  # it learns
    assert truncated != rows(tmp_path / "plain")


@pytest.mark.slow
def test_resume_with_tbptt_equals_uninterrupted(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(make_cfg("trainer.tbptt_steps=2"), tmp_path / "reference")
    original = Trainer._should_stop

    def stop_after_step_4(self: Trainer, stop) -> bool:
        if self.progress.global_step == 4 and stop.signum is None:
            signal.raise_signal(signal.SIGINT)
        return original(self, stop)

    monkeypatch.setattr(Trainer, "_should_stop", stop_after_step_4)
    with pytest.raises(TrainingInterrupted):
        train(make_cfg("trainer.tbptt_steps=2"), tmp_path / "a")
    monkeypatch.undo()
    train(make_cfg("trainer.tbptt_steps=2", f"resume={tmp_path / 'a'}"), tmp_path / "b")
    got, want = model_tensors(tmp_path / "b"), model_tensors(tmp_path / "reference")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert rows(tmp_path / "b") == rows(tmp_path / "reference")


@pytest.mark.slow
def test_scst_epochs_ignore_tbptt(make_cfg, tmp_path: Path) -> None:
    """Self-critical epochs back-propagate their one loss; only teacher forcing is chunked."""
    scst = ["trainer.scst.start_epoch=1", "trainer.scst.samples=2", "trainer.scst.max_len=8"]
    train(make_cfg(*scst), tmp_path / "plain")
    train(make_cfg(*scst, "trainer.tbptt_steps=100"), tmp_path / "covering")
    plain, covering = rows(tmp_path / "plain"), rows(tmp_path / "covering")
    assert "scst_reward" in plain[1] and covering == plain
