import json

import pytest
import torch
from torch import nn

from targetgen import Batch, TrainingContext
from targetgen.config import from_dict
from targetgen.errors import ConfigError
from targetgen.plugins.inversion import DiscriminatorInversion, InversionOptions
from targetgen.training import build_run, plan_run_dir, train


class LinearCritic(nn.Module):
    """D(x) = w·x: ∇x of the wasserstein discrepancy −mean D(x) is −w / N per sample."""

    outputs_probabilities = False

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x.flatten(1) * self.w).sum(1)


def source_with(options, w):
    context = TrainingContext(
        generator=nn.Identity(),
        sample_latents=lambda n: torch.zeros(n),
        dataset=None,
        image_shape=(1, 2, 2),
        device=torch.device("cpu"),
        total_steps=10,
        make_discriminator=lambda sigmoid: LinearCritic(w),
    )
    return DiscriminatorInversion(options, context)


def test_n1_steps_each_of_size_lambda1_over_n1():
    w = torch.tensor([1.0, -2.0, 0.5, 0.0])
    x0 = torch.zeros(4, 1, 2, 2)
    source = source_with(InversionOptions(lambda1=0.8, steps=4, discrepancy="wasserstein", d_loss="hinge"), w)
    x_prime, _ = source.inverse_examples(x0, step=0)
    # four steps of 0.2 along +w / N (N = 4), constant gradient: total 0.8 · w / 4
    assert torch.allclose(x_prime.flatten(1), (0.8 * w / 4).expand(4, 4))


@pytest.mark.parametrize("scale", [1.0, 1000.0])  # the normalised step ignores the gradient's scale
def test_normalized_step_moves_each_sample_exactly_lambda1_over_n1_per_step(scale):
    w = scale * torch.tensor([1.0, -2.0, 0.5, 0.0])
    x0 = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    options = InversionOptions(lambda1=0.6, steps=3, step_rule="normalized", discrepancy="wasserstein", d_loss="hinge")
    x_prime, _ = source_with(options, w).inverse_examples(x0, step=0)
    # -mean D(x) falls fastest along +w: three steps of 0.2 each along w / ‖w‖, whatever N and ‖w‖
    expected = x0.flatten(1) + 0.6 * w / w.norm()
    assert torch.allclose(x_prime.flatten(1), expected, atol=1e-6)
    assert torch.allclose((x_prime - x0).flatten(1).norm(dim=1), torch.full((5,), 0.6))


def test_mixed_step_is_the_gradient_step_cut_to_lambda1_over_n1():
    w = torch.tensor([1.0, -2.0, 0.5, 0.0])
    x0 = torch.zeros(4, 1, 2, 2)
    mixed = lambda w: (
        source_with(
            InversionOptions(
                lambda1=0.8,
                steps=4,
                step_rule="mixed",
                discrepancy="wasserstein",  # noqa: E731
                d_loss="hinge",
            ),
            w,
        )
        .inverse_examples(x0, 0)[0]
        .flatten(1)
    )
    # a short gradient step (0.2 · ‖w‖ / 4 = 0.11 < 0.2) is kept as it is ...
    assert torch.allclose(mixed(w), (0.8 * w / 4).expand(4, 4))
    # ... a long one (0.2 · 100 ‖w‖ / 4 = 11 > 0.2) is cut to 0.2 per step
    assert torch.allclose(mixed(100 * w), (0.8 * w / w.norm()).expand(4, 4), atol=1e-6)


def test_a_zero_gradient_moves_nothing_under_every_rule():
    x0 = torch.ones(2, 1, 2, 2)
    for rule in ("gradient", "normalized", "mixed"):
        options = InversionOptions(lambda1=1.0, step_rule=rule, discrepancy="wasserstein", d_loss="hinge")
        assert torch.equal(source_with(options, torch.zeros(4)).inverse_examples(x0, 0)[0], x0)


def test_inversion_leaves_the_discriminator_out_of_the_graph():
    """No parameter gradient is recorded: the discriminator's weights never reach autograd."""
    w = torch.tensor([1.0, -2.0, 0.5, 0.0])
    source = source_with(InversionOptions(steps=3, discrepancy="wasserstein", d_loss="hinge"), w)
    source.inverse_examples(torch.zeros(2, 1, 2, 2), 0)
    assert source.plain_netD.w.grad is None


