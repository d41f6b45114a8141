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

from targetgen.errors import Interrupted, TargetgenError, Terminated
from targetgen.files import check_writable, write_json

app = typer.Typer(
    help="Train image generators by separating target generation from regression.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from targetgen import __version__

        say(f"targetgen {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print targetgen's version and exit.")
    ] = False,
) -> None:
    """Train image generators by separating target generation from regression."""


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
    on N processes with DistributedDataParallel; see docs/performance.md.
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

    processes = join(cfg.train.device)  # torchrun: one process per GPU (or CPU share), see docs/performance.md
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


RefineOption = Annotated[
    str,
    typer.Option(
        help="Discriminator-driven sampling: none, latent (Langevin steps on z: DDLS, DGflow), data (steps up D's "
        "logit on the samples) or drs (rejection sampling); needs a run with a discriminator."
    ),
]
RefineStepsOption = Annotated[int, typer.Option(help="--refine latent / data: steps (D passes per sample).")]
RefineStepSizeOption = Annotated[float, typer.Option(help="--refine latent / data: the step size η.")]
RefineNoiseOption = Annotated[
    float, typer.Option(help="--refine latent: γ (noise std √(2ηγ)); data: the noise std per step.")
]
RefinePercentileOption = Annotated[float, typer.Option(help="--refine drs: the logit shift's percentile of F.")]


def _refinement(kind: str, steps: int, step_size: float, noise: float, percentile: float):
    """The --refine options, checked like a config (one line naming the bad value)."""
    from targetgen.config import EvaluationConfig, from_dict
    from targetgen.refine import Refinement

    values = {
        "refine": kind,
        "refine_steps": steps,
        "refine_step_size": step_size,
        "refine_noise": noise,
        "refine_percentile": percentile,
    }
    return Refinement.of(from_dict(EvaluationConfig, values, "evaluation"))


