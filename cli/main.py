"""``targetgen``: train, sample and inspect decomposed GAN runs.

Every command turns a ``TargetgenError`` into one line on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from targetgen.errors import Interrupted, TargetgenError

app = typer.Typer(
    help="Train image generators by separating target generation from regression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one config value, e.g. --set targets.options.lambda1=0.25 (repeatable)."),
]


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: built-in digits defaults).")] = None,
    set_: SetOption = None,
    targets: Annotated[Optional[str], typer.Option(help="Target source: standard, inversion, imle, nearest, or any installed plugin (see `targetgen plugins`). Its options start from its defaults unless the config names the same source.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Train this many steps (overrides epochs).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Train this many epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name: the run goes to <out-dir>/<name>.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Folder holding run directories (default runs/).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its last checkpoint.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory of the same name.")] = False,
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
            raise TargetgenError("--resume continues a run with its saved config; drop --config, --targets and --overwrite")
        run_dir = resumable_run_dir(resume)
        cfg = config_of_run(resume, overrides)
    else:
        cfg = load_config(config, overrides, targets)
        run_dir = planned_run_dir(cfg.train.out_dir, cfg.train.name, overwrite)

    from targetgen.distributed import join, leave
    from targetgen.training import train as run_training

    processes = join(cfg.train.device)  # torchrun: one process per GPU (or CPU share), see docs/scaling.md
    try:
        if resume is not None and processes.is_main:
            console.print(f"resuming [bold]{run_dir}[/]")
        run = run_training(cfg, run_dir, resume=resume is not None, overwrite=overwrite, progress=progress,
                           processes=processes)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {_checkpoint_kept(run_dir)}; continue with: targetgen train --resume {run_dir}") from None
    finally:
        leave(processes)
    if processes.is_main:
        where = f" on {processes.world_size} processes" if processes.distributed else ""
        steps = (f"{run.total_steps} steps" if run.step == run.total_steps else
                 f"{run.step} of {run.total_steps} steps (train.max_seconds: {cfg.train.max_seconds:g} s of training reached)")
        console.print(f"data: {run.data.description}; targets: {cfg.targets.name}; {steps}{where}")
        console.print(f"samples:    {run_dir / 'samples'}")
        console.print(f"metrics:    {run_dir / 'metrics.jsonl'}")
        console.print(f"checkpoint: {run_dir / CHECKPOINT}")


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
    trained = load_generator(run_dir)
    z = torch.randn(n, *trained.latent_shape, generator=torch.Generator().manual_seed(seed))
    samples = generate(trained.sampling_generator, z.to(trained.device))
    # 2-D points are drawn over their (synthetic, always available) data
    data = load_data(trained.config.data).dataset.images if len(trained.image_shape) == 1 else None
    save_samples(samples, out, data, title=f"{run_dir.name}")
    console.print(f"wrote {n} samples to {out}")


def _evaluation_options(base, metrics, features, n, seed, cache_dir, fid_weights):
    """The run's evaluation section with the command line's choices on top, checked like a config."""
    from targetgen.config import EvaluationConfig, from_dict, to_dict

    changes = {"metrics": metrics, "features": features, "n": n, "seed": seed,
               "cache_dir": str(cache_dir) if cache_dir else None, "fid_weights": str(fid_weights) if fid_weights else None}
    return from_dict(EvaluationConfig, {**to_dict(base), **{k: v for k, v in changes.items() if v is not None}}, "evaluation")


MetricsOption = Annotated[Optional[str], typer.Option(help="Comma-separated: fid (and KID), pr (precision/recall/density/coverage), modes (toy2d), classes (digits, mnist). Default: all that apply.")]
FeaturesOption = Annotated[Optional[str], typer.Option(help="Feature space: inception (FID), digits or mnist (offline digit classifiers), pixels. Default: digits for digits, mnist for mnist5k, pixels for toy2d, else inception.")]
NOption = Annotated[Optional[int], typer.Option("--n", help="Generated and real samples (default 2048, the paper's protocol).")]
CacheOption = Annotated[Optional[Path], typer.Option(help="Where real statistics are cached (default ~/.cache/targetgen).")]
WeightsOption = Annotated[Optional[Path], typer.Option(help=f"pytorch-fid's {'pt_inception-2015-12-05-6726825d.pth'} (else $TARGETGEN_FID_WEIGHTS, else the torch hub cache).")]


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    metrics: MetricsOption = None,
    features: FeaturesOption = None,
    n: NOption = None,
    ema: Annotated[bool, typer.Option(help="Evaluate the EMA generator (runs trained with regression.ema).")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the latents and of the real subset.")] = None,
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
    run = load_trained(run_dir)
    results = run_evaluation(run, options, ema=ema)
    record = {"run": str(run_dir), "step": run.step, "ema": ema, "features": options.features, **results}
    (run_dir / "eval.json").write_text(jsonsafe.dumps(record, indent=2) + "\n")
    table = Table("metric", "value", title=f"{run_dir} (step {run.step})")
    for key, value in results.items():
        table.add_row(key, describe_value(key, value))
    console.print(table)
    console.print(f"wrote {run_dir / 'eval.json'}")


@app.command("fid-stats")
def fid_stats(
    source: Annotated[str, typer.Argument(help="A YAML config, an image folder, or a data name (digits, toy2d, mnist, ...).")],
    set_: SetOption = None,
    features: FeaturesOption = None,
    n: NOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the real subset.")] = None,
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
    console.print(f"{data.description}: {len(real.features)} images in '{options.features}' space "
                  f"({real.features.size(1)}-d), statistics cached")


@app.command()
def compare(
    out: Annotated[Path, typer.Option(help="Folder of the comparison: runs/, logs/, results.csv, report.md, curves.png, samples.png.")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config; its `compare` section (targets, seeds, grid, control) is the default plan.")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma-separated target sources, e.g. standard,inversion,imle,nearest.")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Seeds per configuration (train.seed, train.seed + 1, ...).")] = None,
    grid: Annotated[Optional[list[str]], typer.Option(help="A grid axis, key=v1,v2,... (repeatable; axes combine as a product). Keys apply to the sources that have them.")] = None,
    set_: SetOption = None,
    jobs: Annotated[int, typer.Option(help="Runs trained in parallel processes (the CPU threads are shared among them).")] = 1,
    devices: Annotated[Optional[str], typer.Option(help="GPUs to spread the jobs over, e.g. 0,1,2,3: each job sees one as its only GPU (default: $CUDA_VISIBLE_DEVICES, else all visible GPUs when there are several).")] = None,
    control: Annotated[Optional[bool], typer.Option("--control/--no-control", help="Add 'standard, G lr = λ2' for every inversion λ2 that differs from standard's lr (default: on).")] = None,
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
        equal = (f"{plan.runs[0].config['train']['max_seconds']:g} s of training each" if plan.compare.budget == "seconds"
                 else "equal steps")
        console.print(f"{len(plan.configurations)} configurations × {plan.compare.seeds} seeds = {len(plan.runs)} runs "
                      f"({equal}): {labels}", soft_wrap=True, highlight=False)
        outcome = run_plan(plan, jobs, console, progress, job_devices(devices))
        paths = write_report(out)
    console.print("report: " + ", ".join(str(p) for p in paths))
    if outcome.failed:
        names = ", ".join(name for name, _ in outcome.failed)
        raise TargetgenError(f"{len(outcome.failed)} runs failed ({names}); their logs are in {out / 'logs'}; "
                             "fix the cause and run the same command again to retry them")


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="The folder of a comparison (targetgen compare --out).")],
) -> None:
    """Rebuild results.csv, report.md, curves.png and samples.png from a comparison's finished runs."""
    from targetgen.report import write_report

    console.print("wrote " + ", ".join(str(p) for p in write_report(out)))


