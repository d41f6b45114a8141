"""Targets the discriminator has seen: D regularizers (spectral norm, R1, R2), inversion's d_fakes, the cfg
source (xICFG), and discriminator-driven sampling (latent, data, drs)."""

import json

import pytest
import torch
from cli_helpers import run_cli
from conftest import TINY
from torch import nn

from targetgen.config import ModelConfig
from targetgen.discriminators import Logit, Penalty, squared_gradient_norm
from targetgen.errors import ConfigError
from targetgen.models import build_discriminator
from targetgen.training import build_run, config_of_run, plan_run_dir, train
from targetgen.training.checkpoint import load_checkpoint
from targetgen.training.rundir import read_metrics

TINY_CLI = [a for o in TINY for a in ("--set", o)]
CFG = ["targets.options.T=3", "targets.options.pool=64", "regression.pool_epochs=2", "regression.optimizer=rmsprop"]


# ----------------------------------------------------------------------------- regularizers


def test_spectral_norm_keeps_every_layers_largest_singular_value_near_one():
    torch.manual_seed(0)
    netD = build_discriminator((1, 16, 16), ModelConfig(ndf=8), sigmoid=False, spectral_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in netD.modules())  # SN discriminators leave them out
    x = torch.randn(32, 1, 16, 16)
    for _ in range(30):  # power iterations run with training forward passes
        netD(x)
    layers = [m for m in netD.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 3
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.02)
        raw = torch.linalg.matrix_norm(layer.parametrizations.weight.original.detach().flatten(1), ord=2)
        assert abs(raw - 1) > 0.5  # the raw weights are far from it: the normalisation does it


def test_r1_and_r2_equal_a_hand_computed_gradient_norm():
    """D(x) = wᵀx + b on 2-D points: ∇x D = w for every x, so R1 = γ/2 ‖w‖², and with the lazy interval
    it is due every N steps and weighted × N."""
    netD = nn.Linear(2, 1)
    with torch.no_grad():
        netD.weight.copy_(torch.tensor([[3.0, -4.0]]))
    real, fake = torch.randn(8, 2), torch.randn(8, 2)
    assert squared_gradient_norm(netD, real).tolist() == pytest.approx([25.0] * 8)
    assert Penalty(r1=0.1)(netD, real, fake, step=7).item() == pytest.approx(0.1 / 2 * 25)
    assert Penalty(r1=0.1, r2=1.0)(netD, real, fake, step=0).item() == pytest.approx(0.05 * 25 + 0.5 * 25)
    lazy = Penalty(r1=0.1, every=4)
    assert lazy(netD, real, fake, step=3) is None
    assert lazy(netD, real, fake, step=4).item() == pytest.approx(4 * 0.05 * 25)
    # and the penalty trains D: its gradient with respect to w is γ · w
    netD.zero_grad()
    Penalty(r1=0.1)(netD, real, fake, step=0).backward()
    assert netD.weight.grad[0].tolist() == pytest.approx([0.3, -0.4])


def test_r1_on_a_sigmoid_discriminator_uses_its_logit():
    netD = build_discriminator((1, 16, 16), ModelConfig(ndf=8), sigmoid=True)
    x = torch.randn(4, 1, 16, 16)
    assert torch.allclose(Logit(netD)(x), torch.logit(netD(x)), atol=1e-4)


@pytest.mark.parametrize("targets", ["standard", "inversion", "cfg"])
def test_every_discriminator_honours_the_regularizers(tiny_config, targets):
    extra = CFG if targets == "cfg" else []
    config = tiny_config(
        "train.steps=4", "discriminator.spectral_norm=true", "discriminator.r1=0.01", *extra, targets=targets
    )
    run_dir = plan_run_dir(config)
    run = train(config, run_dir, progress=False)
    assert any(hasattr(m, "parametrizations") for m in run.strategy.discriminator().modules())
    penalty = run.strategy.penalty if targets == "standard" else run.source.context.penalty
    assert penalty.r1 == 0.01 and penalty.active
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert any(k.endswith("parametrizations.weight.original") for k in _keys(state["strategy"]))


