"""Plugins found through real distributions on sys.path (``*.dist-info`` with
``entry_points.txt``), never by patching the registry."""

from pathlib import Path

import pytest
import tomllib
from cli_helpers import run_cli

from targetgen import registry
from targetgen.errors import PluginError

EXAMPLE = Path(__file__).parents[1] / "examples" / "targetgen-example-plugin"


def install_distribution(
    site: Path, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str] | None = None
):
    """Write a minimal installed distribution into ``site``."""
    modules = modules or {}
    dist = site / f"{name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
            for group, eps in entry_points.items()
        )
    )
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


@pytest.fixture
def example_plugin(site, monkeypatch):
    """The repository's example plugin, installed from its own pyproject.toml."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    install_distribution(site, project["name"], project["entry-points"])
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return project


def test_example_plugin_is_found_and_trains(example_plugin, tmp_path):
    cls = registry.load("targets", "blend")
    assert cls.__name__ == "BlendTowardsData"
    code, out, err = run_cli(
        "train",
        "--targets",
        "blend",
        "--steps",
        "2",
        "--out-dir",
        str(tmp_path),
        "--name",
        "b",
        "--no-progress",
        "--set",
        "data.image_size=16",
        "--set",
        "targets.options.alpha=0.5",
    )
    assert code == 0, err
    assert "blend_distance" in (tmp_path / "b" / "metrics.jsonl").read_text()
    code, out, err = run_cli("train", "--targets", "blend", "--set", "targets.options.beta=1")
    assert code == 2 and "unknown key 'targets.options.beta' (valid keys: alpha)" in err


def test_broken_plugin_is_reported_and_the_rest_keeps_working(site):
    install_distribution(
        site,
        "broken-plugin",
        {"targetgen.targets": {"broken": "broken_mod:Thing"}},
        {"broken_mod": "raise ImportError('needs libfoo')\n"},
    )
    with pytest.raises(
        PluginError, match=r"targets plugin 'broken' from broken-plugin 1.0 failed to load: ImportError: needs libfoo"
    ):
        registry.load("targets", "broken")
    assert registry.load("targets", "inversion").name == "inversion"  # lazy: the broken one is never imported
    rows = {r.name: r for r in registry.survey()}
    assert rows["broken"].status.endswith("needs libfoo") and rows["inversion"].status == "ok"
    assert rows["broken"].status == "ImportError: needs libfoo" and (
        rows["broken"].distribution,
        rows["broken"].version,
    ) == ("broken-plugin", "1.0")
    code, out, _ = run_cli("plugins")
    assert code == 0 and "broken" in out and "inversion" in out


def test_plugin_that_is_not_a_target_generator(site):
    install_distribution(
        site,
        "wrong-plugin",
        {"targetgen.targets": {"wrong": "wrong_mod:Wrong"}},
        {"wrong_mod": "class Wrong:\n    pass\n"},
    )
    with pytest.raises(
        PluginError,
        match=r"'wrong' from wrong-plugin 1.0 failed to load: TypeError: .* not a subclass of targetgen.TargetSource",
    ):
        registry.load("targets", "wrong")


def test_two_plugins_with_one_name_name_both_distributions(site):
    for dist in ("first-dist", "second-dist"):
        install_distribution(site, dist, {"targetgen.losses": {"l2": "targetgen.losses:l1"}})
    with pytest.raises(
        PluginError, match=r"losses plugin 'l2' is registered twice: by .*first-dist 1.0.* and .*second-dist 1.0"
    ):
        registry.load("losses", "l2")


def test_reserved_name(site):
    install_distribution(
        site, "greedy", {"targetgen.targets": {"standard": "targetgen.plugins.inversion:DiscriminatorInversion"}}
    )
    with pytest.raises(PluginError, match="name 'standard' is reserved by targetgen; greedy 1.0 must rename it"):
        registry.load("targets", "standard")


def test_builtins_come_from_targetgens_own_entry_points():
    for kind, name in (("targets", "inversion"), ("losses", "ssim"), ("regularizers", "tv")):
        (ep,) = registry._entry_points(kind)[name]
        assert ep.dist.name == "targetgen"
