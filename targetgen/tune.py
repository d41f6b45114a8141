"""Compare at an equal tuning budget (Lucic et al. 2018): ``targetgen tune`` searches each configuration family
with the same number of trials, every trial an ordinary run, in an Optuna study kept in a real database.

A search space is a YAML file: a base config (the sections of a training config), a ``tune`` section and
``families``, each a target source with fixed settings and distributions over any config key::

    tune: {trials: 24, metric: auto, sampler: random, budget: seconds, pruner: none}
    train: {max_seconds: 90, steps: 1000000}
    families:
      standard:
        targets: standard
        space:
          targets.options.g_lr: {log_uniform: [1.0e-4, 1.0e-2]}
          targets.d_steps: {int: [1, 3]}
      inversion:
        targets: inversion
        set: {targets.options.step_rule: normalized}
        space:
          targets.options.lambda1: {log_uniform: [0.05, 2.0]}
          discriminator.r1: {categorical: [0.0, 0.01]}
          discriminator.reg_every: {int: [1, 16], when: {discriminator.r1: 0.01}}   # conditional on another key

Each family is one study (named after it) in ``DIR/study.db`` (``--storage`` for any RDB URL). Its first
trial is the family's default configuration (the base config and ``set``), the rest are drawn at random
(Lucic et al.) or by TPE. Every trial trains in ``DIR/runs/<family>-tNNN`` to the same budget (steps or
seconds, as in compare); the objective is a metric of the run's last in-run evaluation (by default the FID in
its feature space). Workers (``--jobs``, several ``tune`` processes, several machines sharing one database)
ask and tell the study; a worker killed mid-trial leaves a trial that the next worker marks failed and retries,
resuming its run from its checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fcntl
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import registry
from .compare import CompareConfig, Configuration, Plan, PlannedRun, _applies, _check_budget, job_threads, write_plan
from .config import SEED_MAX, Config, apply_override, bounded, from_dict, read_yaml, set_dotted, to_dict
from .errors import ConfigError, Interrupted, RunDirectoryError, TargetgenError
from .files import atomic_write, write_json
from .metric_names import lower_is_better
from .training.rundir import CHECKPOINT, METRICS, read_metrics, run_lock

DISTRIBUTIONS = ("log_uniform", "uniform", "int", "log_int", "categorical")


@dataclass
class TuneConfig:
    trials: int = bounded(24, ge=1, le=10_000)  # per family
    metric: str = "auto"  # of the last in-run evaluation; auto: the FID in the run's feature space
    sampler: Literal["random", "tpe"] = "random"
    pruner: Literal["none", "median"] = "none"  # median: stop a trial whose evaluations trail the median so far
    budget: Literal["steps", "seconds"] = "steps"  # what every trial gets equally (compare.budget)
    seed: int = bounded(0, ge=0, le=SEED_MAX)  # of the samplers (each worker adds its own offset)
    heartbeat_s: float = bounded(20.0, gt=0)  # a running trial's worker records that it is alive this often ...
    grace_s: float = bounded(60.0, gt=0)  # ... and a trial silent for longer is failed (its worker died) and retried


@dataclass
class Parameter:
    key: str
    kind: str
    values: list[Any]
    when: dict[str, Any] = field(default_factory=dict)


@dataclass
class Family:
    name: str
    source: str
    settings: dict[str, Any]  # fixed settings on top of the base config
    space: list[Parameter]


@dataclass
class Space:
    out: Path
    tune: TuneConfig
    base: dict[str, Any]  # the base training config
    families: list[Family]
    record: dict[str, Any]  # the space as written, to compare with a study's

    def family(self, name: str) -> Family:
        return next(f for f in self.families if f.name == name)


# ----------------------------------------------------------------------------- the space


def _parameter(family: str, key: str, spec: Any, source: str) -> Parameter:
    where = f"families.{family}.space.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{log_uniform: [1e-4, 1e-2]}}, got {spec!r}")
    spec = dict(spec)
    when = spec.pop("when", {}) or {}
    if len(spec) != 1:
        raise ConfigError(f"{where}: expected one distribution ({', '.join(DISTRIBUTIONS)}), got {sorted(spec)}")
    ((kind, values),) = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: unknown distribution {kind!r}{hint} (expected one of {', '.join(DISTRIBUTIONS)})")
    if kind == "categorical":
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.categorical: expected a non-empty list of choices, got {values!r}")
    else:
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)):
            raise ConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}.{kind}: expected low < high, got {values!r}")
        if kind.startswith("log") and low <= 0:
            raise ConfigError(f"{where}.{kind}: a log range needs bounds > 0, got {values!r}")
        if kind.endswith("int") and not all(float(v).is_integer() for v in values):
            raise ConfigError(f"{where}.{kind}: expected integer bounds, got {values!r}")
    if not isinstance(when, dict):
        raise ConfigError(f"{where}.when: expected a mapping of key: value, got {when!r}")
    if not _applies(key, source):
        raise ConfigError(
            f"{where}: '{source}' has no such setting (targets.options keys must be options of the "
            "source, regression keys need a decomposed source)"
        )
    return Parameter(key, kind, values, when)


def load_space(path: Path, out: Path, overrides: list[str] = ()) -> Space:
    """The search space in ``path``, checked: every key and value of every family's default and of the corners
    of every range is checked against the config schema before anything trains."""
    raw = read_yaml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    record = copy.deepcopy(raw)
    tune = from_dict(TuneConfig, raw.pop("tune", None), "tune")
    families_raw = raw.pop("families", None)
    if not isinstance(families_raw, dict) or not families_raw:
        raise ConfigError(f"{path}: expected a 'families' section naming at least one family of configurations")
    families = []
    for name, spec in families_raw.items():
        if not isinstance(spec, dict) or "targets" not in spec:
            raise ConfigError(f"families.{name}: expected a mapping with a 'targets' source, got {spec!r}")
        unknown = set(spec) - {"targets", "set", "space"}
        if unknown:
            raise ConfigError(f"families.{name}: unknown key {sorted(unknown)[0]!r} (expected targets, set, space)")
        source = spec["targets"]
        if source != registry.STANDARD:
            registry.load("targets", source, f"families.{name}.targets")
        settings = spec.get("set") or {}
        space = [_parameter(name, key, value, source) for key, value in (spec.get("space") or {}).items()]
        keys = {p.key for p in space}
        for p in space:
            for key in p.when:
                if key not in keys and key not in settings:
                    raise ConfigError(f"families.{name}.space.{p.key}.when: {key!r} is neither searched nor set")
        families.append(Family(str(name), source, settings, space))
    space = Space(Path(out).resolve(), tune, raw, families, record)
    for family in families:  # every corner of the space is a valid config
        for corner in (0, -1):
            params = {p.key: p.values[corner] for p in family.space}
            _check(space, family, params)
    _check_budget(tune.budget, from_dict(Config, raw).train.max_seconds if raw.get("train") else None, "tune")
    return space


def _check(space: Space, family: Family, params: dict[str, Any]) -> Config:
    config = trial_config(space, family, params, "check")
    try:
        parsed = from_dict(Config, config)
        from_dict(registry.options_class(parsed.targets.name), parsed.targets.options, "targets.options")
        return parsed
    except ConfigError as err:
        raise ConfigError(f"families.{family.name}: {err}") from None


def trial_config(space: Space, family: Family, params: dict[str, Any], name: str) -> dict[str, Any]:
    """The training config of one trial: the base, the family's source and settings, the trial's parameters."""
    raw = copy.deepcopy(space.base)
    targets = raw.get("targets") or {}
    if not isinstance(targets, dict) or targets.get("name", "inversion") != family.source:
        raw["targets"] = {"name": family.source, "options": {}}
    for key, value in {**family.settings, **params}.items():
        set_dotted(raw, key, value, f"families.{family.name}: '{key}'")
    set_dotted(raw, "train.name", name, "tune")
    set_dotted(raw, "train.out_dir", str(space.out / "runs"), "tune")
    return raw


def default_params(space: Space, family: Family) -> dict[str, Any]:
    """The family's default configuration, as parameters: the value the base config and ``set`` give each
    searched key (Lucic et al.'s first trial)."""
    config = from_dict(Config, trial_config(space, family, {}, "default"))
    flat = _flat(to_dict(config))
    options = from_dict(registry.options_class(config.targets.name), config.targets.options, "targets.options")
    flat.update({f"targets.options.{k}": v for k, v in _flat(to_dict(options)).items()})
    params = {}
    for p in family.space:
        if all(params.get(k, flat.get(k)) == v for k, v in p.when.items()):
            value = flat.get(p.key)
            params[p.key] = json.dumps(list(value) if isinstance(value, tuple) else value) if _structured(p) else value
    return params


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {prefix: raw}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def objective_name(space: Space, family: Family) -> str:
    """The metric the study minimises or maximises."""
    from .evaluation import metric_names

    config = from_dict(Config, trial_config(space, family, {}, "name"))
    names = metric_names(config.evaluation, config.data)
    if space.tune.metric == "auto":
        fids = [n for n in names if n.startswith("fid")]
        if not fids:
            raise ConfigError("tune.metric: auto needs evaluation.metrics with fid; name a metric instead")
        return fids[0]
    if space.tune.metric not in names:
        close = difflib.get_close_matches(space.tune.metric, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"tune.metric: {space.tune.metric!r} is not among the evaluated metrics{hint} ({', '.join(names)})"
        )
    return space.tune.metric


# ----------------------------------------------------------------------------- the study


def storage(url: str | None, out: Path, heartbeat_s: float = 20.0, grace_s: float = 60.0):
    """The study database: SQLite in ``out`` by default, or any RDB URL (its driver must be installed)."""
    import warnings

    try:
        import optuna
    except ImportError:
        raise ConfigError("targetgen tune needs Optuna: pip install 'targetgen[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats without Study.optimize are what a worker of several processes needs: said once here, not per call
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    url = url or f"sqlite:///{out / 'study.db'}"
    try:
        from sqlalchemy.engine import make_url

        dialect = make_url(url).get_dialect()
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # the driver, imported now rather than mid-study
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"--storage: {url.split('://')[0]} needs the database driver {err.name!r}, which is "
            f"not installed: pip install {err.name}"
        ) from None
    except Exception as err:  # an unknown scheme or a malformed URL
        raise ConfigError(f"--storage: {url!r} is not a database URL SQLAlchemy knows ({err})") from None
    out.mkdir(parents=True, exist_ok=True)
    # SQLite's default 5 s wait for another worker's write is short on a loaded machine
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=max(1, round(heartbeat_s)), grace_period=max(1, round(grace_s))
    )


