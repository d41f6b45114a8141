"""Metrics against known answers; FID pipeline, caching, the digits classifier, `targetgen evaluate`."""

import json
import math
import time
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
import yaml

from targetgen.config import DataConfig, EvaluationConfig
from targetgen.data import load_data, mixture_means
from targetgen.digits_classifier import held_out_accuracy
from targetgen.errors import DataError
from targetgen.evaluation import evaluate, real_features
from targetgen.features import FID_WEIGHTS_FILE, DigitsCNN, DigitsFeatures, InceptionFeatures, find_fid_weights
from targetgen.metrics import (
    MODE_SAMPLES, Statistics, class_metrics, feature_statistics, frechet_distance, mode_metrics,
    precision_recall_density_coverage,
)
from targetgen.training import load_trained, new_run_dir, train


def test_shipped_digits_classifier_is_accurate_on_held_out_digits():
    features = DigitsFeatures()
    assert held_out_accuracy(features.model) >= 0.97
    assert features.dim == 64 and sum(p.numel() for p in DigitsCNN().parameters()) * 4 < 1024**2


def test_frechet_distance_of_known_gaussians():
    # diagonal covariances: ‖μ1 − μ2‖² + Σ (s1 + s2 − 2 √(s1 s2))
    a = Statistics(np.array([0.0, 1.0]), np.diag([1.0, 4.0]), 100)
    b = Statistics(np.array([3.0, 1.0]), np.diag([4.0, 1.0]), 100)
    assert frechet_distance(a, b) == pytest.approx(9 + (1 + 4 - 4) + (4 + 1 - 4), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_statistics_warn_when_samples_do_not_exceed_the_dimension():
    with pytest.warns(UserWarning, match="8 samples for 16-dimensional features"):
        feature_statistics(torch.randn(8, 16))


def reference_prdc(real, fake, k):
    """Straight from the papers' definitions, with loops."""
    def radii(x):
        return [sorted(((x[i] - x[j]) ** 2).sum().item() for j in range(len(x)))[k] for i in range(len(x))]

    rr, fr = radii(real), radii(fake)
    d = lambda a, b: ((a - b) ** 2).sum().item()  # noqa: E731
    precision = np.mean([any(d(f, r) <= rr[i] for i, r in enumerate(real)) for f in fake])
    recall = np.mean([any(d(r, f) <= fr[j] for j, f in enumerate(fake)) for r in real])
    density = sum(d(f, r) <= rr[i] for f in fake for i, r in enumerate(real)) / (k * len(fake))
    coverage = np.mean([min(d(r, f) for f in fake) <= rr[i] for i, r in enumerate(real)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_precision_recall_density_coverage_equal_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 3, generator=g), torch.randn(30, 3, generator=g) * 0.7 + 1.0
    got = precision_recall_density_coverage(real, fake, k=3)
    want = reference_prdc(real.double(), fake.double(), 3)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_identical_sets_score_one_and_disjoint_sets_zero():
    x = torch.randn(200, 8)
    same = precision_recall_density_coverage(x, x.clone())
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = precision_recall_density_coverage(x, x + 1000.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


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
    samples = torch.cat([
        GRID[0] + near.expand(1, 2),    # mode 0: 1 high-quality sample
        GRID[1] + near.expand(20, 2),   # mode 1: 20
        GRID[2] + near.expand(19, 2),   # mode 2: 19
        GRID[3] + torch.tensor([[0.16, 0.0]]).expand(5, 2),  # 3.2σ from mode 3: not high quality
        torch.tensor([[-3.0, -3.0]]).expand(5, 2),           # between four modes
    ])
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

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
         mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None):
        model = inception.fid_inception_v3()
    path = tmp_path_factory.mktemp("hub") / FID_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


def test_fid_pipeline_with_randomly_initialised_inception_weights(tiny_config, tmp_path, random_inception_weights):
    config = tiny_config("train.steps=2", "evaluation.features=inception", "evaluation.n=12",
                         f"evaluation.cache_dir={tmp_path / 'cache'}", f"evaluation.fid_weights={random_inception_weights}")
    run_dir = new_run_dir(config, False)
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
    name, version, calls = "pixels", "1", 0

    def __call__(self, images):
        CountingFeatures.calls += 1
        return images.flatten(1).float()


def test_real_statistics_are_cached_and_a_mismatched_cache_is_recomputed(tiny_config, tmp_path):
    config = tiny_config()
    data = load_data(config.data)
    options = EvaluationConfig(n=300, cache_dir=str(tmp_path))
    CountingFeatures.calls = 0
    first = real_features(data, config.data, CountingFeatures(), options)
    again = real_features(data, config.data, CountingFeatures(), options)
    assert CountingFeatures.calls == 1 and torch.equal(first.features, again.features)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    real_features(data, config.data, CountingFeatures(), EvaluationConfig(n=200, cache_dir=str(tmp_path)))
    assert CountingFeatures.calls == 2 and len(list(tmp_path.glob("*.npz"))) == 2  # N is in the key

    changed = CountingFeatures()
    changed.version = "2"  # new weights: the old statistics must not be used
    with pytest.warns(UserWarning, match="recomputing"):
        real_features(data, config.data, changed, options)
    assert CountingFeatures.calls == 3


def test_fid_stats_command_fills_the_cache(tmp_path):
    code, out, err = run_cli("fid-stats", "digits", "--cache-dir", str(tmp_path), "--n", "500")
    assert code == 0, err
    assert "500 images in 'digits' space (64-d)" in out
    assert len(list(tmp_path.glob("digits-digits-n500-*.npz"))) == 1


# ----------------------------------------------------------------------------- evaluate during and after training


def test_evaluate_a_digits_run_and_evaluation_during_training(tiny_config, tmp_path):
    config = tiny_config("train.steps=4", "evaluation.every=2", "evaluation.n=200", f"evaluation.cache_dir={tmp_path / 'c'}",
                         "regression.ema=0.9")
    run_dir = new_run_dir(config, False)
    train(config, run_dir, progress=False)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "eval/fid_digits" in line]
    assert [line["step"] for line in evaluated] == [2, 4]
    assert {"eval/precision", "eval/recall", "eval/classes_covered"} <= evaluated[0].keys()

    code, out, err = run_cli("evaluate", str(run_dir), "--ema", "--n", "200")
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["ema"] is True and result["fid_digits"] > 0 and 0 <= result["precision"] <= 1


def test_evaluate_modes_on_toy2d_and_bad_choices(tiny_config, tmp_path):
    config = tiny_config("data.name=toy2d", "data.mixture=grid25", "data.num_points=500", "train.steps=2")
    run_dir = new_run_dir(config, False)
    train(config, run_dir, progress=False)
    code, out, err = run_cli("evaluate", str(run_dir), "--n", "500", "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["modes_total"] == 25 and "fid_pixels" in result
    code, _, err = run_cli("evaluate", str(run_dir), "--metrics", "fid,classes")
    assert code == 2 and "'classes' needs the digits classifier" in err
    # the mode metrics draw the protocol's 2,500 samples of their own, whatever evaluation.n is
    with mock.patch("targetgen.evaluation.mode_metrics", wraps=mode_metrics) as counted:
        result = evaluate(load_trained(run_dir), EvaluationConfig(n=100, metrics="modes"))
    assert counted.call_args.args[0].shape == (MODE_SAMPLES, 2) == (2500, 2) and result["n"] == 100
    code, _, err = run_cli("evaluate", str(run_dir), "--ema")
    assert code == 2 and "keeps no EMA generator" in err


def test_runs_from_before_the_mlp_and_mixture_settings_still_evaluate(tiny_config, tmp_path):
    config = tiny_config("data.name=toy2d", "data.mixture=ring8", "data.num_points=500", "train.steps=2")
    run_dir = new_run_dir(config, False)
    train(config, run_dir, progress=False)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    new_keys = {"model": ["g_depth", "d_depth", "g_width", "d_width", "g_batchnorm", "d_batchnorm", "g_activation",
                          "d_activation", "d_maxout", "init_std"], "data": ["radius", "resample"]}
    for section, keys in new_keys.items():
        for key in keys:
            del saved[section][key]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))  # as an older targetgen wrote it
    code, _, err = run_cli("evaluate", str(run_dir), "--metrics", "modes")
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["modes_total"] == 8 and {"modes_covered", "modes_covered_20", "mode_kl_to_uniform"} <= result.keys()


def test_training_with_inception_evaluation_but_no_weights_fails_before_the_first_step(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("TARGETGEN_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    config = tiny_config("train.steps=50", "evaluation.every=10", "evaluation.features=inception")
    run_dir = new_run_dir(config, False)
    with pytest.raises(DataError, match=FID_WEIGHTS_FILE):
        train(config, run_dir, progress=False)
    assert not (run_dir / "checkpoints").exists()
