"""tether's Python API: one call per stage, with configs built in Python and validated exactly as
the command line validates YAML (`tether sft | reward | ppo` go through the same pipelines).

    import tether

    result = tether.ppo(policy="runs/sft/final", prompts=[{"prompt": "Hello"}, ...],
                        reward=lambda responses: [float(len(r) < 40) for r in responses],
                        total_updates=50, output_dir="runs/ppo-notebook",
                        on_update=lambda metrics: print(metrics["reward/score"]))
    result.run_dir, result.metrics, result.final_dir

A config is a config object (`tether.PPOConfig(...)`), a dict, or a YAML path; keyword options
override it, as `key=value` does on the command line. docs/api.md has the whole surface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from tether.config import ConfigError, PPOConfig, RewardConfig, SFTConfig, config_from_dict, config_to_dict, read_yaml
from tether.data import records_from_dataset
from tether.pipelines.ppo import build_ppo_trainer
from tether.pipelines.reward import run_reward
from tether.pipelines.sft import run_sft
from tether.rewards import FunctionReward, WeightedRewards

ConfigLike = Union[None, SFTConfig, RewardConfig, PPOConfig, Mapping, str, Path]
PYTHON_REWARD = "python:"  # cfg.reward_fn of a callable given in Python: config.yaml says which, nothing imports it
IN_MEMORY = "<in memory>"  # cfg.prompts of prompts given as Python objects


@dataclass
class RunResult:
    """What a stage leaves: its run directory, its final metrics, and where the trained model is."""

    run_dir: Path
    metrics: dict[str, float]

    @property
    def final_dir(self) -> Path:
        """The trained model (or adapter) in save_pretrained format: `from_pretrained(final_dir)`."""
        return self.run_dir / "final"


def sft(config: ConfigLike = None, *, data: Any = None, **options: Any) -> RunResult:
    """Supervised fine-tuning (`tether sft`): options as in `tether sft --help`. `data`: a file or hub
    id, a list of dicts or a `datasets.Dataset`, in any SFT layout (text, messages, prompt-completion)."""
    records, options = _data_records(data, options)
    cfg = make_config(SFTConfig, config, options)
    return RunResult(Path(cfg.output_dir), run_sft(cfg, records))


def reward(config: ConfigLike = None, *, data: Any = None, **options: Any) -> RunResult:
    """Reward-model training on preference pairs (`tether reward`): options as in `tether reward --help`.
    `data`: a file or hub id, a list of dicts or a `datasets.Dataset`, in any pair layout (explicit,
    conversational, HH transcripts)."""
    records, options = _data_records(data, options)
    cfg = make_config(RewardConfig, config, options)
    return RunResult(Path(cfg.output_dir), run_reward(cfg, records))


def _data_records(data: Any, options: dict[str, Any]) -> tuple[Optional[list[dict]], dict[str, Any]]:
    """A path stays the `data` option; rows in memory are handed over (config.yaml says how many)."""
    options = dict(options)
    if data is None:
        return None, options
    if isinstance(data, (str, Path)):
        options["data"] = str(data)
        return None, options
    records = records_from_dataset(data)
    options["data"] = f"{IN_MEMORY} {len(records)} records"
    return records, options


def ppo(config: ConfigLike = None, *, reward: Union[None, Callable, str, Path] = None, prompts: Any = None,
        on_update: Optional[Callable[[dict[str, float]], None]] = None, **options: Any) -> RunResult:
    """PPO (`tether ppo`). `reward`: a callable `responses -> scores` (it may also take `prompts=` and
    any field of the prompt records by name, e.g. `answer=`), a reward model directory, 'module:function',
    or several callables summed into one score — a list, or a dict {name: callable}, weighted by the
    option `reward_weights` and each logged as `reward/<name>`. `prompts`: a file or hub id, a list of dicts
    (or of strings), or a `datasets.Dataset`. `on_update(metrics)` is called after every update
    with that update's metrics row (the keys of docs/metrics.md)."""
    functions, records, options = _ppo_inputs(reward, prompts, options)
    cfg = make_config(PPOConfig, config, options)
    reward_fn = _python_reward(functions, cfg)
    trainer = build_ppo_trainer(cfg, reward_fn=reward_fn, prompt_records=records)
    trainer.on_update = on_update
    return RunResult(Path(cfg.output_dir), trainer.train())


