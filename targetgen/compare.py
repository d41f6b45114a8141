"""Compare target sources: plan every (source × grid point × seed) run, train
them in parallel processes, skip finished runs and resume interrupted ones.

A comparison is an ordinary training config plus a ``compare`` section::

    compare:
      targets: standard,inversion,imle,nearest
      seeds: 5
      grid:
        lambda1:                      # an axis: a list of points ...
          - {targets.options.lambda1: 0.25, regression.lr: 0.0008}
          - {targets.options.lambda1: 1.0, regression.lr: 0.0002}
        regression.loss: [{l2: 1.0}, {l1: 1.0}]   # ... or of values of one key

Axes combine as a Cartesian product. A point applies to a source when every
key in it does (``targets.options.*`` keys when the source has that option,
``regression.*`` keys for decomposed sources); an axis none of whose points
applies is left out for that source, so ``standard`` runs once however the
inversion options are swept.

Layout of the output folder ``DIR``::

    DIR/command.txt          the command line, for the report
    DIR/plan.json            every run in plan order (label, source, seed, control, budget)
    DIR/configs/<run>.yaml   the config each run was planned with
    DIR/runs/<run>/          ordinary run directories (+ summary.json once finished)
    DIR/logs/<run>.log       each run's own output
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.text import Text

from . import jsonsafe, registry
from .config import SEED_MAX, Config, apply_override, bounded, from_dict, parse_yaml, read_yaml, set_dotted
from .errors import ConfigError, Interrupted, RunDirectoryError, TargetgenError, Terminated
from .files import atomic_write, write_json
from .progress import progress_bar
from .registry import STANDARD, options_class
from .training.rundir import CHECKPOINT, METRICS, check_not_in_use, read_metrics

CONTROL_SUFFIX = "(control)"
MAX_SEEDS = 1000
MAX_RUNS = 10_000  # a comparison beyond this is a typo, not a plan: refused before anything is built


@dataclass
class CompareConfig:
    targets: str = "standard,inversion"  # comma-separated target sources
    seeds: int = bounded(1, ge=1, le=MAX_SEEDS)  # each configuration runs with seeds train.seed, train.seed + 1, ...
    grid: dict[str, Any] = field(default_factory=dict)  # axis → list of values, or of {key: value} points
    control: bool = True  # add "standard, G lr = λ2" next to inversion runs whose λ2 differs from standard's lr
    # What every run gets equally: its steps (train.steps / epochs), or its seconds of training steps
    # (train.max_seconds, which must then be set; train.steps / epochs only cap the steps)
    budget: Literal["steps", "seconds"] = "steps"


@dataclass
class Configuration:
    """One column of the comparison: a source with its grid settings; run once per seed."""

    label: str  # "inversion lambda1=0.25 lr=0.0008"
    source: str
    settings: dict[str, Any]  # dotted config key → value, on top of the base config
    control: bool = False


@dataclass
class PlannedRun:
    name: str  # run directory name under DIR/runs
    configuration: Configuration
    seed: int
    config: dict[str, Any]  # the complete raw training config of this run


@dataclass
class Plan:
    out: Path
    compare: CompareConfig
    configurations: list[Configuration]
    runs: list[PlannedRun]

    def run_dir(self, run: PlannedRun) -> Path:
        return self.out / "runs" / run.name


# ----------------------------------------------------------------------------- planning


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):  # a loss mix {l2: 1.0, ssim: 0.2} → "l2+ssim*0.2"
        return "+".join(k if w == 1 else f"{k}*{_format(w)}" for k, w in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(_format(v) for v in value)
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_")


def _options_fields(source: str) -> set[str]:
    return {f.name for f in dataclasses.fields(options_class(source))}


def _applies(key: str, source: str) -> bool:
    section, _, rest = key.partition(".")
    if section == "targets":
        if rest == "d_steps":  # the loop's schedule: every source (one without an update phase refuses > 1)
            return True
        return rest.startswith("options.") and rest.split(".")[1] in _options_fields(source)
    if section == "regression":
        return source != STANDARD  # the standard GAN has no regression engine
    if section == "discriminator":  # its regularizers: for the sources that train one
        return source == STANDARD or getattr(registry.load("targets", source), "trains_discriminator", False)
    return True


def _split_top_level(values: str) -> list[str]:
    """``values`` cut at the commas outside brackets, braces and quotes: ``[1, 2],{a: 1, b: 2}`` is two values."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(values):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(values[start:i])
            start = i + 1
    return [*parts, values[start:]]


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``--grid key=v1,v2,...`` → (key, [v1, v2, ...]); values read as YAML flow values, so a value may be
    a list or a mapping with commas of its own."""
    key, sep, values = text.partition("=")
    if not sep or "." not in key or not values.strip():
        raise ConfigError(f"--grid {text!r}: expected section.key=v1,v2,..., e.g. targets.options.lambda1=0.25,0.5,1")
    return key.strip(), [parse_yaml(v, f"--grid {key.strip()}: value {v.strip()!r}") for v in _split_top_level(values)]


def _axes(grid: dict[str, Any]) -> list[list[tuple[str, dict[str, Any]]]]:
    """Each axis as a list of (label, {dotted key: value}) points."""
    axes = []
    for axis, points in grid.items():
        if not isinstance(points, list) or not points:
            raise ConfigError(
                f"compare.grid.{axis}: expected a non-empty list of values or of {{key: value}} points, got {points!r}"
            )
        parsed = []
        for point in points:
            if isinstance(point, dict) and all(isinstance(k, str) and "." in k for k in point if k != "label"):
                settings = {k: v for k, v in point.items() if k != "label"}
                if not settings:
                    raise ConfigError(f"compare.grid.{axis}: a point needs at least one section.key, got {point!r}")
                label = str(
                    point.get("label") or " ".join(f"{k.rsplit('.', 1)[-1]}={_format(v)}" for k, v in settings.items())
                )
            elif "." in axis:
                settings = {axis: point}
                label = f"{axis.rsplit('.', 1)[-1]}={_format(point)}"
            else:
                raise ConfigError(
                    f"compare.grid.{axis}: a value axis must be named by its config key (e.g. "
                    "targets.options.lambda1), "
                    f"or its points must be mappings of section.key: value; got {point!r}"
                )
            if any(label == other for other, _ in parsed):
                raise ConfigError(
                    f"compare.grid.{axis}: two points are labelled {label!r}; every point of an axis needs a "
                    "label of its own (give the points distinct `label:` values)"
                )
            parsed.append((label, settings))
        axes.append(parsed)
    return axes


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    set_dotted(raw, key, value, f"compare.grid: '{key}'")


def _source_config(base: dict[str, Any], source: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``base`` switched to ``source`` (whose options start from its defaults unless base names it) + settings."""
    raw = copy.deepcopy(base)
    targets = raw.get("targets") or {}
    if not isinstance(targets, dict) or targets.get("name", "inversion") != source:
        raw["targets"] = {"name": source, "options": {}}
    for key, value in settings.items():
        _set(raw, key, value)
    return raw


