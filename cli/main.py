"""``targetgen``: train, sample and inspect decomposed GAN runs.

Every command turns a ``TargetgenError`` into one line on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from targetgen.errors import Interrupted, TargetgenError, Terminated, raise_terminated
from targetgen.files import check_writable, write_json

app = typer.Typer(
    help="Train image generators by separating target generation from regression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def say(text: str) -> None:
    """One line of output, printed as text: paths and names with brackets stay as they are."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override one config value, e.g. --set targets.options.lambda1=0.25 (repeatable)."
    ),
]


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in digits defaults).")
    ] = None,
    set_: SetOption = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="Target source: standard, inversion, imle, nearest, or any installed plugin (see `targetgen "
            "plugins`). Its options start from its defaults unless the config names the same source."
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Train this many steps (overrides epochs).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Train this many epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name: the run goes to <out-dir>/<name>.")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Folder holding run directories (default runs/).")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this directory from its last checkpoint.")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace an existing run directory of the same name (the old run is deleted only once the new one "
            "has written its first checkpoint)."
        ),
    ] = False,
    allow_config_change: Annotated[
        bool,
        typer.Option(
            help="With --resume: continue although config.yaml (or --set) differs from the checkpoint's config; the "
            "changes are recorded in metrics.jsonl."
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a generator; writes config.yaml, metrics.jsonl, samples/ and checkpoints/ into the run directory.

    Launched by torchrun (torchrun --nproc_per_node=N -m targetgen.cli train ...), it trains
    on N processes with DistributedDataParallel; see docs/scaling.md.
    """
    from targetgen.config import load_config
    from targetgen.training.rundir import CHECKPOINT, config_of_run, planned_run_dir, resumable_run_dir

    overrides = list(set_ or [])
    for key, value in (("steps", steps), ("epochs", epochs), ("batch_size", batch_size), ("seed", seed)):
        if value is not None:
            overrides.append(f"train.{key}={value}")
    for key, text in (("name", name), ("out_dir", out_dir), ("device", device)):
        if text is not None:  # names and paths stay strings ("123", "") rather than being read as YAML
            overrides.append(f"train.{key}={json.dumps(str(text))}")
    # Everything that can be checked without torch is checked first; nothing is deleted here.
    if resume is not None:
        if config is not None or targets is not None or overwrite:
            raise TargetgenError(
                "--resume continues a run with its saved config; drop --config, --targets and --overwrite"
            )
        run_dir = resumable_run_dir(resume)
        cfg = config_of_run(resume, overrides, allow_config_change)
    else:
        if allow_config_change:
            raise TargetgenError(
                "--allow-config-change: only with --resume (a new run has no checkpoint to differ from)"
            )
        cfg = load_config(config, overrides, targets)
        run_dir = planned_run_dir(cfg.train.out_dir, cfg.train.name, overwrite)

    from targetgen.distributed import join, leave
    from targetgen.training import train as run_training

    processes = join(cfg.train.device)  # torchrun: one process per GPU (or CPU share), see docs/scaling.md
    try:
        if resume is not None and processes.is_main:
            say(f"resuming {run_dir}")
        run = run_training(
            cfg,
            run_dir,
            resume=resume is not None,
            overwrite=overwrite,
            progress=progress,
            processes=processes,
            allow_config_change=allow_config_change,
        )
    except KeyboardInterrupt as err:
        raise Interrupted(
            f"{'terminated' if isinstance(err, Terminated) else 'interrupted'}; {_checkpoint_kept(run_dir)}; "
            f"continue with: targetgen train --resume {run_dir}",
            exit_code=143 if isinstance(err, Terminated) else 130,
        ) from None
    finally:
        leave(processes)
    if processes.is_main:
        where = f" on {processes.world_size} processes" if processes.distributed else ""
        steps = (
            f"{run.total_steps} steps"
            if run.step == run.total_steps
            else f"{run.step} of {run.total_steps} steps (train.max_seconds: {cfg.train.max_seconds:g} s reached)"
        )
        say(f"data: {run.data.description}; targets: {cfg.targets.name}; {steps}{where}")
        say(f"samples:    {run_dir / 'samples'}")
        say(f"metrics:    {run_dir / 'metrics.jsonl'}")
        say(f"checkpoint: {run_dir / CHECKPOINT}")


def _check_range(option: str, value: float, low: float, high: float | None = None, kind: str = "an integer") -> None:
    """One line naming the option, the range and the value, before any work (typer's own check prints a box)."""
    import math

    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise TargetgenError(f"{option}: expected {kind} {bounds}, got {value!r}")


SEED_MAX = 2**32 - 1
GRID_MAX = 10_000  # tiles in one sample grid (a 3,402-pixel-square PNG at 32×32)


def _checkpoint_kept(run_dir: Path) -> str:
    """What a stopped run keeps, in words."""
    from targetgen.errors import CheckpointError
    from targetgen.training.checkpoint import load_checkpoint
    from targetgen.training.rundir import CHECKPOINT

    try:
        return f"the last checkpoint (step {load_checkpoint(run_dir / CHECKPOINT)['step']}) is kept"
    except CheckpointError:
        return "no checkpoint was written yet"


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 64,
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("samples.png"),
    seed: Annotated[int, typer.Option(help="Seed of the latents.")] = 0,
) -> None:
    """Write a grid of samples from the run's latest checkpoint (the EMA generator when the run kept one).

    Needs only the run's config.yaml and checkpoint, not its training data.
    """
    import torch

    from targetgen.data import load_data
    from targetgen.samples import generate, save_samples
    from targetgen.training import load_generator

    if n < 1:
        raise TargetgenError(f"--n: expected a positive number of samples, got {n}")
    _check_range("--seed", seed, 0, SEED_MAX)
    if out.is_dir() or out.suffix.lower() != ".png":
        raise TargetgenError(f"--out: expected a .png file for the grid, got {out}")
    if n > GRID_MAX:
        raise TargetgenError(
            f"--n: a grid of {n:,} samples would be one PNG of {n:,} tiles; expected at most {GRID_MAX:,}"
        )
    check_writable(out, "the samples")
    trained = load_generator(run_dir)
    z = torch.randn(n, *trained.latent_shape, generator=torch.Generator().manual_seed(seed))
    samples = generate(trained.sampling_generator, z.to(trained.device))
    # 2-D points are drawn over their (synthetic, always available) data
    data = load_data(trained.config.data).dataset.images if len(trained.image_shape) == 1 else None
    save_samples(samples, out, data, title=f"{run_dir.name}")
    say(f"wrote {n} samples to {out}")


def _evaluation_options(base, metrics, features, n, seed, cache_dir, fid_weights):
    """The run's evaluation section with the command line's choices on top, checked like a config."""
    from targetgen.config import EvaluationConfig, from_dict, to_dict

    changes = {
        "metrics": metrics,
        "features": features,
        "n": n,
        "seed": seed,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "fid_weights": str(fid_weights) if fid_weights else None,
    }
    return from_dict(
        EvaluationConfig, {**to_dict(base), **{k: v for k, v in changes.items() if v is not None}}, "evaluation"
    )


MetricsOption = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated: fid (and KID), pr (precision/recall/density/coverage), modes (toy2d), classes "
        "(digits, mnist). Default: all that apply."
    ),
]
FeaturesOption = Annotated[
    str | None,
    typer.Option(
        help="Feature space: inception (FID), digits or mnist (offline digit classifiers), pixels. Default: digits "
        "for digits, mnist for mnist5k, pixels for toy2d, else inception."
    ),
]
NOption = Annotated[
    int | None, typer.Option("--n", help="Generated and real samples (default 2048, the paper's protocol).")
]
CacheOption = Annotated[
    Path | None, typer.Option(help="Where real statistics are cached (default ~/.cache/targetgen).")
]
WeightsOption = Annotated[
    Path | None,
    typer.Option(
        help=f"pytorch-fid's {'pt_inception-2015-12-05-6726825d.pth'} (else $TARGETGEN_FID_WEIGHTS, else the torch "
        "hub cache)."
    ),
]


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    metrics: MetricsOption = None,
    features: FeaturesOption = None,
    n: NOption = None,
    ema: Annotated[bool, typer.Option(help="Evaluate the EMA generator (runs trained with regression.ema).")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the latents and of the real subset.")] = None,
    cache_dir: CacheOption = None,
    fid_weights: WeightsOption = None,
) -> None:
    """Evaluate the latest checkpoint of a run; writes eval.json into the run directory and prints a table."""
    from rich.table import Table

    from targetgen import jsonsafe
    from targetgen.evaluation import check_evaluation, describe_value
    from targetgen.evaluation import evaluate as run_evaluation
    from targetgen.training import config_of_run, load_trained

    config = config_of_run(run_dir)
    options = _evaluation_options(config.evaluation, metrics, features, n, seed, cache_dir, fid_weights)
    check_evaluation(options, config.data)  # missing FID weights: said before the run is rebuilt
    check_writable(run_dir / "eval.json", "the evaluation")  # before minutes of work, not after
    run = load_trained(run_dir)
    results = run_evaluation(run, options, ema=ema)
    record = {"run": str(run_dir), "step": run.step, "ema": ema, "features": options.features, **results}
    write_json(run_dir / "eval.json", record, "the evaluation", jsonsafe.dumps)
    table = Table("metric", "value", title=Text(f"{run_dir} (step {run.step})"))
    for key, value in results.items():
        table.add_row(Text(key), Text(describe_value(key, value)))
    console.print(table)
    say(f"wrote {run_dir / 'eval.json'}")


