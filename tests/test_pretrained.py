"""``captioner export`` and ``Captioner.from_pretrained``: a folder of safetensors + JSON that
gives the checkpoint's captions (float32 exactly, float16 within a stated tolerance), for every
decoder variant; every broken folder is one clear error."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
    save_checkpoint,
)
from captioner.cli import main
from captioner.configs.decode import DecodeConfig
from captioner.configs.model import DecoderConfig, EncoderConfig, ModelConfig
from captioner.errors import UserError
from captioner.inference import Captioner
from captioner.models.captioning import build_model
from captioner.pretrained import (
    CONFIG,
    FORMAT_VERSION,
    VOCAB,
    WEIGHTS,
    export_pretrained,
    load_pretrained,
    vocab_digest,
)
from captioner.training.setup import init_weights
from captioner.vocab import Vocab

CELLS, ATTENTION = ["lstm", "gru", "rnn"], ["none", "soft", "topdown"]
WORDS = ["a red circle", "a blue square on the left", "two green triangles", "a small cross"]
# float16 weights: the largest difference of any logit from the float32 model's, relative to the
# largest logit (float16 keeps 11 significant bits: each weight moves by at most 2^-11)
FP16_LOGIT_TOLERANCE = 1e-2


def images(d: Path, n: int = 4) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(arr, "RGB").save(d / f"img{i}.png")
        out.append(d / f"img{i}.png")
    return out


def variant_checkpoint(tmp_path: Path, cell: str = "lstm", attention: str = "none", **dec) -> Path:
    """best.pt of a randomly initialised ResNet-18 (64 px) + decoder variant, as training
    writes it (with val metrics and the training config's decoding)."""
    vocab = Vocab.build(WORDS)
    config = ModelConfig(
        EncoderConfig(name="resnet18", weights=None, resize=64, crop=64),
        DecoderConfig(
            **{"embed_dim": 16, "hidden_size": 24, "cell": cell, "attention": attention, **dec}
        ),
    )
    torch.manual_seed(0)
    model, pre = build_model(config, len(vocab), pretrained=False)
    payload = {
        **model_payload(model, vocab, pre),
        "epoch": 2,
        "metrics": {"epoch": 3, "val_bleu4": 0.25, "val_cider_d": 0.7, "val_loss": 2.5},
        "train_config": {
            "data": {"name": "demo", "format": "coco"},
            "trainer": {"val_decode": {"strategy": "beam", "beam_size": 2}, "scst": {}},
        },
    }
    return save_checkpoint(payload, tmp_path / "run" / "best.pt")


@pytest.fixture(scope="module")
def lstm_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("lstm")
    ckpt = variant_checkpoint(d)
    return ckpt, export_pretrained(ckpt, d / "exported")


# -- the folder --------------------------------------------------------------------------------


def test_export_writes_weights_json_and_a_model_card_without_pickle(
    lstm_export: tuple[Path, Path],
) -> None:
    ckpt, out = lstm_export
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, CONFIG, VOCAB, "README.md"])
    # safetensors: an 8-byte header length, then a JSON header; no pickle opcode anywhere
    raw = (out / WEIGHTS).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {
        "format": f"captioner-pretrained/{FORMAT_VERSION}",
        "dtype": "float32",
    }
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} <= {"F32", "I64"}
    manifest = json.loads((out / CONFIG).read_text())
    source = load_checkpoint(ckpt)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model"] == source["model_config"]
    assert manifest["preprocessing"] == source["preprocessing"]
    assert manifest["vocab_size"] == len(source["vocab"])
    assert manifest["decoding"]["strategy"] == "beam" and manifest["decoding"]["beam_size"] == 2
    assert manifest["scores"] == {"val_bleu4": 0.25, "val_cider_d": 0.7, "val_loss": 2.5}
    assert manifest["trained_on"] == {"dataset": "demo", "dataset_format": "coco", "epoch": 3}
    assert json.loads((out / VOCAB).read_text()) == source["vocab"]
    card = (out / "README.md").read_text()
    assert "library_name: captioner" in card and "| BLEU-4 | 0.2500 |" in card
    # what the model knows, in words: the demo says it captions shapes, not photos
    assert (
        "Trained on:** the synthetic shapes demo: it captions coloured shapes, not photos "
        "(weights of epoch 3)" in card
    )
    assert "Captioner.from_pretrained" in card and "captioner caption --model" in card


