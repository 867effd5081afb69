"""End-to-end training on the tiny demo: run files, exact resume, the feature cache, DDP, SIGINT."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from captioner.checkpoint import load_checkpoint, model_from_checkpoint
from captioner.configs.hydra import compose
from captioner.configs.model import ModelConfig
from captioner.configs.training import parse_train_config
from captioner.errors import UserError
from captioner.models.encoders import create_encoder
from captioner.runtime import seed_everything
from captioner.training import objectives
from captioner.training.runlog import read_metrics
from captioner.training.setup import check_resume, saved_train_config
from captioner.training.train import Trainer, TrainingInterrupted, train
from captioner.vocab import Vocab

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_bleu4", "seconds"}
# a schedule independent of max_epochs, whose state (last_epoch) a resume must restore
SCHEDULE = ["scheduler=cosine", "scheduler.T_max=3"]


@pytest.fixture(scope="module")
def reference(make_cfg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run with a trainable encoder."""
    out = tmp_path_factory.mktemp("reference")
    train(make_cfg(*SCHEDULE), out)
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_time(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "seconds"}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_run_end(run: Path, ref: Path) -> None:
    got, want = load_checkpoint(run / "last.pt"), load_checkpoint(ref / "last.pt")
    assert_same_tensors(got["model"], want["model"])
    for (k, sa), sb in zip(
        got["optimizer"]["state"].items(), want["optimizer"]["state"].values(), strict=True
    ):
        assert_same_tensors(
            {f"{k}.{n}": v for n, v in sa.items()}, {f"{k}.{n}": v for n, v in sb.items()}
        )
    assert (got["epoch"], got["global_step"]) == (want["epoch"], want["global_step"])
    assert [without_time(m) for m in metrics(run)] == [without_time(m) for m in metrics(ref)]


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Deliver a real SIGINT to this process right after global step ``step``."""
    original = Trainer._should_stop

    def should_stop(self: Trainer, stop) -> bool:
        if self.progress.global_step == step and stop.signum is None:
            signal.raise_signal(signal.SIGINT)
        return original(self, stop)

    monkeypatch.setattr(Trainer, "_should_stop", should_stop)


# ---------------------------------------------------------------------------------------------
# a run's files


@pytest.mark.slow
def test_run_directory(reference: Path) -> None:
    assert {"best.pt", "last.pt", "vocab.json", "metrics.jsonl"} <= {
        p.name for p in reference.iterdir()
    }
    rows = metrics(reference)
    assert [m["epoch"] for m in rows] == [1, 2]
    for m in rows:
        assert m.keys() >= METRIC_KEYS
        assert 0.0 <= m["val_bleu4"] <= 1.0 and m["seconds"] >= 0
        assert m["train_loss"] > 0 and m["val_loss"] > 0
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # it learns something
    assert rows[1]["lr"] < rows[0]["lr"]  # cosine

    last, best = load_checkpoint(reference / "last.pt"), load_checkpoint(reference / "best.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["global_step"]) == (2, 0, 6)
    assert "optimizer" not in best and best["metrics"]["val_bleu4"] == max(
        m["val_bleu4"] for m in rows
    )
    model, vocab, pre = model_from_checkpoint(best)
    assert vocab == Vocab.load(reference / "vocab.json")
    assert (pre.resize, pre.crop) == (32, 32)
    assert not model.training


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.slow
def test_resume_mid_epoch_equals_uninterrupted(
    make_cfg, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, step=4)  # 3 batches per epoch: one batch into epoch 2
    with pytest.raises(TrainingInterrupted) as info:
        train(make_cfg(*SCHEDULE), tmp_path / "a")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is handler  # the trainer's handler is gone again
    assert info.value.checkpoint == tmp_path / "a" / "last.pt"
    assert "resume=" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "a")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["global_step"]) == (1, 1, 4)
    assert len(metrics(tmp_path / "a")) == 1

    train(make_cfg(*SCHEDULE, f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert_same_run_end(tmp_path / "b", reference)


@pytest.mark.slow
def test_resume_at_epoch_boundary_equals_uninterrupted(
    make_cfg, reference: Path, tmp_path: Path
) -> None:
    train(make_cfg(*SCHEDULE, "trainer.max_epochs=1"), tmp_path / "a")
    resume = f"resume={tmp_path / 'a' / 'last.pt'}"
    train(make_cfg(*SCHEDULE, "trainer.max_epochs=2", resume), tmp_path / "b")
    assert_same_run_end(tmp_path / "b", reference)


# ---------------------------------------------------------------------------------------------
# the weight average (trainer.ema_decay) and the validation decoding (trainer.val_decode)

EMA = "trainer.ema_decay=0.9"


@pytest.fixture(scope="module")
def reference_ema(make_cfg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run again, with a weight average."""
    out = tmp_path_factory.mktemp("reference_ema")
    train(make_cfg(*SCHEDULE, EMA), out)
    return out