@app.command("fid-stats")
def fid_stats(
    source: Annotated[
        str, typer.Argument(help="A YAML config, an image folder, or a data name (digits, toy2d, mnist, ...).")
    ],
    set_: SetOption = None,
    features: FeaturesOption = None,
    n: NOption = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the real subset.")] = None,
    cache_dir: CacheOption = None,
    fid_weights: WeightsOption = None,
) -> None:
    """Precompute and cache the real data's feature statistics (used by evaluate and by training's evaluation)."""
    from targetgen.config import load_config
    from targetgen.data import load_data
    from targetgen.evaluation import load_features, real_features, resolve_features
    from targetgen.training import resolve_device

    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        config = load_config(path, list(set_ or []))
    elif path.is_dir():
        config = load_config(None, ["data.name=folder", f"data.path={path}", *(set_ or [])])
    else:
        config = load_config(None, [f"data.name={source}", *(set_ or [])])
    options = _evaluation_options(config.evaluation, None, features, n, seed, cache_dir, fid_weights)
    options.features = resolve_features(options, config.data)
    data = load_data(config.data)
    extractor = load_features(options.features, resolve_device(config.train.device), options.fid_weights)
    real = real_features(data, config.data, extractor, options)
    say(
        f"{data.description}: {len(real.features)} images in '{options.features}' space "
        f"({real.features.size(1)}-d), statistics cached"
    )


