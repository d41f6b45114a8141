import pytest
import torch

from targetgen.config import Config, dump_config, from_dict, load_config, read_yaml, to_dict
from targetgen.errors import ConfigError, PluginError
from targetgen.training import build_run, config_of_run, plan_run_dir, train


def test_defaults_are_the_digits_inversion_run():
    config = load_config()
    assert config.data.name == "digits" and config.targets.name == "inversion"
    assert config.train.name == "digits-inversion"


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.batchsize'; did you mean 'batch_size'\?"):
        load_config(None, ["train.batchsize=64"])
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'\?"):
        load_config(None, ["modle.nz=4"])


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got 'large'"):
        load_config(None, ["train.batch_size=large"])
    with pytest.raises(ConfigError, match=r"regression.reduction: expected one of 'sum', 'mean', got 'avg'"):
        load_config(None, ["regression.reduction=avg"])
    with pytest.raises(ConfigError, match=r"regression.betas: expected a list of 2 numbers, got \[0.5\]"):
        load_config(None, ["regression.betas=[0.5]"])
    with pytest.raises(ConfigError, match=r"train.seed: expected int, got True"):
        load_config(None, ["train.seed=true"])


def test_overrides_are_typed_and_yaml_exponents_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("regression:\n  lr: 8e-4\ntrain:\n  steps: 5\n")
    config = load_config(path, ["train.steps=7", "targets.options.lambda1=0.25"])
    assert config.regression.lr == 0.0008 and config.train.steps == 7
    assert config.targets.options == {"lambda1": 0.25}
    assert config.train.name == "c"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.steps"])


def test_switching_targets_resets_options_unless_same_source(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("targets:\n  name: inversion\n  options: {lambda1: 0.25}\n")
    assert load_config(path, targets="standard").targets.options == {}
    assert load_config(path, targets="inversion").targets.options == {"lambda1": 0.25}


def test_unknown_source_option_lists_the_valid_ones(tiny_config):
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'targets.options.lamda1'; did you mean 'lambda1'\? \(valid keys: lambda1, steps",
    ):
        build_run(tiny_config("targets.options.lamda1=0.5"))


def test_unknown_source_and_loss_are_plugin_errors(tiny_config):
    with pytest.raises(PluginError, match=r"unknown targets plugin 'inversoin'; did you mean 'inversion'\?"):
        build_run(tiny_config(targets="inversoin"))
    with pytest.raises(PluginError, match=r"unknown losses plugin 'l3'"):
        build_run(tiny_config("regression.loss={l3: 1.0}"))


def test_yaml_must_be_safe(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(path)


def test_resolved_config_round_trips_to_the_same_run(tiny_config, tmp_path):
    config = tiny_config("train.steps=3", "targets.options.lambda1=0.5")
    first = train(config, plan_run_dir(config, False), progress=False)
    saved = config_of_run(tmp_path / "run")
    assert to_dict(saved) == to_dict(first.config)
    assert saved.targets.options["d_loss"] == "bce"  # every option resolved and written
    assert config.targets.options == {"lambda1": 0.5} and config.data.image_size == 16  # the given config is left alone
    assert config.data.channels is None
    saved.train.name = "again"
    second = train(saved, plan_run_dir(saved, False), progress=False)
    for p, q in zip(first.generator.parameters(), second.generator.parameters(), strict=True):
        assert torch.equal(p, q)


def test_dump_and_reload_defaults(tmp_path):
    dump_config(Config(), tmp_path / "c.yaml")
    assert from_dict(Config, read_yaml(tmp_path / "c.yaml")) == Config()
