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


def linear_fit(**kw):
    """w·z fitted by SGD onto x' = z from w = 0: every step multiplies the miss by 1 − 5 lr (Σ z² = 5)."""
    model = nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    z = torch.tensor([[1.0], [2.0]])
    return engine(model, optimizer="sgd", **kw).fit(Targets(z, z.clone()), step=0)


def test_until_reach_steps_until_the_targets_are_reached():
    # lr 0.02: the miss shrinks by 0.9 per step, its square by 0.81: reach 1 − 0.81^k ≥ 0.99 from k = 22
    stats = linear_fit(lr=0.02, until_reach=0.99, max_steps=50)
    assert stats["regression_steps"] == 22 and stats["target_reach"] == pytest.approx(1 - 0.81**22, rel=1e-5)
    assert stats["target_reach"] >= 0.99
    capped = linear_fit(lr=0.02, until_reach=0.99, max_steps=10)  # the cap comes first
    assert capped["regression_steps"] == 10 and capped["target_reach"] == pytest.approx(1 - 0.81**10, rel=1e-5)
    # regression.steps are taken in any case (each of λ2 / N2): 3 steps of 0.01 reach 1 − 0.95^6 = 0.26, past 0.2
    first = linear_fit(lr=0.03, steps=3, until_reach=0.2, max_steps=50)
    assert first["regression_steps"] == 3 and first["target_reach"] == pytest.approx(1 - 0.95**6, rel=1e-5)


class Recorder(nn.Module):
    """A linear generator noting which batch (by its first latent) every forward pass saw."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1, bias=False)
        self.seen: list[float] = []

    def forward(self, z):
        self.seen.append(z[0, 0].item())
        return self.linear(z)


def test_replay_draws_only_from_the_last_k_batches():
    torch.manual_seed(0)
    model = Recorder()
    e = engine(model, optimizer="sgd", lr=0.001, steps=4, replay=3)
    for t in range(10):
        z = torch.full((2, 1), float(t))
        model.seen.clear()
        e.fit(Targets(z, z + 1), step=t)
        assert model.seen[0] == t  # the first step fits this step's targets
        assert set(model.seen[1:]) <= {t - 2, t - 1, t} and len(model.seen) == 4
        assert len(e.replay.batches) == min(t + 1, 3)
    state = e.state_dict()
    assert [b["z"][0, 0].item() for b in state["replay"]] == [7.0, 8.0, 9.0]
    again = engine(Recorder(), optimizer="sgd", lr=0.001, steps=4, replay=3)
    again.load_state_dict(state)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(again.replay.batches, state["replay"]))


def test_replay_is_drawn_uniformly():
    torch.manual_seed(0)
    model = Recorder()
    e = engine(model, optimizer="sgd", lr=1e-6, steps=301, replay=3)
    for t in range(3):
        e.fit(Targets(torch.full((2, 1), float(t)), torch.zeros(2, 1)), step=t)
    counts = [model.seen[-300:].count(float(t)) for t in range(3)]
    assert all(70 < c < 130 for c in counts), counts  # 100 each on average


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


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", -1.0, "regression.lr: expected a number > 0, got -1.0"),
        ("steps", 0, "regression.steps: expected an integer >= 1, got 0"),
        ("loss", {}, "regression.loss: give at least one loss"),
        ("loss", {"l2": -1}, "regression.loss.l2: expected a number >= 0, got -1.0"),
        ("ema", 1.5, r"regression.ema: expected a number in \(0, 1\), got 1.5"),
        ("betas", [2, 3], r"regression.betas\[0\]: expected a number in \[0, 1\), got 2.0"),
        ("until_reach", 0.0, r"regression.until_reach: expected a number in \(0, 1\], got 0.0"),
        ("until_reach", 1.5, r"regression.until_reach: expected a number in \(0, 1\], got 1.5"),
        ("max_steps", 0, "regression.max_steps: expected an integer >= 1, got 0"),
        ("replay", 0, "regression.replay: expected an integer >= 1, got 0"),
    ],
)
def test_bad_regression_settings(key, value, message):
    with pytest.raises(ConfigError, match=message):
        engine(nn.Linear(1, 1), **{key: value})


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"replay": 4},
            r"regression.replay: 4 does nothing with one regression step per training step \(replay serves "
            r"the steps after the first\); set regression.steps > 1 or regression.until_reach",
        ),
        ({"until_reach": 0.5, "steps": 5, "max_steps": 3}, r"regression.max_steps: 3 is below regression.steps \(5\)"),
    ],
)
def test_settings_that_cannot_work_together(settings, message):
    with pytest.raises(ConfigError, match=message):
        engine(nn.Linear(1, 1), **settings)
    engine(nn.Linear(1, 1), **{**settings, "until_reach": 0.5, "max_steps": 5})  # and what makes them work
