"""IMLE and nearest-neighbour targets: constructed cases with known answers, and training."""

import json

import pytest
import torch
from cli_helpers import run_cli
from torch import nn

from targetgen import Batch, TrainingContext
from targetgen.config import from_dict
from targetgen.data import TensorImages
from targetgen.errors import ConfigError
from targetgen.plugins.imle import IMLE, IMLEOptions
from targetgen.plugins.nearest import NearestOptions, NearestTargets
from targetgen.training import build_run, plan_run_dir, train


def points_context(data, sample_latents, generator=None, **distributed):
    return TrainingContext(
        generator=generator or nn.Identity(),
        sample_latents=sample_latents,
        dataset=TensorImages(data),
        image_shape=(2,),
        device=torch.device("cpu"),
        total_steps=10,
        latent_shape=(2,),
        **distributed,
    )


class PassSizes(nn.Identity):
    """The identity generator, noting the size of every forward pass."""

    sizes: list[int] = []  # on the class: IMLE generates with a copy

    def forward(self, z):
        self.sizes.append(len(z))
        return z


def test_imle_matches_every_data_point_with_its_true_nearest_sample():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(7, 2, generator=g)
    options = IMLEOptions(samples_factor=3, generation_batch=4, search_batch=8, jitter=0.0)
    PassSizes.sizes.clear()  # the test may run more than once in a process
    imle = IMLE(options, points_context(data, None, generator=PassSizes()))
    pool = torch.cat(list(imle.pool_latents(0)))  # samples_factor 3; the generator is the identity
    assert pool.shape == (7 * 3, 2) and not torch.equal(pool, torch.cat(list(imle.pool_latents(1))))
    assert [len(chunk) for chunk in imle.pool_latents(0)] == [8, 8, 5]  # searched 8 at a time
    imle.on_epoch_start(0)
    assert PassSizes.sizes == [4, 4, 4, 4, 4, 1]  # generated 4 at a time within each search batch
    nearest = torch.cdist(data.double(), pool.double()).argmin(dim=1)
    assert torch.equal(imle.matched_z, pool[nearest])
    targets = imle.propose(Batch(data[[4, 1]], torch.tensor([4, 1])), step=0)
    assert torch.equal(targets.z, pool[nearest[[4, 1]]]) and torch.equal(targets.x, data[[4, 1]])


def test_imle_rematches_every_staleness_epochs_and_jitters_latents():
    data = torch.randn(5, 2)
    imle = IMLE(
        IMLEOptions(samples_factor=2, staleness=2, jitter=0.1), points_context(data, lambda n: torch.randn(n, 2))
    )
    epochs = []
    for epoch in range(5):
        imle.on_epoch_start(epoch)
        epochs.append(imle.matched_epoch)
    assert epochs == [0, 0, 2, 2, 4]
    z = imle.propose(Batch(data, torch.arange(5)), 0).z
    assert 0 < (z - imle.matched_z).abs().max() < 1.0


def test_adaptive_imle_rematches_only_the_data_points_whose_sample_came_within_their_threshold():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(6, 2, generator=g)
    options = IMLEOptions(samples_factor=3, jitter=0.0, adaptive=True, change_coef=0.25, backend="torch")
    imle = IMLE(options, points_context(data, None, generator=PassSizes()))

    def nearest_in_pool(epoch, rows):
        pool = torch.cat(list(imle.pool_latents(epoch)))  # the generator is the identity: samples are latents
        distance, index = torch.cdist(data[rows].double(), pool.double()).min(dim=1)
        return distance.pow(2), pool[index]

    imle.match(0)  # the first matching matches every data point; τ = (1 − γ) × its distance
    first_distance, first_z = nearest_in_pool(0, list(range(6)))
    assert torch.equal(imle.matched_z, first_z)
    assert torch.allclose(imle.thresholds.double(), 0.75 * first_distance, rtol=1e-4, atol=1e-6)  # float32 search

    PassSizes.sizes.clear()
    imle.match(1)  # nothing moved: no sample came within its threshold, and no pool is generated
    assert torch.equal(imle.matched_z, first_z) and imle.rematched_share == 0.0
    assert PassSizes.sizes == [6]  # one pass: the data points' current samples

    # the samples of data points 1 and 4 move halfway towards them: a quarter of the squared distance
    imle.matched_z[[1, 4]] = (first_z[[1, 4]] + data[[1, 4]]) / 2
    before = imle.matched_z.clone()
    imle.match(2)
    new_distance, new_z = nearest_in_pool(2, [1, 4])
    assert torch.equal(imle.matched_z[[1, 4]], new_z)  # their nearest samples in a fresh pool ...
    assert torch.equal(imle.matched_z[[0, 2, 3, 5]], before[[0, 2, 3, 5]])  # ... the others keep theirs
    assert torch.allclose(imle.thresholds[[1, 4]].double(), 0.75 * first_distance[[1, 4]] / 4, rtol=1e-4, atol=1e-6)
    assert imle.rematched_share == pytest.approx(2 / 6) and imle.matched_at.tolist() == [0, 2, 0, 0, 2, 0]

    forced = IMLE(
        IMLEOptions(samples_factor=3, adaptive=True, force_after=2, backend="torch"),
        points_context(data, None, generator=PassSizes()),
    )
    for epoch in range(3):
        forced.match(epoch)
    assert forced.rematched_share == 1.0 and forced.matched_at.tolist() == [2] * 6  # two epochs: due anyway


