"""Tests for captioner.models.ensemble: several captioners decoded as one (the mean of their word
probabilities), its one-line refusals, and ``captioner evaluate ensemble=[...]``. The decoding
strategies over an ensemble (batched beam = per-image beam, beam 1 = greedy, scores = teacher
forcing) are tested with every other decoder in test_decoding.py."""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest
import torch
from torch import nn

from captioner.checkpoint import load_checkpoint
from captioner.configs.decode import DecodeConfig
from captioner.datasets.captions import pad_captions
from captioner.errors import UserError
from captioner.inference import decode_features
from captioner.models.captioning import CaptionModel
from captioner.models.ensemble import EnsembleDecoder, ensemble_model, mean_probability
from captioner.vocab import Vocab

V, FEAT = 12, 8
VOCAB = Vocab(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(4, V))])
# float32 log-softmax, logsumexp and exp of O(1) values: each is off by a few eps (1.2e-7)
# relative, so probabilities <= 1 agree to well under 1e-6
PROB_TOL = 1e-6


class Grid(nn.Module):
    """A timm-like CNN: ``forward_features`` gives a [B, FEAT, H/4, W/4] map."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, FEAT, 4, stride=4), nn.ReLU())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def member(attention: str, cell: str = "lstm", seed: int = 1) -> CaptionModel:
    """A tiny captioner: the encoder of every call is the same (helpers.tiny_model seeds it), the
    decoder's weights N(0, 1) from ``seed`` (peaked distributions, so members disagree)."""
    model = helpers.tiny_model(
        Grid, FEAT, V, {"name": "grid", "weights": None}, cell=cell, attention=attention
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def encoded(model: CaptionModel, n: int = 3) -> torch.Tensor:
    images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return model.encode(images)


@pytest.mark.parametrize("attention", ["none", "soft"])
def test_a_step_gives_the_mean_of_the_members_probabilities(attention: str) -> None:
    a, b = member(attention, "lstm", 1), member(attention, "gru", 2)
    ensemble = EnsembleDecoder([a.decoder, b.decoder])
    feats, tokens = encoded(a), torch.tensor([VOCAB.start_id] * 3)
    with torch.no_grad():
        out, state = ensemble.step(tokens, ensemble.init_state(feats))
        pa, sa = a.decoder.step(tokens, a.decoder.init_state(feats))
        pb, sb = b.decoder.step(tokens, b.decoder.init_state(feats))
    mean = (pa.softmax(-1) + pb.softmax(-1)) / 2
    assert not torch.allclose(pa.softmax(-1), pb.softmax(-1), atol=0.05)  # they disagree
    torch.testing.assert_close(out.exp(), mean, atol=PROB_TOL, rtol=0)
    assert len(state) == len(sa) + len(sb)  # the members' states side by side
    for got, want in zip(state, (*sa, *sb), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_mean_probability_of_identical_members_is_theirs() -> None:
    logp = torch.log_softmax(torch.randn(4, V), dim=-1)
    torch.testing.assert_close(mean_probability([logp, logp, logp]), logp)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_an_ensemble_of_one_decodes_as_its_member(strategy: str) -> None:
    model = member("soft")
    alone = ensemble_model([("a.pt", model, VOCAB, None)])
    feats = encoded(model)
    config = DecodeConfig(strategy=strategy, beam_size=3, max_len=8)
    want = decode_features(model, feats, VOCAB, config)
    got = decode_features(alone, feats, VOCAB, config)
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in want]
    for hs, ws in zip(got, want, strict=True):
        # the ensemble's log-softmax of a log-softmax: one more rounding per step of 8
        assert [h.score for h in hs] == pytest.approx([w.score for w in ws], abs=1e-4)


def test_teacher_forcing_gives_the_steps_mean_and_the_members_mean_maps() -> None:
    a, b = member("soft", "lstm", 1), member("topdown", "gru", 2)
    model = ensemble_model([("a.pt", a, VOCAB, None), ("b.pt", b, VOCAB, None)])
    feats = encoded(a, 2)
    captions, lengths = pad_captions([[1, 4, 5, 6, 2], [1, 7, 2]])
    with torch.no_grad():
        log_probs, alpha = model.decoder(feats, captions, lengths, return_attention=True)
        state = model.decoder.init_state(feats)
        for t in range(captions.shape[1] - 1):
            step, state = model.decoder.step(captions[:, t], state)
            torch.testing.assert_close(step, log_probs[:, t], atol=1e-5, rtol=0)
        _, alpha_a = a.decoder(feats, captions, lengths, return_attention=True)
        _, alpha_b = b.decoder(feats, captions, lengths, return_attention=True)
    torch.testing.assert_close(alpha, (alpha_a + alpha_b) / 2)
    maps = model.attention_maps(feats, captions, lengths)  # [n words, h, w] per caption
    assert [tuple(m.shape) for m in maps] == [(3, 4, 4), (1, 4, 4)]


def test_members_must_share_vocabulary_encoder_and_kind() -> None:
    a = member("soft")
    other_vocab = Vocab([*VOCAB.itos[:-1], "zebra"])
    with pytest.raises(UserError, match=r"ensemble: b\.pt has another vocabulary than a\.pt"):
        ensemble_model([("a.pt", a, VOCAB, None), ("b.pt", member("soft"), other_vocab, None)])
    retrained = member("soft")
    with torch.no_grad():
        next(retrained.encoder.parameters()).add_(0.01)
    with pytest.raises(UserError, match=r"ensemble: c\.pt's encoder differs from a\.pt's"):
        ensemble_model([("a.pt", a, VOCAB, None), ("c.pt", retrained, VOCAB, None)])
    pooled = member("none")  # the same weights, but pooled features: another encoder output
    with pytest.raises(UserError, match=r"d\.pt's encoder differs"):
        ensemble_model([("a.pt", a, VOCAB, None), ("d.pt", pooled, VOCAB, None)])
    with pytest.raises(UserError, match="all attend over the grid, or none does"):
        EnsembleDecoder([a.decoder, pooled.decoder])


def test_an_ensemble_keeps_the_first_models_mode_and_needs_a_member() -> None:
    a, b = member("soft", "lstm", 1), member("soft", "gru", 2)  # both in eval mode
    model = ensemble_model([("a.pt", a, VOCAB, None), ("b.pt", b, VOCAB, None)])
    assert not any(m.training for m in model.modules())
    with pytest.raises(UserError, match="ensemble: no member"):
        ensemble_model([])


# -- captioner evaluate ensemble=[...] and caption --ensemble --------------------------------------

# the word the biased member says with probability ~1 (a word of the demo's vocabulary)
WORD = "triangle"


def biased_copy(checkpoint: Path, out: Path) -> Path:
    """``checkpoint`` with the same encoder, whose decoder says WORD with probability ~1 at every
    step: in an ensemble of two, WORD's mean probability is >= 1/2 at every step, so greedy
    decoding says only WORD, to max_len (no member alone does: the proof the second one is read
    and averaged)."""
    ckpt = load_checkpoint(checkpoint)
    bias = ckpt["model"]["decoder.out.bias"]
    bias[ckpt["vocab"].index(WORD)] += 1e4
    torch.save(ckpt, out)
    return out


def test_evaluate_decodes_an_ensemble(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from test_evaluate import run_eval

    biased = biased_copy(tiny_checkpoint, tmp_path / "biased.pt")
    single = run_eval(tiny_checkpoint, tmp_path / "single")
    both = run_eval(tiny_checkpoint, tmp_path / "both", f"ensemble=[{biased}]", "decode.max_len=5")
    assert both["metrics"]["ensemble"] == [str(biased)] and single["metrics"]["ensemble"] == []
    assert any(r["caption"] != " ".join([WORD] * 5) for r in single["results"])
    assert all(r["caption"] == " ".join([WORD] * 5) for r in both["results"])
    twice = run_eval(tiny_checkpoint, tmp_path / "twice", f"ensemble=[{tiny_checkpoint}]")
    # a model with itself is that model: the mean of two equal distributions is the distribution
    assert twice["results"] == single["results"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("vocab", "has another vocabulary than"),
        ("encoder", "encoder differs from"),
    ],
)
def test_evaluate_refuses_a_mismatched_member_in_one_line(
    capsys: pytest.CaptureFixture[str],
    keep_logging: None,
    tiny_checkpoint: Path,
    tmp_path: Path,
    change: str,
    needle: str,
) -> None:
    from captioner.cli import main

    ckpt = load_checkpoint(tiny_checkpoint)
    if change == "vocab":
        ckpt["vocab"] = [*ckpt["vocab"][:-1], "zebra"]
    else:
        key = next(k for k in ckpt["model"] if k.startswith("encoder.") and "weight" in k)
        ckpt["model"][key] = ckpt["model"][key] + 0.01
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                f"checkpoint={tiny_checkpoint}",
                f"ensemble=[{other}]",
                f"hydra.run.dir={tmp_path / 'run'}",
                "device=cpu",
                "coco_metrics=false",
            ]
        )
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(other) in err[0]
