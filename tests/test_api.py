"""The Python API (tether/api.py): configs built in Python validate as YAML does; the example
script runs PPO end to end with a Python reward function, a datasets.Dataset of prompts and a
per-update callback."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

import tether
from tether.config import ConfigError, PPOConfig, config_to_dict

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ppo_in_python.py"


def load_example():
    spec = importlib.util.spec_from_file_location("ppo_in_python", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_runs_ppo_with_python_objects(tmp_path, capsys):
    example = load_example()
    calls = []
    original = tether.ppo

    def spy(*args, on_update=None, **kwargs):  # the example's callback, and ours beside it
        def both(metrics):
            calls.append(metrics)
            on_update(metrics)
        return original(*args, on_update=both, **kwargs)

    example.tether = type("T", (), {"ppo": staticmethod(spy), "RunResult": tether.RunResult})
    result = example.main(str(tmp_path / "run"))
    assert len(calls) == 8  # once per update (total_updates=8)
    for key in ("reward/score", "kl/mean", "policy/clipfrac", "response/length", "time/update_s"):
        assert all(key in row for row in calls), key
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/score"] for r in rows if "reward/score" in r] == [c["reward/score"] for c in calls]
    assert (result.final_dir / "model.safetensors").is_file()
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["reward_fn"] == "python:letter_o_rate" and saved["prompts"] == "<in memory> 64 records"
    assert result.metrics["reward/score"] == calls[-1]["reward/score"]
    assert "reward/score by update:" in capsys.readouterr().out


def test_a_config_from_python_equals_the_same_from_yaml(tmp_path, tiny_dirs):
    options = dict(policy=str(tiny_dirs["gpt2"]), prompts=str(tiny_dirs["prompts"]), reward_fn="m:f",
                   batch_size=8, num_minibatches=2)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(options))
    from_kwargs = tether.make_config(PPOConfig, None, options)
    assert config_to_dict(tether.make_config(PPOConfig, str(path), {})) == config_to_dict(from_kwargs)
    assert config_to_dict(tether.make_config(PPOConfig, from_kwargs, {})) == config_to_dict(from_kwargs)
    overridden = tether.make_config(PPOConfig, options, {"batch_size": 16})
    assert (overridden.batch_size, overridden.num_minibatches) == (16, 2)


@pytest.mark.parametrize("options, message", [
    ({"batch_sise": 8}, r"unknown config key 'batch_sise'; did you mean batch_size"),
    ({"batch_size": "many"}, r"batch_size"),
    ({"batch_size": 6, "num_minibatches": 4}, r"batch_size"),
])
def test_bad_options_from_python_are_refused_as_from_yaml(tiny_dirs, options, message):
    base = dict(policy=str(tiny_dirs["gpt2"]), prompts=str(tiny_dirs["prompts"]), reward_fn="m:f")
    with pytest.raises(ConfigError, match=message):
        tether.make_config(PPOConfig, None, {**base, **options})


def test_a_reward_that_is_neither_callable_nor_a_path_is_refused(tiny_dirs):
    with pytest.raises(ConfigError, match="reward must be a callable"):
        tether.ppo(policy=str(tiny_dirs["gpt2"]), prompts=str(tiny_dirs["prompts"]), reward=3)
