"""The mix source: how a batch is split, how steps alternate, and that members keep their own ways."""

import json

import pytest
import torch

from targetgen import Batch
from targetgen.plugins.mix import split_sizes
from targetgen.training import build_run, plan_run_dir, train

SOURCES = (
    "targets.options.sources=[{name: inversion, weight: 0.7, options: {lambda1: 0.25}}, "
    "{name: imle, weight: 0.3, options: {staleness: 1, samples_factor: 2, jitter: 0}}]"
)


@pytest.mark.parametrize(
    "total, weights, sizes",
    [
        (10, [0.7, 0.3], [7, 3]),
        (32, [0.7, 0.3], [22, 10]),  # 22.4 and 9.6: the larger remainder gets the last sample
        (5, [1, 1, 1], [2, 2, 1]),  # equal remainders: the first listed first
        (3, [0.98, 0.01, 0.01], [1, 1, 1]),  # every member at least one sample ...
        (10, [0.98, 0.01, 0.01], [8, 1, 1]),  # ... taken from the largest surplus
        (2, [0.98, 0.01, 0.01], [2, 0, 0]),  # ... while there are enough samples
        (4, [1, 0, 1], [2, 0, 2]),  # weight 0: no share
    ],
)
def test_split_sizes(total, weights, sizes):
    assert split_sizes(total, weights) == sizes


def test_split_sizes_always_add_up():
    draw = torch.Generator().manual_seed(0)
    for _ in range(500):
        weights = (torch.rand(int(torch.randint(1, 6, (), generator=draw)), generator=draw) * 3).tolist()
        total = int(torch.randint(len(weights), 300, (), generator=draw))
        sizes = split_sizes(total, weights)
        assert sum(sizes) == total and all(s >= 1 for s in sizes)


def test_split_gives_each_member_its_share_of_real_and_generated_samples(tiny_config):
    run = build_run(tiny_config("train.steps=3", SOURCES, targets="mix"))
    mix = run.source
    mix.on_epoch_start(0)
    batch = Batch(run.data.dataset.images[:10], torch.arange(10, 20))
    targets = mix.propose(batch, 0)
    generated, imle = mix.generated(batch), mix.members[1].source
    assert len(targets.z) == 10
    # inversion: the first 7 of the step's samples, regressed from their own latents, with their forward pass
    assert torch.equal(targets.z[:7], generated.z[:7]) and torch.equal(targets.prediction[:7], generated.x[:7])
    # IMLE: the last 3 data points, from their matched latents
    assert torch.equal(targets.z[7:], imle.matched_z[17:20]) and torch.equal(targets.x[7:], batch.images[7:])
    assert set(targets.stats) >= {"inversion/lambda1", "imle/match_distance"}
    # the update trains the discriminator on the very samples then inverted: one set of shares per step
    part = mix.parts(batch)[0][1]
    assert part is mix.parts(batch)[0][1] and torch.equal(part.generated.x, generated.x[:7])
    assert set(mix.diagnostics(targets)) == {"inversion/d_fake_after_inversion", "inversion/target_distance"}


def test_alternate_follows_the_weights_by_largest_deficit(tiny_config):
    run = build_run(
        tiny_config(
            "targets.options.mode=alternate",
            "targets.options.sources=[{name: inversion, weight: 1}, "
            "{name: imle, weight: 2}, {name: nearest, weight: 0}]",
            targets="mix",
        )
    )
    mix = run.source
    order = [mix.members.index(mix.active(step)) for step in range(9)]
    assert order == [1, 0, 1, 1, 0, 1, 1, 0, 1]
    counts = [0, 0, 0]
    for n, chosen in enumerate(mix.members.index(mix.active(step)) for step in range(1000)):
        counts[chosen] += 1
        assert all(abs(c - (n + 1) * share) < 1 for c, share in zip(counts, mix.shares))
    assert counts[2] == 0  # weight 0: never
    # a function of the step alone: a resumed run asks for step 999 first and gets the same member
    fresh = build_run(
        tiny_config(
            "targets.options.mode=alternate",
            "targets.options.sources=[{name: inversion, weight: 1}, "
            "{name: imle, weight: 2}, {name: nearest, weight: 0}]",
            targets="mix",
        )
    ).source
    assert fresh.members.index(fresh.active(999)) == mix.members.index(mix.active(999))


def test_alternate_runs_one_member_per_step(tiny_config, tmp_path):
    config = tiny_config("train.steps=4", "targets.options.mode=alternate", SOURCES, targets="mix")
    train(config, plan_run_dir(config, False), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["mix/source"] for line in lines] == [0, 1, 0, 0]  # 0.7 / 0.3
    assert "inversion/d_loss" in lines[0] and "inversion/d_loss" not in lines[1] and "imle/match_distance" in lines[1]


def test_members_keep_their_state_under_their_labels(tiny_config):
    run = build_run(
        tiny_config(
            "targets.options.sources=[{name: inversion, label: strong, options: {lambda1: 2}}, "
            "{name: inversion, options: {lambda1: 0.1}}, {name: imle}]",
            targets="mix",
        )
    )
    mix = run.source
    assert [m.label for m in mix.members] == ["strong", "inversion_1", "imle"]
    assert [m.source.options.lambda1 for m in mix.members[:2]] == [2.0, 0.1]
    state = mix.state_dict()
    assert set(state) == {"strong", "inversion_1", "imle"} and set(state["strong"]) == {"netD", "optimizerD"}
    assert mix.trains_in_update()
    # the resolved config shows every option of every member
    assert run.config.targets.options["sources"][2]["options"]["samples_factor"] == 10
