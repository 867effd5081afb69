"""Self-critical sequence training: the baseline, the masking, the direction of the policy
gradient, the reward's <end>, and the loss, on a tiny model with cached features."""

from __future__ import annotations

import signal
from pathlib import Path

import helpers
import pytest
import torch
from test_training import assert_same_run_end, assert_same_tensors, interrupt_at
from torch import nn

from captioner.checkpoint import load_checkpoint
from captioner.configs.model import DecoderConfig, ModelConfig
from captioner.configs.training import SCSTConfig, parse_train_config
from captioner.datasets.annotations import CaptionRecord
from captioner.decoding import Hypothesis
from captioner.errors import UserError
from captioner.models.captioning import CaptionModel
from captioner.models.decoders import PooledDecoder
from captioner.models.encoders import Encoder
from captioner.runtime import setup_runtime
from captioner.training import scst as scst_module
from captioner.training.runlog import read_metrics
from captioner.training.scst import (
    ScstSwitch,
    SelfCritical,
    mean_of_others,
    sequence_log_probs,
)
from captioner.training.setup import Optimization
from captioner.training.train import Trainer, TrainingInterrupted, train
from captioner.vocab import Vocab

CAPTIONS = [
    ["a dog runs on the grass", "a brown dog runs"],
    ["two cats sleep on a bed", "cats sleep"],
    ["a red car is parked", "the red car"],
]
FEATURES = 6


@pytest.fixture
def vocab() -> Vocab:
    return Vocab.build([c for caps in CAPTIONS for c in caps])


@pytest.fixture
def records() -> list[CaptionRecord]:
    return [CaptionRecord(i, Path(f"{i}.jpg"), caps) for i, caps in enumerate(CAPTIONS)]


def tiny_model(vocab: Vocab, dropout: float = 0.0, **decoder: str) -> CaptionModel:
    """The tiny captioner of :func:`helpers.tiny_model` (its encoder unused: the batches hold
    features)."""
    return helpers.tiny_model(
        nn.Flatten, FEATURES, len(vocab), embed_dim=8, hidden_size=16, dropout=dropout, **decoder
    )


def hyp(vocab: Vocab, text: str, finished: bool = True) -> Hypothesis:
    return Hypothesis([vocab.stoi[w] for w in text.split()], 0.0, finished)


def batch_of(images: list[int], grid: bool = False) -> dict:
    """Cached features of ``images``: pooled [B, F], or grids of 4 positions [B, 4, F]."""
    gen = torch.Generator().manual_seed(1)
    shape = (len(images), 4, FEATURES) if grid else (len(images), FEATURES)
    return {
        "inputs": torch.randn(shape, generator=gen),
        "index": torch.tensor(images),
    }


def scripted(
    monkeypatch: pytest.MonkeyPatch, samples: list, greedy: list | None = None, modes=None
) -> None:
    """Make the sampler (and greedy decoding) return these hypotheses; ``modes`` collects the
    decoder's training flag at each greedy decoding."""

    def decode(decoder, features, config, **ids):
        if config.strategy == "sample":
            return [[h] for h in samples]
        assert config.strategy == "greedy" and greedy is not None
        if modes is not None:
            modes.append(decoder.training)
        return [[h] for h in greedy]

    monkeypatch.setattr(scst_module, "decode", decode)


def log_probs(
    model: CaptionModel, objective: SelfCritical, feats, hyps, owners=None
) -> torch.Tensor:
    """Summed log-probs of ``hyps``, hypothesis i given the features of row ``owners[i]``."""
    captions, lengths = objective._captions(hyps)
    owners = torch.zeros(len(hyps), dtype=torch.long) if owners is None else torch.tensor(owners)
    with torch.no_grad():
        logits = model(feats, captions, lengths, owners, True)
    v = objective.vocab
    banned = torch.tensor([v.pad_id, v.start_id])
    return sequence_log_probs(logits, captions, banned, v.pad_id)


# ---------------------------------------------------------------------------------------------


def test_mean_of_others_never_includes_the_sample_itself() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 0.0]])
    base = mean_of_others(rewards)
    assert torch.allclose(base[0], torch.tensor([11 / 3, 10 / 3, 3.0, 2.0]))
    changed = rewards.clone()
    changed[0, 2] = 100.0  # a sample's own reward moves every baseline but its own
    moved = mean_of_others(changed)
    assert moved[0, 2] == base[0, 2] and (moved[0, [0, 1, 3]] > base[0, [0, 1, 3]]).all()