def make_config(cls: type, config: ConfigLike, options: Mapping[str, Any]):
    """A validated stage config from a config object, a dict or a YAML path, with `options` on top.
    A config object with no options is used as it is (the stage validates it as it starts)."""
    if isinstance(config, cls) and not options:
        return config
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, cls):
        values = config_to_dict(config)
    elif isinstance(config, Mapping):
        values = dict(config)
    elif isinstance(config, (str, Path)):
        values = read_yaml(str(config))
    else:
        raise ConfigError(f"config must be a {cls.__name__}, a dict or a YAML path, got {type(config).__name__}")
    return config_from_dict(cls, {**values, **options})  # typed and validated as YAML is


def _python_reward(functions: Optional[dict[str, Callable]], cfg: PPOConfig):
    """Python callables as the pipeline's reward source: one FunctionReward, or several summed."""
    if not functions:
        return None
    wrapped = [FunctionReward(fn, spec, cfg.reward_timeout_s)
               for fn, spec in zip(functions.values(), cfg.reward_fns or [cfg.reward_fn])]
    if not cfg.reward_fns:
        return wrapped[0]
    return WeightedRewards(wrapped, list(functions), cfg.reward_weights)


def _ppo_inputs(reward: Any, prompts: Any, options: dict[str, Any]) -> tuple[Optional[dict], Any, dict]:
    """Python objects for `reward` and `prompts` become what the pipeline takes; their config keys
    say what they were (config.yaml records them)."""
    options = dict(options)
    functions = None
    if isinstance(reward, (list, tuple, Mapping)):
        functions = _named_functions(reward)
        options["reward_fns"] = [PYTHON_REWARD + name for name in functions]
    elif callable(reward) and not isinstance(reward, (str, Path)):
        functions = {_function_name(reward): reward}
        options["reward_fn"] = PYTHON_REWARD + (getattr(reward, "__qualname__", None) or type(reward).__name__)
    elif isinstance(reward, str) and reward.startswith(("http://", "https://")):
        options["reward_url"] = reward
    elif isinstance(reward, (str, Path)):
        options["reward_model" if Path(reward).is_dir() else "reward_fn"] = str(reward)
    elif reward is not None:
        raise ConfigError(f"reward must be a callable, a reward model directory or 'module:function', got "
                          f"{type(reward).__name__}")
    records = None
    if isinstance(prompts, (str, Path)):
        options["prompts"] = str(prompts)
    elif prompts is not None:
        records = _prompt_records(prompts, options.get("prompt_field", PPOConfig.prompt_field))
        options["prompts"] = f"{IN_MEMORY} {len(records)} records"
    return functions, records, options


def _function_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _named_functions(rewards: Any) -> dict[str, Callable]:
    """{name: callable} from a list of callables (named by __name__) or a dict."""
    pairs = list(rewards.items()) if isinstance(rewards, Mapping) else [(_function_name(f), f) for f in rewards]
    if not pairs or not all(callable(fn) and not isinstance(fn, (str, Path)) for _, fn in pairs):
        raise ConfigError("reward as a list or dict must hold Python callables, one per reward function; for "
                          "'module:function' strings use the option reward_fns")
    names = [str(name) for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two reward functions are named {names[0] if names.count(names[0]) > 1 else sorted(names)!r}; "
                          "pass a dict {name: function} to name each (each is logged as reward/<name>)")
    return dict(zip(names, (fn for _, fn in pairs)))


def _prompt_records(prompts: Any, field: str) -> list[dict]:
    """Rows of a Dataset or a list of dicts; a list of strings becomes rows of `field`."""
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        prompts = [{field: p} for p in prompts]
    return records_from_dataset(prompts)


__all__ = ["RunResult", "sft", "reward", "ppo", "make_config"]
