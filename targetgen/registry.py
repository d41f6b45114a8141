"""The one place that knows about plugins: entry points, looked up by name.

Plugins are found with ``importlib.metadata.entry_points`` and loaded lazily:
only the entry point a run names is imported. The built-ins are registered in
targetgen's own ``pyproject.toml`` through the same groups as third-party ones.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from .config import StandardOptions
from .errors import PluginError

GROUPS = {
    "targets": "targetgen.targets",
    "losses": "targetgen.losses",
    "regularizers": "targetgen.regularizers",
    "features": "targetgen.features",
    "loggers": "targetgen.loggers",
}

STANDARD = "standard"  # the end-to-end GAN baseline: no target source, no regression engine
# Names handled by the trainer itself rather than by a plugin.
RESERVED = {"targets": {STANDARD}}


def _distribution(ep: EntryPoint) -> str:
    name, version = _name_version(ep)
    return f"{name} {version}".strip()


def _name_version(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    return (dist.name, dist.version) if dist is not None else ("unknown distribution", "")


def _entry_points(kind: str) -> dict[str, list[EntryPoint]]:
    """Entry points of one group by name; the same distribution seen twice
    (e.g. on sys.path twice) counts once."""
    found: dict[str, list[EntryPoint]] = {}
    seen = set()
    for ep in entry_points(group=GROUPS[kind]):
        key = (ep.name, ep.value, _distribution(ep))
        if key in seen:
            continue
        seen.add(key)
        found.setdefault(ep.name, []).append(ep)
    return found


def names(kind: str) -> list[str]:
    """Every registered name in a group (nothing is imported)."""
    return sorted(set(_entry_points(kind)) | RESERVED.get(kind, set()))


def _check(kind: str, name: str, obj: object) -> None:
    if kind == "targets":
        from .api import TargetSource

        if not (isinstance(obj, type) and issubclass(obj, TargetSource)):
            raise TypeError(f"{obj!r} is not a subclass of targetgen.TargetSource")
        if not hasattr(obj, "Options"):
            raise TypeError(f"{obj.__name__} has no Options dataclass")
    elif not callable(obj):
        raise TypeError(f"{obj!r} is not callable")


def load(kind: str, name: str, key: str | None = None) -> object:
    """Import and return the plugin ``name`` of group ``kind``; ``key`` is the config key that named it."""
    found = _entry_points(kind)
    if name not in found:
        valid = names(kind)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        where = f"{key}: " if key else ""
        raise PluginError(f"{where}unknown {kind} plugin '{name}'{hint} (available: {', '.join(valid) or 'none'})")
    candidates = found[name]
    if len(candidates) > 1:
        where = " and ".join(f"{_distribution(ep)} ({ep.value})" for ep in candidates)
        raise PluginError(f"{kind} plugin '{name}' is registered twice: by {where}; uninstall one of them")
    ep = candidates[0]
    if name in RESERVED.get(kind, set()):
        raise PluginError(f"{kind} plugin name '{name}' is reserved by targetgen; {_distribution(ep)} must rename it")
    try:
        obj = ep.load()
        _check(kind, name, obj)
    except Exception as err:  # a broken plugin must not take the CLI down with it
        raise PluginError(
            f"{kind} plugin '{name}' from {_distribution(ep)} failed to load: {type(err).__name__}: {err}"
        ) from err
    return obj


@dataclass
class PluginRow:
    group: str
    name: str
    distribution: str
    version: str
    status: str  # "ok" or the error


def survey() -> list[PluginRow]:
    """Try to load every registered plugin; for ``targetgen plugins``."""
    rows = []
    for kind, group in GROUPS.items():
        for name, eps in sorted(_entry_points(kind).items()):
            try:
                load(kind, name)
                status = "ok"
            except PluginError as err:
                cause = err.__cause__
                status = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
            for ep in eps:
                rows.append(PluginRow(group, name, *_name_version(ep), status))
    return rows


def options_class(source: str) -> type:
    """The dataclass of ``targets.options`` for a source, or for the standard GAN (``config.StandardOptions``).
    Loads the source's plugin, nothing else."""
    if source == STANDARD:
        return StandardOptions
    return load("targets", source, "targets.name").Options