@contextlib.contextmanager
def _one_worker_at_a_time(out: Path):
    """Workers starting together take turns creating the tables and the studies (two would both enqueue the
    default trial, or both create a table)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".tune.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record_command(out: Path, command: str) -> None:
    """Add ``command`` to DIR/command.txt unless it is there: every worker's command line (they differ in
    --worker or --jobs) stays on record for the report, each once."""
    with _one_worker_at_a_time(out):
        path = out / "command.txt"
        lines = path.read_text().splitlines() if path.is_file() else []
        if command not in lines:
            atomic_write(path, "\n".join([*lines, command]) + "\n", "tune command")


def open_study(space: Space, family: Family, store, worker: int):
    import optuna

    tune = space.tune
    seed = tune.seed + 1000 * worker  # workers sharing a study must not propose the same trials
    sampler = (
        optuna.samplers.RandomSampler(seed=seed) if tune.sampler == "random" else optuna.samplers.TPESampler(seed=seed)
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3) if tune.pruner == "median" else optuna.pruners.NopPruner()
    metric = objective_name(space, family)
    direction = "minimize" if lower_is_better(metric) else "maximize"
    study = optuna.create_study(
        storage=store, study_name=family.name, sampler=sampler, pruner=pruner, direction=direction, load_if_exists=True
    )
    record = {
        "family": {
            "targets": family.source,
            "set": family.settings,
            "space": {p.key: {p.kind: p.values, **({"when": p.when} if p.when else {})} for p in family.space},
        },
        "base": space.base,
        "metric": metric,
        "budget": tune.budget,
    }
    record = json.loads(json.dumps(record, default=str))
    known = study.user_attrs.get("space")
    if known is None:
        study.set_user_attr("space", record)
        if not study.trials:
            study.enqueue_trial(default_params(space, family), user_attrs={"default": True})
    elif known != record:
        before, now = _flat(known), _flat(record)
        key = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))[0]
        raise ConfigError(
            f"study {family.name!r} in {store.url} was run with another space ({key}: "
            f"{before.get(key)!r} there, {now.get(key)!r} now); use another --out or --storage"
        )
    return study, metric


def suggest(trial, family: Family) -> dict[str, Any]:
    """The trial's parameters, drawn key by key (define-by-run: a key whose ``when`` does not hold is left out)."""
    params: dict[str, Any] = {}
    for p in family.space:
        if not all(params.get(k, family.settings.get(k)) == v for k, v in p.when.items()):
            continue
        low, high = (p.values[0], p.values[1]) if p.kind != "categorical" else (None, None)
        if p.kind == "log_uniform":
            params[p.key] = trial.suggest_float(p.key, low, high, log=True)
        elif p.kind == "uniform":
            params[p.key] = trial.suggest_float(p.key, low, high)
        elif p.kind in ("int", "log_int"):
            params[p.key] = trial.suggest_int(p.key, int(low), int(high), log=p.kind == "log_int")
        elif _structured(p):  # Optuna's choices are scalars: lists (betas) travel as their JSON text
            params[p.key] = json.loads(trial.suggest_categorical(p.key, [json.dumps(v) for v in p.values]))
        else:
            params[p.key] = trial.suggest_categorical(p.key, p.values)
    return params


