"""Config: YAML + key=value overrides, rejected before any model loads."""

import subprocess
import sys

import pytest

from tether.config import ConfigError, PPOConfig, config_from_dict, describe_options, load_config
from tether.cli import main

REQUIRED = ["policy=some/model", "prompts=p.jsonl", "reward_fn=mod:fn"]


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy: a\nprompts: p.jsonl\nreward_fn: m:f\nbatch_size: 32\nlearning_rate: 1e-5\n")
    cfg = load_config(PPOConfig, str(path), ["batch_size=64", "stop_strings=[\"\\n\\n\"]", "clip_eps=0.1"])
    assert cfg.batch_size == 64
    assert cfg.learning_rate == pytest.approx(1e-5)  # YAML reads "1e-5" as a string; it is coerced
    assert cfg.stop_strings == ["\n\n"]
    assert cfg.clip_eps == 0.1
    assert cfg.minibatch_size == 64 and cfg.micro_batch_size == 64


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'.*did you mean learning_rate"):
        load_config(PPOConfig, None, REQUIRED + ["learning_rat=1e-4"])


@pytest.mark.parametrize("override,message", [
    ("batch_size=abc", r"batch_size must be int, got 'abc'"),
    ("batch_size=2.5", r"batch_size must be int"),
    ("adaptive_kl=maybe", r"adaptive_kl must be bool"),
    ("lr_schedule=exponential", r"lr_schedule must be one of 'constant', 'linear', 'cosine'"),
    ("kl_estimator=k4", r"kl_estimator must be one of 'k1', 'k2', 'k3'"),
])
def test_wrong_types_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, None, REQUIRED + [override])


@pytest.mark.parametrize("overrides,message", [
    (["batch_size=10", "num_minibatches=3"], r"batch_size=10 is not divisible by num_minibatches=3"),
    (["batch_size=8", "num_minibatches=2", "gradient_accumulation_steps=3"],
     r"minibatch_size=4 is not divisible by gradient_accumulation_steps=3"),
    (["temperature=0"], r"temperature must be > 0"),
    (["top_p=1.5"], r"top_p must be in \(0, 1\]"),
    (["dual_clip=0.5"], r"dual_clip must be > 1"),
    (["ppo_epochs=0"], r"ppo_epochs must be >= 1"),
    (["log_with=[mlflow]"], r"unknown sink"),
])
def test_inconsistent_sizes_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, None, REQUIRED + overrides)


def test_reward_must_be_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of reward_model"):
        load_config(PPOConfig, None, ["policy=a", "prompts=p.jsonl"])
    with pytest.raises(ConfigError, match="exactly one of reward_model"):
        load_config(PPOConfig, None, REQUIRED + ["reward_model=rm"])
    with pytest.raises(ConfigError, match="policy is required"):
        load_config(PPOConfig, None, ["prompts=p.jsonl", "reward_fn=m:f"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PPOConfig, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PPOConfig, str(bad))


def test_help_lists_every_option_with_its_default():
    out = subprocess.run([sys.executable, "-m", "tether.cli", "ppo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    import dataclasses

    for f in dataclasses.fields(PPOConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"{f.name}={default!r}" in out, f.name
    assert describe_options(PPOConfig).count("\n      ") == len(dataclasses.fields(PPOConfig))


def test_cli_reports_config_errors_before_loading_anything(capsys):
    code = main(["ppo", "policy=some-org/some-model", "prompts=p.jsonl", "reward_fn=m:f", "batch_size=7",
                 "num_minibatches=2"])
    assert code == 2
    assert "batch_size=7 is not divisible by num_minibatches=2" in capsys.readouterr().err


def test_cli_names_an_output_location_that_is_a_file(tmp_path, capsys):
    occupied = tmp_path / "taken"
    occupied.write_text("keep me")
    code = main(["demo", "--output-dir", str(occupied)])
    assert code == 2  # a path that cannot be used is the user's input to fix
    assert f"cannot use {occupied}: File exists" in capsys.readouterr().err
    assert occupied.read_text() == "keep me"


def test_config_round_trips_through_saved_yaml(tmp_path):
    from tether.config import save_config

    cfg = config_from_dict(PPOConfig, {"policy": "a", "prompts": "p", "reward_fn": "m:f", "kl_coef": 0.2,
                                       "stop_strings": ["###"], "clip_eps_high": 0.28})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PPOConfig, str(tmp_path / "config.yaml"))
    assert again == cfg