def _keys(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize(
    "overrides, targets, message",
    [
        (["discriminator.r1=1"], "imle", "discriminator.r1: regularizes a discriminator; 'imle' trains none"),
        (["discriminator.spectral_norm=true"], "nearest", "discriminator.spectral_norm: regularizes a discriminator"),
        (
            ["discriminator.spectral_norm=true", "targets.options.d_loss=wgan-gp"],
            "inversion",
            "discriminator.spectral_norm: with d_loss wgan-gp",
        ),
        (
            ["discriminator.r1=1", "targets.options.d_loss=wgan-gp"],
            "inversion",
            "discriminator.r1 / r2: with d_loss wgan-gp",
        ),
        (["targets.options.T=0"], "cfg", "targets.options.T: expected an integer >= 1, got 0"),
        (["targets.options.eta=0"], "cfg", "targets.options.eta: expected a number > 0, got 0.0"),
        (["targets.options.pool=16", "regression.pool_batch=64"], "cfg", "targets.options.pool: 16 pairs"),
        (["targets.d_steps=2"], "cfg", "targets.d_steps: 2; 'cfg' counts its discriminator updates itself"),
        (["targets.options.d_fakes=moved"], "inversion", "targets.options.d_fakes: expected one of 'samples'"),
        (["targets.options.d_fakes=targets"], "imle", "unknown key 'targets.options.d_fakes'"),
    ],
)
def test_bad_discriminator_settings_are_one_line(tiny_config, overrides, targets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_run(tiny_config(*overrides, targets=targets))


# ----------------------------------------------------------------------------- inversion's d_fakes


@pytest.mark.parametrize("d_fakes", ["targets", "both"])
def test_d_fakes_trains_the_discriminator_on_the_inverse_examples(tiny_config, d_fakes):
    from targetgen import Batch

    run = build_run(tiny_config(f"targets.options.d_fakes={d_fakes}", "targets.options.lambda1=0.5"))
    source = run.source
    seen = []
    source.plain_netD.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach().clone()))
    images = run.data.dataset.images[:8]
    batch = Batch(images, torch.arange(8))
    samples = source.generated(batch).x.detach()
    expected = source.inverse_examples(samples, 0)[0]
    seen.clear()
    source.update(batch, 0)
    # the D step sees the real batch, then (both: the samples and) their inverse examples (before the real
    # batch, the inversion itself reads the samples)
    first_real = next(i for i, t in enumerate(seen) if torch.equal(t, images))
    fakes = seen[first_real + 1 :]
    assert len(fakes) == (2 if d_fakes == "both" else 1)
    assert any(torch.allclose(t, expected) for t in fakes)
    assert any(torch.equal(t, samples) for t in fakes) == (d_fakes == "both")


# ----------------------------------------------------------------------------- cfg