@pytest.mark.slow
def test_ema_changes_what_is_validated_not_the_training(
    reference_ema: Path, reference: Path
) -> None:
    got, want = load_checkpoint(reference_ema / "last.pt"), load_checkpoint(reference / "last.pt")
    assert_same_tensors(got["model"], want["model"])  # the optimizer saw the same weights
    assert want["ema"] is None and got["ema"]["updates"] == 6
    averages = got["ema"]["averages"]
    assert any(not torch.equal(averages[k], got["model"][k]) for k in averages)
    rows, ref_rows = metrics(reference_ema), metrics(reference)
    assert [m["train_loss"] for m in rows] == [m["train_loss"] for m in ref_rows]
    assert [m["val_loss"] for m in rows] != [m["val_loss"] for m in ref_rows]


@pytest.mark.slow
def test_resume_mid_epoch_continues_the_weight_average(
    make_cfg, reference_ema: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupt_at(monkeypatch, step=4)
    with pytest.raises(TrainingInterrupted):
        train(make_cfg(*SCHEDULE, EMA), tmp_path / "a")
    monkeypatch.undo()
    train(make_cfg(*SCHEDULE, EMA, f"resume={tmp_path / 'a'}"), tmp_path / "b")
    assert_same_run_end(tmp_path / "b", reference_ema)
    got, want = (
        load_checkpoint(tmp_path / "b" / "last.pt"),
        load_checkpoint(reference_ema / "last.pt"),
    )
    assert got["ema"]["updates"] == want["ema"]["updates"]
    assert_same_tensors(got["ema"]["averages"], want["ema"]["averages"])


@pytest.mark.slow
def test_best_pt_is_the_validated_model(make_cfg, tmp_path: Path) -> None:
    """With a weight average and beam validation, evaluating best.pt the same way on val gives
    exactly the val BLEU that selected it: best.pt holds the averaged weights that were scored."""
    from captioner.evaluation.evaluate import evaluate

    beam = ["trainer.val_decode.strategy=beam", "trainer.val_decode.beam_size=2"]
    train(make_cfg(EMA, *beam, "trainer.max_epochs=1"), tmp_path / "run")
    last, best = (
        load_checkpoint(tmp_path / "run" / "last.pt"),
        load_checkpoint(tmp_path / "run" / "best.pt"),
    )
    averages = last["ema"]["averages"]
    assert_same_tensors({k: best["model"][k] for k in averages}, averages)
    assert any(not torch.equal(averages[k], last["model"][k]) for k in averages)

    overrides = ["split=val", "device=cpu", "coco_metrics=false", "batch_size=8"]
    decode = ["decode.strategy=beam", "decode.beam_size=2"]
    cfg = compose("evaluate", [f"checkpoint={tmp_path / 'run' / 'best.pt'}", *overrides, *decode])
    evaluate(cfg, tmp_path / "eval")
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["bleu4"] == pytest.approx(metrics(tmp_path / "run")[0]["val_bleu4"], abs=1e-9)
    assert scored["bleu1"] == pytest.approx(metrics(tmp_path / "run")[0]["val_bleu1"], abs=1e-9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.val_decode.strategy=nope", r"trainer\.val_decode: strategy must be one of"),
        ("trainer.val_decode.beam_size=0", r"trainer\.val_decode: beam_size must be >= 1"),
        ("trainer.ema_decay=1.0", r"trainer\.ema_decay must be in \(0, 1\)"),
    ],
)
def test_bad_validation_settings_fail_before_training(
    make_cfg, tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        train(make_cfg(override), tmp_path)
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.slow
def test_resume_refuses_best_pt(make_cfg, reference: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="last.pt"):
        train(make_cfg(f"resume={reference / 'best.pt'}"), tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# frozen encoder and the feature cache


def _initial_encoder(cfg) -> dict[str, torch.Tensor]:
    """The encoder a run starts from: the trainer seeds, then builds the encoder first."""
    seed_everything(int(cfg.seed))
    from omegaconf import OmegaConf

    enc, _ = create_encoder(ModelConfig.from_dict(OmegaConf.to_container(cfg.model)).encoder)
    return {f"encoder.{k}": v for k, v in enc.state_dict().items()}


@pytest.mark.slow
def test_frozen_encoder_unchanged_by_training(make_cfg, reference: Path, tmp_path: Path) -> None:
    cfg = make_cfg(
        "model.encoder.freeze=true", "trainer.cache_features=false", "trainer.max_epochs=1"
    )
    train(cfg, tmp_path)
    initial = _initial_encoder(cfg)
    assert any(k.endswith("running_var") for k in initial)
    final = load_checkpoint(tmp_path / "last.pt")["model"]
    assert_same_tensors({k: final[k] for k in initial}, initial)
    # the check has teeth: a trainable encoder (the reference run) does move, BN stats included
    moved = load_checkpoint(reference / "last.pt")["model"]
    assert not torch.equal(
        moved["encoder.backbone.bn1.running_mean"], initial["encoder.backbone.bn1.running_mean"]
    )


@pytest.mark.slow
def test_feature_cache_reuse_and_invalidation(
    make_cfg, tmp_path: Path, encoder_calls: dict[str, int]
) -> None:
    cache = tmp_path / "cache"
    base = ["model.encoder.freeze=true", "trainer.max_epochs=1", f"trainer.cache_dir={cache}"]
    calls = encoder_calls

    train(make_cfg(*base), tmp_path / "r1")
    entries = sorted(p for p in cache.iterdir())
    assert len(entries) == 2  # train and val images
    metas = [json.loads((p / "meta.json").read_text()) for p in entries]
    assert sorted(m["num_images"] for m in metas) == [8, 24]
    assert calls["n"] > 0
    stamps = {p: (p / "features.npy").stat().st_mtime_ns for p in entries}

    calls["n"] = 0
    train(make_cfg(*base), tmp_path / "r2")
    assert calls["n"] == 0, "a cached run ran the encoder"
    assert sorted(cache.iterdir()) == entries
    assert {p: (p / "features.npy").stat().st_mtime_ns for p in entries} == stamps
    # a cache hit and a cache miss train the same model (building the cache uses no global RNG)
    assert_same_tensors(
        load_checkpoint(tmp_path / "r1" / "last.pt")["model"],
        load_checkpoint(tmp_path / "r2" / "last.pt")["model"],
    )

    changes = ["seed=1", "model.encoder.crop=28", "model.encoder.flip_average=true"]
    for n, change in enumerate(changes, start=3):
        calls["n"] = 0
        train(make_cfg(*base, change), tmp_path / f"r{n}")
        assert calls["n"] > 0, change
        assert len(list(cache.iterdir())) == 2 * (n - 1), change  # two NEW entries

    # an entry whose meta names another key is rebuilt, never trusted
    meta_file = entries[0] / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "key": "other"}))
    calls["n"] = 0
    train(make_cfg(*base), tmp_path / "r6")
    assert calls["n"] > 0
    assert json.loads(meta_file.read_text())["key"] != "other"


