"""Validation's teacher-forced loss runs over a batch's captions a few at a time (bounded
logits at a large vocabulary) and gives the same val loss as one pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioner.configs.training import parse_train_config
from captioner.runtime import setup_runtime, teardown_runtime
from captioner.training import validation
from captioner.training.train import Trainer


def test_val_loss_in_parts_is_the_one_pass_loss(make_cfg, tmp_path: Path, monkeypatch) -> None:
    cfg = parse_train_config(make_cfg("data.batch_size=8"))
    rt = setup_runtime(cfg.device)
    try:
        trainer = Trainer(cfg, tmp_path / "run", rt)
        check_parts(trainer, monkeypatch)
    finally:
        teardown_runtime(rt)


def check_parts(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = trainer.model.decoder
    seen: list[int] = []
    original = type(decoder).forward

    def recording(self, features, captions, lengths, *args, **kwargs):
        seen.append(captions.shape[0])
        return original(self, features, captions, lengths, *args, **kwargs)

    monkeypatch.setattr(type(decoder), "forward", recording)
    whole = trainer.validate(0)[0]["val_loss"]  # 8 images x 5 captions < LOSS_CAPTIONS: one pass
    assert max(seen) == 40
    seen.clear()
    monkeypatch.setattr(validation, "LOSS_CAPTIONS", 3)
    parts = trainer.validate(0)[0]["val_loss"]
    assert max(seen) == 3
    # float32 means over ~40 captions' tokens, summed in another order: a few eps relative
    assert parts == pytest.approx(whole, rel=1e-5)