def _stored_choice(spec: Any, value: Any) -> Any:
    """A parameter as Optuna stored it, back as the config value: list choices were stored as JSON text."""
    choices = spec.get("categorical") if isinstance(spec, dict) else None
    return json.loads(value) if isinstance(value, str) and choices and _any_structured(choices) else value


def _structured(p: Parameter) -> bool:
    return p.kind == "categorical" and _any_structured(p.values)


def _any_structured(choices: list[Any]) -> bool:
    """Optuna's choices are scalars: lists and mappings among them travel as JSON text."""
    return any(isinstance(v, (list, dict)) for v in choices)


def _states():
    from optuna.trial import TrialState

    return TrialState


def _retried(trials) -> set[int]:
    """Numbers of the trials queued again after their worker died."""
    return {t.user_attrs["retry_of"] for t in trials if t.user_attrs.get("retry_of") is not None}


def _counted(study) -> list:
    """Trials that use the budget: finished ones (a training that failed counts: its configuration was tried),
    and running ones; surplus trials (asked past the budget by a racing worker) and retried ones do not."""
    states = _states()
    counted = []
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    for t in trials:
        if t.user_attrs.get("surplus") or t.number in retried:
            continue
        if t.state in (states.COMPLETE, states.PRUNED, states.RUNNING) or (
            t.state == states.FAIL and t.user_attrs.get("training_failed")
        ):
            counted.append(t)
    return counted


