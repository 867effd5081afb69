"""Vanishing gradients, measured (captioner/evaluation/gradient_flow.py): the gradient at distance
0 is the direct one, the norms agree with independent computations (a separate unrolled pass
through the cell, central finite differences), a vanilla RNN with small recurrent weights decays
within its Jacobian bound, captions of different lengths are aligned by their end, the curve and
its plot."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from captioner.checkpoint import load_checkpoint, model_from_checkpoint, train_config
from captioner.configs.model import DecoderConfig
from captioner.datasets.captions import encode_caption, load_split, pad_captions
from captioner.datasets.images import build_transform, load_image
from captioner.evaluation.evaluate import resolve_data_config
from captioner.evaluation.gradient_flow import (
    GradientFlow,
    gradient_flow,
    gradient_norms,
    measure_checkpoint,
    plot_gradient_flow,
)
from captioner.models.decoders import Decoder, build_decoder
from captioner.vocab import Vocab

V, FEAT, GRID, E, H = 12, 5, 4, 5, 6  # vocabulary, features, grid positions, embedding, hidden
START, END = Vocab.start_id, Vocab.end_id
# three captions of 4, 1 and 2 words: final steps T = 4, 1, 2
CAPTIONS = torch.tensor(
    [[START, 4, 5, 6, 7, END], [START, 8, END, 0, 0, 0], [START, 9, 10, END, 0, 0]]
)
LENGTHS = torch.tensor([6, 3, 4])
FINAL = LENGTHS - 2  # the step that predicts <end>


def decoder(cell: str = "lstm", attention: str = "none", dtype=torch.float32, **cfg) -> Decoder:
    torch.manual_seed(0)
    settings = {"embed_dim": E, "hidden_size": H, "dropout": 0.0, "num_layers": 2, **cfg}
    dec = build_decoder(DecoderConfig(cell=cell, attention=attention, **settings), FEAT, V)
    return dec.to(dtype).eval()


def features(attention: str = "none", n: int = 3, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (n, FEAT) if attention == "none" else (n, GRID, FEAT)
    return torch.randn(shape, generator=g).to(dtype)


def rel_tol(dtype: torch.dtype, depth: int) -> float:
    """The relative error two float computations of the same gradient may differ by: a step
    rounds each value of its dot products over at most ``H + FEAT + E`` terms (a cell's input
    and recurrent weights, or attention's; relative error <= terms * eps, the standard bound), a gradient at distance k goes through ``depth`` =
    k + 1 such steps forward and back (2 * depth), and the bounds add; x4 for the gate
    products an LSTM step multiplies together."""
    return 4 * 2 * depth * (H + FEAT + E) * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# the direct gradient and independent computations


@pytest.mark.parametrize(
    "cell,attention", [("lstm", "none"), ("gru", "none"), ("rnn", "none"), ("gru", "topdown")]
)
def test_distance_zero_is_the_direct_gradient(cell: str, attention: str) -> None:
    """At k = 0 the only path is the output layer: dL_T/dh_T = W_out^T (softmax - onehot(<end>))
    on the top layer and 0 on the layer below, with the softmax of the model's own teacher-forced
    logits (its forward pass, another code path) at step T."""
    dec, feats = decoder(cell, attention), features(attention)
    norms = gradient_norms(dec, feats, CAPTIONS, LENGTHS)
    with torch.no_grad():
        logits = dec(feats, CAPTIONS, LENGTHS)  # [N, T-1, V]
    last = logits[torch.arange(3), FINAL]  # [N, V]: the logits that predict <end>
    direct = (last.softmax(-1) - F.one_hot(torch.full((3,), END), V)) @ dec.out.weight  # [N, H]
    expected = direct.norm(dim=1).double()
    assert torch.allclose(norms[:, 0], expected, rtol=rel_tol(torch.float32, 6), atol=0)
    # and not what step T-1 would give: the distance-1 norm is a different number
    assert not torch.allclose(norms[:, 1], expected, rtol=1e-2)


def _cell_state(dec: Decoder, state: tuple[torch.Tensor, ...]):
    return (state[0], state[1]) if dec.cell_tensors == 2 else state[0]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_norms_match_a_separate_unrolled_pass(cell: str) -> None:
    """For each caption and each h_t: a leaf copy of h_t (from the cell run over the prefix),
    the rest of the caption run through ``nn.LSTM/GRU/RNN`` as one sequence call (not the
    per-step ``_advance`` the tool uses), and torch.autograd.grad of the final loss at the leaf:
    the same norm, within float32 rounding over the depth (:func:`rel_tol`)."""
    dec, feats = decoder(cell), features()
    norms = gradient_norms(dec, feats, CAPTIONS, LENGTHS)
    for i, T in enumerate(FINAL.tolist()):
        init = dec.init_state(feats[i : i + 1])  # h_{-1} (and c_{-1})
        x = dec.embed(CAPTIONS[i : i + 1, : T + 1])  # [1, T+1, E]: the tokens steps 0..T read
        for t in range(-1, T + 1):
            with torch.no_grad():  # the state after step t, from the prefix
                state = init if t < 0 else dec.rnn(x[:, : t + 1], _cell_state(dec, init))[1]
            state = state if isinstance(state, tuple) else (state,)
            h = state[0].detach().clone().requires_grad_()
            rest = (h, *state[1:]) if len(state) == 2 else (h,)
            if t < T:
                out, _ = dec.rnn(x[:, t + 1 :], _cell_state(dec, rest))
                top = out[:, -1]
            else:
                top = h[-1]
            loss = F.cross_entropy(dec.out(top), CAPTIONS[i : i + 1, T + 1])
            (grad,) = torch.autograd.grad(loss, h)
            k = T - t
            assert norms[i, k].item() == pytest.approx(
                grad.norm().item(), rel=rel_tol(torch.float32, k + 1)
            ), (i, t)


def _state_after(dec: Decoder, caption: torch.Tensor, f: torch.Tensor, t: int, h=None):
    """The decoder's state after step t (t = -1: the image's), stepped with ``_advance``; with
    ``h``, h_t replaced by it."""
    state = dec.init_state(f)
    for s in range(t + 1):
        _, state, _ = dec._advance(dec.embed(caption[:, s]), state)
    return state if h is None else (h, *state[1:])


def _final_loss(dec: Decoder, caption: torch.Tensor, f: torch.Tensor, t: int, h, T: int):
    """L_T of a caption [1, T+2..] as a function of its h_t = ``h``: steps t+1..T from there."""
    state = _state_after(dec, caption, f, t, h)
    for s in range(t + 1, T + 1):
        _, state, _ = dec._advance(dec.embed(caption[:, s]), state)
    return F.cross_entropy(dec.out(state[0][-1]), caption[:, T + 1])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_norms_match_finite_differences(cell: str) -> None:
    """Central differences of L_T in every coordinate of each h_t of one caption (float64, steps
    of 1e-6), rerunning the decoder's steps from the perturbed state: no autograd at all. A
    central difference errs by step^2/6 times the third derivative (~1e-13 here) plus the
    rounding of L, eps64 |L| / step (~5e-10 for |L| ~ 2.5), so the norms (~1e-3 .. 1) agree to
    1e-7 relative plus 1e-8 absolute."""
    dec, feats = decoder(cell, dtype=torch.float64), features(dtype=torch.float64)
    norms = gradient_norms(dec, feats, CAPTIONS, LENGTHS)
    caption, f, T, step = CAPTIONS[:1], feats[:1], int(FINAL[0]), 1e-6
    with torch.no_grad():
        for t in range(-1, T + 1):
            h = _state_after(dec, caption, f, t)[0]
            grad = torch.zeros(h.numel(), dtype=h.dtype)
            for j in range(h.numel()):
                e = torch.zeros(h.numel(), dtype=h.dtype)
                e[j] = step
                e = e.view_as(h)
                up = _final_loss(dec, caption, f, t, h + e, T)
                down = _final_loss(dec, caption, f, t, h - e, T)
                grad[j] = (up - down).item() / (2 * step)
            assert norms[0, T - t].item() == pytest.approx(grad.norm().item(), rel=1e-7, abs=1e-8)


@pytest.mark.parametrize("cell,attention", [("lstm", "soft"), ("gru", "soft"), ("rnn", "topdown")])
def test_norms_match_a_leaf_copy_of_each_state_with_attention(cell: str, attention: str) -> None:
    """With attention, h_t reaches L_T through the recurrence AND the queries of later steps.
    For each caption and h_t: a leaf copy of h_t, the steps after it rerun for that caption
    alone, torch.autograd.grad of its final loss at the leaf: the same norm as the batched
    graph's. (Not finite differences: the attention's softmax runs in float32 even in a float64
    model, so L is only float32-smooth.) The two computations differ in rounding by the batch
    only, bounded by float32 rounding over the depth (:func:`rel_tol`)."""
    dec = decoder(cell, attention, torch.float64)
    feats = features(attention, dtype=torch.float64)
    norms = gradient_norms(dec, feats, CAPTIONS, LENGTHS)
    for i, T in enumerate(FINAL.tolist()):
        caption, f = CAPTIONS[i : i + 1], feats[i : i + 1]
        for t in range(-1, T + 1):
            with torch.no_grad():
                h = _state_after(dec, caption, f, t)[0]
            h = h.clone().requires_grad_()
            (grad,) = torch.autograd.grad(_final_loss(dec, caption, f, t, h, T), h)
            k = T - t
            assert norms[i, k].item() == pytest.approx(
                grad.norm().item(), rel=rel_tol(torch.float32, k + 1)
            ), (i, t)


# ---------------------------------------------------------------------------------------------
# the vanilla RNN's geometric decay


def test_vanilla_rnn_decays_within_its_jacobian_bound() -> None:
    """h_{t+1} = tanh(W_ih x + W_hh h_t + b), so dL/dh_t = W_hh^T diag(1 - h_{t+1}^2) dL/dh_{t+1}
    and ||dL/dh_t|| <= sigma(W_hh) * max(1 - h^2) * ||dL/dh_{t+1}||: with W_hh scaled to spectral
    norm 0.5 the measured gradient must shrink at least that fast per step, caption by caption
    and in the averaged curve (same-length captions: the same captions at every k)."""
    dec = decoder("rnn", dtype=torch.float64, num_layers=1)
    with torch.no_grad():
        w = dec.rnn.weight_hh_l0
        w *= 0.5 / torch.linalg.matrix_norm(w, ord=2)
    sigma = torch.linalg.matrix_norm(dec.rnn.weight_hh_l0, ord=2).item()
    g = torch.Generator().manual_seed(2)
    words = torch.randint(4, V, (8, 10), generator=g)
    captions = torch.cat([torch.full((8, 1), START), words, torch.full((8, 1), END)], dim=1)
    lengths = torch.full((8,), 12)
    feats = features(n=8, dtype=torch.float64)
    with torch.no_grad():  # every state's tanh': the largest bounds every step's Jacobian
        states, _ = dec.rnn(dec.embed(captions[:, :-1]), dec.init_state(feats)[0])
        h_init = dec.init_state(feats)[0]
    slope = (1 - torch.cat([states.flatten(), h_init.flatten()]) ** 2).max().item()
    bound = sigma * slope
    assert bound < 0.5 + 1e-12
    norms = gradient_norms(dec, feats, captions, lengths)  # [8, 12]: k = 0 .. 11
    ratios = norms[:, 1:] / norms[:, :-1]
    # float64 rounding of the 12-step chain is ~1e-13 relative: 1e-9 is room, not slack
    assert (ratios <= bound * (1 + 1e-9)).all(), ratios.max()
    flow = GradientFlow.from_norms(norms)
    assert flow.count == [8] * 12
    curve = torch.tensor(flow.mean_norm)
    assert (curve[1:] / curve[:-1] <= bound * (1 + 1e-9)).all()
    assert flow.per_step_factor() <= bound * (1 + 1e-9)
    assert flow.relative[-1] <= bound**11 * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# captions of different lengths, the curve


@pytest.mark.parametrize("attention", ["none", "soft"])
def test_captions_of_different_lengths_are_aligned_by_their_end(attention: str) -> None:
    """Each caption's norms in a padded batch are its norms alone (so the batch neither mixes
    captions nor lets the pads count), with distances k = 0 .. T + 1 (the image's initial state
    last) and NaN beyond; the curve counts, per k, the captions that reach it."""
    dec, feats = decoder("gru", attention), features(attention)
    norms = gradient_norms(dec, feats, CAPTIONS, LENGTHS)
    assert norms.shape == (3, 6)
    for i, n in enumerate(LENGTHS.tolist()):
        alone = gradient_norms(dec, feats[i : i + 1], CAPTIONS[i : i + 1, :n], LENGTHS[i : i + 1])
        assert alone.shape == (1, n)  # T + 2 = n distances
        assert torch.allclose(norms[i, :n], alone[0], rtol=rel_tol(torch.float32, n), atol=0)
        assert torch.isnan(norms[i, n:]).all() and not torch.isnan(norms[i, :n]).any()
    repadded = CAPTIONS.masked_fill(CAPTIONS == 0, 11)  # other tokens where the pads were
    repadded_norms = gradient_norms(dec, feats, repadded, LENGTHS)
    torch.testing.assert_close(repadded_norms, norms, rtol=0.0, atol=0.0, equal_nan=True)
    flow = gradient_flow(dec, feats, CAPTIONS, LENGTHS, batch_size=2)
    assert flow.distance == [0, 1, 2, 3, 4, 5]
    assert flow.count == [3, 3, 3, 2, 1, 1]  # T + 1 = 5, 2, 3: reached by all, then 2, then 1
    assert flow.mean_norm[3] == pytest.approx(norms[[0, 2], 3].mean().item(), rel=1e-6)
    assert flow.relative[0] == 1.0
    assert flow.mean_norm[0] == pytest.approx(norms[:, 0].mean().item(), rel=1e-6)


def test_last_word_target_is_the_end_target_one_step_earlier() -> None:
    """``target="last_word"``: the loss of each caption's last real word, i.e. the <end> curve of
    the caption cut one token earlier (its last word in the place of <end>)."""
    dec, feats = decoder("lstm"), features()[[0, 2]]
    captions, lengths = CAPTIONS[[0, 2]], LENGTHS[[0, 2]]
    last_word = gradient_norms(dec, feats, captions, lengths, target="last_word")
    cut = gradient_norms(dec, feats, captions, lengths - 1)
    torch.testing.assert_close(last_word, cut, rtol=0.0, atol=0.0, equal_nan=True)
    assert not torch.allclose(last_word[0], gradient_norms(dec, feats, captions, lengths)[0, :5])
    empty = torch.tensor([6, 2])  # the second caption is <start> <end>: no last word
    with pytest.raises(ValueError, match=r"lengths must lie in \[3, 6\]"):
        gradient_norms(dec, feats, captions, empty, target="last_word")


def test_dropout_is_off_and_the_mode_restored() -> None:
    """With dropout 0.5 in training mode, two measurements agree (eval mode inside), equal the
    eval-mode one, and the model is back in training mode."""
    dec, feats = decoder("lstm", dropout=0.5), features()
    dec.train()
    first = gradient_norms(dec, feats, CAPTIONS, LENGTHS)
    assert dec.training
    same = {"rtol": 0.0, "atol": 0.0, "equal_nan": True}
    torch.testing.assert_close(first, gradient_norms(dec, feats, CAPTIONS, LENGTHS), **same)
    dec.eval()
    torch.testing.assert_close(first, gradient_norms(dec, feats, CAPTIONS, LENGTHS), **same)
    # one row per image, captions mapped to them: the same features, the same norms
    rows = gradient_norms(
        dec, feats[[2, 0, 1]], CAPTIONS, LENGTHS, image_of_caption=torch.tensor([1, 2, 0])
    )
    torch.testing.assert_close(rows, first, **same)


def test_a_decoder_whose_output_is_not_its_hidden_state_is_refused() -> None:
    """The norm at h holds every path to the loss only if the output layer reads h itself."""
    dec = decoder("gru")
    advance = dec._advance
    dec._advance = lambda x, state: (2 * advance(x, state)[0], *advance(x, state)[1:])
    with pytest.raises(ValueError, match="not its top hidden state"):
        gradient_norms(dec, features(), CAPTIONS, LENGTHS)


def test_curve_round_trips_and_plots_on_a_log_scale() -> None:
    norms = torch.tensor([[1.0, 0.5, 0.25, math.nan], [2.0, 0.5, 0.5, 0.1]], dtype=torch.float64)
    flow = GradientFlow.from_norms(norms, label="rnn")
    assert flow.mean_norm == [1.5, 0.5, 0.375, 0.1]
    assert flow.relative == [1.0, 0.375, 0.25, 0.05]
    assert flow.count == [2, 2, 2, 1]
    assert flow.per_step_factor(min_count=2) == pytest.approx(0.25**0.5)
    assert GradientFlow.from_dict(json.loads(json.dumps(flow.to_dict()))) == flow
    ax = Figure().subplots()
    other = GradientFlow.from_norms(norms[:1], label="lstm")
    fig = plot_gradient_flow([flow, other], ax, min_count=2)
    assert fig is ax.figure and ax.get_yscale() == "log"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["rnn", "lstm"]
    assert list(lines[0].get_xdata()) == [0, 1, 2]  # k = 3 has one caption only
    assert list(lines[0].get_ydata()) == [1.0, 0.375, 0.25]
    assert list(lines[1].get_xdata()) == []  # no distance with two captions


# ---------------------------------------------------------------------------------------------
# a checkpoint on a split, and the benchmark script


@pytest.mark.slow
def test_a_checkpoint_is_measured_on_the_first_references_of_its_split(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """measure_checkpoint takes the first N references of the val split in order, with the
    features of their own images: the curve computed by hand from them is the same, to the
    bit. From the feature cache (float16 features: a relative rounding of 2^-11 each, which
    moves these gradients by well under 1%) the same curve within 1%. The script writes the
    plot and the numbers."""
    flow = measure_checkpoint(tiny_checkpoint, num_captions=12)
    ckpt = load_checkpoint(tiny_checkpoint)
    model, vocab, pre = model_from_checkpoint(ckpt)
    data = resolve_data_config(train_config(ckpt), {})
    records = load_split(data, "val")[:3]  # 5 references each: 15 >= 12
    transform = build_transform(pre)
    with torch.no_grad():
        images = model.encode(torch.stack([transform(load_image(r.path)) for r in records]))
    refs = [(i, c) for i, r in enumerate(records) for c in r.captions][:12]
    captions, lengths = pad_captions(
        [encode_caption(vocab, c, data.max_caption_len) for _, c in refs], vocab.pad_id
    )
    owner = torch.tensor([i for i, _ in refs])
    assert flow == gradient_flow(
        model, images, captions, lengths, image_of_caption=owner, label="LSTM"
    )
    assert flow.count[0] == 12 and flow.label == "LSTM"
    cached = measure_checkpoint(tiny_checkpoint, num_captions=12, cache_dir=tmp_path / "cache")
    assert cached.count == flow.count
    assert cached.relative == pytest.approx(flow.relative, rel=1e-2)

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_flow.py"
    spec = importlib.util.spec_from_file_location("gradient_flow_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    args = [str(tiny_checkpoint), str(tiny_checkpoint), "--labels", "A", "B", "--captions", "12"]
    module.main([*args, "--device", "cpu", "--min-count", "2", "--out", str(out)])
    record = json.loads((out / "gradient_flow.json").read_text())
    assert [m["label"] for m in record["models"]] == ["A", "B"]
    assert record["models"][0]["relative"] == flow.relative
    assert (out / "gradient_flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["A", "12"]