@pytest.mark.parametrize(("cell", "attention"), list(itertools.product(CELLS, ATTENTION)))
def test_exported_model_captions_exactly_like_its_checkpoint(
    cell: str, attention: str, tmp_path: Path
) -> None:
    ckpt = variant_checkpoint(tmp_path, cell, attention)
    out = export_pretrained(ckpt.parent, tmp_path / "exported")  # a run directory: its best.pt
    from_ckpt = Captioner.from_checkpoint(ckpt, device="cpu")
    from_folder = Captioner.from_pretrained(out, device="cpu")
    assert from_folder.model.config == from_ckpt.model.config
    assert from_folder.preprocessing == from_ckpt.preprocessing
    for name, want in from_ckpt.model.state_dict().items():
        assert torch.equal(from_folder.model.state_dict()[name], want), name
    card = (out / "README.md").read_text()
    assert ("attends over" in card, "top-down" in card) == (
        attention != "none",
        attention == "topdown",
    )
    pics = images(tmp_path / "images")
    configs = [
        DecodeConfig(),
        DecodeConfig("beam", beam_size=3, n_best=2),
        DecodeConfig("sample", seed=7, top_k=5),
    ]
    for config in configs:
        a = from_ckpt.caption(pics, config, attention=attention != "none")
        b = from_folder.caption(pics, config, attention=attention != "none")
        assert [r.hypotheses for r in a] == [r.hypotheses for r in b]
        if attention != "none":
            for ra, rb in zip(a, b, strict=True):
                assert torch.equal(ra.attention, rb.attention)


def test_half_weights_stay_within_the_stated_tolerance(tmp_path: Path) -> None:
    ckpt = variant_checkpoint(tmp_path, "lstm", "soft")
    full = export_pretrained(ckpt, tmp_path / "fp32")
    half = export_pretrained(ckpt, tmp_path / "fp16", half=True)
    assert (half / WEIGHTS).stat().st_size < 0.55 * (full / WEIGHTS).stat().st_size
    assert json.loads((half / CONFIG).read_text())["dtype"] == "float16"
    m32, vocab, _, _ = load_pretrained(full)
    m16, _, _, info = load_pretrained(half)
    assert info.dtype == "float16"
    assert all(p.dtype == torch.float32 for p in m16.parameters())  # widened on load
    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64)
    caps = torch.tensor(
        [vocab.encode("a red circle"), vocab.encode("two green triangles") + [0]][:1] * 3
    )
    lengths = torch.full((3,), caps.shape[1])
    with torch.no_grad():
        l32, l16 = m32(x, caps, lengths), m16(x, caps, lengths)
    assert not torch.equal(l32, l16)  # the weights really were rounded
    assert (l32 - l16).abs().max() <= FP16_LOGIT_TOLERANCE * l32.abs().max()