def test_clamp_and_regularizers_shape_the_targets():
    w = torch.tensor([100.0, -100.0, 0.0, 0.0])
    x0 = torch.zeros(2, 1, 2, 2)
    plain = source_with(InversionOptions(lambda1=1.0, discrepancy="wasserstein", d_loss="hinge"), w)
    clamped = source_with(InversionOptions(lambda1=1.0, discrepancy="wasserstein", d_loss="hinge", clamp=True), w)
    assert plain.inverse_examples(x0, 0)[0].abs().max() == 50.0
    assert clamped.inverse_examples(x0, 0)[0].abs().max() == 1.0
    # proximity: with x = x0 its gradient vanishes at the first step, so use two steps
    near = source_with(
        InversionOptions(
            lambda1=1.0, steps=2, discrepancy="wasserstein", d_loss="hinge", regularizers={"proximity": 1.0}
        ),
        w,
    )
    assert near.inverse_examples(x0, 0)[0].abs().max() < plain.inverse_examples(x0, 0)[0].abs().max()
    tv = source_with(
        InversionOptions(lambda1=1.0, steps=2, discrepancy="wasserstein", d_loss="hinge", regularizers={"tv": 10.0}), w
    )
    x_tv, x_plain = tv.inverse_examples(x0, 0)[0], plain.inverse_examples(x0, 0)[0]
    jump = lambda x: (x[:, :, 0, 0] - x[:, :, 0, 1]).abs().max()  # noqa: E731
    assert jump(x_plain) == 100.0 and jump(x_tv) < 95.0  # TV smooths the edge


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"lambda1": 0.0}, r"targets.options.lambda1: expected a number > 0, got 0.0"),
        ({"steps": 0}, r"targets.options.steps: expected an integer >= 1, got 0"),
        (
            {"step_rule": "unit"},
            r"targets.options.step_rule: expected one of 'gradient', 'normalized', 'mixed', got 'unit'",
        ),
        ({"d_lr": -1}, r"targets.options.d_lr: expected a number > 0, got -1.0"),
        ({"d_betas": [0.5, 1.5]}, r"targets.options.d_betas\[1\]: expected a number in \[0, 1\), got 1.5"),
        ({"regularizers": {"tv": -0.1}}, r"targets.options.regularizers.tv: expected a number >= 0, got -0.1"),
    ],
)
def test_bad_options_are_refused_by_the_schema(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(InversionOptions, bad, "targets.options")


@pytest.mark.parametrize(
    "d_loss, discrepancy", [("bce", "bce"), ("lsgan", "l2"), ("hinge", "hinge"), ("wgan-gp", "wasserstein")]
)
def test_every_discriminator_loss_trains_and_moves_samples_towards_real(tiny_config, d_loss, discrepancy):
    config = tiny_config(
        "train.steps=3",
        f"targets.options.d_loss={d_loss}",
        f"targets.options.discrepancy={discrepancy}",
        "targets.options.regularizers={tv: 0.001, range: 1.0}",
    )
    run_dir = plan_run_dir(config, False)
    run = train(config, run_dir, progress=False)
    stats = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert stats["target_distance"] > 0 and "target_reach" in stats
    # RMS over a sample's 16×16 pixels, averaged over samples: the mean per-sample L2 norm / 16
    assert stats["target_distance_per_pixel"] == pytest.approx(stats["target_distance"] / 16, rel=1e-5)
    assert stats["d_fake_after_inversion"] > stats["d_fake_before_inversion"]  # x' looks more real to D
    assert run.strategy.source.netD.outputs_probabilities == (d_loss == "bce")


def test_lambda1_schedule(tiny_config):
    run = build_run(tiny_config("train.steps=11", "targets.options.schedule=linear", "targets.options.lambda1=0.5"))
    assert run.strategy.source.lambda1(0) == 0.5 and run.strategy.source.lambda1(10) == 0.0


def discriminator_state(source):
    return {k: v.clone() for k, v in source.plain_netD.state_dict().items()}


def test_propose_has_no_side_effects_and_update_trains_the_discriminator(tiny_config):
    run = build_run(tiny_config("train.steps=3"))
    source = run.source
    batch = Batch(run.data.dataset.images[:8], torch.arange(8))
    before = discriminator_state(source)
    targets = source.propose(batch, 0)
    assert all(torch.equal(before[k], v) for k, v in source.plain_netD.state_dict().items())
    assert targets.z is source.generated(batch).z  # the propose phase reads the step's samples
    stats = source.update(batch, 0)
    assert set(stats) == {"d_loss", "d_real", "d_fake"}
    assert not torch.equal(before["main.0.weight"], source.plain_netD.state_dict()["main.0.weight"])


@pytest.mark.parametrize("targets", ["inversion", "standard"])
def test_d_steps_updates_the_discriminator_that_often_per_step(tiny_config, targets):
    run = build_run(tiny_config("train.steps=2", "targets.d_steps=3", targets=targets))
    optimizer = run.source.optimizerD if targets == "inversion" else run.strategy.optimizerD
    batch = Batch(run.data.dataset.images[:8], torch.arange(8))
    run.strategy.step(batch, 0, log=False)
    run.strategy.step(batch, 1, log=False)
    assert {int(state["step"]) for state in optimizer.state.values()} == {6}


def test_d_steps_needs_a_source_with_an_update_phase(tiny_config):
    with pytest.raises(
        ConfigError,
        match=r"targets.d_steps: 2 needs a source with an update phase; 'nearest' trains "
        r"nothing of its own there \(use 1\)",
    ):
        build_run(tiny_config("targets.d_steps=2", targets="nearest"))


def test_a_version_1_source_still_trains(tiny_config):
    """Contract version 1: no update phase, latents drawn from the context inside propose."""
    from dataclasses import dataclass

    from targetgen import TargetGenerator, Targets
    from targetgen.training.decomposed import Decomposed

    @dataclass
    class NoOptions:
        pass

    class VersionOne(TargetGenerator):
        name, Options, proposals = "v1", NoOptions, 0

        def propose(self, batch, step):
            z = self.context.sample_latents(len(batch.images))
            fake = self.context.generator(z)
            VersionOne.proposals += 1  # whatever it trains, it trains here
            return Targets(z=z, x=batch.images, prediction=fake)

    run = build_run(tiny_config("train.steps=2"))
    before = [p.clone() for p in run.generator.parameters()]
    strategy = Decomposed(
        VersionOne(NoOptions(), run.source.context), run.strategy.regression, run.strategy.sample_latents
    )
    stats = strategy.step(Batch(run.data.dataset.images[:8], torch.arange(8)), 0, log=True)
    assert VersionOne.proposals == 1 and stats["target_reach"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, run.generator.parameters(), strict=True))
