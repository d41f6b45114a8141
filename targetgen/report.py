"""The comparison report: results.csv, report.md, curves.png and samples.png.

Reads only what ``targetgen compare`` leaves in its folder (plan.json, each
run's summary.json and metrics.jsonl), so it can be rebuilt at any time, also
from a comparison that is still missing runs.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.image import imread

from .errors import RunDirectoryError
from .metric_names import lower_is_better
from .registry import STANDARD
from .training.rundir import METRICS, read_metrics

ORDER = (
    "fid",
    "fid_digits",
    "fid_pixels",
    "fid_inception",
    "precision",
    "recall",
    "density",
    "coverage",
    "modes_covered",
    "high_quality_share",
    "mode_kl_to_uniform",
    "classes_covered",
    "class_kl_to_uniform",
)
# What the overview table and the curves show first, after the FID.
PREFERRED = ("modes_covered", "high_quality_share", "classes_covered", "precision", "recall", "density", "coverage")
# Bookkeeping keys, not results.
NOT_REPORTED = ("n", "modes_total")


@dataclass
class Group:
    """The runs of one configuration (one per seed), in plan order."""

    label: str
    source: str
    control: bool
    summaries: list[dict[str, Any]]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN with a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def load_groups(out: Path) -> list[Group]:
    plan_path = out / "plan.json"
    if not plan_path.is_file():
        raise RunDirectoryError(f"{out} holds no comparison (no plan.json); run targetgen compare --out {out} first")
    groups: dict[str, Group] = {}
    for entry in json.loads(plan_path.read_text()):
        group = groups.setdefault(entry["label"], Group(entry["label"], entry["source"], entry["control"], []))
        summary_path = out / "runs" / entry["name"] / "summary.json"
        if summary_path.is_file():
            group.summaries.append(json.loads(summary_path.read_text()))
    return list(groups.values())


def reported_metrics(groups: list[Group]) -> list[str]:
    seen: dict[str, None] = {}
    for group in groups:
        for summary in group.summaries:
            for key in summary["metrics"]:
                if key not in NOT_REPORTED and not re.fullmatch(r"class_\d+_share|kid.*_std", key):  # csv only
                    seen.setdefault(key)
    # headline metrics first (the report's first table and its summary sentence), the rest as they come
    first = [m for m in ORDER if m in seen]
    return first + [m for m in seen if m not in first]


# ----------------------------------------------------------------------------- results.csv


def write_results_csv(groups: list[Group], path: Path) -> None:
    rows = []
    for group in groups:
        for s in group.summaries:
            settings = {
                f"set:{k}": json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in s["settings"].items()
            }
            rows.append(
                {
                    "run": s["name"],
                    "configuration": s["label"],
                    "source": s["source"],
                    "control": s["control"],
                    "seed": s["seed"],
                    "steps": s["steps"],
                    "images_seen": s["images_seen"],
                    "train_s": s["train_s"],
                    "cpu": s.get("cpu"),  # summaries written before it was recorded lack it
                    **settings,
                    **s["metrics"],
                }
            )
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- report.md


def _cell(mean: float, se: float, digits: int = 4) -> str:
    if math.isnan(se):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {se:.2g}"


@dataclass
class Stat:
    mean: float
    se: float
    n: int


def overview_metrics(metrics: list[str]) -> list[str]:
    """The FID and the KID first, then PREFERRED, for the overview table and the curves."""
    first = [m for m in metrics if m.startswith("fid")][:1] + [
        m for m in metrics if m.startswith("kid") and not m.endswith("_std")
    ][:1]
    return first + [m for m in PREFERRED if m in metrics]


def metric_stats(groups: list[Group], metric: str) -> dict[str, Stat]:
    """Mean, standard error and number of seeds per configuration (those that report ``metric``)."""
    stats = {}
    for g in groups:
        values = [s["metrics"][metric] for s in g.summaries if s["metrics"].get(metric) is not None]  # None: no value
        if values:
            stats[g.label] = Stat(*mean_se(values), len(values))
    return stats


def best_mean(stats: dict[str, Stat], metric: str) -> float:
    means = [st.mean for st in stats.values()]
    return min(means) if lower_is_better(metric) else max(means)


def _versus(a: Stat, b: Stat, metric: str) -> str:
    """How ``a`` compares with ``b``: the relative difference (FID-like) or the difference, and whether
    their standard errors overlap."""
    if a.mean == b.mean:
        return "tied"
    apart = not (math.isnan(a.se) or math.isnan(b.se)) and abs(a.mean - b.mean) > a.se + b.se
    if lower_is_better(metric):  # FID-like: the relative reduction
        change = 100 * (b.mean - a.mean) / abs(b.mean) if b.mean else math.inf
        difference = f"{abs(change):.1f} % {'lower' if change > 0 else 'higher'}"
    else:
        difference = f"{a.mean - b.mean:+.3g}"
    return f"{difference}, standard errors {'apart' if apart else 'overlap'}"


def headline(groups: list[Group], metric: str) -> str | None:
    """One sentence: the best configuration against the best-tuned standard GAN, which is the best mean
    over every standard configuration (the lr controls and any standard grid included), not one lr."""
    stats = metric_stats(groups, metric)
    if not stats:
        return None
    best = next(label for label, st in stats.items() if st.mean == best_mean(stats, metric))
    sentence = f"best {metric}: **{best}** {_cell(stats[best].mean, stats[best].se)}"
    standard = {g.label: stats[g.label] for g in groups if g.source == STANDARD and g.label in stats}
    others = {label: st for label, st in stats.items() if label not in standard}
    if not standard or not others:
        return sentence
    tuned = next(label for label, st in standard.items() if st.mean == best_mean(standard, metric))
    if best != tuned:
        return (
            f"{sentence}; vs best-tuned standard **{tuned}** {_cell(standard[tuned].mean, standard[tuned].se)}: "
            f"{_versus(stats[best], standard[tuned], metric)}"
        )
    rival = next(label for label, st in others.items() if st.mean == best_mean(others, metric))
    return (
        f"{sentence}, a standard configuration; the best other, **{rival}** "
        f"{_cell(others[rival].mean, others[rival].se)}, "
        f"vs it: {_versus(others[rival], standard[tuned], metric)}"
    )


def _best_cell(st: Stat, top: float) -> str:
    cell = _cell(st.mean, st.se)
    return f"**{cell}**" if st.mean == top else cell  # ties: all bold


def summary_table(groups: list[Group], metrics: list[str]) -> list[str]:
    """One row per configuration, one column per metric (mean ± SE; best in bold), and the training time."""
    stats = {metric: metric_stats(groups, metric) for metric in metrics}
    tops = {metric: best_mean(st, metric) for metric, st in stats.items() if st}
    columns = ["configuration", *metrics, "steps", "training s", "n"]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
    ]
    for g in groups:
        if not g.summaries:
            continue
        cells = [_best_cell(stats[m][g.label], tops[m]) if g.label in stats[m] else "—" for m in metrics]
        steps = mean_se([s["steps"] or 0 for s in g.summaries])[0]
        seconds = mean_se([s["train_s"] or 0.0 for s in g.summaries])[0]
        lines.append(f"| {g.label} | " + " | ".join(cells) + f" | {steps:.0f} | {seconds:.0f} | {len(g.summaries)} |")
    return lines


def _spread(values: list[float]) -> str:
    """One value when every seed has it, else mean ± standard error."""
    return f"{values[0]:,}" if len(set(values)) == 1 else _cell(*mean_se(values), digits=3)


def budget_section(groups: list[Group], budget: str) -> list[str]:
    """What every run got equally, and the steps, images and seconds each configuration used."""
    finished = [s for g in groups for s in g.summaries]
    if budget == "seconds":
        limit = max((s.get("max_seconds") or 0.0 for s in finished), default=0.0)
        intro = (
            f"Equal budget: **training time**. Every run trained for {limit:g} s of training steps (evaluation, "
            "samples and checkpoints excluded) and stopped at the first step boundary past it; the steps and "
            "images seen are what each configuration did in that time (mean ± standard error over seeds)."
        )
    else:
        intro = (
            "Equal budget: **steps**. Every run trained the same number of steps at the same batch size; "
            "the training seconds (evaluation, samples and checkpoints excluded) are what each configuration "
            "took (mean ± standard error over seeds)."
        )
    lines = ["## Budget", "", intro, "", "| configuration | steps | images seen | training s |", "|---|---|---|---|"]
    for g in groups:
        if g.summaries:
            seconds = mean_se([s["train_s"] or 0.0 for s in g.summaries])
            lines.append(
                f"| {g.label} | {_spread([s['steps'] for s in g.summaries])} | "
                f"{_spread([s['images_seen'] for s in g.summaries])} | {_cell(*seconds, digits=3)} |"
            )
    if budget == "seconds":
        capped = [
            f"{s['label']} seed {s['seed']}" for s in finished if (s["train_s"] or 0.0) < (s.get("max_seconds") or 0.0)
        ]
        if capped:
            lines += [
                "",
                f"Reached their step cap (train.steps / epochs) before the time limit, so had less time: "
                f"{', '.join(capped)}; raise the cap to make the budget equal.",
            ]
    return lines


def plan_budget(out: Path) -> str:
    """What the comparison held equal (compare.budget): steps, or seconds of training."""
    entries = json.loads((out / "plan.json").read_text())
    return entries[0].get("budget", "steps") if entries else "steps"  # plans before budgets held steps equal


def write_report_md(groups: list[Group], out: Path, metrics: list[str]) -> None:
    command = (out / "command.txt").read_text().strip() if (out / "command.txt").is_file() else "(unknown)"
    runs = sum(len(g.summaries) for g in groups)
    planned = len(json.loads((out / "plan.json").read_text()))
    lines = [
        f"# Comparison: {out.name}",
        "",
        "```bash",
        command,
        "```",
        "",
        f"{runs} of {planned} planned runs finished. Each cell: mean ± standard error over seeds (n in the last "
        "column); the best configuration per metric is in bold. Rows marked (control) are the standard GAN "
        "with generator lr = λ2 of an inversion row (docs/design.md: with Adam and N1 = N2 = 1, the decomposed "
        "step at (λ1, λ2) is nearly that run). The best-tuned standard is the best standard configuration "
        "(every learning rate tried, the controls included).",
        "",
    ]
    headlines = [m for m in metrics if m.startswith("fid")][:1] + [
        m for m in ("modes_covered", "high_quality_share") if m in metrics
    ]
    for metric in headlines:
        sentence = headline(groups, metric)
        if sentence:
            lines += [f"- {sentence}"]
    if "modes_covered" in metrics:
        lines += [
            "",
            "On 2-D points the Fréchet distance compares only means and covariances: a single Gaussian "
            "blob over the whole mixture scores near 0. Modes covered and the high-quality share are the "
            "measures of mode collapse and sample quality here.",
        ]
    lines.append("")
    lines += summary_table(groups, overview_metrics(metrics)[:7]) + [""]
    for metric in metrics:
        direction = "lower is better" if lower_is_better(metric) else "higher is better"
        stats = metric_stats(groups, metric)
        if not stats:
            continue
        lines += [f"## {metric} ({direction})", "", "| configuration | " + metric + " | n |", "|---|---|---|"]
        top = best_mean(stats, metric)
        for label, st in stats.items():
            lines.append(f"| {label} | {_best_cell(st, top)} | {st.n} |")
        lines.append("")
    lines += budget_section(groups, plan_budget(out))
    lines += ["", "## Runs and their resolved configs", ""]
    for g in groups:
        for s in g.summaries:
            lines.append(
                f"- {g.label}, seed {s['seed']}: [`runs/{s['name']}/config.yaml`](runs/{s['name']}/config.yaml)"
            )
    lines += ["", "![curves](curves.png)", "", "![samples](samples.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- plots


def _evaluations(out: Path, name: str) -> list[dict[str, Any]]:
    lines = read_metrics(out / "runs" / name / METRICS)
    return [line for line in lines if any(k.startswith("eval/") for k in line)]


def write_curves(groups: list[Group], out: Path, metrics: list[str], path: Path) -> None:

    shown = overview_metrics(metrics)[:4]
    fig = Figure(figsize=(11, 3.2 * len(shown)))
    axes = fig.subplots(len(shown), 2, squeeze=False)
    colours = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    for i, group in enumerate(g for g in groups if g.summaries):
        by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for s in group.summaries:
            for line in _evaluations(out, s["name"]):
                by_step[line["step"]].append(line)
        steps = sorted(by_step)
        seconds = [sum(r.get("train_s", 0.0) for r in by_step[t]) / len(by_step[t]) for t in steps]
        style = "--" if group.control else "-"
        for row, metric in enumerate(shown):
            stats = [
                mean_se([r[f"eval/{metric}"] for r in by_step[t] if r.get(f"eval/{metric}") is not None] or [math.nan])
                for t in steps
            ]
            mean = [m for m, _ in stats]
            low = [m - (0 if math.isnan(se) else se) for m, se in stats]
            high = [m + (0 if math.isnan(se) else se) for m, se in stats]
            for col, x in enumerate((steps, seconds)):
                ax = axes[row][col]
                ax.plot(x, mean, style, color=colours(i), label=group.label)
                ax.fill_between(x, low, high, color=colours(i), alpha=0.2)
    for row, metric in enumerate(shown):
        for col, xlabel in enumerate(("training step", "training seconds (wall clock)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.set_title(
                f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better) vs {xlabel.split(' (')[0]}"
            )
            ax.grid(alpha=0.3)
    if shown:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize="small", frameon=False)
    fig.suptitle(f"{out.name}: mean over seeds, band ± 1 standard error")
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(groups) / 3), 1, 0.97))
    fig.savefig(path, dpi=110)


def write_samples(groups: list[Group], out: Path, path: Path) -> None:
    """Each configuration's final sample grid (its first seed), side by side."""

    shown = [(g, out / "runs" / g.summaries[0]["name"] / "samples" / "final.png") for g in groups if g.summaries]
    shown = [(g, p) for g, p in shown if p.is_file()]
    if not shown:
        return
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.8 * cols, 4.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (group, image) in zip(axes.flat, shown):
        ax.imshow(imread(image))
        ax.set_title(f"{group.label}\nseed {group.summaries[0]['seed']}", fontsize="small")
    fig.suptitle(f"{out.name}: final samples per configuration")
    fig.tight_layout(h_pad=3.0, rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)


