"""Metrics against known answers and against prdc; FID pipeline, caching, the digit classifiers, `targetgen "
"evaluate`."""

import contextlib
import io
import json
import math
import time
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import run_cli

from targetgen import jsonsafe, metrics
from targetgen.config import DataConfig, EvaluationConfig, load_config
from targetgen.data import load_data, mixture_means
from targetgen.digits_classifier import RECIPES, held_out_accuracy
from targetgen.errors import ConfigError, DataError
from targetgen.evaluation import evaluate, fingerprint, real_features, resolve_features, resolve_metrics
from targetgen.features import (
    FID_WEIGHTS_FILE,
    DigitsCNN,
    DigitsFeatures,
    InceptionFeatures,
    MnistFeatures,
    find_fid_weights,
)
from targetgen.metrics import (
    MODE_SAMPLES,
    Statistics,
    class_metrics,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    kl_to_uniform,
    mode_metrics,
    precision_recall_density_coverage,
)
from targetgen.report import Group, metric_stats
from targetgen.training import load_trained, plan_run_dir, train


def test_shipped_digits_classifier_is_accurate_on_held_out_digits():
    features = DigitsFeatures()
    assert held_out_accuracy(features.model, RECIPES["digits"]) >= 0.97
    assert features.dim == 64 and sum(p.numel() for p in DigitsCNN().parameters()) * 4 < 1024**2


def test_shipped_mnist_classifier_is_accurate_on_its_1000_held_out_digits():
    features = MnistFeatures()
    assert RECIPES["mnist"].weights.stat().st_size < 1024**2
    assert held_out_accuracy(features.model, RECIPES["mnist"]) >= 0.96  # 0.977 when trained (README)
    images = load_data(DataConfig(name="mnist5k")).dataset.images[:100]
    assert features(images).shape == (100, 64) and features.classify(images).shape == (100, 10)
    assert features.version != DigitsFeatures().version  # caches keep the two spaces apart


def test_frechet_distance_of_known_gaussians():
    # diagonal covariances: ‖μ1 − μ2‖² + Σ (s1 + s2 − 2 √(s1 s2))
    a = Statistics(np.array([0.0, 1.0]), np.diag([1.0, 4.0]), 100)
    b = Statistics(np.array([3.0, 1.0]), np.diag([4.0, 1.0]), 100)
    assert frechet_distance(a, b) == pytest.approx(9 + (1 + 4 - 4) + (4 + 1 - 4), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_statistics_warn_when_samples_do_not_exceed_the_dimension():
    with pytest.warns(UserWarning, match="8 samples for 16-dimensional features"):
        feature_statistics(torch.randn(8, 16))


def prdc_reference(real, fake, k):
    """prdc's own compute_prdc (it prints a line; kept out of the test output)."""
    import prdc

    with contextlib.redirect_stdout(io.StringIO()):
        return {key: float(value) for key, value in prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=k).items()}


def assert_equal_to_prdc(real, fake):
    """Our defaults (precision/recall at k = 3, density/coverage at k = 5) and one k for all, against prdc."""
    ours, k3, k5 = (
        precision_recall_density_coverage(real, fake),
        prdc_reference(real, fake, 3),
        prdc_reference(real, fake, 5),
    )
    want = {"precision": k3["precision"], "recall": k3["recall"], "density": k5["density"], "coverage": k5["coverage"]}
    assert ours == pytest.approx(want, rel=0, abs=1e-12)
    assert precision_recall_density_coverage(real, fake, k=4) == pytest.approx(
        prdc_reference(real, fake, 4), rel=0, abs=1e-12
    )
    return ours


g = torch.Generator().manual_seed(0)
REAL = torch.randn(300, 16, generator=g)
FAKE = torch.randn(250, 16, generator=g) * 0.8 + 0.3


def test_prdc_metrics_equal_prdc_on_continuous_data():
    ours = assert_equal_to_prdc(REAL, FAKE)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1 and 0 < ours["coverage"] < 1
    assert ours == pytest.approx(
        {"precision": 0.916, "recall": 134 / 300, "density": 1.5112, "coverage": 286 / 300}, abs=1e-12
    )