def _unretried(study) -> list:
    """Trials that failed because their worker died (not their training) and are not queued again yet."""
    states = _states()
    trials = study.get_trials(deepcopy=True)  # fresh from the database: another worker may just have failed them
    queued = _retried(trials)
    return [
        t
        for t in trials
        if t.state == states.FAIL
        and t.user_attrs.get("run")
        and t.number not in queued
        and not t.user_attrs.get("training_failed")
        and not t.user_attrs.get("surplus")
    ]


def _retry_stale(study) -> None:
    """Trials whose worker stopped recording heartbeats (killed) are failed, and their parameters queued again,
    with their run directory, which resumes from its checkpoint."""
    import optuna

    optuna.storages.fail_stale_trials(study)
    for t in _unretried(study):
        study.enqueue_trial(
            t.params,
            user_attrs={
                "run": t.user_attrs["run"],
                "retry_of": t.number,
                **({"default": True} if t.user_attrs.get("default") else {}),
            },
        )


# ----------------------------------------------------------------------------- one trial


def _environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TARGETGEN_PARENT_PID=str(os.getpid()))
    return env


def last_evaluation(run_dir: Path) -> dict[str, float]:
    evaluations = [r for r in read_metrics(run_dir / METRICS) if any(k.startswith("eval/") for k in r)]
    return {k[5:]: v for k, v in evaluations[-1].items() if k.startswith("eval/")} if evaluations else {}