@app.command()
def toy(
    dim: Annotated[int, typer.Option(help="Dimension d of data, latents and samples.")] = 2,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 1000,
    regression: Annotated[str, typer.Option(help="closed-form (least squares B = X'ᵀZ̃(Z̃ᵀZ̃)⁻¹ on every batch) or gradient (the regression engine, SGD).")] = "closed-form",
    lambda1: Annotated[float, typer.Option(help="λ1 of the inversion (δ1 is mean-reduced: each sample moves λ1 / batch size).")] = 100.0,
    lr: Annotated[float, typer.Option(help="λ2 of the gradient regression.")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of μ, Σ, the data and training.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder: toy.json, errors.png, scatter.png (d = 2).")] = Path("runs/toy"),
) -> None:
    """The paper's toy GAN: linear generator vs logistic discriminator on N(μ, Σ).

    The paper predicts that it matches the mean and never the covariance; the
    plot and toy.json show whether it does (docs/theory.md).
    """
    from targetgen.toy import train_toy, write_toy_outputs

    result, generator, points = train_toy(dim, steps, regression, lambda1, lr, batch_size=batch_size, seed=seed)
    paths = write_toy_outputs(result, generator, points, out)
    console.print(f"mean error {result.mean_error[0]:.4g} → {result.mean_error[-1]:.4g}; "
                  f"covariance error {result.covariance_error[0]:.4g} → {result.covariance_error[-1]:.4g}")
    console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command()
def probe(
    run_dir: Annotated[Path, typer.Argument(help="A decomposed run directory.")],
    batch_size: Annotated[int, typer.Option(help="Samples in the probed batch (K has (batch × sample size)² entries, never formed).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the batch and the latents.")] = 0,
) -> None:
    """Measure the generator's inductive bias K_θ along the target source's requests (docs/theory.md)."""

    from rich.table import Table

    from targetgen.probe import probe_run
    from targetgen.training import load_trained

    if batch_size < 2:
        raise TargetgenError(f"--batch-size: expected at least 2 samples, got {batch_size}")
    results = probe_run(load_trained(run_dir), batch_size, seed)
    table = Table("quantity", "value", title=f"K_θ probe of {run_dir}")
    for key, value in results.items():
        table.add_row(key, f"{value:.4g}")
    console.print(table)
    (run_dir / "probe.json").write_text(json.dumps(results, indent=1) + "\n")


@app.command()
def plugins() -> None:
    """List installed plugins by group, with their distribution and whether they load."""
    from rich.table import Table

    from targetgen.registry import survey

    table = Table("group", "name", "distribution", "version", "status")
    for row in survey():
        status = "[green]ok[/]" if row.status == "ok" else f"[red]{row.status}[/]"
        table.add_row(row.group, row.name, row.distribution, row.version, status)
    console.print(table)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, without the source line that raised them."""
    if os.environ.get("RANK", "0") == "0":
        from rich.markup import escape

        err_console.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}", soft_wrap=True, highlight=False)


def main() -> None:
    import warnings

    warnings.showwarning = _one_line_warning
    try:
        app()
    except TargetgenError as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike: say it once
            label = "stopped" if isinstance(err, Interrupted) else "error"
            err_console.print(f"[red]{label}:[/] {err}", soft_wrap=True, highlight=False)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # outside training: nothing to resume
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
