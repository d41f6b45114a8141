"""The table of a study in docs/results/: one row per configuration of a comparison folder (``compare --out``),
mean ± standard error over its seeds of the final evaluation, the steps and training seconds each run had, and
the two statistics that explain wins and losses — target distance (RMS per pixel between a sample and its
target) and target reach (the share of the requested move the generator made), each the median over the
logged steps of a run's last fifth, then the median over seeds.

    .venv/bin/python benchmarks/study_table.py runs/dseen_mnist5k [--metric fid_mnist] [--refined DIR ...]

``--refined`` adds, for the run directories given, the scores of their ``eval_KIND.json`` files (written by
``targetgen evaluate RUN --refine KIND --out RUN/eval_KIND.json``): the metric before → after and the cost.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from targetgen.report import _cell, load_groups, mean_se
from targetgen.training.rundir import read_metrics

COLUMNS = ("precision", "recall", "coverage", "classes_covered")


def last_fifth_median(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not values:
        return math.nan
    return statistics.median(values[len(values) - max(1, len(values) // 5) :])


def shown(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return _cell(*mean_se(values), digits) if values else "–"


def table(out: Path, metric: str) -> str:
    groups: dict[str, list[tuple[dict, list[dict]]]] = {}
    for group in load_groups(out):  # the finished runs of each configuration, in plan order
        if group.summaries:
            groups[group.label] = [
                (s, [r for r in read_metrics(out / "runs" / s["name"] / "metrics.jsonl") if "eval/n" not in r])
                for s in group.summaries
            ]
    head = f"| configuration | seeds | {metric} | " + " | ".join(COLUMNS)
    lines = [head + " | steps | training s | target distance / px | target reach |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 7))
    for label, runs in sorted(groups.items(), key=lambda g: mean_se([s["metrics"][metric] for s, _ in g[1]])[0]):
        distance = statistics.median(last_fifth_median(r, "target_distance_per_pixel") for _, r in runs)
        reach = statistics.median(last_fifth_median(r, "target_reach") for _, r in runs)
        cells = [shown([s["metrics"].get(c, math.nan) for s, _ in runs]) for c in COLUMNS]
        lines.append(
            f"| {label} | {len(runs)} | {shown([s['metrics'][metric] for s, _ in runs])} | "
            + " | ".join(cells)
            + f" | {shown([s['steps'] for s, _ in runs], 4)} | {shown([s['train_s'] for s, _ in runs])}"
            + f" | {distance:.3g} | {reach:.3g} |".replace("nan", "–")
        )
    return "\n".join(lines)


def refined(run_dirs: list[Path], metric: str) -> str:
    """Per configuration (a run's name without its seed) and refinement: the metric before → after over the
    given seeds, each seed's own relative change (paired: the spread between seeds drops out), and the cost,
    from each run's ``eval_KIND.json``."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in run_dirs:
        for path in sorted(run.glob("eval_*.json")):
            groups[(run.name.rsplit("-seed", 1)[0], path.stem.removeprefix("eval_"))].append(
                json.loads(path.read_text())
            )
    lines = [
        f"| run | refinement | seeds | {metric} before | after | change (paired) | D passes / sample"
        " | G passes / sample | s / 1,000 |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for (name, kind), results in sorted(groups.items()):
        cost = [
            statistics.mean(r.get(key, math.nan) for r in results)
            for key in ("refine_d_passes_per_sample", "refine_g_passes_per_sample", "refine_seconds_per_1000")
        ]
        change_mean, change_se = mean_se([100 * (r[f"refined/{metric}"] - r[metric]) / r[metric] for r in results])
        lines.append(
            f"| {name} | {kind} | {len(results)} | {shown([r[metric] for r in results])}"
            f" | {shown([r[f'refined/{metric}'] for r in results])}"
            f" | {change_mean:+.3g} ± {change_se:.2g} %"
            f" | {cost[0]:.3g} | {cost[1]:.3g} | {cost[2]:.3g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--metric", default="fid_mnist")
    parser.add_argument("--refined", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    print(table(args.out, args.metric))
    if args.refined:
        print()
        print(refined(args.refined, args.metric))


if __name__ == "__main__":
    main()