def test_cfg_trains_stages_resumes_exactly_and_samples_its_composite(tiny_config, tmp_path):
    options = [*CFG, "train.checkpoint_every=4", "train.log_every=1"]
    whole_config = tiny_config(*options, "train.steps=10", targets="cfg", name="whole")
    whole = train(whole_config, plan_run_dir(whole_config), progress=False)
    split_config = tiny_config(*options, "train.steps=4", targets="cfg", name="split")
    split_dir = plan_run_dir(split_config)
    train(split_config, split_dir, progress=False)
    resumed = train(config_of_run(split_dir, ["train.steps=10"]), split_dir, resume=True, progress=False)
    for p, q in zip(whole.generator.parameters(), resumed.generator.parameters(), strict=True):
        assert torch.equal(p, q)
    a = load_checkpoint(plan_run_dir(whole_config, True) / "checkpoints" / "last.pt")["strategy"]["source"]
    b = load_checkpoint(split_dir / "checkpoints" / "last.pt")["strategy"]["source"]
    for x, y in zip(a["snapshots"], b["snapshots"], strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    records = [json.loads(line) for line in (split_dir / "metrics.jsonl").read_text().splitlines()]
    # step 1 fits the warm start; then stages of T = 3 updates, the last of each fitting a pool of 64
    assert [r["step"] for r in records if "pool_pairs" in r] == [1, 4, 7, 10]
    assert records[0].get("warm_start") == 1.0 and [r["substep"] for r in records[1:4]] == [0, 1, 2]
    assert all("target_reach" in r and "target_distance_per_pixel" in r for r in records if "pool_pairs" in r)
    # what the run generates is the composite: G then its three stored discriminators
    sampler = resumed.strategy.sampler()
    assert type(sampler).__name__ == "Composite" and len(sampler.discriminators) == 3
    z = resumed.fixed_noise[:8]
    with torch.no_grad():
        assert not torch.allclose(sampler(z), resumed.generator(z))
    # sample (without the training data) and evaluate score the composite too
    code, out, err = run_cli("sample", str(split_dir), "--n", "8", "--out", str(tmp_path / "s.npz"), "--no-progress")
    assert code == 0, err
    from targetgen.training import load_generator

    trained = load_generator(split_dir)
    assert type(trained.sampling_generator).__name__ == "Composite"
    assert len(trained.sampling_generator.discriminators) == 3
    # probe asks for the targets of a stage's end: step 9 (counted from 0) ends the third stage, 10 starts the fourth
    assert resumed.strategy.source.probe_step(9) == 9 and resumed.strategy.source.probe_step(10) == 12
    code, out, err = run_cli("probe", str(split_dir), "--batch-size", "16")
    assert code == 0 and "alignment" in out, err


def test_cfg_logs_every_stage_end_whatever_the_logging_interval(tiny_config):
    config = tiny_config(*CFG, "train.steps=9", "train.log_every=5", targets="cfg")
    train(config, plan_run_dir(config), progress=False)
    records = read_metrics(plan_run_dir(config, True) / "metrics.jsonl")
    # the warm start (1) and the ends of the stages of T = 3 (4, 7) besides every fifth step and the last
    assert [r["step"] for r in records] == [1, 4, 5, 7, 9]
    assert [r["step"] for r in records if "target_reach" in r] == [1, 4, 7]


def test_cfg_refuses_a_pool_smaller_than_its_minibatch(tiny_config):
    with pytest.raises(ConfigError, match="targets.options.pool: 16 pairs"):
        build_run(tiny_config(*CFG, "targets.options.pool=16", "regression.pool_batch=64", targets="cfg"))


# ----------------------------------------------------------------------------- refinement


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("refine")
    code, _, err = run_cli(
        "train",
        "--out-dir",
        str(out),
        "--name",
        "r",
        "--targets",
        "standard",
        "--steps",
        "6",
        "--no-progress",
        *TINY_CLI,
    )
    assert code == 0, err
    return out / "r"


@pytest.mark.parametrize("kind", ["latent", "data", "drs"])
def test_refinement_moves_samples_up_the_discriminator_and_counts_its_cost(trained, kind):
    from targetgen.refine import Cost, Refinement, refined_chunks
    from targetgen.samples import generate_chunks
    from targetgen.training import load_generator

    run = load_generator(trained)
    d = Logit(run.discriminator)
    z = torch.randn(64, *run.latent_shape, generator=torch.Generator().manual_seed(0))
    gen = lambda part: next(generate_chunks(run.sampling_generator, part, len(part)))  # noqa: E731
    raw = gen(z)
    cost = Cost()
    refined = torch.cat(
        list(refined_chunks(run.sampling_generator, d, Refinement(kind, steps=10, noise=0.0), z, 32, gen, cost))
    )
    assert refined.shape == raw.shape and cost.samples == 64
    with torch.no_grad():
        assert d(refined).mean() > d(raw).mean()  # every refinement favours what D finds real
    per = cost.per_sample()
    if kind == "drs":
        assert per["refine_d_passes_per_sample"] >= 1 + 2048 / 64  # candidates and the burn-in, counted
    else:
        assert per["refine_d_passes_per_sample"] == 10 and per["refine_g_passes_per_sample"] == (
            11 if kind == "latent" else 1
        )


def test_refined_scores_beside_raw_ones_and_refusals(trained, tmp_path):
    code, out, err = run_cli(
        "evaluate",
        str(trained),
        "--n",
        "64",
        "--refine",
        "data",
        "--refine-steps",
        "3",
        "--out",
        str(tmp_path / "e.json"),
        "--no-progress",
    )
    assert code == 0, err
    record = json.loads((tmp_path / "e.json").read_text())
    assert {"fid_digits", "refined/fid_digits", "refine_d_passes_per_sample"} <= set(record)
    assert record["refine_d_passes_per_sample"] == 3
    code, _, err = run_cli("sample", str(trained), "--refine", "bogus", "--out", str(tmp_path / "s.png"))
    assert code == 2 and "evaluation.refine: expected one of 'none', 'latent', 'data', 'drs', got 'bogus'" in err
    imle_dir = tmp_path / "imle"
    code, _, err = run_cli(
        "train",
        "--out-dir",
        str(tmp_path),
        "--name",
        "imle",
        "--targets",
        "imle",
        "--steps",
        "2",
        "--no-progress",
        *TINY_CLI,
    )
    assert code == 0, err
    for command in (
        ["sample", str(imle_dir), "--refine", "latent", "--out", str(tmp_path / "s.png")],
        ["evaluate", str(imle_dir), "--refine", "drs", "--n", "64"],
    ):
        code, _, err = run_cli(*command)
        assert code == 2 and "needs a discriminator; 'imle' trains none" in err and len(err.strip().splitlines()) == 1
