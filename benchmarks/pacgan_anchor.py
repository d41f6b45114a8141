"""The PacGAN anchor: the standard GAN on PacGAN's 2-D presets, next to PacGAN's Table 1.

Reads the comparison folders that README's "The 2-D protocol" trains
(``runs/pacgan_grid25`` and ``runs/pacgan_ring8``, one run per seed), prints
the README's table — per seed the last in-run evaluation and the training time
(``train_s``: seconds inside training steps, summed over resumes; wall-clock adds
start-up and the in-run evaluations), the mean ± standard error, PacGAN's GAN
row — and draws modes covered and the high-quality share
against steps into ``docs/images/pacgan/curves.png``.

    .venv/bin/python benchmarks/pacgan_anchor.py [--runs runs] [--figure docs/images/pacgan/curves.png] [--step N]

``--step N`` tables the evaluation at step N instead of the last one (runs continued past N).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from targetgen.report import mean_se

# PacGAN Table 1, row "GAN" (Lin et al. 2018, 10 runs each); its ring reverse KL is not quoted here
PACGAN = {
    "pacgan_grid25": {
        "total": 25,
        "modes": "17.3 ± 0.8",
        "modes_mean": 17.3,
        "hq": "94.8 %",
        "hq_mean": 0.948,
        "kl": "0.70",
    },
    "pacgan_ring8": {"total": 8, "modes": "6.3", "modes_mean": 6.3, "hq": "98.2 %", "hq_mean": 0.982, "kl": "—"},
}
# The anchor holds when the standard GAN is within this many modes of PacGAN's mean, at this high-quality share.
MODES_TOLERANCE, MIN_HQ = 2.0, 0.85


def evaluations(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line for line in lines if "eval/modes_covered" in line]


def seed_runs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in (folder / "runs").glob("standard-seed*") if (p / "metrics.jsonl").is_file()),
        key=lambda p: int(p.name.rsplit("seed", 1)[1]),
    )


def fmt(mean: float, se: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def table(runs: Path, step: int | None = None) -> tuple[list[str], list[str]]:
    """The README's table at ``step`` (None: each run's last evaluation), and per preset whether the anchor holds."""
    verdicts = []
    lines = [
        "| preset | seed | steps | modes (≥ 1 HQ) | high-quality share | reverse KL | modes_covered_20 | training "
        "time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, reference in PACGAN.items():
        rows = []
        for run_dir in seed_runs(runs / preset):
            curve = evaluations(run_dir)
            last = curve[-1] if step is None else next((line for line in curve if line["step"] == step), None)
            if last is None:
                continue
            rows.append(last)
            seed = run_dir.name.rsplit("seed", 1)[1]
            lines.append(
                f"| {preset} | {seed} | {last['step']:,} | {last['eval/modes_covered']:.0f} "
                f"| {last['eval/high_quality_share']:.1%} | {last['eval/mode_kl_to_uniform']:.2f} "
                f"| {last['eval/modes_covered_20']:.0f} | {last['train_s'] / 60:.1f} min |"
            )
        if not rows:
            continue
        stats = {
            key: mean_se([last[f"eval/{key}"] for last in rows])
            for key in ("modes_covered", "high_quality_share", "mode_kl_to_uniform", "modes_covered_20")
        }
        modes, hq = stats["modes_covered"], stats["high_quality_share"]
        lines.append(
            f"| {preset} | mean ± SE | | {fmt(*modes, 1)} | {fmt(100 * hq[0], 100 * hq[1], 1)} % "
            f"| {fmt(*stats['mode_kl_to_uniform'], 2)} | {fmt(*stats['modes_covered_20'], 1)} | |"
        )
        lines.append(
            f"| PacGAN, GAN | 10 runs | 400,000 | {reference['modes']} | {reference['hq']} | {reference['kl']} | | |"
        )
        holds = abs(modes[0] - reference["modes_mean"]) <= MODES_TOLERANCE and hq[0] >= MIN_HQ
        verdicts.append(
            f"{preset}: modes {modes[0]:.1f} (PacGAN {reference['modes_mean']}), high quality {hq[0]:.1%}: "
            f"anchor {'holds' if holds else 'not reproduced'} (±{MODES_TOLERANCE:g} modes, ≥ {MIN_HQ:.0%})"
        )
    return lines, verdicts


def figure(runs: Path, path: Path) -> None:

    fig = Figure(figsize=(10, 6.5))
    axes = fig.subplots(2, len(PACGAN), squeeze=False, sharex="col")
    for col, (preset, reference) in enumerate(PACGAN.items()):
        for run_dir in seed_runs(runs / preset):
            curve = evaluations(run_dir)
            steps = [line["step"] for line in curve]
            label = run_dir.name.replace("standard-", "")
            axes[0][col].plot(steps, [line["eval/modes_covered"] for line in curve], lw=1, label=label)
            axes[1][col].plot(steps, [line["eval/high_quality_share"] for line in curve], lw=1, label=label)
        axes[0][col].axhline(reference["modes_mean"], color="k", ls="--", lw=1, label="PacGAN (400k steps)")
        axes[1][col].axhline(reference["hq_mean"], color="k", ls="--", lw=1, label="PacGAN (400k steps)")
        axes[0][col].set_title(preset)
        axes[0][col].set_ylabel("modes covered (≥ 1 high-quality sample)")
        axes[1][col].set_ylabel("high-quality share")
        axes[1][col].set_xlabel("step (batch 100)")
        axes[0][col].set_ylim(0, reference["total"] + 0.5)
        axes[1][col].set_ylim(0, 1)
        axes[0][col].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=Path, default=Path("runs"), help="folder holding pacgan_grid25/ and pacgan_ring8/"
    )
    parser.add_argument("--figure", type=Path, default=Path("docs/images/pacgan/curves.png"))
    parser.add_argument("--step", type=int, default=None, help="table the evaluation at this step (default: the last)")
    args = parser.parse_args()
    lines, verdicts = table(args.runs, args.step)
    print("\n".join(lines + [""] + verdicts))
    figure(args.runs, args.figure)
    print(f"curves: {args.figure}")


if __name__ == "__main__":
    main()
