"""Typed configuration: YAML files and ``--set`` overrides loaded into dataclasses.

Every section is a dataclass; loading checks every key and value against it, so
a typo is an error that names the key and suggests the closest valid one. A
target source's ``options`` are checked against that source's own ``Options``
dataclass once the source is known (see ``targetgen.registry``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

# ----------------------------------------------------------------------------- ranges


def _bound(value: float) -> str:
    """A range's end as written: 4294967295, not 4.29497e+09."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


@dataclass(frozen=True)
class Bounds:
    """The range a numeric setting must lie in; checked by ``from_dict`` for every value.

    Applies to the number itself, to every element of a tuple of numbers and to
    every value of a mapping of numbers (e.g. loss weights); ``None`` is never
    checked (it means "unset").
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        low = f"[{_bound(self.ge)}" if self.ge is not None else f"({_bound(self.gt)}" if self.gt is not None else None
        high = f"{_bound(self.le)}]" if self.le is not None else f"{_bound(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field whose value must lie in a range, e.g. ``lr: float = bounded(0.0002, gt=0)``.

    The one place where a config range is declared: loading a config (or a
    target source's options) checks it and names the key, the value and the
    range. Third-party target sources use it in their ``Options`` too.
    """
    return field(default=default, default_factory=factory, metadata={"bounds": Bounds(ge, gt, le, lt)})


SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit
EVALUATION_MAX_N = 50_000  # the field's largest standard protocol (FID-50k)


@dataclass
class DataConfig:
    name: Literal["digits", "mnist5k", "folder", "celeba", "mnist", "fashion-mnist", "cifar10", "toy2d"] = "digits"
    image_size: int | None = None  # None: the source's default (digits 32, celeba 64, ...)
    channels: int | None = None  # None: the source's default (digits 1, celeba 3, ...)
    path: str | None = None  # folder / celeba: the image folder; torchvision sets: their root
    download: bool = False  # torchvision sets only; off so that nothing downloads by surprise
    skip_bad_images: bool = False  # folder / celeba: drop unreadable files instead of failing
    num_workers: int = bounded(0, ge=0)  # DataLoader workers for datasets decoded from files
    mixture: Literal["ring8", "grid25"] = "ring8"  # toy2d
    num_points: int = bounded(10000, ge=1)  # toy2d
    std: float | None = bounded(None, gt=0)  # toy2d component std; None: ring8 0.02, grid25 0.05
    radius: float | None = bounded(None, gt=0)  # toy2d ring8 radius; None: 2 (VEEGAN's ring; PacGAN's is 1)
    resample: bool = False  # toy2d: a fresh draw of num_points points every epoch, seeded by the epoch


# Hidden-layer nonlinearities of the toy2d MLPs (leaky_relu has slope 0.2, as in the DCGAN tutorial).
Activation = Literal["relu", "leaky_relu", "tanh", "elu"]


@dataclass
class ModelConfig:
    nz: int = bounded(100, ge=1)  # latent size
    ngf: int = bounded(32, ge=1)  # generator width (the DCGAN tutorial uses 64 at 64×64)
    ndf: int = bounded(32, ge=1)  # discriminator width
    # toy2d MLPs: depth hidden layers of width units each, then a linear output layer
    hidden: int = bounded(128, ge=1)  # width of both MLPs unless g_width / d_width say otherwise
    g_depth: int = bounded(2, ge=1)
    d_depth: int = bounded(2, ge=1)
    g_width: int | None = bounded(None, ge=1)  # None: hidden
    d_width: int | None = bounded(None, ge=1)  # None: hidden
    g_batchnorm: bool = False  # BatchNorm1d after every hidden linear layer (which then has no bias)
    d_batchnorm: bool = False
    g_activation: Activation = "relu"
    d_activation: Activation = "leaky_relu"
    d_maxout: int | None = bounded(None, ge=2)  # pieces per maxout unit; replaces d_activation when set
    init_std: float | None = bounded(None, gt=0)  # weights N(0, init_std), biases 0; None: PyTorch's default