def test_prdc_metrics_equal_prdc_on_ties_generated_equal_to_real():
    # strict < with one set of distances: each point lies in its own ball and in those of the k − 1
    # neighbours closer than the k-th, so density is exactly 1 (with <=: (k + 1) / k)
    ours = assert_equal_to_prdc(REAL, REAL.clone())
    assert ours == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


def test_prdc_metrics_equal_prdc_on_samples_copied_from_real_points():
    copied = REAL[torch.randint(len(REAL), (250,), generator=torch.Generator().manual_seed(1))]
    ours = assert_equal_to_prdc(REAL, copied)
    assert ours["precision"] == 1.0 and ours["coverage"] < 1.0


def test_prdc_metrics_equal_prdc_under_a_large_common_offset():
    # distances do not change under translation; float32 ‖a‖² + ‖b‖² − 2a·b loses them at +300
    # (targetgen's metrics before they were rebuilt on float64 differences gave precision 0.395 here)
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(1000, 256, generator=g), torch.randn(800, 256, generator=g) + 0.1
    shifted = assert_equal_to_prdc(real + 300.0, fake + 300.0)
    assert shifted == precision_recall_density_coverage(real, fake)
    assert shifted == pytest.approx(
        {"precision": 0.4725, "recall": 0.544, "density": 0.74075, "coverage": 0.89}, abs=1e-12
    )


def test_prdc_metrics_in_blocks_of_rows_are_identical(monkeypatch):
    whole = precision_recall_density_coverage(REAL, FAKE)
    monkeypatch.setattr(metrics, "DISTANCE_CHUNK_BYTES", 8 * 300 * 7)  # 7 rows per block
    assert precision_recall_density_coverage(REAL, FAKE) == whole


def test_identical_sets_score_one_and_disjoint_sets_zero():
    x = torch.randn(200, 8)
    same = precision_recall_density_coverage(x, x.clone())
    assert same["precision"] == same["recall"] == same["coverage"] == same["density"] == 1.0
    far = precision_recall_density_coverage(x, x + 1000.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="k = 5 need more than 5"):
        precision_recall_density_coverage(x[:5], x[:5])


# ----------------------------------------------------------------------------- KID


def plain_unbiased_mmd2(x, y):
    """Unbiased MMD² with k(a, b) = (aᵀb/d + 1)³, pair by pair in plain Python."""
    m, d = len(x), len(x[0])
    k = lambda a, b: (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / m**2
    return xx + yy - 2 * xy


def test_kid_of_whole_sets_equals_the_plain_formula():
    g = torch.Generator().manual_seed(0)
    real, fake = (
        torch.randn(25, 4, generator=g, dtype=torch.float64),
        torch.randn(25, 4, generator=g, dtype=torch.float64) + 0.5,
    )
    kid, std = kernel_inception_distance(real, fake, subsets=3, subset_size=25)  # every subset is the whole set
    assert kid == pytest.approx(plain_unbiased_mmd2(fake.tolist(), real.tolist()), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12) and kid > 0


# Samples on four points: MMD² has closed forms over the points' kernel matrix.
SUPPORT = torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 2, 0], [1, 1, 1]], dtype=torch.float64)
KERNEL = (SUPPORT @ SUPPORT.T / 3 + 1) ** 3


def population_mmd2(p, q):
    return (p @ KERNEL @ p + q @ KERNEL @ q - 2 * p @ KERNEL @ q).item()


def whole_sample_mmd2(x, y):
    """The unbiased MMD² of two whole samples, from how often each point occurs in them.

    A random subset's estimate has exactly this expectation: the value an unbiased KID must average to.
    """
    cx, cy = ((s.unsqueeze(1) == SUPPORT).all(dim=2).double().sum(dim=0) for s in (x, y))

    def within(c):
        n = c.sum()
        return (c @ KERNEL @ c - c @ KERNEL.diagonal()) / (n * (n - 1))  # pairs of different draws

    return (within(cx) + within(cy) - 2 * (cx @ KERNEL @ cy) / (cx.sum() * cy.sum())).item()


