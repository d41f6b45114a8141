"""The paper's identity, tested: a standard GAN generator step of size η equals
inversion with step λ1 followed by summed-ℓ2 regression with step λ2 = η / λ1."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import max_param_diff

import targetgen.plugins.inversion as inversion
from targetgen import Targets
from targetgen.training import build_run, plan_run_dir, train

ETA = 0.05  # large enough that 5 steps move the generator visibly


def fixed_discriminator_trajectories(tiny_config, lambda1, *overrides):
    """5 generator steps each way with the discriminator fixed; returns both generators."""
    run = build_run(
        tiny_config(
            f"targets.options.lambda1={lambda1}",
            "regression.optimizer=sgd",
            f"regression.lr={ETA / lambda1}",
            *overrides,
        )
    )
    source, engine = run.strategy.source, run.strategy.regression
    standard_G = copy.deepcopy(run.generator)
    initial_G = copy.deepcopy(run.generator)
    optimizer = torch.optim.SGD(standard_G.parameters(), lr=ETA)
    for step in range(5):
        z = torch.randn(16, 8, 1, 1)
        # standard: end-to-end non-saturating loss through the discriminator
        optimizer.zero_grad()
        output = source.netD(standard_G(z)).view(-1)
        F.binary_cross_entropy(output, torch.ones_like(output)).backward()
        optimizer.step()
        # decomposed: inverse examples, then regression onto them
        fake = run.generator(z)
        x_prime, _ = source.inverse_examples(fake.detach(), step)
        engine.fit(Targets(z, x_prime, prediction=fake), step)
    return standard_G, run.generator, initial_G


@pytest.mark.parametrize("lambda1", [1.0, 0.25])
def test_sgd_fixed_discriminator_agrees_to_1e_12(tiny_config, float64, lambda1):
    standard_G, decomposed_G, initial_G = fixed_discriminator_trajectories(tiny_config, lambda1)
    assert max_param_diff(standard_G, initial_G) > 1e-3  # the generators did move
    assert max_param_diff(standard_G, decomposed_G) <= 1e-12


def test_summed_inversion_loss_breaks_the_identity(tiny_config, float64, monkeypatch):
    def summed_bce(output, kind, probabilities):
        return F.binary_cross_entropy(output, torch.ones_like(output), reduction="sum")

    monkeypatch.setattr(inversion, "discrepancy", summed_bce)
    standard_G, decomposed_G, _ = fixed_discriminator_trajectories(tiny_config, 0.25)
    assert max_param_diff(standard_G, decomposed_G) > 1e-4  # eight orders of magnitude above 1e-12


def test_mean_regression_loss_breaks_the_identity(tiny_config, float64):
    standard_G, decomposed_G, _ = fixed_discriminator_trajectories(tiny_config, 0.25, "regression.reduction=mean")
    assert max_param_diff(standard_G, decomposed_G) > 1e-4


def test_full_alternating_training_with_adam_agrees(tiny_config, float64):
    """The two trainers, discriminator trained in alternation, Adam, λ1 = 1."""
    common = ["train.steps=5", "train.batch_size=64"]
    standard_cfg = tiny_config(*common, targets="standard", name="standard")
    standard = train(standard_cfg, plan_run_dir(standard_cfg, False), progress=False)
    decomposed_cfg = tiny_config(*common, "targets.options.lambda1=1.0", "regression.lr=0.0002", name="decomposed")
    decomposed = train(decomposed_cfg, plan_run_dir(decomposed_cfg, False), progress=False)

    assert standard.generator.main[0].weight.dtype == torch.float64
    assert max_param_diff(standard.generator, decomposed.generator) <= 1e-10
    assert max_param_diff(standard.strategy.netD, decomposed.strategy.source.netD) <= 1e-10
    fresh = build_run(standard_cfg)
    assert max_param_diff(standard.generator, fresh.generator) > 1e-4