def test_log_probs_count_end_and_nothing_after_it(vocab: Vocab, records) -> None:
    objective = SelfCritical(vocab, records, SCSTConfig(samples=2), max_len=8)
    hyps = [hyp(vocab, "a dog runs"), hyp(vocab, "a", finished=False)]
    captions, lengths = objective._captions(hyps)
    v = vocab
    assert captions[0].tolist() == [v.start_id, *hyps[0].tokens, v.end_id]
    assert captions[1].tolist() == [v.start_id, hyps[1].tokens[0], v.pad_id, v.pad_id, v.pad_id]
    assert lengths.tolist() == [5, 2]

    logits = torch.randn(2, 4, len(vocab))  # [N, T-1, V]
    banned = torch.tensor([v.pad_id, v.start_id])
    got = sequence_log_probs(logits, captions, banned, v.pad_id)
    logp = logits.index_fill(-1, banned, float("-inf")).log_softmax(-1)
    want0 = sum(logp[0, t, captions[0, t + 1]] for t in range(4))  # 3 words and <end>
    assert got[0] == pytest.approx(float(want0))
    assert got[1] == pytest.approx(float(logp[1, 0, captions[1, 1]]))  # one word, no <end>
    noisy = logits.clone()
    noisy[1, 1:] = 1e3 * torch.randn(3, len(vocab))  # what the model says after the sample ends
    assert torch.equal(sequence_log_probs(noisy, captions, banned, v.pad_id)[1], got[1])


def test_end_enters_the_reward_of_finished_samples_only(vocab: Vocab, records) -> None:
    """A fragment cut off by max_len misses the n-grams that end the references."""
    with_end = SelfCritical(vocab, records, SCSTConfig(), max_len=8)
    finished, cut = hyp(vocab, "a brown dog runs"), hyp(vocab, "a brown dog runs", False)
    assert with_end.words(finished)[-1] == "<end>" and "<end>" not in with_end.words(cut)
    r_finished, r_cut = with_end.rewards([finished, cut], [0, 0]).tolist()
    assert r_finished > r_cut > 0
    without = SelfCritical(vocab, records, SCSTConfig(end_in_reward=False), max_len=8)
    assert without.rewards([finished, cut], [0, 0]).tolist()[0] == pytest.approx(
        without.rewards([cut], [0]).item()
    )


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_loss_is_minus_advantage_times_sample_log_prob(
    vocab: Vocab, records, monkeypatch: pytest.MonkeyPatch, baseline: str
) -> None:
    """Two images (records 2 and 0, in that order) of two samples each: every sample is scored
    against its own image's references and given that image's features."""
    model = tiny_model(vocab)
    config = SCSTConfig(samples=2, baseline=baseline, dropout=False)
    objective = SelfCritical(vocab, records, config, max_len=8)
    samples = [hyp(vocab, "the red car"), hyp(vocab, "a red car is parked"),  # image 2
               hyp(vocab, "a brown dog runs"), hyp(vocab, "a dog runs on the grass")]  # image 0  # fmt: skip
    greedy = [hyp(vocab, "a red car"), hyp(vocab, "a dog")]
    modes: list[bool] = []
    scripted(monkeypatch, samples, greedy, modes)
    batch = batch_of([2, 0])
    out = objective(model, batch, features=True)
    loss = float(out.loss.detach())

    rewards = objective.rewards(samples, [2, 2, 0, 0]).view(2, 2)
    swapped = objective.rewards(samples, [0, 0, 2, 2])
    assert (rewards.reshape(-1) > swapped).all()  # each is about its own image, not the other
    if baseline == "mean":
        base = mean_of_others(rewards)
    else:
        base = objective.rewards(greedy, [2, 0])[:, None].expand(2, 2)
        assert modes == [False]  # the greedy caption of the evaluated policy: eval mode
    logp = log_probs(model, objective, batch["inputs"], samples, owners=[0, 0, 1, 1])
    want = -((rewards - base).reshape(-1) * logp).mean()
    assert loss == pytest.approx(float(want), rel=1e-5)
    assert out.weight == 4
    assert out.logs["scst_reward"] == pytest.approx(float(rewards.mean()))
    assert out.logs["scst_baseline"] == pytest.approx(float(base.mean()))
    assert out.logs["scst_distinct"] == 1.0
    if baseline == "greedy":
        assert out.logs["scst_greedy_reward"] == pytest.approx(float(base[:, 0].mean()))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("attention", ["none", "soft", "topdown"])