def draw(p, n, seed):
    return SUPPORT[torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(seed))]


def biased_v_statistic(real, fake, subsets, size):
    g = torch.Generator().manual_seed(2)
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
    values = []
    for _ in range(subsets):
        x, y = fake[torch.randperm(len(fake), generator=g)[:size]], real[torch.randperm(len(real), generator=g)[:size]]
        values.append((k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).item())
    return float(np.mean(values))


@pytest.mark.parametrize("q, population", [([0.4, 0.3, 0.2, 0.1], 0.0), ([0.1, 0.2, 0.3, 0.4], 2087 / 2700)])
def test_kid_is_unbiased_on_samples_with_a_known_mmd(q, population):
    # small subsets (10 points) make the biased V-statistic's offset large: KID must not have it
    p, q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    real, fake = draw(p, 4000, 0), draw(q, 4000, 1)
    expected = whole_sample_mmd2(fake, real)
    assert population_mmd2(q, p) == pytest.approx(population, abs=1e-12) and expected == pytest.approx(
        population, abs=0.05
    )
    kid, std = kernel_inception_distance(real, fake, subsets=2000, subset_size=10)
    standard_error = std / math.sqrt(2000)
    assert abs(kid - expected) < 3 * standard_error and standard_error < 0.03
    assert biased_v_statistic(real, fake, 2000, 10) - expected > 10 * standard_error
    assert (kid > 0.7) == (population > 0)


