import pytest
import torch
from torch import nn

from targetgen import Targets
from targetgen.config import RegressionConfig, from_dict
from targetgen.errors import ConfigError
from targetgen.regression import RegressionEngine
from targetgen.schedules import scheduled


def engine(model, **kw):
    return RegressionEngine(model, from_dict(RegressionConfig, kw, "regression"), total_steps=10)


def test_loss_values_and_reductions():
    model = nn.Linear(1, 1)
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    assert engine(model, loss={"l2": 1.0}).loss(pred, target).item() == 0.5 * (1 + 4 + 1 + 1)
    assert engine(model, loss={"l2": 1.0}, reduction="mean").loss(pred, target).item() == 0.5 * 7 / 4
    assert engine(model, loss={"l1": 1.0}).loss(pred, target).item() == 5.0
    mixed = engine(model, loss={"l1": 2.0, "l2": 0.5}).loss(pred, target, weight=torch.tensor([1.0, 0.0]))
    assert mixed.item() == 2.0 * 3 + 0.5 * 0.5 * 5


def test_ssim_loss_is_zero_for_identical_images_and_grows_with_noise():
    model = nn.Linear(1, 1)
    e = engine(model, loss={"ssim": 1.0}, reduction="mean")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert e.loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    slightly, very = e.loss(x, x + 0.05 * torch.randn_like(x)), e.loss(x, torch.rand_like(x) * 2 - 1)
    assert 0 < slightly.item() < very.item() <= 2


def test_n2_steps_of_size_lambda2_over_n2_with_sgd():
    # Linear model, l2 loss: each step θ ← θ − (λ2/N2) Σ (θz − x') z
    model = nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    e = engine(model, lr=0.1, steps=2, optimizer="sgd")
    z, target = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [2.0]])
    e.fit(Targets(z, target), step=0)
    w = 0.0
    for _ in range(2):
        w -= 0.05 * sum((w * zi - xi) * zi for zi, xi in ((1, 1), (2, 2)))
    assert model.weight.item() == pytest.approx(w, rel=1e-6)


def test_target_reach():
    model = nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    z, target = torch.tensor([[1.0]]), torch.tensor([[1.0]])
    # lr 1 on ½(w − 1)²: one step lands exactly on the target → reach 1
    stats = engine(model, lr=1.0, optimizer="sgd").fit(Targets(z, target), step=0, measure_reach=True)
    assert stats["target_reach"] == pytest.approx(1.0)
    model.weight.data.fill_(0.0)
    # lr 0.5: halfway, so the squared distance is a quarter → reach 0.75
    stats = engine(model, lr=0.5, optimizer="sgd").fit(Targets(z, target), step=0, measure_reach=True)
    assert stats["target_reach"] == pytest.approx(0.75)


def test_schedules():
    assert scheduled(1.0, "constant", 7, 10) == 1.0
    assert scheduled(1.0, "linear", 0, 11, 0.0) == 1.0 and scheduled(1.0, "linear", 5, 11, 0.0) == 0.5
    assert scheduled(2.0, "cosine", 10, 11, 0.5) == pytest.approx(1.0)
    assert scheduled(2.0, "cosine", 5, 11, 0.0) == pytest.approx(1.0)
    e = engine(nn.Linear(1, 1), lr=0.1, steps=2, schedule="linear")
    assert e.step_size(0) == pytest.approx(0.05) and e.step_size(9) == pytest.approx(0.0)


def test_ema_copy_follows_the_generator():
    model = nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    e = engine(model, lr=1.0, optimizer="sgd", ema=0.5)
    z = torch.tensor([[1.0]])
    e.fit(Targets(z, torch.tensor([[1.0]])), step=0)  # the first update copies the weights
    e.fit(Targets(z, torch.tensor([[3.0]])), step=1)
    assert model.weight.item() == pytest.approx(3.0)
    assert e.sampling_generator().weight.item() == pytest.approx(0.5 * 1.0 + 0.5 * 3.0)


@pytest.mark.parametrize("key, value, message", [
    ("lr", -1.0, "regression.lr: expected a number > 0, got -1.0"),
    ("steps", 0, "regression.steps: expected an integer >= 1, got 0"),
    ("loss", {}, "regression.loss: give at least one loss"),
    ("loss", {"l2": -1}, "regression.loss.l2: expected a number >= 0, got -1.0"),
    ("ema", 1.5, r"regression.ema: expected a number in \(0, 1\), got 1.5"),
    ("betas", [2, 3], r"regression.betas\[0\]: expected a number in \[0, 1\), got 2.0"),
])
def test_bad_regression_settings(key, value, message):
    with pytest.raises(ConfigError, match=message):
        engine(nn.Linear(1, 1), **{key: value})