def test_without_dropout_the_loss_scores_what_the_sampler_drew(
    vocab: Vocab, records, monkeypatch: pytest.MonkeyPatch, cell: str, attention: str
) -> None:
    """dropout=false: the log-prob pass gives each sample the log-probability the sampler drew
    it with, although the model has dropout and the trainer put it in train mode; for every
    cell, pooled or attending (and then the loss reaches the attention's weights)."""
    model = tiny_model(vocab, dropout=0.5, cell=cell, attention=attention)
    objective = SelfCritical(vocab, records, SCSTConfig(samples=3), max_len=8)
    drawn = []
    real = scst_module.decode

    def recording_decode(decoder, features, config, **ids):
        hyps = real(decoder, features, config, **ids)
        if config.strategy == "sample":
            drawn.extend(h[0] for h in hyps)
        return hyps

    monkeypatch.setattr(scst_module, "decode", recording_decode)
    batch = batch_of([0, 1], grid=attention != "none")
    out = objective(model, batch, features=True)
    assert len(drawn) == 6  # 2 images x 3 samples, drawn through decoding.decode
    out.loss.backward()
    if attention != "none":
        assert model.decoder.attention.score.weight.grad.abs().sum() > 0
    model.eval()
    logp = log_probs(model, objective, batch["inputs"], drawn, owners=[0, 0, 0, 1, 1, 1])
    assert logp.tolist() == pytest.approx([h.score for h in drawn], abs=1e-4)


def test_a_trainable_encoder_updates_its_batchnorm_once_per_step(vocab: Vocab, records) -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    cfg = ModelConfig(decoder=DecoderConfig(embed_dim=8, hidden_size=16, dropout=0.0))
    model = CaptionModel(Encoder(backbone, 4), PooledDecoder(4, len(vocab), cfg.decoder), cfg)
    model.set_encoder_trainable(None)
    model.train()
    objective = SelfCritical(vocab, records, SCSTConfig(samples=2), max_len=6)
    batch = {"inputs": torch.randn(2, 3, 8, 8), "index": torch.tensor([0, 1])}
    out = objective(model, batch, features=False)
    assert int(backbone[1].num_batches_tracked) == 1  # the log-prob pass only, as in XE
    out.loss.backward()
    assert backbone[0].weight.grad is not None  # the encoder learns from the reward


