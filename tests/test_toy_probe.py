"""The paper's toy GAN (mean yes, covariance no) and the K_θ probe (exact, JVP form, first-order prediction)."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_cli

from targetgen.api import Targets
from targetgen.config import ModelConfig, RegressionConfig
from targetgen.models import MLPGenerator, MLPSpec, build_generator
from targetgen.probe import kernel, kernel_vector_product, predicted_move, predicted_reach
from targetgen.regression import RegressionEngine
from targetgen.toy import LinearGenerator, closed_form_regression, train_toy


def random_linear(dim: int) -> LinearGenerator:
    g = LinearGenerator(dim).double()
    with torch.no_grad():
        g.affine.weight.normal_()
        g.affine.bias.normal_()
    return g


def test_linear_generator_kernel_is_norm_of_z_tilde_times_identity(float64):
    torch.manual_seed(0)
    dim = 4
    generator = random_linear(dim)
    z = torch.randn(1, dim)
    z_tilde = torch.cat([z[0], torch.ones(1)])
    k = kernel(generator, z)
    assert torch.allclose(k, z_tilde.pow(2).sum() * torch.eye(dim), rtol=0, atol=1e-10)
    # Two inputs share B: the cross blocks are (z̃_a · z̃_b) I
    z2 = torch.randn(2, dim)
    zt = torch.cat([z2, torch.ones(2, 1)], dim=1)
    expected = torch.kron(zt @ zt.T, torch.eye(dim))
    assert torch.allclose(kernel(generator, z2), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_kernel_vector_product_equals_exact_kernel(float64, model):
    torch.manual_seed(1)
    if model == "mlp":
        generator, z = MLPGenerator(3, MLPSpec(width=16)).double(), torch.randn(5, 3)
    else:  # train-mode BatchNorm: samples of a batch move together (cross blocks)
        generator, z = build_generator((1, 16, 16), ModelConfig(nz=4, ngf=4)).double(), torch.randn(3, 4, 1, 1)
    with torch.no_grad():
        shape = generator(z).shape
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    v = torch.randn(shape)
    exact = (kernel(generator, z) @ v.reshape(-1)).reshape(shape)
    fast = kernel_vector_product(generator, z, v)
    assert torch.allclose(fast, exact, rtol=1e-10, atol=1e-10)
    # probing moved no parameter and no BatchNorm statistic
    for key, value in generator.state_dict().items():
        assert torch.equal(value, before[key]), key


def sgd_step_change(generator, z, targets, step):
    engine = RegressionEngine(generator, RegressionConfig(lr=step, optimizer="sgd"), total_steps=1)
    with torch.no_grad():
        before = generator(z)
    stats = engine.fit(Targets(z=z, x=targets), 0, measure_reach=True)
    with torch.no_grad():
        return generator(z) - before, stats["target_reach"]


def test_first_order_prediction_matches_an_actual_sgd_step(float64):
    torch.manual_seed(2)
    z = torch.randn(8, 3)
    errors = []
    for step in (1e-3, 1e-4):
        torch.manual_seed(3)
        generator = MLPGenerator(3, MLPSpec(width=32)).double()
        with torch.no_grad():
            targets = generator(z) + torch.randn(8, 2)
        predicted = predicted_move(generator, z, targets, step)
        reach = predicted_reach(generator, z, targets, step)
        actual, measured_reach = sgd_step_change(generator, z, targets, step)
        errors.append(((actual - predicted).norm() / actual.norm()).item())
        assert reach == pytest.approx(measured_reach, rel=1e-2)
    # first order: the relative error of x − ηK∇L shrinks with η (about 10× per 10× smaller step)
    assert errors[0] < 1e-2 and errors[1] < errors[0] / 5


def test_best_sgd_step_reaches_the_squared_alignment(float64):
    torch.manual_seed(6)
    generator = MLPGenerator(3, MLPSpec(width=16)).double()
    z = torch.randn(5, 3)
    with torch.no_grad():
        targets = generator(z) + torch.randn(5, 2)
        request = targets - generator(z)
    k_r = kernel_vector_product(generator, z, request)
    best_step = ((request * k_r).sum() / k_r.pow(2).sum()).item()
    cos = ((request * k_r).sum() / (request.norm() * k_r.norm())).item()
    assert predicted_reach(generator, z, targets, best_step) == pytest.approx(cos**2, rel=1e-10)
    for other in (0.5 * best_step, 2 * best_step):
        assert predicted_reach(generator, z, targets, other) < cos**2


def test_linear_generator_first_order_prediction_is_exact(float64):
    torch.manual_seed(4)
    generator = random_linear(3)
    z = torch.randn(6, 3)
    targets = torch.randn(6, 3)
    predicted = predicted_move(generator, z, targets, 0.01)
    actual, _ = sgd_step_change(generator, z, targets, 0.01)
    assert torch.allclose(actual, predicted, rtol=0, atol=1e-12)


def test_closed_form_regression_recovers_an_affine_map(float64):
    torch.manual_seed(5)
    generator = LinearGenerator(3).double()
    w, b = torch.randn(3, 3), torch.randn(3)
    z = torch.randn(50, 3)
    closed_form_regression(generator, z, z @ w.T + b)
    assert torch.allclose(generator.affine.weight, w, atol=1e-10)
    assert torch.allclose(generator.affine.bias, b, atol=1e-10)


@pytest.mark.parametrize("regression, steps", [("closed-form", 300), ("gradient", 400)])
def test_toy_gan_matches_the_mean_but_not_the_covariance(regression, steps):
    result, generator, _ = train_toy(dim=2, steps=steps, regression=regression)
    mean0, mean1 = result.mean_error[0], result.mean_error[-1]
    cov0, cov1 = result.covariance_error[0], result.covariance_error[-1]
    assert mean0 > 3.0 and mean1 < 0.1 * mean0  # the mean is found ...
    assert cov1 > 0.9 * cov0 > 1.5  # ... the covariance error stays (it even grows)


def test_toy_cli_writes_json_and_plots(tmp_path):
    code, stdout, stderr = run_cli("toy", "--steps", "30", "--out", str(tmp_path))
    assert code == 0, stderr
    record = json.loads((tmp_path / "toy.json").read_text())
    assert record["dim"] == 2 and record["steps"][-1] == 30
    assert record["final"]["mean_error"] == record["mean_error"][-1]
    for png in ("errors.png", "scatter.png"):
        assert (tmp_path / png).stat().st_size > 5_000
    code, _, stderr = run_cli("toy", "--regression", "exact", "--out", str(tmp_path))
    assert code == 2 and "expected closed-form or gradient, got 'exact'" in stderr


def test_probe_of_a_trained_run_is_consistent(tiny_config, tmp_path):
    from targetgen.probe import probe_run
    from targetgen.training import load_trained, plan_run_dir, train

    config = tiny_config("train.steps=3", "regression.lr=0.0008", "targets.options.lambda1=0.25", targets="inversion")
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    result = probe_run(load_trained(run_dir), batch_size=8)
    assert result["kappa_request"] > 0 and result["kappa_random"] > 0  # K is positive semi-definite
    assert 0 < result["alignment"] <= 1
    assert result["best_sgd_reach"] == pytest.approx(result["alignment"] ** 2, rel=1e-6)
    again = probe_run(load_trained(run_dir), batch_size=8)
    assert again == pytest.approx(result, rel=1e-5)  # seeded: the same batch, latents and targets

    code, _, stderr = run_cli("probe", str(run_dir), "--batch-size", "1")
    assert code == 2 and "--batch-size: expected at least 2" in stderr
    standard = tiny_config("train.steps=1", targets="standard", name="std")
    std_dir = plan_run_dir(standard, False)
    train(standard, std_dir, progress=False)
    code, _, stderr = run_cli("probe", str(std_dir))
    assert code == 2 and "a standard run has no target source" in stderr