@dataclass
class Running:
    trial: Any
    family: Family
    study: Any
    metric: str
    run_dir: Path
    process: subprocess.Popen
    log: Any
    store: Any
    heartbeat_s: float = 20.0
    reported: int = -1
    beat: float = 0.0


def start_trial(space: Space, family: Family, study, metric: str, threads: int, store) -> Running | None:
    """Ask the study for a trial and start its training; None when the family's budget is used up."""
    states = _states()
    if len([t for t in _counted(study) if t.state != states.RUNNING]) >= space.tune.trials:
        return None
    if len(_counted(study)) >= space.tune.trials and not study.get_trials(deepcopy=False, states=(states.WAITING,)):
        return None
    trial = study.ask()
    if trial.user_attrs.get("run") is None and _unretried(study):
        # asking failed a dead worker's trial: its retry goes first, this fresh trial is given back
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=states.FAIL)
        _retry_stale(study)
        return start_trial(space, family, study, metric, threads, store)
    counted_before = [t for t in _counted(study) if t.number < trial.number]
    if len(counted_before) >= space.tune.trials:
        trial.set_user_attr("surplus", True)  # another worker took the last slot first
        study.tell(trial, state=states.FAIL)
        return None
    params = suggest(trial, family)
    name = trial.user_attrs.get("run") or f"{family.name}-t{trial.number:03d}"
    trial.set_user_attr("run", name)
    run_dir = space.out / "runs" / name
    config_path = space.out / "configs" / f"{name}.yaml"
    atomic_write(
        config_path, yaml.safe_dump(trial_config(space, family, params, name), sort_keys=False), "trial config"
    )
    train = [sys.executable, "-m", "targetgen.cli", "train", "--no-progress"]
    command = (
        [*train, "--resume", str(run_dir)]
        if (run_dir / CHECKPOINT).is_file()
        else [*train, "--config", str(config_path), "--overwrite"]
    )
    (space.out / "logs").mkdir(exist_ok=True)
    log = (space.out / "logs" / f"{name}.log").open("a")
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} trial {trial.number}: {shlex.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_environment(threads))
    store.record_heartbeat(trial._trial_id)
    return Running(
        trial, family, study, metric, run_dir, process, log, store, space.tune.heartbeat_s, beat=time.monotonic()
    )


def poll(running: Running) -> str | None:
    """Heartbeat, pruning on the in-run evaluations, and the trial's end: None while it runs, else how it ended."""
    states = _states()
    now = time.monotonic()
    if now - running.beat > running.heartbeat_s / 2:
        running.store.record_heartbeat(running.trial._trial_id)
        running.beat = now
    if running.process.poll() is None:
        evaluations = [r for r in read_metrics(running.run_dir / METRICS) if f"eval/{running.metric}" in r]
        for record in evaluations:
            if record["step"] > running.reported and record[f"eval/{running.metric}"] is not None:
                running.trial.report(record[f"eval/{running.metric}"], record["step"])
                running.reported = record["step"]
                if running.trial.should_prune():
                    running.process.terminate()
                    running.process.wait()
                    running.log.close()
                    running.study.tell(running.trial, state=states.PRUNED)
                    return "pruned"
        return None
    running.log.close()
    value = last_evaluation(running.run_dir).get(running.metric)
    if running.process.returncode != 0 or value is None or not math.isfinite(value):
        running.trial.set_user_attr("training_failed", True)
        running.study.tell(running.trial, state=states.FAIL)
        return "failed"
    running.study.tell(running.trial, value)
    return "done"


# ----------------------------------------------------------------------------- the command


