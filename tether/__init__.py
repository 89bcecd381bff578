"""tether: RLHF with PPO for Hugging Face causal language models.

The Python API (tether/api.py, docs/api.md): `tether.sft`, `tether.reward`, `tether.ppo`, the
configs `tether.SFTConfig`, `tether.RewardConfig`, `tether.PPOConfig`, and `tether.RunResult`.
They load on first use, so `import tether.algo` stays torch-only.
"""

__version__ = "0.1.0"

__all__ = ["sft", "reward", "ppo", "make_config", "RunResult", "SFTConfig", "RewardConfig", "PPOConfig"]
_FROM_CONFIG = ("SFTConfig", "RewardConfig", "PPOConfig")


def __getattr__(name: str):
    """The API names, imported when first asked for (PEP 562)."""
    if name in _FROM_CONFIG:
        from tether import config

        return getattr(config, name)
    if name in __all__:
        from tether import api

        return getattr(api, name)
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