def test_one_step_raises_the_better_sample_and_lowers_the_worse(
    vocab: Vocab, records, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(vocab)
    objective = SelfCritical(vocab, records, SCSTConfig(samples=2, dropout=False), max_len=8)
    good, bad = hyp(vocab, "a brown dog runs"), hyp(vocab, "the red car")  # image 0: a dog
    scripted(monkeypatch, [good, bad])
    batch = batch_of([0])
    r_good, r_bad = objective.rewards([good, bad], [0, 0]).tolist()
    assert r_good > r_bad  # so the advantages are +(r_good - r_bad) and -(r_good - r_bad)

    before = log_probs(model, objective, batch["inputs"], [good, bad])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    objective(model, batch, features=True).loss.backward()
    optimizer.step()
    after = log_probs(model, objective, batch["inputs"], [good, bad])
    assert after[0] > before[0] and after[1] < before[1]


def test_samples_are_drawn_from_the_global_rng_for_exact_resume(vocab: Vocab, records) -> None:
    model = tiny_model(vocab, dropout=0.3)
    model.decoder.eval()
    objective = SelfCritical(vocab, records, SCSTConfig(samples=4, dropout=True), max_len=8)
    batch = batch_of([0, 1, 2])
    torch.manual_seed(5)
    a = objective(model, batch, features=True)
    torch.manual_seed(5)
    b = objective(model, batch, features=True)
    c = objective(model, batch, features=True)  # the stream moved on
    assert torch.equal(a.loss, b.loss) and a.logs == b.logs
    assert a.logs != c.logs
    assert not model.decoder.training  # sampled in train mode, left as it was


# ---------------------------------------------------------------------------------------------
# the learning rate's warm-up at the switch (trainer.scst.warmup_steps)


def test_warmup_ramps_the_first_scst_epochs_first_steps_only(vocab: Vocab, records) -> None:
    config = SCSTConfig(start_epoch=2, warmup_steps=4)
    switch = ScstSwitch(
        config, teacher_forcing=None, vocab=vocab, records=records, default_max_len=8
    )
    assert [switch.lr_scale(2, b) for b in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert switch.lr_scale(1, 0) == 1.0  # teacher forcing
    assert switch.lr_scale(3, 0) == 1.0  # the second SCST epoch
    plain = ScstSwitch(SCSTConfig(start_epoch=2), None, vocab, records, 8)
    assert plain.lr_scale(2, 0) == 1.0


def test_a_scaled_step_takes_that_share_of_the_rate_and_keeps_the_rate() -> None:
    """SGD moves a weight by exactly lr * scale * grad; the group's rate, which the schedule and
    checkpoints read, is the unscaled one after the step."""
    weight = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    opt = Optimization(optimizer, None, None, scaler, None)
    weight.grad = torch.tensor([1.0, -2.0, 4.0])
    opt.step(nn.Linear(1, 1), [weight], grad_clip=None, lr_scale=0.25)
    # 0.5 * 0.25 = 0.125 and the gradients are powers of two: every product is exact
    assert torch.equal(weight.detach(), torch.tensor([-0.125, 0.25, -0.5]))
    assert optimizer.param_groups[0]["lr"] == 0.5 and weight.grad is None


# ---------------------------------------------------------------------------------------------
# in a training run (the tiny demo: 24 train images, 3 batches of 8 per epoch)

# teacher forcing in epoch 1, SCST in epochs 2 and 3 at its own rate; images in the loop
SWITCH = [
    "trainer.max_epochs=3",
    "trainer.scst.start_epoch=1",
    "trainer.scst.samples=3",
    "trainer.scst.lr=5e-4",
    "trainer.scst.max_len=8",
    "trainer.monitor=val_cider_d",
    "trainer.patience=null",
    "scheduler=cosine",
    "scheduler.T_max=3",
]


@pytest.fixture(scope="module")
def switched(make_cfg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run that switches to SCST after one epoch."""
    out = tmp_path_factory.mktemp("switched")
    train(make_cfg(*SWITCH), out)
    return out


@pytest.mark.slow
def test_a_run_switches_to_scst_and_logs_its_figures(switched: Path) -> None:
    rows = read_metrics(switched / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert not any(k.startswith("scst_") for k in rows[0])
    for r in rows[1:]:
        assert 0.0 <= r["scst_reward"] <= 10.0 and 0.0 <= r["scst_baseline"] <= 10.0
        assert 0.0 < r["scst_distinct"] <= 1.0 and 1.0 <= r["scst_sample_len"] <= 8.0
    # trainer.scst.lr at the switch, and the (cosine) schedule goes on from it
    assert rows[0]["lr"] != 5e-4 and rows[1]["lr"] == 5e-4 and rows[2]["lr"] < 5e-4
    for r in rows:
        assert r["val_cider_d"] >= 0.0 and 0.0 < r["val_distinct"] <= 1.0
    last = load_checkpoint(switched / "last.pt")
    assert last["global_step"] == 9  # 3 caption batches, then 2 x 3 batches of 8 images
    best = load_checkpoint(switched / "best.pt")  # selected by trainer.monitor
    assert best["metrics"]["val_cider_d"] == max(r["val_cider_d"] for r in rows)


@pytest.mark.slow
def test_resume_in_the_first_scst_epoch_equals_uninterrupted(
    make_cfg, switched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupt_at(monkeypatch, step=4)  # one batch into epoch 2, the first SCST epoch
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(*SWITCH), tmp_path / "a")
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "a")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 1)
    train(make_cfg(*SWITCH, f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert_same_run_end(tmp_path / "b", switched)


@pytest.mark.slow
def test_resume_at_the_switch_equals_uninterrupted(
    make_cfg, switched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after the teacher-forced epoch (validated and saved): the resumed run makes the
    switch itself."""
    original = Trainer._should_stop

    def should_stop(self: Trainer, stop) -> bool:
        p = self.progress
        if (p.epoch, p.batch_in_epoch) == (1, 0) and stop.signum is None:
            signal.raise_signal(signal.SIGINT)
        return original(self, stop)

    monkeypatch.setattr(Trainer, "_should_stop", should_stop)
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(*SWITCH), tmp_path / "a")
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "a")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["global_step"]) == (1, 0, 3)
    train(make_cfg(*SWITCH, f"resume={tmp_path / 'a' / 'last.pt'}"), tmp_path / "b")
    assert_same_run_end(tmp_path / "b", switched)