def _resolved(raw: dict[str, Any], where: str) -> tuple[Config, Any]:
    """The typed config and target options of ``raw``; errors name the configuration."""
    try:
        config = from_dict(Config, raw)
        return config, from_dict(options_class(config.targets.name), config.targets.options, "targets.options")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _configurations(base: dict[str, Any], compare: CompareConfig, sources: list[str]) -> list[Configuration]:
    axes = _axes(compare.grid)
    used = [[False] * len(axis) for axis in axes]
    found: dict[str, Configuration] = {}
    for source in sources:
        relevant = []
        for a, axis in enumerate(axes):
            fits = [all(_applies(k, source) for k in settings) for _, settings in axis]
            if any(fits) and not all(fits):
                raise ConfigError(
                    f"compare.grid: axis {list(compare.grid)[a]!r} has points that apply to '{source}' and points that "
                    "do not; split it into axes whose points set the same kind of keys"
                )
            if all(fits):
                relevant.append(axis)
                used[a] = [True] * len(axis)
        if math.prod(len(axis) for axis in relevant) > MAX_RUNS:
            raise ConfigError(
                f"compare.grid: its axes give {math.prod(len(a) for a in relevant):,} configurations of "
                f"'{source}', more than {MAX_RUNS:,}; narrow the grid"
            )
        for combination in itertools.product(*relevant):
            settings = {k: v for _, point in combination for k, v in point.items()}
            label = " ".join([source, *(text for text, _ in combination)])
            if label in found:
                raise ConfigError(
                    f"compare.grid: two configurations are labelled {label!r}; give their points distinct labels"
                )
            found[label] = Configuration(label, source, settings)
    for a in range(len(axes)):
        if not any(used[a]):
            raise ConfigError(
                f"compare.grid: axis {list(compare.grid)[a]!r} applies to none of the sources {', '.join(sources)} "
                "(targets.options keys must be options of a source; regression keys need a decomposed source)"
            )
    configurations = list(found.values())
    if compare.control:
        configurations += _controls(base, configurations)
    return configurations