CheckpointOption = Annotated[
    str,
    typer.Option(
        help="Which checkpoint: last, best (kept with train.best_metric), step_N (kept with train.keep_checkpoints) "
        "or the path of a checkpoint file."
    ),
]


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 64,
    out: Annotated[
        Path, typer.Option(help="Where they go: a .png grid, an .npz (uint8 N×H×W×C) or a folder of PNGs.")
    ] = Path("samples.png"),
    format_: Annotated[
        str | None,
        typer.Option("--format", help="grid, png (one file per sample) or npz; default: what --out's name says."),
    ] = None,
    checkpoint: CheckpointOption = "last",
    refine: RefineOption = "none",
    refine_steps: RefineStepsOption = 25,
    refine_step_size: RefineStepSizeOption = 0.1,
    refine_noise: RefineNoiseOption = 0.01,
    refine_percentile: RefinePercentileOption = 95.0,
    seed: Annotated[int, typer.Option(help="Seed of the latents.")] = 0,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Samples generated at a time: memory stays at one batch. The DCGAN generator's batch norm runs in "
            "train mode (as in the tutorial), so samples depend on the batches they are generated in."
        ),
    ] = 256,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Write samples of a run (the EMA generator when the run kept one), as a grid, PNGs or an .npz.

    Needs only the run's config.yaml and checkpoint, not its training data. Large --n is generated a
    batch at a time; PNG folders and .npz files are written as it goes.
    """
    import torch

    from targetgen.data import load_data
    from targetgen.discriminators import Logit
    from targetgen.progress import progress_bar
    from targetgen.refine import Cost, refined_chunks
    from targetgen.samples import generate_chunks, sample_format, save_samples, write_npz, write_png_folder
    from targetgen.training import load_generator

    if n < 1:
        raise TargetgenError(f"--n: expected a positive number of samples, got {n}")
    _check_range("--seed", seed, 0, SEED_MAX)
    _check_range("--batch-size", batch_size, 1, 100_000)
    fmt = sample_format(out, format_)
    if fmt == "grid" and n > GRID_MAX:
        raise TargetgenError(
            f"--n: a grid of {n:,} samples would be one PNG of {n:,} tiles; expected at most {GRID_MAX:,} "
            "(--format png or npz writes any number)"
        )
    check_writable(out / "000000.png" if fmt == "png" else out, "the samples")
    trained = load_generator(run_dir, checkpoint)
    if fmt != "grid" and len(trained.image_shape) != 3:
        raise TargetgenError(f"--format {fmt}: writes images; {run_dir} generates 2-D points (use a .png grid)")
    refinement = _refinement(refine, refine_steps, refine_step_size, refine_noise, refine_percentile)
    if refinement.kind != "none" and trained.discriminator is None:
        raise TargetgenError(f"--refine {refine}: needs a discriminator; '{trained.config.targets.name}' trains none")
    z = torch.randn(n, *trained.latent_shape, generator=torch.Generator().manual_seed(seed)).to(trained.device)
    bf16 = trained.config.train.precision == "bf16"
    bar = progress_bar("samples", console=err_console, disable=not progress)
    cost = Cost()
    with bar:
        task = bar.add_task("sampling", total=n)

        def chunks():
            g = trained.sampling_generator
            made = (
                generate_chunks(g, z, batch_size, bf16)
                if refinement.kind == "none"
                else refined_chunks(
                    g,
                    Logit(trained.discriminator),
                    refinement,
                    z,
                    batch_size,
                    lambda part: next(generate_chunks(g, part, len(part), bf16)),
                    cost,
                    seed,
                )
            )
            for chunk in made:
                bar.advance(task, len(chunk))
                yield chunk.cpu()

        if fmt == "grid":
            # 2-D points are drawn over their (synthetic, always available) data
            data = load_data(trained.config.data).dataset.images if len(trained.image_shape) == 1 else None
            save_samples(torch.cat(list(chunks())), out, data, title=f"{run_dir.name}")
        elif fmt == "png":
            write_png_folder(chunks(), out)
        else:
            write_npz(chunks(), out, n, trained.image_shape)
    spent = ""
    if refinement.kind != "none":
        c = cost.per_sample()
        spent = (
            f", refined ({refine}: {c['refine_d_passes_per_sample']:.3g} D and {c['refine_g_passes_per_sample']:.3g} "
            f"G passes per sample, {c['refine_seconds_per_1000']:.3g} s per 1,000)"
        )
    say(f"wrote {n} samples of {run_dir} (checkpoint {checkpoint}, step {trained.step}){spent} to {out}")


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
    run_dir: Annotated[Path | None, typer.Argument(help="A run directory (or use --samples).")] = None,
    samples: Annotated[
        Path | None,
        typer.Option(help="Score these images instead of a run's: a folder of images or an .npz (uint8 N×H×W×C)."),
    ] = None,
    real: Annotated[
        str | None,
        typer.Option(help="With --samples: the real side, a run directory (its data) or a config or preset name."),
    ] = None,
    checkpoint: CheckpointOption = "last",
    refine: RefineOption = "none",
    refine_steps: RefineStepsOption = 25,
    refine_step_size: RefineStepSizeOption = 0.1,
    refine_noise: RefineNoiseOption = 0.01,
    refine_percentile: RefinePercentileOption = 95.0,
    metrics: MetricsOption = None,
    features: FeaturesOption = None,
    n: NOption = None,
    ema: Annotated[bool, typer.Option(help="Evaluate the EMA generator (runs trained with regression.ema).")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the latents and of the real subset.")] = None,
    cache_dir: CacheOption = None,
    fid_weights: WeightsOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Where eval.json goes (default: the run directory, or beside --samples).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Evaluate a run's checkpoint, or images made anywhere (--samples, --real); writes eval.json and prints a table.

    eval.json records the protocol beside the metrics: the number of samples each side, the feature
    space used, k of precision/recall and of density/coverage, and KID's subset size and count.
    """
    from dataclasses import asdict

    from rich.table import Table

    from targetgen import jsonsafe
    from targetgen.evaluation import check_evaluation, describe_value, evaluate_images, protocol
    from targetgen.evaluation import evaluate as run_evaluation
    from targetgen.progress import progress_bar
    from targetgen.training import config_of_run, load_trained

    if (run_dir is None) == (samples is None):
        raise TargetgenError("evaluate: give a run directory or --samples (with --real), not both or neither")
    bar = progress_bar("images", console=err_console, disable=not progress)
    if samples is not None:
        from targetgen.config import load_config
        from targetgen.data import data_shape
        from targetgen.samples import read_samples
        from targetgen.training import resolve_device

        if real is None:
            raise TargetgenError("--samples: needs --real, a run directory or a config whose data are the real side")
        base = config_of_run(Path(real)) if Path(real).is_dir() else load_config(real)
        options = _evaluation_options(base.evaluation, metrics, features, n, seed, cache_dir, fid_weights)
        check_evaluation(options, base.data)
        target = out or (samples.parent / f"{samples.stem}.eval.json" if samples.suffix else samples / "eval.json")
        check_writable(target, "the evaluation")
        shape = data_shape(base.data)
        count, _, chunks = read_samples(samples, shape[0], shape[1])
        with bar:
            results, proto = evaluate_images(count, chunks, base.data, options, resolve_device(base.train.device), bar)
        record = {"samples": str(samples), "real": real, "protocol": asdict(proto), **results}
        title = f"{samples} against {real}"
    else:
        config = config_of_run(run_dir)
        options = _evaluation_options(config.evaluation, metrics, features, n, seed, cache_dir, fid_weights)
        check_evaluation(options, config.data)  # missing FID weights: said before the run is rebuilt
        target = out or run_dir / "eval.json"
        check_writable(target, "the evaluation")  # before minutes of work, not after
        refinement = _refinement(refine, refine_steps, refine_step_size, refine_noise, refine_percentile)
        trained = load_trained(run_dir, checkpoint)
        with bar:
            results = run_evaluation(trained, options, ema=ema, bar=bar, refinement=refinement)
        proto = protocol(options, trained.config.data, options.n, min(options.n, len(trained.data.dataset)))
        record = {
            "run": str(run_dir),
            "checkpoint": checkpoint,
            "step": trained.step,
            "ema": ema,
            "protocol": asdict(proto),
            **results,
        }
        title = f"{run_dir} (checkpoint {checkpoint}, step {trained.step})"
    write_json(target, record, "the evaluation", jsonsafe.dumps)
    table = Table("metric", "value", title=Text(title))
    for key, value in results.items():
        table.add_row(Text(key), Text(describe_value(key, value)))
    console.print(table)
    say(f"{proto.features} space, {proto.n_generated} generated vs {proto.n_real} real samples; wrote {target}")


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
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Precompute and cache the real data's feature statistics (used by evaluate and by training's evaluation)."""
    from targetgen.config import load_config
    from targetgen.data import load_data
    from targetgen.evaluation import load_features, real_features, resolve_features
    from targetgen.progress import progress_bar
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
    with (bar := progress_bar("images", console=err_console, disable=not progress)):
        real = real_features(data, config.data, extractor, options, bar)
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
    plan_only: Annotated[
        bool, typer.Option(help="Write the plan (configs/, plan.json) and stop: for --run-index on a cluster.")
    ] = False,
    run_index: Annotated[
        str | None,
        typer.Option(
            help="Train one planned run (0 … runs − 1) and write its summary; auto: $SLURM_ARRAY_TASK_ID. Reads the "
            "plan in --out (compare --plan-only writes it)."
        ),
    ] = None,
    collect: Annotated[
        bool, typer.Option(help="Write the report from whatever runs of the plan in --out are finished.")
    ] = False,
    executor: Annotated[
        str,
        typer.Option(
            help="local (processes here, --jobs at a time) or submitit (one job array; Slurm where it exists)."
        ),
    ] = "local",
    cluster: Annotated[str, typer.Option(help="--executor submitit: auto, slurm or local.")] = "auto",
    partition: Annotated[str | None, typer.Option(help="--executor submitit: the Slurm partition.")] = None,
    minutes: Annotated[int, typer.Option(help="--executor submitit: each job's time limit in minutes.")] = 240,
    gpus: Annotated[int, typer.Option(help="--executor submitit: GPUs per job.")] = 0,
    cpus: Annotated[int, typer.Option(help="--executor submitit: CPU cores (training threads) per job.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train every target source × grid point × seed with equal budgets, then write the report.

    Re-running the same command skips finished runs and resumes interrupted ones from their last
    checkpoint. On a cluster: --executor submitit submits one job array; or write the plan with
    --plan-only, run each task with --run-index auto (e.g. sbatch --array=0-N-1), and report with
    --collect.
    """
    import shlex

    from targetgen.compare import (
        ClusterOptions,
        array_index,
        job_devices,
        load_plan,
        plan_comparison,
        run_one,
        run_plan,
        submit_plan,
        summary_line,
        write_plan,
    )
    from targetgen.report import write_report
    from targetgen.training.rundir import run_lock

    if run_index is not None or collect:
        given = [
            o
            for o, v in (
                ("--config", config),
                ("--targets", targets),
                ("--seeds", seeds),
                ("--grid", grid),
                ("--set", set_),
                ("--plan-only", plan_only),
            )
            if v
        ]
        if given or (run_index is not None and collect):
            mode = "--run-index" if run_index is not None else "--collect"
            raise TargetgenError(f"{mode} reads the plan in --out; drop {', '.join(given) or '--collect'}")
        if collect:
            with run_lock(out, "targetgen compare --collect"):
                load_plan(out)  # refuses a folder without a plan, in one line
                say(write_report(out).line())
            return
        summary = run_one(out, array_index(run_index))
        say(f"done {summary_line(summary)}")
        return
    if executor not in ("local", "submitit"):
        raise TargetgenError(f"--executor: expected local or submitit, got {executor!r}")
    if cluster not in ("auto", "slurm", "local"):
        raise TargetgenError(f"--cluster: expected auto, slurm or local, got {cluster!r}")
    _check_range("--minutes", minutes, 1, 60 * 24 * 30)
    plan = plan_comparison(config, out, list(set_ or []), targets, seeds, list(grid or []), control)
    with run_lock(plan.out, "targetgen compare"):  # one comparison at a time in a folder
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
        if plan_only:
            say(
                f"planned in {plan.out}; train run I with: targetgen compare --out {plan.out} --run-index I "
                f"(I = 0 … {len(plan.runs) - 1}; --run-index auto reads $SLURM_ARRAY_TASK_ID), then report with "
                f"targetgen compare --out {plan.out} --collect"
            )
            return
        if executor == "submitit":
            options = ClusterOptions(cluster, partition, minutes, gpus, cpus, jobs)
            outcome = submit_plan(plan, options, console, progress)
        else:
            outcome = run_plan(plan, jobs, console, progress, job_devices(devices))
        written = write_report(plan.out)
    say(written.line())
    if outcome.failed:
        names = ", ".join(name for name, _ in outcome.failed)
        raise TargetgenError(
            f"{len(outcome.failed)} runs failed ({names}); their logs are in {plan.out / 'logs'}; "
            "fix the cause and run the same command again to retry them"
        )