@dataclass
class TrainConfig:
    name: str | None = None  # run directory name; None: the config file's stem, else <data>-<targets>
    out_dir: str = "runs"
    epochs: int = bounded(30, ge=1)
    steps: int | None = bounded(None, ge=1)  # when set, overrides epochs
    # Stop at the first step boundary past this many seconds of training steps (as train_s counts them: not
    # evaluation, samples or checkpoints; summed over resumes), with the final checkpoint, samples and evaluation;
    # steps / epochs still cap the run. For equal-time comparisons (compare.budget: seconds). None: no limit.
    max_seconds: float | None = bounded(None, gt=0)
    batch_size: int = bounded(128, ge=1)
    # null: false in one process (the tutorial keeps the last, smaller batch), true with several (each
    # process needs an equal share of every global batch); the resolved value is recorded
    drop_last: bool | None = None
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    log_every: int = bounded(10, ge=1)
    sample_every: int = bounded(200, ge=1)
    checkpoint_every: int = bounded(200, ge=1)
    # The numeric format of G's and D's passes (docs/performance.md). bf16: autocast, with inverse examples,
    # regression targets, losses and metrics in float32; auto: bf16 where the hardware computes bf16 natively
    # (AMX or AVX512-BF16 on CPU, compute capability >= 8 on CUDA), else fp32. The resolved value is recorded.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Images in NHWC, the layout oneDNN and tensor cores prefer; auto: on for images (measured faster on CPU
    # and wherever bf16 runs on tensor cores), off for toy2d's points. The resolved value is recorded.
    channels_last: bool | Literal["auto"] = "auto"
    cudnn_benchmark: bool = False  # let cuDNN pick the fastest convolution algorithms (CUDA only)
    # torch's CPU threads. None: 1 for the toy2d MLPs (their steps are too small to split), else torch's
    # default ($OMP_NUM_THREADS, which `compare --jobs N` sets to cores / N, else the cores). The count a
    # run used is recorded in its config.yaml, so that a resumed run computes bit for bit alike.
    threads: int | None = bounded(None, ge=1)
    # Where metrics go besides metrics.jsonl (always written): comma-separated loggers of the
    # targetgen.loggers group; auto = tensorboard when the tensorboard package is installed.
    loggers: str = "auto"
    keep_checkpoints: int = bounded(1, ge=1)  # last.pt plus, when > 1, the last N as checkpoints/step_NNNNNN.pt
    best_metric: str | None = None  # with evaluation.every: keep checkpoints/best.pt by this metric, e.g. fid_mnist


@dataclass
class TargetsConfig:
    name: str = "inversion"  # "standard" or a plugin of the targetgen.targets group
    options: dict[str, Any] = field(default_factory=dict)  # checked against the source's Options
    # Discriminator steps per generator step (n_critic; WGAN-GP is usually trained with 5): the source's
    # update phase (the standard GAN's D step) runs this often, each time on fresh latents and the step's batch.
    d_steps: int = bounded(1, ge=1)


@dataclass
class DiscriminatorConfig:
    """Regularizers of every discriminator a run trains (the standard GAN's, inversion's, cfg's), so that a
    control trains its D alike. Off by default."""

    # torch's spectral-norm parametrization on every layer (Miyato et al. 2018); the DCGAN discriminator's batch
    # norms are then left out, as in StudioGAN's and DGflow's SN discriminators
    spectral_norm: bool = False
    r1: float = bounded(0.0, ge=0)  # γ of R1 = γ/2 · E‖∇x D(x_real)‖² on D's logit (Mescheder et al. 2018); 0: off
    r2: float = bounded(0.0, ge=0)  # the same penalty on generated samples
    reg_every: int = bounded(1, ge=1)  # lazy regularization: the penalties every N steps, weighted × N (StyleGAN2)


@dataclass
class StandardOptions:
    """``targets.options`` of the standard GAN (``targets.name: standard``): the DCGAN tutorial's optimisers."""

    g_lr: float = bounded(0.0002, gt=0)  # the generator's learning rate η
    d_lr: float = bounded(0.0002, gt=0)
    betas: tuple[float, float] = bounded((0.5, 0.999), ge=0, lt=1)


