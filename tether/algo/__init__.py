"""tether.algo: the math of RLHF-PPO as pure functions on tensors.

Imports torch only (no transformers, no I/O, no distributed). Mask convention everywhere:
``mask`` is bool or 0/1 with **True = a real token that counts**; values at masked
positions never change a result, and per-token outputs are 0 there.
"""

from .advantages import gae
from .estimators import (
    LOSS_AGGREGATIONS,
    aggregation_weights,
    broadcast_to_tokens,
    dr_grpo_advantages,
    grpo_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    returns_to_go,
    rloo_advantages,
    uniform_groups,
)
from .kl import AdaptiveKLController, FixedKLController, KL_ESTIMATORS, kl_loss, kl_per_token
from .logprobs import entropy_from_logits, logprobs_from_logits
from .losses import clipped_policy_loss, clipped_value_loss, entropy_loss, lm_loss, pairwise_loss
from .masked import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten
from .rewards import (
    RunningMoments,
    append_missing_eos,
    apply_missing_eos_penalty,
    clip_scores,
    last_token_index,
    shape_rewards,
)

__all__ = [
    # masked.py
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "explained_variance",
    # logprobs.py
    "logprobs_from_logits",
    "entropy_from_logits",
    # kl.py
    "KL_ESTIMATORS",
    "kl_per_token",
    "kl_loss",
    "FixedKLController",
    "AdaptiveKLController",
    # rewards.py
    "last_token_index",
    "append_missing_eos",
    "shape_rewards",
    "apply_missing_eos_penalty",
    "clip_scores",
    "RunningMoments",
    # advantages.py
    "gae",
    # estimators.py
    "LOSS_AGGREGATIONS",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "returns_to_go",
    "reinforce_pp_advantages",
    "broadcast_to_tokens",
    "aggregation_weights",
    "overlong_penalty",
    "uniform_groups",
    # losses.py
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_loss",
    "lm_loss",
    "pairwise_loss",
]