def test_kid_subsets_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first = kernel_inception_distance(REAL, FAKE, subsets=20, subset_size=50, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert kernel_inception_distance(REAL, FAKE, subsets=20, subset_size=50, seed=3) == first
    assert kernel_inception_distance(REAL, FAKE, subsets=20, subset_size=50, seed=4) != first


GRID = mixture_means(DataConfig(name="toy2d", mixture="grid25"))


def test_mode_metrics_on_the_true_mixture_and_on_one_mode():
    means, std = GRID, 0.05
    g = torch.Generator().manual_seed(0)
    true = means[torch.randint(25, (2500,), generator=g)] + std * torch.randn(2500, 2, generator=g)
    m = mode_metrics(true, means, std)
    # within 3σ of its mode: P(‖x‖ ≤ 3σ) = 1 − exp(−9/2) ≈ 0.9889 for a 2-D Gaussian
    assert m["modes_covered"] == m["modes_covered_20"] == 25 and m["mode_kl_to_uniform"] < 0.02
    assert m["high_quality_share"] == pytest.approx(1 - math.exp(-4.5), abs=0.006)
    one = means[7] + std * torch.randn(2500, 2, generator=g)
    m = mode_metrics(one, means, std)
    assert m["modes_covered"] == m["modes_covered_20"] == 1 and m["mode_kl_to_uniform"] == pytest.approx(math.log(25))


def test_published_rule_counts_one_high_quality_sample_and_the_strict_rule_twenty():
    std = 0.05
    near = torch.tensor([0.1, -0.05])  # 0.112 from its centre, within 3σ = 0.15
    samples = torch.cat(
        [
            GRID[0] + near.expand(1, 2),  # mode 0: 1 high-quality sample
            GRID[1] + near.expand(20, 2),  # mode 1: 20
            GRID[2] + near.expand(19, 2),  # mode 2: 19
            GRID[3] + torch.tensor([[0.16, 0.0]]).expand(5, 2),  # 3.2σ from mode 3: not high quality
            torch.tensor([[-3.0, -3.0]]).expand(5, 2),  # between four modes
        ]
    )
    m = mode_metrics(samples, GRID, std)
    assert m["modes_covered"] == 3 and m["modes_covered_20"] == 1 and m["modes_total"] == 25
    assert m["high_quality_share"] == 40 / 50
    p = torch.tensor([1, 20, 19], dtype=torch.float64) / 40  # reverse KL: Σ p log(p / (1/25)) over the modes hit
    assert m["mode_kl_to_uniform"] == pytest.approx((p * (25 * p).log()).sum().item(), rel=1e-12)


def test_without_high_quality_samples_the_reverse_kl_is_nan_not_infinite():
    m = mode_metrics(torch.tensor([[-3.0, -3.0], [1.0, 1.0]]), GRID, 0.05)
    assert m["modes_covered"] == m["modes_covered_20"] == 0 and m["high_quality_share"] == 0
    assert math.isnan(m["mode_kl_to_uniform"])


def test_class_metrics_count_covered_classes():
    probabilities = torch.eye(10)[torch.tensor([0] * 50 + [3] * 49 + [5])]
    m = class_metrics(probabilities)
    assert m["classes_covered"] == 2  # class 5 holds 1 % < 2 %
    assert m["mean_confidence"] == 1.0 and m["class_3_share"] == pytest.approx(0.49)


# ----------------------------------------------------------------------------- FID weights and the pipeline


def test_missing_fid_weights_fail_fast_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("TARGETGEN_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(DataError, match=f"{FID_WEIGHTS_FILE}.*put it at {tmp_path / 'hub' / 'checkpoints'}"):
        InceptionFeatures()
    with pytest.raises(DataError, match="TARGETGEN_FID_WEIGHTS points to /nowhere/x.pth, which is missing"):
        monkeypatch.setenv("TARGETGEN_FID_WEIGHTS", "/nowhere/x.pth")
        find_fid_weights()
    assert time.perf_counter() - start < 5


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """pytorch-fid's FID Inception with random weights, saved where a real file would go."""
    from pytorch_fid import inception

    with (
        mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None),
    ):
        model = inception.fid_inception_v3()
    path = tmp_path_factory.mktemp("hub") / FID_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


def test_fid_pipeline_with_randomly_initialised_inception_weights(tiny_config, tmp_path, random_inception_weights):
    config = tiny_config(
        "train.steps=2",
        "evaluation.features=inception",
        "evaluation.n=12",
        f"evaluation.cache_dir={tmp_path / 'cache'}",
        f"evaluation.fid_weights={random_inception_weights}",
    )
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 12 samples in 2048 dimensions: singular, and said so
        code, out, err = run_cli("evaluate", str(run_dir), "--metrics", "fid,pr")
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["fid"] > 0 and math.isfinite(result["fid"])
    features = InceptionFeatures(weights=random_inception_weights)
    x = load_data(config.data).dataset.images[:12]
    a = features(x)
    assert a.shape == (12, 2048) and torch.allclose(a, features(x))


# ----------------------------------------------------------------------------- the real statistics cache


class CountingFeatures:
    """Counts the images it embeds (the real subset is embedded a chunk at a time)."""

    name, version, calls = "pixels", "1", 0

    def __call__(self, images):
        CountingFeatures.calls += len(images)
        return images.flatten(1).float()


def test_real_statistics_are_cached_and_a_mismatched_cache_is_recomputed(tiny_config, tmp_path):
    config = tiny_config()
    data = load_data(config.data)
    options = EvaluationConfig(n=300, cache_dir=str(tmp_path))
    CountingFeatures.calls = 0
    first = real_features(data, config.data, CountingFeatures(), options)
    again = real_features(data, config.data, CountingFeatures(), options)
    assert CountingFeatures.calls == 300 and torch.equal(first.features, again.features)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    real_features(data, config.data, CountingFeatures(), EvaluationConfig(n=200, cache_dir=str(tmp_path)))
    assert CountingFeatures.calls == 500 and len(list(tmp_path.glob("*.npz"))) == 2  # N is in the key

    changed = CountingFeatures()
    changed.version = "2"  # new weights: the old statistics must not be used
    with pytest.warns(UserWarning, match="recomputing"):
        real_features(data, config.data, changed, options)
    assert CountingFeatures.calls == 800


def test_fid_stats_command_fills_the_cache(tmp_path):
    code, out, err = run_cli("fid-stats", "digits", "--cache-dir", str(tmp_path), "--n", "500")
    assert code == 0, err
    assert "500 images in 'digits' space (64-d)" in out
    assert len(list(tmp_path.glob("digits-digits-n500-*.npz"))) == 1


# ----------------------------------------------------------------------------- evaluate during and after training


def test_evaluate_a_digits_run_and_evaluation_during_training(tiny_config, tmp_path):
    config = tiny_config(
        "train.steps=4",
        "evaluation.every=2",
        "evaluation.n=200",
        f"evaluation.cache_dir={tmp_path / 'c'}",
        "regression.ema=0.9",
    )
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "eval/fid_digits" in line]
    assert [line["step"] for line in evaluated] == [2, 4]
    assert {
        "eval/precision",
        "eval/recall",
        "eval/classes_covered",
        "eval/kid_digits",
        "eval/kid_digits_std",
    } <= evaluated[0].keys()

    code, out, err = run_cli("evaluate", str(run_dir), "--ema", "--n", "200")
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["ema"] is True and result["fid_digits"] > 0 and 0 <= result["precision"] <= 1