@dataclass
class RegressionConfig:
    loss: dict[str, float] = bounded(factory=lambda: {"l2": 1.0}, ge=0)  # δ2: weighted mix
    reduction: Literal["sum", "mean"] = "sum"  # sum reproduces the GAN step (docs/design.md)
    lr: float = bounded(0.0002, gt=0)  # λ2; each of the N2 steps uses λ2 / N2
    steps: int = bounded(1, ge=1)  # N2
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    betas: tuple[float, float] = bounded((0.5, 0.999), ge=0, lt=1)  # adam
    momentum: float = bounded(0.0, ge=0, lt=1)  # sgd
    alpha: float = bounded(0.99, gt=0, lt=1)  # rmsprop's smoothing (xICFG: 0.95)
    eps: float = bounded(1e-8, gt=0)  # adam's and rmsprop's ε (xICFG: 1e-18)
    # Pool mode, for sources whose targets are a pool of pairs (cfg): fit the pool for pool_epochs epochs of
    # shuffled minibatches of pool_batch at lr; an epoch whose mean loss rose cuts the lr × decay_on_rise, at
    # most max_decays times; fresh_optimizer: a new optimizer (and the lr reset) for every pool, as xICFG does.
    pool_epochs: int = bounded(10, ge=1)
    pool_batch: int = bounded(64, ge=1)
    decay_on_rise: float = bounded(1.0, gt=0, le=1)  # 1: no decay (xICFG: 0.1)
    max_decays: int = bounded(3, ge=0)
    fresh_optimizer: bool = False
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    final_fraction: float = bounded(0.0, ge=0, le=1)  # linear / cosine: λ2 at the end, as a fraction of lr
    ema: float | None = bounded(None, gt=0, lt=1)  # decay of an EMA copy of the generator used for samples
    # Fit the targets instead of taking N2 steps: after the N2 steps (each of λ2 / N2), keep stepping until the
    # target reach on the step's targets is at least until_reach, or max_steps steps are done. None: N2 steps.
    until_reach: float | None = bounded(None, gt=0, le=1)
    max_steps: int = bounded(20, ge=1)  # until_reach: at most this many regression steps per training step
    # Every regression step after a step's first fits one batch drawn uniformly from the last `replay` batches
    # of targets (this step's included), so that the generator keeps fitting recent targets. None: no replay.
    replay: int | None = bounded(None, ge=1)


@dataclass
class EvaluationConfig:
    every: int = bounded(0, ge=0)  # evaluate every N training steps into metrics.jsonl; 0: only on demand
    metrics: str = "auto"  # comma-separated: fid (with KID), pr, modes, classes; auto: all that apply
    # inception | digits | mnist | pixels | a plugin; auto: digits / mnist (mnist5k) / pixels (toy2d) / inception
    features: str = "auto"
    # neighbours of the k-NN balls; None: precision/recall at k = 3 (Kynkäänniemi), density/coverage at k = 5 (Naeem)
    k: int | None = bounded(None, ge=1)
    n: int = bounded(2048, ge=4, le=EVALUATION_MAX_N)  # generated and real samples (the paper: 2048 vs 2048)
    seed: int = bounded(0, ge=0, le=SEED_MAX)  # latents and the real subset; fixed so that evaluations compare
    # Discriminator-driven sampling (docs/evaluation.md): in-run evaluations score the refined samples too
    # (eval/refined/...), sample and evaluate use it with --refine. latent: Langevin steps on z (DDLS, DGflow);
    # data: steps up D's logit on the samples (the run's own inverse examples at test time); drs: rejection.
    refine: Literal["none", "latent", "data", "drs"] = "none"
    refine_steps: int = bounded(25, ge=1)  # latent / data: D passes per sample
    refine_step_size: float = bounded(0.1, gt=0)  # latent: η; data: the step up D's logit
    refine_noise: float = bounded(0.01, ge=0)  # latent: γ, noise std √(2ηγ); data: the noise std per step
    refine_percentile: float = bounded(95.0, gt=0, lt=100)  # drs: the logit shift γ, a percentile of F
    cache_dir: str | None = None  # real statistics; None: ~/.cache/targetgen
    fid_weights: str | None = None  # path of pt_inception-2015-12-05-6726825d.pth


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