def tune(space: Space, storage_url: str | None, jobs: int, console, worker: int = 0) -> dict[str, int]:
    """Run trials until every family has its budget; ``jobs`` trainings at a time. Returns how trials ended."""
    from rich.text import Text

    if jobs < 1:
        raise ConfigError(f"--jobs: expected at least 1 parallel trial, got {jobs}")
    with _one_worker_at_a_time(space.out):
        store = storage(storage_url, space.out, space.tune.heartbeat_s, space.tune.grace_s)
        write_json(
            space.out / "tune.json",
            {"space": space.record, "storage": store.url if storage_url else None},
            "tune record",
        )
        studies = {f.name: open_study(space, f, store, worker) for f in space.families}
    threads = job_threads(dict(os.environ), jobs, os.cpu_count() or 1)
    running: list[Running] = []
    ended: dict[str, int] = {"done": 0, "failed": 0, "pruned": 0}
    stop: list[int] = []
    previous = {
        s: signal.signal(s, lambda n, f: stop.append(n))
        for s in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(s) != signal.SIG_IGN
    }
    try:
        exhausted: set[str] = set()
        while not stop:
            for family in space.families:
                if len(running) >= jobs or family.name in exhausted:
                    continue
                study, metric = studies[family.name]
                _retry_stale(study)
                started = start_trial(space, family, study, metric, threads, store)
                if started is None:
                    exhausted.add(family.name)
                else:
                    running.append(started)
            if not running:
                elsewhere = [
                    f.name
                    for f in space.families
                    if studies[f.name][0].get_trials(deepcopy=False, states=(_states().RUNNING,))
                ]
                if not elsewhere:
                    break
                exhausted -= set(elsewhere)  # another worker's trials: wait for them, or retry them once stale
            time.sleep(0.5)
            for r in list(running):
                outcome = poll(r)
                if outcome is not None:
                    running.remove(r)
                    ended[outcome] += 1
                    value = r.study.trials[r.trial.number].value
                    shown = f"{r.metric} {value:.4g}" if value is not None else outcome
                    style = "green" if outcome == "done" else "yellow" if outcome == "pruned" else "red"
                    console.print(
                        Text.assemble((outcome, style), f" {r.family.name} trial {r.trial.number}: {shown}"),
                        soft_wrap=True,
                    )
                    exhausted.discard(r.family.name)
        if stop:
            for r in running:
                r.process.terminate()
            for r in running:
                r.process.wait()
                r.log.close()  # their trials stay RUNNING until stale, then are retried, resuming their runs
            terminated = stop[0] == signal.SIGTERM
            raise Interrupted(
                f"tune {'terminated' if terminated else 'interrupted'}; the running trials keep their "
                f"checkpoints and are retried when tune runs again ({space.out})",
                exit_code=143 if terminated else 130,
            )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return ended


def cluster_worker(config: str, out: str, overrides: list[str], storage_url: str | None, worker: int) -> dict:
    """One worker of ``submit_workers``'s job array: the same loop as a local ``tune`` worker, one trial at a time."""
    from rich.console import Console

    return tune(load_space(Path(config), Path(out), overrides), storage_url, 1, Console(), worker)


def submit_workers(
    config: Path, space: Space, overrides: list[str], storage_url: str | None, workers: int, options, console
) -> dict[str, int]:
    """``workers`` tune workers as one submitit job array sharing the study (Slurm where it exists); waits for them
    and sums how their trials ended. A Ctrl-C or SIGTERM cancels the jobs: their trials are retried later."""
    from rich.text import Text

    from .compare import _stop_requests, cancelled, cluster_executor

    executor = cluster_executor(space.out / "submitit", options, f"targetgen-tune-{space.out.name}")
    with executor.batch():
        jobs = [
            executor.submit(cluster_worker, str(Path(config).resolve()), str(space.out), overrides, storage_url, i)
            for i in range(workers)
        ]
    ended = {"done": 0, "failed": 0, "pruned": 0}
    with _stop_requests() as stop:
        while not stop and not all(job.done() for job in jobs):
            time.sleep(0.5)
        if stop:
            raise cancelled(jobs, stop[0], "tune", f"their trials are retried when tune runs again ({space.out})")
    for i, job in enumerate(jobs):
        error = job.exception()
        if error is not None:
            why = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            console.print(Text.assemble(("failed", "red"), f" worker {i} (job {job.job_id}): {why}"), soft_wrap=True)
            continue
        for outcome, count in job.result().items():
            ended[outcome] += count
    return ended