@dataclass
class Written:
    """What ``write_report`` wrote, and the planned runs it had no summary for."""

    paths: list[Path]
    finished: int
    planned: int
    missing: list[str]

    def line(self) -> str:
        """One line for the command line."""
        wrote = "wrote " + ", ".join(str(p) for p in self.paths)
        if not self.missing:
            return f"{wrote} ({self.finished} runs)"
        shown = ", ".join(self.missing[:5]) + (f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else "")
        return f"{wrote}: {self.finished} of {self.planned} planned runs finished; missing: {shown}"


def missing_runs(out: Path) -> list[str]:
    """The planned runs of ``out`` without a summary (not trained, still training, or failed)."""
    entries = json.loads((out / "plan.json").read_text())
    return [e["name"] for e in entries if not (out / "runs" / e["name"] / "summary.json").is_file()]


def write_report(out: Path) -> Written:
    """The report files for the comparison in ``out``, from whatever runs are finished (none: a report.md that
    says so, and no plots)."""
    groups = load_groups(out)
    metrics = reported_metrics(groups)
    paths = [out / "results.csv", out / "report.md", out / "curves.png", out / "samples.png"]
    finished = sum(len(g.summaries) for g in groups)
    write_results_csv(groups, paths[0])
    write_report_md(groups, out, metrics)
    for stale in paths[2:]:
        stale.unlink(missing_ok=True)  # never a plot of another set of runs beside this report
    if finished:
        write_curves(groups, out, metrics, paths[2])
        write_samples(groups, out, paths[3])
    missing = missing_runs(out)
    return Written([p for p in paths if p.exists()], finished, finished + len(missing), missing)