@pytest.mark.slow
def test_cached_and_in_loop_training_agree(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    losses: dict[str, list[float]] = {"auto": [], "false": []}
    loss_fn = objectives.caption_loss
    base = ["model.encoder.freeze=true", "trainer.max_epochs=1", "model.decoder.dropout=0.0"]
    for mode, seen in losses.items():

        def recording_loss(*args, seen=seen, **kwargs):
            loss = loss_fn(*args, **kwargs)
            seen.append(float(loss.detach()))
            return loss

        monkeypatch.setattr(objectives, "caption_loss", recording_loss)
        train(make_cfg(*base, f"trainer.cache_features={mode}"), tmp_path / mode)
    assert losses["auto"][0] == pytest.approx(losses["false"][0], rel=1e-3)  # float16 cache
    cached, in_loop = metrics(tmp_path / "auto")[0], metrics(tmp_path / "false")[0]
    assert cached["train_loss"] == pytest.approx(in_loop["train_loss"], rel=1e-2)
    assert cached["val_loss"] == pytest.approx(in_loop["val_loss"], rel=1e-2)


def test_cache_features_true_needs_frozen_encoder(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("model.encoder.freeze=false", "trainer.cache_features=true")
    with pytest.raises(UserError, match="cache_features=true needs a frozen encoder"):
        train(cfg, tmp_path)


# ---------------------------------------------------------------------------------------------
# subprocesses: DDP and a real SIGINT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        [],
        # a GRU attending over the trainable encoder's 2 x 2 grid
        [
            "model.decoder.cell=gru",
            "model.decoder.attention=soft",
            "model.encoder.resize=64",
            "model.encoder.crop=64",
        ],
        # the top-down decoder's two LSTMs over the same grid
        [
            "model.decoder.attention=topdown",
            "model.encoder.resize=64",
            "model.encoder.crop=64",
        ],
    ],  # fmt: skip
    ids=["lstm", "gru-attention", "lstm-topdown"],
)
def test_ddp_two_processes_gloo(tiny_demo: Path, tmp_path: Path, variant: list[str]) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "captioner", "train",
        # epoch 2 self-critical: each rank samples for its own shard of the images
        *tiny_overrides(tiny_demo, tmp_path / "cache", **{"trainer.max_epochs": 2}),
        "trainer.scst.start_epoch=1", "trainer.scst.samples=2", "trainer.scst.max_len=6",
        *variant, f"hydra.run.dir={run}",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(run)
    assert len(rows) == 2 and "scst_reward" in rows[1]  # written once per epoch, by rank 0
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
    ckpt = load_checkpoint(run / "last.pt")
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    model_from_checkpoint(ckpt)
    assert proc.stdout.count("best val_bleu4") == 1  # only rank 0 prints the result