# ----------------------------------------------------------------------------- the report


def best_of_k(values: list[float], lower: bool, draws: int = 1000, seed: int = 0) -> list[tuple[float, float, float]]:
    """The expected best of k trials, k = 1 … len(values): per k, the median and the 5th and 95th percentiles of
    the best of k trials drawn with replacement, over ``draws`` bootstrap draws."""
    rng = random.Random(seed)
    curve = []
    for k in range(1, len(values) + 1):
        bests = sorted((min if lower else max)(rng.choices(values, k=k)) for _ in range(draws))
        curve.append((bests[len(bests) // 2], bests[int(0.05 * (draws - 1))], bests[int(0.95 * (draws - 1))]))
    return curve


@dataclass
class FamilyResult:
    name: str
    metric: str
    lower: bool
    trials: list[dict[str, Any]]  # number, state, value, params, run

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["value"] is not None and math.isfinite(t["value"])]

    @property
    def best(self) -> dict[str, Any] | None:
        done = self.finished
        return (min if self.lower else max)(done, key=lambda t: t["value"]) if done else None


def results(out: Path, storage_url: str | None = None) -> list[FamilyResult]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record = json.loads((out / "tune.json").read_text())
    store = storage(storage_url or record.get("storage"), out)
    found = []
    for name in record["space"]["families"]:
        try:
            study = optuna.load_study(study_name=name, storage=store)
        except KeyError:
            continue
        metric = study.user_attrs["space"]["metric"]
        spec = record["space"]["families"][name].get("space") or {}
        trials = []
        everything = study.get_trials(deepcopy=False)
        retried = _retried(everything)
        for t in everything:
            if t.user_attrs.get("surplus") or t.number in retried:
                continue
            value = t.value if t.state.name == "COMPLETE" else math.inf if t.user_attrs.get("training_failed") else None
            if t.state.name in ("RUNNING", "WAITING"):
                continue
            trials.append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "value": value,
                    "params": {k: _stored_choice(spec.get(k), v) for k, v in t.params.items()},
                    "run": t.user_attrs.get("run"),
                    "default": bool(t.user_attrs.get("default")),
                }
            )
        found.append(FamilyResult(name, metric, lower_is_better(metric), trials))
    return found