def test_evaluate_modes_on_toy2d_and_bad_choices(tiny_config, tmp_path):
    config = tiny_config("data.name=toy2d", "data.mixture=grid25", "data.num_points=500", "train.steps=2")
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    code, out, err = run_cli("evaluate", str(run_dir), "--n", "500", "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["modes_total"] == 25 and "fid_pixels" in result and result["kid_pixels"] > 0
    code, _, err = run_cli("evaluate", str(run_dir), "--metrics", "fid,classes")
    assert code == 2 and "'classes' needs a feature space that classifies (digits, mnist), got features 'pixels'" in err
    code, _, err = run_cli("evaluate", str(run_dir), "--n", "5")
    assert (
        code == 2
        and "evaluation.n: precision/recall/density/coverage with k = 5 need more than 5 samples, got 5" in err
    )
    # the mode metrics draw the protocol's 2,500 samples of their own, whatever evaluation.n is
    with mock.patch("targetgen.evaluation.mode_metrics", wraps=mode_metrics) as counted:
        result = evaluate(load_trained(run_dir), EvaluationConfig(n=100, metrics="modes"))
    assert counted.call_args.args[0].shape == (MODE_SAMPLES, 2) == (2500, 2) and result["n"] == 100
    code, _, err = run_cli("evaluate", str(run_dir), "--ema")
    assert code == 2 and "keeps no EMA generator" in err


def test_runs_from_before_the_mlp_and_mixture_settings_still_evaluate(tiny_config, tmp_path):
    config = tiny_config("data.name=toy2d", "data.mixture=ring8", "data.num_points=500", "train.steps=2")
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    new_keys = {
        "model": [
            "g_depth",
            "d_depth",
            "g_width",
            "d_width",
            "g_batchnorm",
            "d_batchnorm",
            "g_activation",
            "d_activation",
            "d_maxout",
            "init_std",
        ],
        "data": ["radius", "resample"],
    }
    for section, keys in new_keys.items():
        for key in keys:
            del saved[section][key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))  # as an older targetgen wrote it
    code, _, err = run_cli("evaluate", str(run_dir), "--metrics", "modes")
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["modes_total"] == 8 and {"modes_covered", "modes_covered_20", "mode_kl_to_uniform"} <= result.keys()