def _controls(base: dict[str, Any], configurations: list[Configuration]) -> list[Configuration]:
    """The fair control of docs/design.md: with Adam and N1 = N2 = 1 a decomposed run at
    (λ1, λ2) is nearly the standard GAN with generator lr λ2, so every inversion λ2
    that differs from the standard baseline's lr gets "standard, G lr = λ2"."""
    standard = [c for c in configurations if c.source == STANDARD]
    baselines = {_resolved(_source_config(base, STANDARD, c.settings), c.label)[1].g_lr for c in standard}
    if not baselines:
        baselines = {_resolved(_source_config(base, STANDARD, {}), STANDARD)[1].g_lr}
    controls: dict[str, Configuration] = {}
    for c in configurations:
        if c.source != "inversion":
            continue
        config, options = _resolved(_source_config(base, c.source, c.settings), c.label)
        lr = config.regression.lr
        if lr in baselines:
            continue
        label = f"standard G-lr={_format(lr)} {CONTROL_SUFFIX}"
        settings = {
            "targets.options.g_lr": lr,
            "targets.options.d_lr": options.d_lr,
            "targets.options.betas": list(config.regression.betas),
        }
        controls.setdefault(label, Configuration(label, STANDARD, settings, control=True))
    return list(controls.values())


def _total_steps(config: Config, lengths: dict[str, int]) -> int:
    if config.train.steps is not None:
        return config.train.steps
    from .data import batches_per_epoch, load_data

    key = json.dumps(dataclasses.asdict(config.data), sort_keys=True)
    if key not in lengths:
        lengths[key] = len(load_data(config.data).dataset)
    return config.train.epochs * batches_per_epoch(lengths[key], config.train.batch_size, bool(config.train.drop_last))