# ----------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number or a numeric string, else None.

    YAML 1.1 reads "1e-4" (no dot) as a string: it is accepted as the number it is.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_bounds(value: Any, bounds: Bounds, where: str) -> None:
    """Every number in ``value`` (itself, a tuple's elements, a mapping's values) within ``bounds``."""
    if value is None:
        return
    items = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, tuple) else [(None, value)]
    )
    for key, number in items:
        if not bounds.holds(number):
            at = where if key is None else f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]"
            kind = "an integer" if isinstance(number, int) else "a number"
            raise ConfigError(f"{at}: expected {kind} {bounds.describe()}, got {number!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict:
        key_type, value_type = typing.get_args(tp)
        if isinstance(value, dict):
            return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    elif origin is list:  # e.g. the sources of a mix: list[MemberOptions], each element named by its position
        (item_type,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # 1e3 and 2e0 are the integers they name, however YAML reads them (float or string).
        number = _number(value)
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
    elif tp is float:
        number = _number(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, where)
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, raw: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, rejecting unknown keys and bad values.

    ``where`` is the dotted path of this section, used in error messages.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{path}'{hint} (valid keys: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], path)
        if "bounds" in fields[key].metadata:
            _check_bounds(kwargs[key], fields[key].metadata["bounds"], path)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where + '.' if where else ''}{name}: missing; this key has no default")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- files and overrides


# Limits on what a YAML text may hold: a config is a few hundred lines, so anything near these is
# an accident or an attack (an alias bomb expands a few lines into billions of nodes).
YAML_MAX_BYTES = 1 << 20
YAML_MAX_DEPTH = 64
YAML_MAX_NODES = 100_000  # after expanding aliases


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses nesting deeper than YAML_MAX_DEPTH while composing."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > YAML_MAX_DEPTH:
                raise ConfigError(f"nested more than {YAML_MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """The number of nodes ``node`` stands for once every alias is expanded (memoised per node)."""
    if id(node) in sizes:
        return sizes[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    if size > YAML_MAX_NODES:
        raise ConfigError(f"expands to more than {YAML_MAX_NODES:,} values (aliases included)")
    sizes[id(node)] = size
    return size


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong, and where."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{' '.join(str(problem).split())}{where}"


def parse_yaml(text: str, where: str) -> Any:
    """``text`` read as YAML by the safe loader, within the limits above; ``where`` names it in errors."""
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters, more than a config may hold ({YAML_MAX_BYTES:,})")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return loader.construct_document(node)
    except ConfigError as err:
        raise ConfigError(f"{where}: not a config: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not a config: nested too deeply") from None
    finally:
        loader.dispose()


def presets() -> dict[str, Path]:
    """The configs shipped with targetgen by name: training presets, and comparison templates (``compare/``)."""
    root = importlib.resources.files("targetgen.configs")
    found = {}
    for folder in (root, root / "compare"):
        for entry in sorted(folder.iterdir(), key=lambda e: e.name) if folder.is_dir() else ():
            if entry.name.endswith(".yaml"):
                found.setdefault(entry.name[: -len(".yaml")], Path(str(entry)))
    return found


def find_config(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the shipped preset of that name (``mnist5k``, ``toy2d_compare``)."""
    path = Path(path)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = presets()
    if str(path) in shipped:
        return shipped[str(path)]
    close = difflib.get_close_matches(str(path), list(shipped), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"config file not found: {path}, and no preset of that name{hint} (presets: {', '.join(shipped)})"
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = find_config(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > YAML_MAX_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, more than a config may hold ({YAML_MAX_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {err.start} is {err.object[err.start]:#04x}); expected a YAML config"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is read as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. train.steps=100")
    try:
        value = parse_yaml(text, f"--set {key.strip()}") if text.strip() else None
    except ConfigError as err:
        if "not valid YAML" not in str(err):
            raise
        value = text  # a plain string that YAML would misread, e.g. a path with ': ' in it
    set_dotted(raw, key.strip(), value, f"--set {assignment!r}")


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``raw[a][b][c] = value`` for the key ``a.b.c``, creating sections on the way; ``where`` names
    the source of the key in errors. The one walker of dotted keys (--set, compare's grid)."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), targets: str | None = None
) -> Config:
    """Load a config file (or the defaults), switch the target source to ``targets``
    if given (its options start from that source's defaults), then apply ``--set``
    overrides."""
    path = find_config(path) if path is not None else None
    raw = read_yaml(path) if path is not None else {}
    if "compare" in raw:
        raise ConfigError(
            f"{path} describes a comparison (it has a compare section); run it with targetgen compare --config "
            f"{path} --out DIR"
        )
    if targets is not None:
        section = raw.get("targets") or {}
        if not isinstance(section, dict) or section.get("name", TargetsConfig.name) != targets:
            raw["targets"] = {"name": targets, "options": {}}
    for assignment in overrides:
        apply_override(raw, assignment)
    config = from_dict(Config, raw)
    if config.train.name is None:
        # without a file, name the run after what it trains: runs/digits-imle
        config.train.name = Path(path).stem if path is not None else f"{config.data.name}-{config.targets.name}"
    return config


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