def test_nearest_with_alpha_1_returns_dataset_images_exactly(tiny_config):
    run = build_run(tiny_config(targets="nearest"))
    source, images = run.source, run.data.dataset.images
    torch.manual_seed(0)
    targets = source.propose(Batch(images[:32], torch.arange(32)), step=0)
    fake = targets.prediction.detach()
    truth = torch.cdist(fake.flatten(1).double(), images.flatten(1).double()).argmin(dim=1)
    assert torch.equal(targets.x, images[truth])


def test_nearest_alpha_and_k_move_part_way_to_the_mean_of_k_neighbours():
    data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 4.0], [10.0, 10.0]])
    sample = torch.tensor([[0.2, 0.1]])  # nearest: data 0, then 1, then 2
    options = NearestOptions(alpha=0.5, k=2, backend="torch")
    source = NearestTargets(options, points_context(data, lambda n: sample.clone()))
    targets = source.propose(Batch(data[:1], torch.tensor([0])), step=0)
    assert torch.allclose(targets.x, sample + 0.5 * (torch.tensor([[0.5, 0.0]]) - sample))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"k": 9}, r"k: expected 1 <= k <= 4 \(the data set size\), got 9"),
        ({"space": "downsample"}, "'downsample' needs images; these data are 2-d points"),
        ({"space": "inceptoin"}, "unknown space 'inceptoin'; expected one of pixels, downsample, projection"),
    ],
)
def test_nearest_bad_options_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        NearestTargets(NearestOptions(**bad), points_context(torch.randn(4, 2), None))


@pytest.mark.parametrize(
    "options, bad, message",
    [
        (NearestOptions, {"alpha": 0.0}, r"targets.options.alpha: expected a number in \(0, 1\], got 0.0"),
        (NearestOptions, {"alpha": 1.5}, r"targets.options.alpha: expected a number in \(0, 1\], got 1.5"),
        (IMLEOptions, {"staleness": 0}, "targets.options.staleness: expected an integer >= 1, got 0"),
        (IMLEOptions, {"search_batch": 0}, "targets.options.search_batch: expected an integer >= 1, got 0"),
        (IMLEOptions, {"memory_budget": -1}, "targets.options.memory_budget: expected a number > 0, got -1.0"),
        (IMLEOptions, {"jitter": -0.1}, "targets.options.jitter: expected a number >= 0, got -0.1"),
        (IMLEOptions, {"change_coef": 1}, r"targets.options.change_coef: expected a number in \(0, 1\), got 1.0"),
        (IMLEOptions, {"force_after": 0}, "targets.options.force_after: expected an integer >= 1, got 0"),
    ],
)
def test_bad_search_options_are_refused_by_the_schema(options, bad, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(options, bad, "targets.options")


@pytest.mark.parametrize("space", ["downsample", "projection"])
def test_reduced_spaces_have_the_configured_size(tiny_config, space):
    run = build_run(
        tiny_config(
            f"targets.options.space={space}",
            "targets.options.downsample_to=4",
            "targets.options.projection_dim=10",
            targets="nearest",
        )
    )
    assert run.source.index.dim == {"downsample": 16, "projection": 10}[space]


def test_imle_on_toy2d_brings_samples_closer_to_the_data(tiny_config, tmp_path):
    config = tiny_config(
        "data.name=toy2d",
        "data.mixture=grid25",
        "data.num_points=500",
        "train.batch_size=100",
        "train.steps=100",
        "targets.options.staleness=1",
        "targets.options.samples_factor=4",
        "regression.lr=0.002",
        targets="imle",
    )
    run = train(config, plan_run_dir(config, False), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = log[0]["match_distance"], log[-1]["match_distance"]
    assert log[-1]["matched_epoch"] == 19  # 500 points / 100 per batch: 20 epochs, matched at each
    assert last < 0.5 * first, (first, last)
    assert run.source.matched_z.shape == (500, 8)


@pytest.mark.parametrize("targets", ["imle", "nearest"])
@pytest.mark.parametrize("data", [[], ["--set", "data.name=toy2d", "--set", "data.num_points=300"]])
def test_cli_trains_imle_and_nearest_out_of_the_box(tmp_path, targets, data):
    code, out, err = run_cli(
        "train",
        "--targets",
        targets,
        "--steps",
        "3",
        "--set",
        "train.out_dir=" + str(tmp_path),
        "--set",
        "train.batch_size=64",
        "--set",
        "targets.options.samples_factor=2" if targets == "imle" else "targets.options.k=1",
        *data,
    )
    assert code == 0, err
    run_dir = tmp_path / f"{'toy2d' if data else 'digits'}-{targets}"
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert (run_dir / "samples" / "final.png").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 1