def plan_comparison(
    config_path: Path | None,
    out: Path,
    overrides: list[str] = (),
    targets: str | None = None,
    seeds: int | None = None,
    grid: list[str] = (),
    control: bool | None = None,
) -> Plan:
    """Every run of the comparison, validated (types, option names) before anything trains. Paths are
    stored resolved: ``runs/c`` and ``/home/me/runs/c`` are the same plan."""
    out = Path(out).resolve()
    raw = read_yaml(config_path) if config_path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    compare = from_dict(CompareConfig, raw.pop("compare", None), "compare")
    if targets is not None:
        compare.targets = targets
    if seeds is not None:
        compare.seeds = seeds
    if control is not None:
        compare.control = control
    compare.grid = dict(compare.grid)
    for text in grid:
        key, values = parse_grid_option(text)
        compare.grid[key] = values
    if not 1 <= compare.seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds: expected 1 to {MAX_SEEDS} seeds, got {compare.seeds}")
    sources = [s.strip() for s in compare.targets.split(",") if s.strip()]
    if not sources:
        raise ConfigError(f"--targets: expected a comma-separated list of target sources, got {compare.targets!r}")
    if len(set(sources)) != len(sources):
        raise ConfigError(f"--targets: a source is listed twice in {compare.targets!r}")
    for source in sources:
        if source != STANDARD:
            registry.load("targets", source)  # unknown names fail here, with the available ones

    configurations = _configurations(raw, compare, sources)
    slugs: dict[str, str] = {}
    for c in configurations:
        other = slugs.setdefault(_slug(c.label), c.label)
        if other != c.label:
            raise ConfigError(
                f"compare.grid: configurations {other!r} and {c.label!r} would share a run directory; "
                "give their points distinct ASCII labels"
            )
    if len(configurations) * compare.seeds > MAX_RUNS:
        raise ConfigError(
            f"compare: {len(configurations):,} configurations × {compare.seeds} seeds = "
            f"{len(configurations) * compare.seeds:,} runs, more than {MAX_RUNS:,}; narrow the grid or the seeds"
        )
    runs, lengths, limits = [], {}, set()
    for configuration in configurations:
        source_raw = _source_config(raw, configuration.source, configuration.settings)
        config, _ = _resolved(source_raw, configuration.label)
        _check_budget(compare.budget, config.train.max_seconds, configuration.label)
        limits.add(config.train.max_seconds)
        if config.train.seed + compare.seeds - 1 > SEED_MAX:
            raise ConfigError(
                f"--seeds: {compare.seeds} seeds from train.seed {config.train.seed} go past the largest "
                f"seed, {SEED_MAX}; lower train.seed"
            )
        for i in range(compare.seeds):
            seed = config.train.seed + i
            name = f"{_slug(configuration.label)}-seed{seed}"
            run_raw = copy.deepcopy(source_raw)
            _set(run_raw, "train.name", name)
            _set(run_raw, "train.out_dir", str(out / "runs"))
            _set(run_raw, "train.seed", seed)
            if not config.evaluation.every:  # curves need in-run evaluations: about ten per run
                _set(run_raw, "evaluation.every", max(1, _total_steps(config, lengths) // 10))
            runs.append(PlannedRun(name, configuration, seed, run_raw))
    if len(limits) > 1:
        raise ConfigError(
            f"train.max_seconds: the grid gives configurations different limits "
            f"({', '.join(f'{v:g}' for v in sorted(limits))}); compare.budget: seconds needs one for all"
        )
    return Plan(out, compare, configurations, runs)


def _check_budget(budget: str, max_seconds: float | None, label: str) -> None:
    if budget == "seconds" and max_seconds is None:
        raise ConfigError(
            "compare.budget: seconds needs train.max_seconds, the training seconds every run gets "
            "(e.g. --set train.max_seconds=120); train.steps or train.epochs then only caps the steps"
        )
    if budget == "steps" and max_seconds is not None:
        raise ConfigError(
            f"train.max_seconds: {max_seconds:g} would stop {label!r} by time while compare.budget is "
            "steps; set compare.budget: seconds, or leave train.max_seconds unset"
        )


# ----------------------------------------------------------------------------- the plan on disk


def _flatten(raw: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {prefix: raw}
    flat = {}
    for key, value in raw.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def write_plan(plan: Plan, command: str) -> None:
    """Record the plan; refuse when a run already in ``out`` was planned differently."""
    configs = plan.out / "configs"
    for run in plan.runs:
        path = configs / f"{run.name}.yaml"
        if path.exists():
            before, now = _flatten(read_yaml(path)), _flatten(run.config)
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            if changed:
                key = changed[0]
                raise ConfigError(
                    f"{plan.out} already holds run {run.name} planned differently ({key}: {before.get(key)!r} there, "
                    f"{now.get(key)!r} now); use another --out, or delete {plan.run_dir(run)} and {path} to redo it"
                )
    configs.mkdir(parents=True, exist_ok=True)
    (plan.out / "logs").mkdir(exist_ok=True)
    for run in plan.runs:
        atomic_write(configs / f"{run.name}.yaml", yaml.safe_dump(run.config, sort_keys=False), "planned config")
    entries = [
        {
            "name": r.name,
            "label": r.configuration.label,
            "source": r.configuration.source,
            "seed": r.seed,
            "control": r.configuration.control,
            "settings": r.configuration.settings,
            "budget": plan.compare.budget,
        }
        for r in plan.runs
    ]
    write_json(plan.out / "plan.json", entries, "comparison plan")
    atomic_write(plan.out / "command.txt", command + "\n", "comparison command")


def load_plan(out: Path) -> Plan:
    """The plan a comparison folder holds (``plan.json`` and ``configs/``), as ``plan_comparison`` made it."""
    out = Path(out).resolve()
    if not (out / "plan.json").is_file():
        raise RunDirectoryError(
            f"{out} holds no comparison (no plan.json); plan one with targetgen compare --plan-only --out {out}"
        )
    entries = json.loads((out / "plan.json").read_text())
    configurations: dict[str, Configuration] = {}
    runs = []
    for entry in entries:
        c = configurations.setdefault(
            entry["label"], Configuration(entry["label"], entry["source"], entry["settings"], entry["control"])
        )
        runs.append(PlannedRun(entry["name"], c, entry["seed"], read_yaml(out / "configs" / f"{entry['name']}.yaml")))
    seeds = max((sum(r.configuration is c for r in runs) for c in configurations.values()), default=1)
    budget = entries[0].get("budget", "steps") if entries else "steps"
    return Plan(out, CompareConfig(seeds=seeds, budget=budget), list(configurations.values()), runs)


# ----------------------------------------------------------------------------- running


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def _checkpoint_step(run_dir: Path) -> int | None:
    from .training.checkpoint import load_checkpoint  # torch: only once runs are trained, never for planning

    path = run_dir / CHECKPOINT
    return load_checkpoint(path)["step"] if path.is_file() else None


def _command(plan: Plan, run: PlannedRun) -> tuple[list[str], int | None]:
    """The ``targetgen train`` command line for ``run``, and the step it resumes from."""
    run_dir = plan.run_dir(run)
    train = [sys.executable, "-m", "targetgen.cli", "train", "--no-progress"]
    step = _checkpoint_step(run_dir)
    if step is not None:
        return [*train, "--resume", str(run_dir)], step
    config = str(plan.out / "configs" / f"{run.name}.yaml")
    return [*train, "--config", config, "--overwrite"], None  # --overwrite: a run that died before its first checkpoint


def final_metrics(run_dir: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """The last evaluation (``eval/`` keys, prefix dropped) and the last log line of a run."""
    lines = read_metrics(run_dir / METRICS)
    evaluations = [line for line in lines if any(k.startswith("eval/") for k in line)]
    metrics = {k[5:]: v for k, v in evaluations[-1].items() if k.startswith("eval/")} if evaluations else {}
    steps = [line for line in lines if "train_s" in line]  # not a --allow-config-change record
    return metrics, steps[-1] if steps else {}


def _summarise(plan: Plan, run: PlannedRun, resumed_from: int | None, wall_s: float) -> dict[str, Any]:
    from .training.builder import cpu_model  # torch: only once runs are trained, never for planning

    run_dir = plan.run_dir(run)
    metrics, last = final_metrics(run_dir)
    summary = {
        "name": run.name,
        "label": run.configuration.label,
        "source": run.configuration.source,
        "control": run.configuration.control,
        "seed": run.seed,
        "settings": run.configuration.settings,
        "steps": last.get("step"),
        "images_seen": last.get("images_seen"),
        "train_s": last.get("train_s"),
        "max_seconds": run.config["train"].get("max_seconds"),
        "wall_s": wall_s,
        "cpu": cpu_model(),
        "resumed_from": resumed_from,
        "metrics": metrics,
    }
    write_json(run_dir / "summary.json", summary, "run summary", jsonsafe.dumps)
    return summary


HEADLINE = ("precision", "recall", "modes_covered", "high_quality_share", "classes_covered")


def summary_line(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    fids = [k for k in metrics if k.startswith("fid")][:1]  # fid, fid_digits, fid_mnist, ...: whichever was measured
    shown = [f"{k} {metrics[k]:.4g}" for k in (*fids, *HEADLINE) if metrics.get(k) is not None]
    resumed = f", resumed from step {summary['resumed_from']}" if summary["resumed_from"] is not None else ""
    train_s = summary["train_s"] or 0.0
    return (
        f"{summary['label']} seed {summary['seed']}: {', '.join(shown) or 'no metrics'} ({train_s:.0f} s "
        f"training{resumed})"
    )


@dataclass
class Outcome:
    finished: list[dict[str, Any]]  # summaries of runs finished now
    skipped: list[str]  # names of runs finished before
    failed: list[tuple[str, str]]  # (name, why)


def job_devices(devices: str | None) -> list[str]:
    """The GPUs that jobs are spread over: ``--devices``, else $CUDA_VISIBLE_DEVICES, else every visible
    GPU when there are several; empty when jobs need not be told (one GPU or none)."""
    given = devices if devices is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip()]
    import torch

    count = torch.cuda.device_count()
    return [str(i) for i in range(count)] if count > 1 else []


def job_threads(environ: dict[str, str], jobs: int, cores: int) -> int:
    """CPU threads per run: the cores shared among the jobs instead of oversubscribed, or fewer when the
    user set OMP_NUM_THREADS or MKL_NUM_THREADS lower. One count goes into both variables: torch follows
    MKL_NUM_THREADS when it is set, so a user's OMP_NUM_THREADS=1 beside MKL_NUM_THREADS=2 trains on 2.
    Runs with train.threads unset use it (toy2d's MLPs use 1)."""
    given = [
        int(environ[var])
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
        if environ.get(var, "").isdigit() and int(environ[var]) > 0
    ]
    return min([max(1, cores // jobs), *given])


def run_plan(plan: Plan, jobs: int, console, progress: bool = True, devices: list[str] = ()) -> Outcome:
    """Train every unfinished run, ``jobs`` processes at a time; print a line per finished run.

    With ``devices``, each job sees one of them as its only GPU (``CUDA_VISIBLE_DEVICES``),
    the one fewest running jobs use, so that jobs spread over the GPUs instead of sharing cuda:0."""
    if jobs < 1:
        raise ConfigError(f"--jobs: expected at least 1 parallel run, got {jobs}")
    pending = [r for r in plan.runs if not is_finished(plan.run_dir(r))]
    outcome = Outcome([], [r.name for r in plan.runs if is_finished(plan.run_dir(r))], [])
    if outcome.skipped:
        console.print(f"{len(outcome.skipped)} of {len(plan.runs)} runs already finished: skipped", markup=False)
    env = dict(os.environ)
    threads = str(job_threads(env, jobs, os.cpu_count() or 1))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TARGETGEN_PARENT_PID=str(os.getpid()))

    bar = progress_bar("runs", extra="running", console=console, disable=not progress)
    running: dict[str, tuple[subprocess.Popen, PlannedRun, int | None, float, Any, str | None]] = {}
    task = bar.add_task("compare", total=len(plan.runs), completed=len(outcome.skipped), running="")
    with _stop_requests() as stop:
        try:
            with bar:
                while (pending or running) and not stop:
                    while pending and len(running) < jobs and not stop:
                        run = pending.pop(0)
                        _wait_until_free(plan.run_dir(run))
                        command, resumed_from = _command(plan, run)
                        log = (plan.out / "logs" / f"{run.name}.log").open("a")
                        what = f"resuming from step {resumed_from}" if resumed_from is not None else "starting"
                        job_env, where = env, ""
                        if devices:
                            busy = [r[5] for r in running.values()]
                            device = min(devices, key=busy.count)  # the least used, first in order on ties
                            job_env, where = (
                                {**env, "CUDA_VISIBLE_DEVICES": device},
                                f" on CUDA_VISIBLE_DEVICES={device}",
                            )
                        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}{where}: {' '.join(command)}\n")
                        log.flush()
                        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=job_env)
                        device = job_env.get("CUDA_VISIBLE_DEVICES") if devices else None
                        running[run.name] = (process, run, resumed_from, time.perf_counter(), log, device)
                        bar.update(task, running=f"running: {', '.join(running)}")
                    time.sleep(0.2)
                    for name, (process, run, resumed_from, started, log, _) in list(running.items()):
                        if process.poll() is None:
                            continue
                        log.close()
                        del running[name]
                        if process.returncode == 0:
                            summary = _summarise(plan, run, resumed_from, time.perf_counter() - started)
                            outcome.finished.append(summary)
                            console.print(Text.assemble(("done", "green"), f" {summary_line(summary)}"), soft_wrap=True)
                        else:
                            tail = _last_line(plan.out / "logs" / f"{name}.log")
                            outcome.failed.append((name, tail))
                            failed = Text.assemble(("failed", "red"), f" {name} (exit {process.returncode}): {tail}")
                            console.print(failed, soft_wrap=True)
                        bar.update(task, advance=1, running=f"running: {', '.join(running)}" if running else "")
        except KeyboardInterrupt as err:  # raised by a handler that is not ours (another thread's, a host's)
            stop.append(signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
        if stop:  # Ctrl-C or SIGTERM: every child stops like a Ctrl-C'd training, its checkpoint kept
            for process, *_ in running.values():
                process.terminate()
            for process, *_ in running.values():
                process.wait()
            terminated = stop[0] == signal.SIGTERM
            raise Interrupted(
                f"comparison {'terminated' if terminated else 'interrupted'}; its running trainings stopped "
                f"with their checkpoints; run the same command again to resume it ({plan.out})",
                exit_code=143 if terminated else 130,
            )
    return outcome


@contextlib.contextmanager
def _stop_requests():
    """While compare runs its jobs, Ctrl-C and SIGTERM only record themselves (the list it yields): the job loop
    sees them at its next poll and stops every job. A handler that raised could have its exception swallowed
    in a finaliser (Python prints "Exception ignored" and carries on), leaving the comparison running.
    An ignored signal (a background job's SIGINT) stays ignored."""
    stop: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) != signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda number, frame: stop.append(number))
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_until_free(run_dir: Path, seconds: float = 30.0) -> None:
    """A training left by a killed compare gets SIGTERM with it and stops within moments: wait for its lock
    to go rather than fail the run (a run still locked after ``seconds`` is started and reports the holder)."""
    deadline = time.monotonic() + seconds
    while run_dir.is_dir():
        try:
            check_not_in_use(run_dir)
            return
        except TargetgenError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


# ----------------------------------------------------------------------------- one run, and clusters


def array_index(text: str) -> int:
    """``--run-index``: a number, or ``auto`` for the task's index in a Slurm (or submitit) job array."""
    if text != "auto":
        if not text.isdigit():
            raise ConfigError(f"--run-index: expected a run number or auto, got {text!r}")
        return int(text)
    for variable in ("SLURM_ARRAY_TASK_ID", "SUBMITIT_LOCAL_JOB_ID"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    raise ConfigError("--run-index auto: $SLURM_ARRAY_TASK_ID is not set (not inside a Slurm job array)")


def job_environment(cores: int | None = None) -> dict[str, str]:
    """The environment of one training job that has ``cores`` (default: $SLURM_CPUS_PER_TASK, else the machine's)."""
    env = dict(os.environ)
    given = os.environ.get("SLURM_CPUS_PER_TASK", "")
    cores = cores or (int(given) if given.isdigit() else os.cpu_count() or 1)
    threads = str(job_threads(env, 1, cores))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TARGETGEN_PARENT_PID=str(os.getpid()))
    return env


def run_one(out: Path, index: int) -> dict[str, Any]:
    """Train run ``index`` of the plan in ``out`` (resuming it when it has a checkpoint, skipping it when it is
    finished) and write its summary.json: one task of a job array. Raises a TargetgenError naming the run and
    the last line of its log when its training fails."""
    plan = load_plan(out)
    if not 0 <= index < len(plan.runs):
        raise ConfigError(
            f"--run-index: {index} is beyond the plan in {plan.out}, which has {len(plan.runs)} runs "
            f"(0 to {len(plan.runs) - 1})"
        )
    run = plan.runs[index]
    if is_finished(plan.run_dir(run)):
        return json.loads((plan.run_dir(run) / "summary.json").read_text())
    command, resumed_from = _command(plan, run)
    (plan.out / "logs").mkdir(exist_ok=True)
    started = time.perf_counter()
    with (plan.out / "logs" / f"{run.name}.log").open("a") as log:
        what = f"resuming from step {resumed_from}" if resumed_from is not None else "starting"
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {what} (run {index}): {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=job_environment()).returncode
    if code != 0:
        raise TargetgenError(
            f"run {index} ({run.name}) failed (exit {code}): {_last_line(plan.out / 'logs' / f'{run.name}.log')}"
        )
    return _summarise(plan, run, resumed_from, time.perf_counter() - started)


@dataclass
class ClusterOptions:
    """``--executor submitit``: where and how the job array runs (submitit.AutoExecutor's parameters)."""

    cluster: str = "auto"  # auto (Slurm where sbatch exists, else local processes) | slurm | local
    partition: str | None = None
    minutes: int = 240  # the time limit of each job
    gpus: int = 0  # per job
    cpus: int = 1  # per job: its training threads
    parallel: int = 1  # jobs running at once (Slurm's array parallelism; local: the jobs started at a time)


def cluster_executor(folder: Path, options: ClusterOptions, name: str):
    """A submitit executor for ``options``: Slurm where ``sbatch`` exists (or asked for), else local processes."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor submitit: needs the submitit package: pip install 'targetgen[slurm]'") from None
    cluster = None if options.cluster == "auto" else options.cluster
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(
        timeout_min=int(options.minutes), gpus_per_node=options.gpus, cpus_per_task=options.cpus, name=name
    )
    if executor.cluster == "slurm":
        executor.update_parameters(
            slurm_array_parallelism=options.parallel,
            **({"slurm_partition": options.partition} if options.partition else {}),
        )
    return executor


def submit_plan(plan: Plan, options: ClusterOptions, console, progress: bool = True) -> Outcome:
    """Train every unfinished run of ``plan`` as one submitit job array, wait for them, and say how each ended.
    A Ctrl-C or SIGTERM cancels the jobs (their checkpoints stay; the same command resumes them)."""
    executor = cluster_executor(plan.out / "submitit", options, f"targetgen-{plan.out.name}")
    indices = [i for i, r in enumerate(plan.runs) if not is_finished(plan.run_dir(r))]
    outcome = Outcome([], [r.name for r in plan.runs if is_finished(plan.run_dir(r))], [])
    # locally submitit starts every job at once: keep `parallel` of them in flight instead
    wave = len(indices) if executor.cluster == "slurm" else max(1, options.parallel)
    bar = progress_bar("runs", extra="running", console=console, disable=not progress)
    task = bar.add_task("compare", total=len(plan.runs), completed=len(outcome.skipped), running="")
    waiting, jobs = list(indices), {}
    with _stop_requests() as stop, bar:
        while (waiting or jobs) and not stop:
            if waiting and len(jobs) < wave:
                batch = waiting[: wave - len(jobs)]
                del waiting[: len(batch)]
                with executor.batch():
                    submitted = [(i, executor.submit(run_one, plan.out, i)) for i in batch]
                jobs.update((i, job) for i, job in submitted)
                bar.update(task, running=f"{executor.cluster} jobs: {len(jobs)} running or queued")
            time.sleep(0.5)
            for i, job in list(jobs.items()):
                if not job.done():
                    continue
                del jobs[i]
                name = plan.runs[i].name
                error = job.exception()
                if error is None:
                    summary = job.result()
                    outcome.finished.append(summary)
                    console.print(Text.assemble(("done", "green"), f" {summary_line(summary)}"), soft_wrap=True)
                else:
                    why = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                    outcome.failed.append((name, why))
                    console.print(
                        Text.assemble(("failed", "red"), f" {name} (job {job.job_id}): {why}"), soft_wrap=True
                    )
                bar.update(task, advance=1)
        if stop:
            raise cancelled(
                jobs.values(),
                stop[0],
                "comparison",
                f"their checkpoints kept; run the same command again to resume it ({plan.out})",
            )
    return outcome


def cancelled(jobs, signum: int, what: str, then: str) -> Interrupted:
    """Cancel submitit ``jobs`` after signal ``signum``; returns the Interrupted that says so."""
    for job in jobs:
        job.cancel(check=False)
    terminated = signum == signal.SIGTERM
    return Interrupted(
        f"{what} {'terminated' if terminated else 'interrupted'}; its jobs were cancelled, {then}",
        exit_code=143 if terminated else 130,
    )