@app.command()
def compare(
    out: Annotated[
        Path,
        typer.Option(help="Folder of the comparison: runs/, logs/, results.csv, report.md, curves.png, samples.png."),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML config; its `compare` section (targets, seeds, grid, control) is the default plan.",
        ),
    ] = None,
    targets: Annotated[
        str | None, typer.Option(help="Comma-separated target sources, e.g. standard,inversion,imle,nearest.")
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(help="Seeds per configuration (train.seed, train.seed + 1, ...).")
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            help="A grid axis, key=v1,v2,... (repeatable; axes combine as a product). Keys apply to the sources that "
            "have them."
        ),
    ] = None,
    set_: SetOption = None,
    jobs: Annotated[
        int, typer.Option(help="Runs trained in parallel processes (the CPU threads are shared among them).")
    ] = 1,
    devices: Annotated[
        str | None,
        typer.Option(
            help="GPUs to spread the jobs over, e.g. 0,1,2,3: each job sees one as its only GPU (default: "
            "$CUDA_VISIBLE_DEVICES, else all visible GPUs when there are several)."
        ),
    ] = None,
    control: Annotated[
        bool | None,
        typer.Option(
            "--control/--no-control",
            help="Add 'standard, G lr = λ2' for every inversion λ2 that differs from standard's lr (default: on).",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train every target source × grid point × seed with equal budgets, then write the report.

    Re-running the same command skips finished runs and resumes interrupted ones
    from their last checkpoint.
    """
    import shlex

    from targetgen.compare import job_devices, plan_comparison, run_plan, write_plan
    from targetgen.report import write_report
    from targetgen.training.rundir import run_lock

    plan = plan_comparison(config, out, list(set_ or []), targets, seeds, list(grid or []), control)
    with run_lock(out, "targetgen compare"):  # one comparison at a time in a folder
        write_plan(plan, shlex.join(["targetgen", *sys.argv[1:]]))
        labels = ", ".join(c.label for c in plan.configurations)
        equal = (
            f"{plan.runs[0].config['train']['max_seconds']:g} s of training each"
            if plan.compare.budget == "seconds"
            else "equal steps"
        )
        say(
            f"{len(plan.configurations)} configurations × {plan.compare.seeds} seeds = {len(plan.runs)} runs "
            f"({equal}): {labels}"
        )
        outcome = run_plan(plan, jobs, console, progress, job_devices(devices))
        paths = write_report(out)
    say("report: " + ", ".join(str(p) for p in paths))
    if outcome.failed:
        names = ", ".join(name for name, _ in outcome.failed)
        raise TargetgenError(
            f"{len(outcome.failed)} runs failed ({names}); their logs are in {out / 'logs'}; "
            "fix the cause and run the same command again to retry them"
        )


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="The folder of a comparison (targetgen compare --out).")],
) -> None:
    """Rebuild results.csv, report.md, curves.png and samples.png from a comparison's finished runs."""
    from targetgen.report import write_report

    say("wrote " + ", ".join(str(p) for p in write_report(out)))


@app.command()
def toy(
    dim: Annotated[int, typer.Option(help="Dimension d of data, latents and samples.")] = 2,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 1000,
    regression: Annotated[
        str,
        typer.Option(
            help="closed-form (least squares B = X'ᵀZ̃(Z̃ᵀZ̃)⁻¹ on every batch) or gradient (the regression engine, SGD)."
        ),
    ] = "closed-form",
    lambda1: Annotated[
        float, typer.Option(help="λ1 of the inversion (δ1 is mean-reduced: each sample moves λ1 / batch size).")
    ] = 100.0,
    lr: Annotated[float, typer.Option(help="λ2 of the gradient regression.")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of μ, Σ, the data and training.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder: toy.json, errors.png, scatter.png (d = 2).")] = Path(
        "runs/toy"
    ),
) -> None:
    """The paper's toy GAN: linear generator vs logistic discriminator on N(μ, Σ).

    The paper predicts that it matches the mean and never the covariance; the
    plot and toy.json show whether it does (docs/theory.md).
    """
    from targetgen.toy import train_toy, write_toy_outputs

    _check_range("--dim", dim, 1, 10_000)
    _check_range("--steps", steps, 1, 10_000_000)
    _check_range("--batch-size", batch_size, 2, 1_000_000)
    _check_range("--seed", seed, 0, SEED_MAX)
    if regression not in ("closed-form", "gradient"):
        raise TargetgenError(f"--regression: expected closed-form or gradient, got {regression!r}")
    for option, value in (("--lambda1", lambda1), ("--lr", lr)):
        if not (value > 0 and value != float("inf")):
            raise TargetgenError(f"{option}: expected a finite number > 0, got {value!r}")
    result, generator, points = train_toy(dim, steps, regression, lambda1, lr, batch_size=batch_size, seed=seed)
    paths = write_toy_outputs(result, generator, points, out)
    say(
        f"mean error {result.mean_error[0]:.4g} → {result.mean_error[-1]:.4g}; "
        f"covariance error {result.covariance_error[0]:.4g} → {result.covariance_error[-1]:.4g}"
    )
    say("wrote " + ", ".join(str(p) for p in paths))


@app.command()
def probe(
    run_dir: Annotated[Path, typer.Argument(help="A decomposed run directory.")],
    batch_size: Annotated[
        int, typer.Option(help="Samples in the probed batch (K has (batch × sample size)² entries, never formed).")
    ] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the batch and the latents.")] = 0,
) -> None:
    """Measure the generator's inductive bias K_θ along the target source's requests (docs/theory.md)."""

    from rich.table import Table

    from targetgen.probe import probe_run
    from targetgen.training import load_trained

    if batch_size < 2:
        raise TargetgenError(f"--batch-size: expected at least 2 samples, got {batch_size}")
    _check_range("--seed", seed, 0, SEED_MAX)
    check_writable(run_dir / "probe.json", "the probe")
    results = probe_run(load_trained(run_dir), batch_size, seed)
    table = Table("quantity", "value", title=Text(f"K_θ probe of {run_dir}"))
    for key, value in results.items():
        table.add_row(key, f"{value:.4g}")
    console.print(table)
    write_json(run_dir / "probe.json", results, "the probe")


@app.command()
def plugins() -> None:
    """List installed plugins by group, with their distribution and whether they load."""
    from rich.table import Table

    from targetgen.registry import survey

    table = Table("group", "name", "distribution", "version", "status")
    for row in survey():
        status = Text("ok", "green") if row.status == "ok" else Text(row.status, "red")
        table.add_row(Text(row.group), Text(row.name), Text(row.distribution), Text(row.version), status)
    console.print(table)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, without the source line that raised them."""
    if os.environ.get("RANK", "0") == "0":
        err_console.print(Text.assemble(("warning:", "yellow"), " " + " ".join(str(message).split())), soft_wrap=True)


PARENT = "TARGETGEN_PARENT_PID"  # set by compare for its children: they stop when it dies


def _die_with_parent() -> None:
    """A child of ``targetgen compare`` gets SIGTERM when compare dies, however it dies (Linux: PR_SET_PDEATHSIG),
    so that no orphaned training keeps a run locked; a parent already gone means stop now."""
    parent = os.environ.get(PARENT, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(parent):
        raise Terminated


def main() -> None:
    import signal
    import warnings

    warnings.showwarning = _one_line_warning
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_terminated)  # stop like Ctrl-C: cleanup runs, exit status 143
    try:
        _die_with_parent()
        app()
    except TargetgenError as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike: say it once
            label = "stopped" if isinstance(err, Interrupted) else "error"
            err_console.print(Text.assemble((f"{label}:", "red"), " " + " ".join(str(err).split("\n"))), soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:  # outside training: nothing to resume
        terminated = isinstance(err, Terminated)
        err_console.print(Text("terminated" if terminated else "interrupted"))
        sys.exit(143 if terminated else 130)


if __name__ == "__main__":
    main()
