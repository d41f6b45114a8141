"""Where an IMLE run's samples land on toy2d: its matched latents against the rest.

    python benchmarks/imle_cloud.py RUN_DIR [RUN_DIR ...]     # toy2d runs trained with --targets imle

IMLE fits the generator only at the latents some data point is matched to.
For three sets of latents this prints where the trained generator (the one
the regression fits) maps them: the distance to the nearest mode centre
(median, and the 90th percentile) and the share within 3σ of it (the
evaluation's "high quality"):

* matched — every data point's matched latent, without jitter: what the regression is fitted on
  (several data points may share one: "distinct" counts them once);
* unmatched — the rest of the pool of the last matching: latents no data point chose;
* prior — 10,000 fresh latents from N(0, I) (seed 0): what sampling draws.

For Adaptive IMLE the matched latents come from several matchings' pools;
"unmatched" is still the last pool less the latents matched from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from targetgen.data import mixture_means, mixture_std
from targetgen.errors import ConfigError
from targetgen.plugins.imle import IMLE
from targetgen.samples import generate
from targetgen.training import load_trained


def landing(run_dir: Path, prior: int = 10_000) -> dict[str, dict[str, float]]:
    """For matched, unmatched and prior latents: how many, and where their samples land."""
    run = load_trained(run_dir)
    config, source = run.config, run.source
    if config.data.name != "toy2d" or not isinstance(source, IMLE):
        raise ConfigError(
            f"{run_dir}: expected a toy2d run trained with imle, got {config.data.name} with {config.targets.name}"
        )
    means, std = mixture_means(config.data).double(), mixture_std(config.data)
    matched = source.matched_z.cpu()
    pool = torch.cat(list(source.pool_latents(source.matched_epoch)))
    chosen = {row.numpy().tobytes() for row in matched}
    unmatched = pool[torch.tensor([row.numpy().tobytes() not in chosen for row in pool])]
    fresh = torch.randn(prior, *matched.shape[1:], generator=torch.Generator().manual_seed(0))
    result = {}
    for name, z in (("matched", matched), ("unmatched", unmatched), ("prior", fresh)):
        samples = generate(run.generator, z.to(run.device), chunk=4096).double().cpu()
        distance = torch.cdist(samples, means).min(dim=1).values
        result[name] = {
            "latents": float(len(z)),
            "distinct": float(len(torch.unique(z, dim=0))),
            "median_distance": distance.median().item(),
            "p90_distance": distance.quantile(0.9).item(),
            "share_within_3_sigma": (distance <= 3 * std).double().mean().item(),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print(
        "| run | latents | how many (distinct) | median distance to nearest mode | 90th percentile | share within 3σ |"
    )
    print("|---|---|---|---|---|---|")
    for run_dir in args.runs:
        for name, r in landing(run_dir).items():
            print(
                f"| {run_dir.name} | {name} | {r['latents']:,.0f} ({r['distinct']:,.0f}) | "
                f"{r['median_distance']:.3f} | "
                f"{r['p90_distance']:.3f} | {100 * r['share_within_3_sigma']:.1f} % |"
            )


if __name__ == "__main__":
    main()