def test_training_with_inception_evaluation_but_no_weights_fails_before_the_first_step(
    tiny_config, tmp_path, monkeypatch
):
    monkeypatch.delenv("TARGETGEN_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    config = tiny_config("train.steps=50", "evaluation.every=10", "evaluation.features=inception")
    run_dir = plan_run_dir(config, False)
    with pytest.raises(DataError, match=FID_WEIGHTS_FILE):
        train(config, run_dir, progress=False)
    assert not (run_dir / "checkpoints").exists()


# ----------------------------------------------------------------------------- mnist5k, k, and values that do not exist


def test_mnist5k_runs_are_evaluated_in_the_mnist_space(tiny_config, tmp_path):
    config = tiny_config("data.name=mnist5k", "train.steps=2", "evaluation.n=300")
    assert resolve_features(config.evaluation, config.data) == "mnist"
    assert resolve_metrics(config.evaluation, config.data, "mnist") == ["fid", "pr", "classes"]
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    code, out, err = run_cli("evaluate", str(run_dir), "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["fid_mnist"] > 0 and result["kid_mnist"] > 0 and result["kid_mnist_std"] > 0
    assert {"precision", "recall", "density", "coverage", "classes_covered", "mean_confidence"} <= result.keys()
    assert len(list((tmp_path / "c").glob("mnist5k-mnist-n300-1x16x16-*.npz"))) == 1


def test_the_data_fingerprint_covers_mnist5k():
    digits, mnist = DataConfig(name="digits", image_size=16), DataConfig(name="mnist5k", image_size=16)
    mnist_data = load_data(mnist)
    assert fingerprint(mnist_data, mnist) != fingerprint(load_data(digits), digits)
    assert fingerprint(mnist_data, mnist) == fingerprint(load_data(DataConfig(name="mnist5k", image_size=16)), mnist)
    mnist_data.dataset.images[0, 0, 8, 8] += 0.5  # the content, not only the config, is hashed
    assert fingerprint(mnist_data, mnist) != fingerprint(load_data(DataConfig(name="mnist5k", image_size=16)), mnist)


def test_evaluation_k_is_one_k_for_all_four_metrics_when_set(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="evaluation.k: expected an integer >= 1, got 0"):
        load_config(None, ["evaluation.k=0"])
    assert load_config(None, []).evaluation.k is None
    config = tiny_config(
        "train.steps=1",
        "evaluation.n=100",
        "evaluation.metrics=pr",
        "evaluation.features=pixels",
        "evaluation.k=2",
        f"evaluation.cache_dir={tmp_path}",
    )
    run_dir = plan_run_dir(config, False)
    run = train(config, run_dir, progress=False)
    from targetgen.evaluation import evaluate, generated_samples

    got = evaluate(run)
    real = real_features(run.data, config.data, load_features_pixels(), config.evaluation).features
    fake = generated_samples(run.generator, tuple(run.fixed_noise.shape[1:]), 100, 0, run.device).flatten(1)
    assert {k: got[k] for k in ("precision", "recall", "density", "coverage")} == pytest.approx(
        prdc_reference(real, fake, 2), rel=0, abs=1e-12
    )


def load_features_pixels():
    from targetgen.features import PixelFeatures

    return PixelFeatures()


def test_results_without_a_finite_value_are_null_in_json_and_explained_in_the_table(tiny_config, tmp_path):
    assert kl_to_uniform(torch.zeros(8)) == math.inf
    assert (
        jsonsafe.dumps({"a": math.inf, "b": [math.nan, 1.5], "c": {"d": -math.inf}})
        == '{"a": null, "b": [null, 1.5], "c": {"d": null}}'
    )
    with pytest.raises(ValueError):
        json.dumps(math.inf, allow_nan=False)  # what jsonsafe.dumps relies on for anything it does not convert

    # modes σ = 0.001 wide: after 2 steps no sample lies within 3σ of one, the KL of the empty histogram is inf
    config = tiny_config(
        "data.name=toy2d",
        "data.mixture=ring8",
        "data.std=0.001",
        "data.num_points=500",
        "train.steps=2",
        "evaluation.every=2",
        "evaluation.n=200",
        f"evaluation.cache_dir={tmp_path}",
    )
    run_dir = plan_run_dir(config, False)
    train(config, run_dir, progress=False)
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])  # strict JSON: no Infinity
    assert logged["eval/high_quality_share"] == 0 and logged["eval/mode_kl_to_uniform"] is None
    code, out, err = run_cli("evaluate", str(run_dir))
    assert code == 0, err
    assert json.loads((run_dir / "eval.json").read_text())["mode_kl_to_uniform"] is None
    assert "n/a (no high-quality samples)" in out

    # the comparison report skips missing values in its means
    summaries = [{"metrics": {"mode_kl_to_uniform": None}}, {"metrics": {"mode_kl_to_uniform": 0.5}}]
    stats = metric_stats([Group("inversion", "inversion", False, summaries)], "mode_kl_to_uniform")
    assert stats["inversion"].mean == 0.5 and stats["inversion"].n == 1