def test_tied_weights_export_and_stay_tied(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ckpt = variant_checkpoint(tmp_path, tie_weights=True, embed_dim=24)
    out = export_pretrained(ckpt, tmp_path / "out")
    stored = load_file(str(out / WEIGHTS))  # both names stored (safetensors refuses shared storage)
    assert torch.equal(stored["decoder.out.weight"], stored["decoder.embed.weight"])
    model, _, _, _ = load_pretrained(out)
    assert model.decoder.out.weight is model.decoder.embed.weight  # loading kept the tie
    pics = images(tmp_path / "images", 2)
    a = Captioner.from_checkpoint(ckpt, device="cpu").caption(pics)
    b = Captioner.from_pretrained(out, device="cpu").caption(pics)
    assert [r.hypotheses for r in a] == [r.hypotheses for r in b]


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_export_then_caption_with_model_equals_checkpoint(
    capsys: pytest.CaptureFixture[str], lstm_export: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, _ = lstm_export
    pics = [str(p) for p in images(tmp_path / "images", 3)]
    with pytest.raises(SystemExit) as code:
        main(["export", str(ckpt), str(tmp_path / "cli_out"), "--half"])
    assert code.value.code == 0
    assert "exported to" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli_out" / CONFIG).read_text())["dtype"] == "float16"
    outputs = []
    for source in (["--checkpoint", str(ckpt)], ["--model", str(lstm_export[1])]):
        with pytest.raises(SystemExit) as code:
            main(["caption", *source, *pics, "--json"])
        assert code.value.code == 0
        outputs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert outputs[0] == outputs[1]
    # no option given: the decoding the model was selected with (beam 2 in its config)
    direct = Captioner.from_checkpoint(ckpt, device="cpu").caption(
        pics, DecodeConfig("beam", beam_size=2)
    )
    assert [o["caption"] for o in outputs[1]] == [r.caption for r in direct]


def test_cli_model_and_checkpoint_are_exclusive(
    capsys: pytest.CaptureFixture[str], lstm_export: tuple[Path, Path]
) -> None:
    ckpt, out = lstm_export
    with pytest.raises(SystemExit) as code:
        main(["caption", "--checkpoint", str(ckpt), "--model", str(out), "x.png"])
    assert code.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


# -- broken folders ----------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(folder: Path, **changes: object) -> None:
    manifest = json.loads((folder / CONFIG).read_text())
    manifest.update(changes)
    (folder / CONFIG).write_text(json.dumps(manifest))


def _save_tensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def _write_vocab(folder: Path, words: list[str]) -> None:
    """A vocabulary that config.json agrees with (size and digest): only the weights can tell."""
    (folder / VOCAB).write_text(json.dumps(words))
    _edit_config(folder, vocab_size=len(words), vocab_sha256=vocab_digest(words))


def _vocab_plus_one(folder: Path) -> None:
    _write_vocab(folder, [*json.loads((folder / VOCAB).read_text()), "extra"])


def _vocab_swapped(folder: Path) -> None:
    words = json.loads((folder / VOCAB).read_text())
    words[4], words[5] = words[5], words[4]
    (folder / VOCAB).write_text(json.dumps(words))


BROKEN = {
    "newer_format": (
        lambda f: _edit_config(f, format_version=FORMAT_VERSION + 1),
        "newer captioner",
    ),
    "older_format": (lambda f: _edit_config(f, format_version=0), "re-export"),
    "not_ours": (lambda f: _edit_config(f, format="transformers"), "not a captioner model config"),
    "bad_json": (lambda f: (f / CONFIG).write_text("{not json"), "not valid JSON"),
    "no_config": (lambda f: (f / CONFIG).unlink(), "config.json: exported model config not found"),
    "no_weights": (lambda f: (f / WEIGHTS).unlink(), "model.safetensors: missing"),
    "no_vocab": (lambda f: (f / VOCAB).unlink(), "vocab.json: exported vocabulary not found"),
    "corrupt_weights": (
        lambda f: (f / WEIGHTS).write_bytes(b"\x00" * 20),
        "not a readable safetensors",
    ),
    "missing_tensor": (
        lambda f: _save_tensors(f, lambda t: t.pop("decoder.out.bias")),
        "missing 1 (decoder.out.bias)",
    ),
    "extra_tensor": (
        lambda f: _save_tensors(f, lambda t: t.__setitem__("decoder.spare", torch.zeros(2))),
        "unexpected 1 (decoder.spare)",
    ),
    "vocab_size_disagrees": (
        lambda f: _edit_config(f, vocab_size=99),
        "does not belong to these weights",
    ),
    "vocab_of_other_weights": (_vocab_plus_one, "weights are for a"),
    "vocab_reordered": (_vocab_swapped, "not the vocabulary these weights were trained with"),
    "bad_vocab_words": (
        lambda f: _write_vocab(f, ["a", "b"]),
        "vocabulary must start with",
    ),
    "bad_model_field": (
        lambda f: _edit_config(
            f, model={"encoder": {"name": "resnet18"}, "decoder": {"cell": "tcn"}}
        ),
        "cell",
    ),
}


def _edit_preprocessing(folder: Path, **changes: object) -> None:
    manifest = json.loads((folder / CONFIG).read_text())
    manifest["preprocessing"].update(changes)
    (folder / CONFIG).write_text(json.dumps(manifest))


def _edit_model(folder: Path, part: str, **changes: object) -> None:
    manifest = json.loads((folder / CONFIG).read_text())
    manifest["model"][part].update(changes)
    (folder / CONFIG).write_text(json.dumps(manifest))


# every field of config.json a folder from someone else may get wrong: one line naming the file
# and the field (the preprocessing values are Preprocessing's own checks)
BAD_FIELDS = {
    "mean_of_two": (lambda f: _edit_preprocessing(f, mean=[0.5, 0.5]), "preprocessing.mean"),
    "std_zero": (lambda f: _edit_preprocessing(f, std=[0, 0, 0]), "preprocessing.std"),
    "std_string": (lambda f: _edit_preprocessing(f, std="wide"), "preprocessing.std"),
    "unknown_interpolation": (
        lambda f: _edit_preprocessing(f, interpolation="spline"),
        "preprocessing.interpolation",
    ),
    "crop_over_resize": (lambda f: _edit_preprocessing(f, crop=10**6), "preprocessing.crop"),
    "preprocessing_a_list": (lambda f: _edit_config(f, preprocessing=[64, 64]), "preprocessing"),
    "string_scores": (lambda f: _edit_config(f, scores={"val_bleu4": "high"}), "scores.val_bleu4"),
    "nan_score": (
        lambda f: _edit_config(f, scores={"val_bleu4": float("nan")}),
        "scores.val_bleu4",
    ),
    "scores_a_list": (lambda f: _edit_config(f, scores=[0.5]), "scores"),
    "trained_on_a_list": (lambda f: _edit_config(f, trained_on=["coco"]), "trained_on"),
    "trained_on_nested": (
        lambda f: _edit_config(f, trained_on={"dataset": {"name": "coco"}}),
        "trained_on.dataset",
    ),
    "unknown_dtype": (lambda f: _edit_config(f, dtype="int8"), "dtype"),
    "huge_grid": (lambda f: _edit_model(f, "encoder", grid=10**4), "model.encoder.grid"),
    "vocab_size_a_string": (lambda f: _edit_config(f, vocab_size="5"), "vocab_size"),
    "vocab_digest_a_number": (lambda f: _edit_config(f, vocab_sha256=5), "vocab_sha256"),
    "model_a_string": (lambda f: _edit_config(f, model="resnet18"), "model"),
    "decoding_a_list": (lambda f: _edit_config(f, decoding=["beam"]), "decoding"),
    "unknown_strategy": (
        lambda f: _edit_config(f, decoding={"strategy": "psychic"}),
        "decoding: strategy",
    ),
    "version_a_number": (lambda f: _edit_config(f, captioner_version=2), "captioner_version"),
}
BROKEN.update((case, (breaks, f"{CONFIG}: {says}")) for case, (breaks, says) in BAD_FIELDS.items())


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_folder_is_one_clear_error(
    case: str, lstm_export: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(lstm_export[1], tmp_path / case)
    breaks, says = BROKEN[case]
    breaks(folder)
    with pytest.raises(UserError) as info:
        Captioner.from_pretrained(folder, device="cpu")
    message = str(info.value)
    assert says in message and "\n" not in message
    # the CLI: one error line, exit 2, no traceback
    with pytest.raises(SystemExit) as code:
        main(["caption", "--model", str(folder), "x.png"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err
    if case in BAD_FIELDS and importlib.util.find_spec("fastapi"):
        # serve refuses to start (--max-len 1: a folder it wrongly loaded is refused for its
        # decoding instead of being served, so a failure never hangs the test)
        with pytest.raises(SystemExit) as code:
            main(["serve", "--model", str(folder), "--port", "0", "--max-len", "1"])
        assert code.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err


def test_missing_folder_and_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        load_pretrained(tmp_path / "nothing" / "here")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a pretrained model folder"):
        load_pretrained(tmp_path / "file.txt")


# -- the Hub (never the network: a mocked download) ----------------------------------------------


def test_hub_id_is_fetched_with_huggingface_hub(
    monkeypatch: pytest.MonkeyPatch, lstm_export: tuple[Path, Path], tmp_path: Path
) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, sorted(allow_patterns)))
        return str(lstm_export[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # "someone/demo-captioner" is no local folder here
    captioner = Captioner.from_pretrained("someone/demo-captioner", device="cpu")
    assert calls == [("someone/demo-captioner", sorted([WEIGHTS, CONFIG, VOCAB, "README.md"]))]
    assert captioner.info.source == "someone/demo-captioner"

    def offline(repo_id: str, allow_patterns: list[str]) -> str:
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        UserError, match=r"someone/x: no such local folder, and fetching .*couldn't connect"
    ) as info:
        Captioner.from_pretrained("someone/x", device="cpu")
    assert "\n" not in str(info.value)


def test_hub_id_without_huggingface_hub_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"pip install 'captioner\[hub\]'"):
        load_pretrained("someone/demo-captioner")


# -- what gets exported ------------------------------------------------------------------------


def test_export_refuses_a_folder_of_other_files_and_replaces_an_earlier_export(
    lstm_export: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, _ = lstm_export
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("my project")
    with pytest.raises(UserError, match="not empty and not an earlier `captioner export`"):
        export_pretrained(ckpt, tmp_path / "project")
    assert (tmp_path / "project" / "README.md").read_text() == "my project"
    out = export_pretrained(ckpt, tmp_path / "again")
    export_pretrained(ckpt, out, half=True)  # over an earlier export: replaced
    assert json.loads((out / CONFIG).read_text())["dtype"] == "float16"


def test_a_last_pt_exports_its_weight_average_with_its_epochs_scores(tmp_path: Path) -> None:
    """A ``last.pt`` of a run with ``trainer.ema_decay`` was validated with its weight average:
    ``export``, ``evaluate`` / ``caption`` (model_from_checkpoint) and ``init_from`` all read
    that average, not the raw weights beside it, so one file scores the same everywhere."""
    best = load_checkpoint(variant_checkpoint(tmp_path))
    averages = {k: v + 1 if v.is_floating_point() else v for k, v in best["model"].items()}
    last = {
        **{k: best[k] for k in ("format", "model", "model_config", "vocab", "preprocessing")},
        "train_config": best["train_config"],
        "optimizer": {},
        "epoch": 2,  # two epochs completed
        "ema": {"decay": 0.99, "updates": 10, "averages": averages},
    }
    run = tmp_path / "run"
    save_checkpoint(last, run / "last.pt")
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "val_bleu4": 0.1})
        + "\n"
        + json.dumps({"epoch": 2, "val_bleu4": 0.2})
        + '\n{"epoch": 3, "val_bl'  # a torn last line (a killed run)
    )
    out = export_pretrained(run / "last.pt", tmp_path / "out")
    manifest = json.loads((out / CONFIG).read_text())
    assert manifest["trained_on"]["epoch"] == 2 and manifest["scores"] == {"val_bleu4": 0.2}
    exported, _, _, _ = load_pretrained(out)
    evaluated, vocab, _ = model_from_checkpoint(load_checkpoint(run / "last.pt"))
    started, _ = build_model(ModelConfig.from_dict(best["model_config"]), len(vocab), False)
    init_weights(started, vocab, str(run / "last.pt"))
    for model in (exported, evaluated, started):
        for name, value in model.state_dict().items():
            assert torch.equal(value, averages[name]), name


def test_half_export_refuses_values_beyond_float16(tmp_path: Path) -> None:
    ckpt = load_checkpoint(variant_checkpoint(tmp_path))
    ckpt["model"]["decoder.out.bias"][0] = 1e6
    path = save_checkpoint(ckpt, tmp_path / "big.pt")
    with pytest.raises(UserError, match=r"--half: decoder.out.bias has values beyond float16"):
        export_pretrained(path, tmp_path / "out", half=True)
    export_pretrained(path, tmp_path / "out32")  # float32 keeps it


def test_the_python_api_decodes_like_the_model_was_selected(
    lstm_export: tuple[Path, Path], tmp_path: Path
) -> None:
    pics = images(tmp_path / "images", 3)
    captioner = Captioner.from_pretrained(lstm_export[1], device="cpu")
    # the selected decoding, with <unk> kept out of captions shown to people (issue 23)
    assert captioner.default_decoding == DecodeConfig("beam", beam_size=2, suppress_unk=True)
    default = captioner.caption(pics)
    explicit = captioner.caption(pics, DecodeConfig("beam", beam_size=2, suppress_unk=True))
    assert [r.hypotheses for r in default] == [r.hypotheses for r in explicit]


def test_a_decoding_of_another_version_falls_back_to_greedy(tmp_path: Path) -> None:
    ckpt = load_checkpoint(variant_checkpoint(tmp_path))
    ckpt["train_config"]["trainer"]["val_decode"] = {"strategy": "beam", "diversity": 0.5}
    path = save_checkpoint(ckpt, tmp_path / "future.pt")
    fallback = Captioner.from_checkpoint(path, device="cpu").default_decoding
    assert fallback == DecodeConfig(suppress_unk=True)


def test_a_missing_checkpoint_path_is_not_taken_for_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^runs/best.pt: no such folder"):
        load_pretrained("runs/best.pt")


# -- a config.json out of proportion with its weights --------------------------------------------

# What the subprocess runs: load the good folder once (every import and code path warm), then
# each huge config under an address-space limit a little above that baseline. Before the check,
# the model was built before its weights were read: hidden_size 20,000 alone is an LSTM of 6.4 GB.
HUGE_CONFIG_SCRIPT = """
import resource, sys
import torch
from captioner.errors import UserError
from captioner.pretrained import load_pretrained

torch.set_num_threads(1)  # no thread pool reserving address space after the limit is set
good, *huge = sys.argv[1:]
load_pretrained(good)
vm = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
limit = int(vm["VmSize"].split()[0]) * 1024 + HEADROOM
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for folder in huge:
    try:
        load_pretrained(folder)
        print("loaded", folder)
    except UserError as exc:
        print("error:", exc)
    except BaseException as exc:  # MemoryError, torch's allocation RuntimeError
        print("crashed:", type(exc).__name__, str(exc).splitlines()[0][:200])
"""
HUGE_FIELDS = {  # decoder field, value -> what the one error line names
    ("hidden_size", 10**6): "model.decoder.hidden_size=1000000",
    ("hidden_size", 20_000): "model.decoder.hidden_size=20000",
    ("embed_dim", 10**6): "model.decoder.embed_dim=1000000",
    ("num_layers", 10**6): "model.decoder.num_layers=1000000",
}


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc: Linux")
def test_a_huge_model_in_config_json_is_refused_before_it_is_built(
    lstm_export: tuple[Path, Path], tmp_path: Path
) -> None:
    folders = []
    for (name, value), _ in HUGE_FIELDS.items():
        folder = _copy(lstm_export[1], tmp_path / f"{name}-{value}")
        manifest = json.loads((folder / CONFIG).read_text())
        manifest["model"]["decoder"][name] = value
        (folder / CONFIG).write_text(json.dumps(manifest))
        folders.append(str(folder))
    script = HUGE_CONFIG_SCRIPT.replace("HEADROOM", str(256 * 2**20))
    done = subprocess.run(
        [sys.executable, "-c", script, str(lstm_export[1]), *folders],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(folders), done.stdout
    for line, folder, names in zip(lines, folders, HUGE_FIELDS.values(), strict=True):
        assert line.startswith(f"error: {folder}/{CONFIG}: ") and names in line, line


def test_a_single_path_or_image_is_one_image(
    lstm_export: tuple[Path, Path], tmp_path: Path
) -> None:
    """``caption("photo.jpg")`` captions the photo, not the string's nine characters."""
    captioner = Captioner.from_pretrained(lstm_export[1], device="cpu")
    path = images(tmp_path, 1)[0]
    want = captioner.caption([path])[0].caption
    for single in (str(path), path, Image.open(path)):
        results = captioner.caption(single)
        assert len(results) == 1 and results[0].error is None and results[0].caption == want


def test_captions_shown_never_say_unk_unless_asked(
    lstm_export: tuple[Path, Path], tmp_path: Path
) -> None:
    """The default decoding suppresses ``<unk>`` (issue 23: a caption shown to a person never
    contains it); a decoding given explicitly is used as given, as ``evaluate`` needs."""
    captioner = Captioner.from_pretrained(lstm_export[1], device="cpu")
    with torch.no_grad():  # a model that would rather say <unk> than anything else
        captioner.model.decoder.out.bias[captioner.vocab.unk_id] += 100.0
    pics = images(tmp_path, 2)
    assert captioner.default_decoding.suppress_unk
    for result in captioner.caption(pics):
        assert result.error is None and "<unk>" not in result.caption
    as_given = captioner.caption(pics, DecodeConfig(suppress_unk=False))
    assert all("<unk>" in r.caption for r in as_given)
