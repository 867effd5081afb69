"""``ModelEMA``: the averaging recurrence, its warm-up, swapping the average in and out, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captioner.errors import UserError
from captioner.training.ema import ModelEMA


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_average_follows_the_warmed_up_recurrence() -> None:
    model = small_model()
    ema = ModelEMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    expected = start.clone()
    for t, value in enumerate([1.0, -2.0, 0.5, 3.0, 3.0, 3.0], start=1):
        set_weights(model, value)
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
    assert ema.updates == 6
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(10_000) == 0.9
    torch.testing.assert_close(ema.averages["0.weight"], expected)
    assert not torch.allclose(ema.averages["0.weight"], model[0].weight)


def test_only_floating_point_state_is_averaged() -> None:
    model = small_model()
    ema = ModelEMA(model, decay=0.5)
    assert "1.num_batches_tracked" not in ema.averages  # an integer counter
    assert {"0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"} <= set(
        ema.averages
    )
    model.train()
    model(torch.randn(8, 3))  # moves the BN running statistics
    ema.update(model)
    assert not torch.equal(ema.averages["1.running_mean"], torch.zeros(4))


def test_applied_swaps_the_average_in_and_back_out() -> None:
    model = small_model()
    ema = ModelEMA(model, decay=0.5)
    set_weights(model, 2.0)
    ema.update(model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    param = model[0].weight  # the optimizer holds this object: it must stay the same tensor
    with ema.applied(model):
        assert torch.equal(model[0].weight, ema.averages["0.weight"])
        assert not torch.equal(model[0].weight, own["0.weight"])
    assert model[0].weight is param
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k
    with pytest.raises(RuntimeError, match="inside"), ema.applied(model):
        raise RuntimeError("inside")
    assert torch.equal(model[0].weight, own["0.weight"])  # restored on an error too


def test_state_round_trip_continues_identically() -> None:
    model = small_model()
    a = ModelEMA(model, decay=0.8)
    for v in (1.0, 2.0):
        set_weights(model, v)
        a.update(model)
    b = ModelEMA(small_model(), decay=0.8)
    b.load_state_dict(a.state_dict())
    set_weights(model, 5.0)
    a.update(model)
    b.update(model)
    assert a.updates == b.updates == 3
    for k in a.averages:
        assert torch.equal(a.averages[k], b.averages[k]), k


def test_state_of_another_model_is_refused() -> None:
    ema = ModelEMA(small_model(), decay=0.8)
    other = ModelEMA(nn.Linear(3, 4), decay=0.8)
    with pytest.raises(UserError, match="different model"):
        ema.load_state_dict(other.state_dict())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_decay_outside_the_open_unit_interval_is_refused(decay: float) -> None:
    with pytest.raises(UserError, match=r"trainer\.ema_decay must be in \(0, 1\)"):
        ModelEMA(small_model(), decay=decay)


def reference_average(avg: dict[str, torch.Tensor], model: nn.Module, weight: float) -> None:
    """The textbook EMA: every floating-point tensor of the state, every step."""
    for name, t in model.state_dict().items():
        if name in avg:
            avg[name].lerp_(t.detach(), weight)


def test_frozen_tensors_are_skipped_and_unfreezing_mid_run_stays_exact() -> None:
    """Averaging only what changes (trainable parameters, buffers of modules in training mode)
    gives exactly the average over every tensor, also when a frozen part starts training."""
    torch.manual_seed(0)
    frozen, head = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2)
    model = nn.Sequential(frozen, head)
    frozen.requires_grad_(False)
    model.train()
    frozen.eval()
    ema = ModelEMA(model, decay=0.9)
    reference = {k: v.clone() for k, v in ema.averages.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def steps(n: int) -> None:
        for _ in range(n):
            model(torch.randn(8, 3)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update(model)
            reference_average(reference, model, 1 - ema.decay_at(ema.updates))

    ema.track(model)
    steps(3)
    live = {id(t) for t in ema._live[0]}  # what the frozen phase folds in: the head only
    assert live == {id(ema.averages["1.weight"]), id(ema.averages["1.bias"])}
    frozen.requires_grad_(True)  # fine-tuning starts: parameters and BatchNorm statistics move
    frozen.train()
    ema.track(model)
    steps(3)
    assert not torch.equal(ema.averages["0.1.running_mean"], torch.zeros(4))
    for name in reference:
        torch.testing.assert_close(ema.averages[name], reference[name], rtol=0, atol=1e-7)


def test_a_tied_weight_is_averaged_once_under_both_names() -> None:
    embed = nn.Embedding(5, 4)
    out = nn.Linear(4, 5)
    out.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "out": out})
    ema = ModelEMA(model, decay=0.5)
    assert ema.averages["embed.weight"] is ema.averages["out.weight"]  # one copy
    start = ema.averages["embed.weight"].clone()
    set_weights(model, 3.0)
    ema.update(model)
    d = ema.decay_at(1)
    torch.testing.assert_close(ema.averages["out.weight"], d * start + (1 - d) * 3.0)
    with ema.applied(model):
        assert torch.equal(model["out"].weight, ema.averages["embed.weight"])