@pytest.mark.slow
def test_sigint_saves_and_resumes(tiny_demo: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_demo, tmp_path / "cache", **{"trainer.patience": "null"})
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    cmd = [sys.executable, "-m", "captioner", "train", *overrides]
    with open(tmp_path / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(
            [*cmd, "trainer.max_epochs=50", f"hydra.run.dir={run}"],
            cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not (run / "metrics.jsonl").is_file() or not metrics(run):
                assert proc.poll() is None and time.monotonic() < deadline, "no epoch finished"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130
        finally:
            proc.kill()
        err.seek(0)
        stderr = err.read()
    assert any("resume" in line for line in stderr.splitlines()), stderr[-2000:]
    assert "Traceback" not in stderr
    ckpt = load_checkpoint(run / "last.pt")
    epochs = ckpt["epoch"] + 1  # finish the epoch it was in (or one more at a boundary)

    done = subprocess.run(
        [*cmd, f"trainer.max_epochs={epochs}", f"resume={run}", f"hydra.run.dir={resumed}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["epoch"] for m in metrics(resumed)] == list(range(1, epochs + 1))
    assert load_checkpoint(resumed / "last.pt")["global_step"] == 3 * epochs
    # what the terminal shows (conf/hydra/default.yaml): the time of day, then the message; where
    # the run goes and how far it may go, and each epoch as N/M
    console = done.stderr.splitlines()
    start = rf"\[\d\d:\d\d:\d\d\] training into {re.escape(str(resumed))}: epochs \d+ to {epochs} "
    assert any(re.match(start, line) for line in console), done.stderr[-2000:]
    last = rf"\[\d\d:\d\d:\d\d\] epoch {epochs}/{epochs}: train_loss "
    assert any(re.match(last, line) for line in console), done.stderr[-2000:]


@pytest.mark.slow
def test_resume_after_kill_9_loses_at_most_the_current_epoch(
    make_cfg, tiny_demo: Path, tmp_path: Path
) -> None:
    """SIGKILL leaves no chance to save: the run resumes from the last epoch's last.pt, a torn
    metrics line (a crash mid-write) is dropped, and it ends as an uninterrupted run would."""
    # a schedule that does not depend on max_epochs, which the killed run sets higher
    overrides = [*tiny_overrides(tiny_demo, tmp_path / "cache"), *SCHEDULE, "trainer.patience=null"]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    cmd = [sys.executable, "-m", "captioner", "train", *overrides]
    proc = subprocess.Popen(
        [*cmd, "trainer.max_epochs=200", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(run / "metrics.jsonl")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "no epochs finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    with open(run / "metrics.jsonl", "a") as f:  # what a crash mid-write leaves behind
        f.write('{"epoch": 99, "train_loss": 0.')
    done_epochs = load_checkpoint(run / "last.pt")["epoch"]
    assert done_epochs >= 1
    epochs = done_epochs + 1

    done = subprocess.run(
        [*cmd, f"trainer.max_epochs={epochs}", f"resume={run}", f"hydra.run.dir={resumed}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    reference = make_cfg(*SCHEDULE, "trainer.patience=null", f"trainer.max_epochs={epochs}")
    train(reference, tmp_path / "ref")
    assert_same_run_end(resumed, tmp_path / "ref")


@pytest.mark.slow
def test_another_objective_plugs_in_without_touching_the_loop(make_cfg, tmp_path: Path) -> None:
    """make_objective(trainer) gets the built trainer; its loss is what is minimised and its
    logs are averaged into metrics.jsonl."""
    calls = {"n": 0}

    class Halved:
        def __init__(self, trainer: Trainer):
            self.inner = objectives.TeacherForcing(trainer.vocab.pad_id)

        def __call__(self, model, batch, *, features):
            calls["n"] += 1
            out = self.inner(model, batch, features=features)
            return objectives.StepLoss(
                out.loss / 2, out.weight, {"doubled": 2 * float(out.loss.detach())}
            )

    train(make_cfg("trainer.max_epochs=1"), tmp_path / "run", make_objective=Halved)
    (record,) = metrics(tmp_path / "run")
    assert calls["n"] == 3  # every training batch, and nothing else
    assert record["doubled"] == pytest.approx(4 * record["train_loss"])
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert Path(saved["train_config"]["trainer"]["cache_dir"]).is_absolute()


# ---------------------------------------------------------------------------------------------
# what a resume may change


def saved_checkpoint(make_cfg, *overrides: str) -> dict:
    """What check_resume reads of a last.pt whose run was composed with ``overrides``."""
    config = parse_train_config(make_cfg(*overrides))
    return {"model_config": config.model.to_dict(), "train_config": saved_train_config(config)}


def test_resume_refuses_another_architecture_and_changed_settings(make_cfg, caplog) -> None:
    base = make_cfg("scheduler=cosine")
    ckpt, where = saved_checkpoint(make_cfg, "scheduler=cosine"), Path("runs/base/last.pt")

    def check(*overrides: str) -> None:
        cfg = make_cfg("scheduler=cosine", "resume=runs/base", *overrides)
        check_resume(parse_train_config(cfg), ckpt, where)

    with pytest.raises(UserError) as info:
        check("model.decoder.hidden_size=512", "optim.lr=0.5")
    assert str(info.value).startswith(
        "resume: runs/base/last.pt has model.decoder.hidden_size=32, this run "
        "model.decoder.hidden_size=512"
    )
    with pytest.raises(UserError) as info:
        check("optim.lr=0.5", "model.decoder.dropout=0.3")
    message = str(info.value)
    assert "\n" not in message and message.startswith("resume: runs/base/last.pt was trained with")
    assert f"optim.lr={base.optim.lr}" in message and "optim.lr=0.5" in message
    dropout = base.model.decoder.dropout
    assert f"model.decoder.dropout={dropout}" in message and "model.decoder.dropout=0.3" in message
    # the run's length, its early stopping and where it runs are applied
    check("trainer.patience=null", "data.num_workers=1", "device=cpu")
    assert not caplog.text
    # a cosine schedule's T_max follows trainer.max_epochs, but the schedule goes on as saved
    with caplog.at_level(logging.WARNING):
        check("trainer.max_epochs=9")
    assert f"scheduler.T_max={base.trainer.max_epochs}" in caplog.text
    # one that cannot step past its length (OneCycleLR's total_steps) is refused
    one_cycle = (
        "scheduler=cosine",
        "scheduler._target_=torch.optim.lr_scheduler.OneCycleLR",
        "~scheduler.T_max",
        "~scheduler.eta_min",
        "+scheduler.max_lr=0.001",
        "+scheduler.total_steps=${trainer.max_epochs}",
    )
    ckpt = saved_checkpoint(make_cfg, *one_cycle)
    longer = make_cfg(*one_cycle, "resume=runs/base", "trainer.max_epochs=9")
    with pytest.raises(UserError, match=r"scheduler\.total_steps=2, which follows a changed"):
        check_resume(parse_train_config(longer), ckpt, where)
    shorter = make_cfg(*one_cycle, "resume=runs/base", "trainer.max_epochs=1")
    check_resume(parse_train_config(shorter), ckpt, where)  # stops early: allowed


@pytest.mark.slow
def test_resume_with_another_architecture_fails_before_training(
    make_cfg, reference: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=r"model\.decoder\.hidden_size=64"):
        train(make_cfg(*SCHEDULE, f"resume={reference}", "model.decoder.hidden_size=64"), tmp_path)
    assert not list(tmp_path.iterdir())