@app.command()
def tune(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The search space: a base config, a tune section and families.")
    ],
    out: Annotated[Path, typer.Option(help="Folder of the study: study.db, runs/, logs/, tune_report.md.")],
    trials: Annotated[int | None, typer.Option(help="Trials per family (tune.trials).")] = None,
    set_: SetOption = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="The study's database URL (default: SQLite in --out), e.g. postgresql://host/db for workers "
            "on several machines."
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Trials trained at a time by this worker (the CPU threads shared).")] = 1,
    worker: Annotated[
        int, typer.Option(help="This worker's number when several share a study (seeds its sampler).")
    ] = 0,
    confirm: Annotated[
        int, typer.Option(help="Then rerun each family's best with this many seeds (0: no confirmation).")
    ] = 0,
    progress: Annotated[bool, typer.Option(help="Show the progress bar of --confirm.")] = True,
    executor: Annotated[
        str,
        typer.Option(
            help="local (this process's --jobs workers) or submitit (--workers jobs sharing the study; Slurm where "
            "it exists)."
        ),
    ] = "local",
    workers: Annotated[int, typer.Option(help="--executor submitit: tune workers, one job each.")] = 2,
    cluster: Annotated[str, typer.Option(help="--executor submitit: auto, slurm or local.")] = "auto",
    partition: Annotated[str | None, typer.Option(help="--executor submitit: the Slurm partition.")] = None,
    minutes: Annotated[int, typer.Option(help="--executor submitit: each job's time limit in minutes.")] = 240,
    cpus: Annotated[int, typer.Option(help="--executor submitit: CPU cores (training threads) per job.")] = 1,
    gpus: Annotated[int, typer.Option(help="--executor submitit: GPUs per job.")] = 0,
) -> None:
    """Search every family of configurations with the same number of trials (Lucic et al. 2018) in an Optuna study.

    Every trial is an ordinary run with the same budget; re-running the same command continues the study to
    --trials (a worker killed mid-trial is retried, its run resumed). Writes tune_report.md: the expected best
    score after k trials per family, every trial, and each family's best configuration.
    """
    import shlex

    from targetgen.tune import confirm as confirm_best
    from targetgen.tune import load_space, record_command, write_tune_report
    from targetgen.tune import tune as run_tune

    overrides = list(set_ or [])
    if trials is not None:
        if trials < 1:
            raise TargetgenError(f"--trials: expected at least 1 trial per family, got {trials}")
        overrides.append(f"tune.trials={trials}")
    _check_range("--confirm", confirm, 0, 1000)
    _check_range("--worker", worker, 0, 10_000)
    if executor not in ("local", "submitit"):
        raise TargetgenError(f"--executor: expected local or submitit, got {executor!r}")
    if cluster not in ("auto", "slurm", "local"):
        raise TargetgenError(f"--cluster: expected auto, slurm or local, got {cluster!r}")
    space = load_space(config, out, overrides)
    space.out.mkdir(parents=True, exist_ok=True)
    record_command(space.out, shlex.join(["targetgen", *sys.argv[1:]]))
    families = ", ".join(f"{f.name} ({len(f.space)} keys)" for f in space.families)
    say(
        f"{len(space.families)} families × {space.tune.trials} trials ({space.tune.sampler} search, equal "
        f"{space.tune.budget}): {families}"
    )
    if executor == "submitit":
        from targetgen.compare import ClusterOptions
        from targetgen.tune import submit_workers

        _check_range("--workers", workers, 1, 10_000)
        options = ClusterOptions(cluster, partition, minutes, gpus, cpus, parallel=workers)
        ended = submit_workers(config, space, overrides, storage, workers, options, console)
    else:
        ended = run_tune(space, storage, jobs, console, worker)
    paths = write_tune_report(space.out, storage)
    say(
        f"{ended['done']} trials done, {ended['failed']} failed, {ended['pruned']} pruned here; report: "
        + ", ".join(str(p) for p in paths)
    )
    if confirm:
        say(confirm_best(space, confirm, jobs, console, progress, storage).line())


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="The folder of a comparison (targetgen compare --out).")],
) -> None:
    """Rebuild a comparison's report (results.csv, report.md, curves.png, samples.png) from its finished runs,
    or a tuning study's (tune_report.md, tune_curves.png)."""
    from targetgen.report import write_report

    if (out / "tune.json").is_file():
        from targetgen.tune import write_tune_report

        say("wrote " + ", ".join(str(p) for p in write_tune_report(out)))
        return
    say(write_report(out).line())


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
    import warnings

    # SIGTERM keeps its default (the process ends at once) until training, compare or tune install their own
    # handlers: raised as an exception during start-up it was once lost, and a compare's child trained on.
    warnings.showwarning = _one_line_warning
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