def write_tune_report(out: Path, storage_url: str | None = None) -> list[Path]:
    """``tune_report.md`` (best-of-k per family, every trial with its parameters, each family's best
    configuration) and ``tune_curves.png``."""
    from matplotlib.figure import Figure

    families = results(out, storage_url)
    lines = [
        f"# Tuning: {out.name}",
        "",
        "```bash",
        (out / "command.txt").read_text().strip() if (out / "command.txt").is_file() else "(unknown)",
        "```",
        "",
    ]
    lines += [
        "Every trial trained to the same budget; a failed training (divergence) counts as a trial with the "
        "worst score. Expected best after k trials: the median (and 5th–95th percentile band) of the best "
        "of k trials drawn with replacement from a family's trials, 1,000 draws.",
        "",
    ]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for family in families:
        values = [t["value"] for t in family.trials if t["value"] is not None]
        lines += [f"## {family.name}", ""]
        if not values:
            lines += ["No finished trials yet.", ""]
            continue
        worst = max if family.lower else min
        finite = [v for v in values if math.isfinite(v)]
        scored = [v if math.isfinite(v) else (worst(finite) if finite else 0.0) for v in values]
        curve = best_of_k(scored, family.lower)
        ks = [1, 2, 4, 8, 16, 32, 64, 100, len(curve)]
        lines += [
            f"{len(values)} trials ({len(values) - len(finite)} failed), metric {family.metric} "
            f"({'lower' if family.lower else 'higher'} is better).",
            "",
            "| k | expected best | 5–95 % |",
            "|---|---|---|",
        ]
        for k in sorted({k for k in ks if k <= len(curve)}):
            median, low, high = curve[k - 1]
            lines.append(f"| {k} | {median:.4g} | {low:.4g} – {high:.4g} |")
        best = family.best
        if best is not None:
            lines += [
                "",
                f"Best: trial {best['number']} ({best['run']}), {family.metric} {best['value']:.4g}: "
                + ", ".join(f"`{k}` = {_show(v)}" for k, v in best["params"].items()),
                "",
            ]
        lines += ["| trial | " + family.metric + " | parameters |", "|---|---|---|"]
        for t in family.trials:
            value = (
                "failed"
                if t["value"] is not None and not math.isfinite(t["value"])
                else (f"{t['value']:.4g}" if t["value"] is not None else t["state"].lower())
            )
            params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_show(v)}" for k, v in t["params"].items())
            lines.append(f"| {t['number']}{' (default)' if t['default'] else ''} | {value} | {params} |")
        lines.append("")
        xs = list(range(1, len(curve) + 1))
        ax.plot(xs, [c[0] for c in curve], label=family.name)
        ax.fill_between(xs, [c[1] for c in curve], [c[2] for c in curve], alpha=0.2)
    if all(t["value"] > 0 for f in families for t in f.finished):
        ax.set_yscale("log")  # FIDs of collapsed and good trials differ by orders of magnitude
    ax.set_xlabel("trials (k)")
    ax.set_ylabel(f"expected best {families[0].metric if families else ''}")
    ax.set_title("best of k trials (median, 5–95 % band)")
    ax.grid(alpha=0.3)
    if families:
        ax.legend()
    report, curves = out / "tune_report.md", out / "tune_curves.png"
    lines += ["![best of k](tune_curves.png)", ""]
    atomic_write(report, "\n".join(lines), "tuning report")
    fig.tight_layout()
    fig.savefig(curves, dpi=110)
    return [report, curves]


def _show(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def confirmation_plan(space: Space, seeds: int, storage_url: str | None = None) -> Plan:
    """Each family's best configuration with ``seeds`` seeds, as a comparison in ``DIR/confirm``."""
    out = space.out / "confirm"
    configurations, runs = [], []
    for family_result in results(space.out, storage_url):
        best = family_result.best
        if best is None:
            continue
        family = space.family(family_result.name)
        label = f"{family.name} (best of {len(family_result.trials)})"
        configuration = Configuration(label, family.source, dict(best["params"]))
        configurations.append(configuration)
        base = trial_config(space, family, best["params"], "x")
        first = int((base.get("train") or {}).get("seed", 0))
        for seed in range(first, first + seeds):
            name = f"{family.name}-best-seed{seed}"
            raw = copy.deepcopy(base)
            set_dotted(raw, "train.name", name, "tune")
            set_dotted(raw, "train.out_dir", str(out / "runs"), "tune")
            set_dotted(raw, "train.seed", seed, "tune")
            runs.append(PlannedRun(name, configuration, seed, raw))
    if not runs:
        raise RunDirectoryError(f"{space.out} has no finished trials to confirm")
    return Plan(out, CompareConfig(seeds=seeds, budget=space.tune.budget), configurations, runs)


def confirm(space: Space, seeds: int, jobs: int, console, progress: bool, storage_url: str | None = None):
    """Rerun each family's best with ``seeds`` seeds; the report (mean ± SE, the headline against the best
    standard family) goes to ``DIR/confirm``."""
    from .compare import run_plan
    from .report import write_report

    plan = confirmation_plan(space, seeds, storage_url)
    with run_lock(plan.out, "targetgen tune --confirm"):
        write_plan(plan, f"targetgen tune --confirm {seeds} (best of each family in {space.out})")
        outcome = run_plan(plan, jobs, console, progress)
        written = write_report(plan.out)
    if outcome.failed:
        raise TargetgenError(f"{len(outcome.failed)} confirmation runs failed; their logs are in {plan.out / 'logs'}")
    return written