@pytest.mark.slow
def test_a_warmed_up_switch_resumes_mid_warmup_as_uninterrupted(
    make_cfg, switched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm-up changes the run (its first SCST steps are smaller) and, being a function of
    the counters, continues exactly after a resume between its steps."""
    warm = [*SWITCH, "trainer.scst.warmup_steps=3"]
    train(make_cfg(*warm), tmp_path / "ref")
    got = load_checkpoint(tmp_path / "ref" / "last.pt")["model"]
    plain = load_checkpoint(switched / "last.pt")["model"]
    assert any(not torch.equal(got[k], plain[k]) for k in got)
    rows = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert rows[1]["lr"] == 5e-4  # the logged rate is the schedule's, not the warmed one
    interrupt_at(monkeypatch, step=4)  # the first of the 3 warm-up steps is taken
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(*warm), tmp_path / "a")
    monkeypatch.undo()
    train(make_cfg(*warm, f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert_same_run_end(tmp_path / "b", tmp_path / "ref")


@pytest.mark.slow
def test_scst_from_the_feature_cache(make_cfg, tmp_path: Path) -> None:
    frozen = ["model.encoder.freeze=true", "trainer.cache_features=true"]
    train(make_cfg(*frozen, *SWITCH[1:5], "trainer.max_epochs=2"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "scst_reward" in rows[1] and "scst_reward" not in rows[0]


# ---------------------------------------------------------------------------------------------
# init_from: a new run from a trained model's weights


@pytest.fixture(scope="module")
def trained(make_cfg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    train(make_cfg("trainer.max_epochs=1"), out)
    return out / "best.pt"


@pytest.mark.slow
def test_init_from_loads_the_weights_only(make_cfg, trained: Path, tmp_path: Path) -> None:
    config = parse_train_config(make_cfg(f"init_from={trained}"))
    trainer = Trainer(config, tmp_path / "run", setup_runtime("cpu"))
    assert_same_tensors(
        {k: v.cpu() for k, v in trainer.model.state_dict().items()},
        load_checkpoint(trained)["model"],
    )
    assert trainer.progress.epoch == 0 and trainer.progress.global_step == 0
    assert trainer.progress.best_score == -1.0
    assert trainer.optimizer.state_dict()["state"] == {}  # a fresh optimizer


@pytest.mark.slow
def test_scst_from_the_start_of_a_run_from_a_trained_model(
    make_cfg, trained: Path, tmp_path: Path
) -> None:
    train(make_cfg(f"init_from={trained}", *SWITCH[2:5], "trainer.scst.start_epoch=0",
                   "trainer.max_epochs=1"), tmp_path / "run")  # fmt: skip
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "scst_reward" in row and row["step"] == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.min_freq=40", r"^init_from: .*best\.pt has a vocabulary of \d+ words, this run's"),
        (
            "model.decoder.hidden_size=24",
            r"^init_from: .*model\.decoder\.hidden_size=32, this run ",
        ),
        (  # the demo's builtin encoder against torchvision's ResNet-18
            "model.encoder.source=torchvision model.encoder.name=resnet18",
            r"^init_from: .*model\.encoder\.source=builtin, this run model\.encoder\.source=torch",
        ),
    ],
)
@pytest.mark.slow
def test_init_from_another_model_is_one_clear_error(
    make_cfg, trained: Path, tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(UserError, match=message) as info:
        train(make_cfg(f"init_from={trained}", *override.split()), tmp_path / "run")
    assert "\n" not in str(info.value)


def test_init_from_a_file_that_is_no_checkpoint(make_cfg, tmp_path: Path) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"^init_from: .*notes\.pt: refused to load"):
        train(make_cfg(f"init_from={bad}"), tmp_path / "run")
