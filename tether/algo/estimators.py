"""Critic-free advantage estimators and loss aggregation modes, beside GAE.

A rollout batch holds groups: each prompt sampled n times (`samples_per_prompt`), the n responses
of a prompt in adjacent rows, so a (B,) vector reshapes to (B/n, n). The sequence-level
estimators (GRPO, Dr. GRPO, RLOO) turn each response's return (the sum of its shaped per-token
rewards: the score on its last token, plus -beta*KL_t per token when the KL is in the reward) into
one advantage given to every token of it. REINFORCE++ keeps token-level returns-to-go.

Shapes: B responses (B = prompts x n), R response tokens; masks are True for real tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masked import _as_bool_mask, _zero_masked, masked_whiten

__all__ = [
    "LOSS_AGGREGATIONS",
    "group_view",
    "group_deviations",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "returns_to_go",
    "reinforce_pp_advantages",
    "broadcast_to_tokens",
    "aggregation_weights",
    "overlong_penalty",
    "uniform_groups",
]

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def group_view(x: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B/n, n): row g holds the n responses of prompt g (adjacent in the batch)."""
    if x.dim() != 1 or group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"need a (B,) tensor with B a multiple of the group size {group_size}, got {tuple(x.shape)}")
    return x.view(-1, group_size)


def group_deviations(returns: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B/n, n) float64: r_i - mean(r_group), exactly 0 for a group whose returns are all
    equal (a float mean of equal values can miss them by an ulp, and GRPO divides that by eps)."""
    groups = group_view(returns.double(), group_size)
    uniform = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return torch.where(uniform, torch.zeros((), dtype=centred.dtype, device=centred.device), centred)


def _as_returned(advantages: Tensor, returns: Tensor) -> Tensor:
    """Group statistics are float64; the result has the input's precision (at least float32)."""
    return advantages.flatten().to(torch.promote_types(returns.dtype, torch.float32))


def grpo_advantages(returns: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision): (B,) -> (B,)
    A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased (n - 1), as TRL and verl.
    A group of one has no baseline: mean 0, std 1, so A = r (verl's convention). Equal returns
    in a group give exactly A = 0 (nothing to learn from that prompt)."""
    if group_size == 1:
        return _as_returned(returns, returns)
    centred = group_deviations(returns, group_size)
    std = centred.pow(2).sum(dim=1, keepdim=True).div(group_size - 1).sqrt()
    return _as_returned(centred / (std + eps), returns)


def dr_grpo_advantages(returns: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3): (B,) -> (B,)
    A_i = r_i - mean(r_group): no division by the group's std (which up-weights prompts that are
    too easy or too hard). A group of one: A = r."""
    if group_size == 1:
        return _as_returned(returns, returns)
    return _as_returned(group_deviations(returns, group_size), returns)


def rloo_advantages(returns: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 5; Kool et al. 2019): (B,) -> (B,)
    A_i = r_i - mean_{j != i} r_j = n/(n-1) * (r_i - mean(r_group)). A group of one: A = r."""
    if group_size == 1:
        return _as_returned(returns, returns)
    return _as_returned(group_deviations(returns, group_size) * (group_size / (group_size - 1)), returns)


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """(B, R) -> (B, R): G_t = sum_{k >= t} gamma^(k-t) r_k over real tokens (REINFORCE; Williams
    1992), 0 at masked positions, which are not steps (like `gae`)."""
    mask = _as_bool_mask(rewards, mask)
    rewards = _zero_masked(rewards.float(), mask)
    running = rewards.new_zeros(rewards.shape[0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out.append(torch.where(mask[:, t], running, torch.zeros_like(running)))
    return torch.stack(out[::-1], dim=1) if out else rewards


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262, eqs. 6-8): (B, R) shaped per-token rewards -> (B, R)
    advantages: returns-to-go with gamma = 1, whitened over every real token of the batch
    (`masked_whiten`). `moments` = (mean, var) of the returns over the whole batch (all ranks)
    when the caller has them; else those of this call. (The trainer whitens the returns it has
    already computed with those two same pieces.) The "-baseline" variant subtracts the group
    mean from the scores before they enter `rewards` (see `dr_grpo_advantages`)."""
    mask = _as_bool_mask(rewards, mask)
    return masked_whiten(returns_to_go(rewards, mask), mask, moments=moments)


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """(B,) per-response advantages -> (B, R): the same value on every real token, 0 elsewhere."""
    mask = _as_bool_mask(advantages.unsqueeze(1).expand(-1, mask.shape[1]), mask)
    return torch.where(mask, advantages.float().unsqueeze(1), torch.zeros((), device=mask.device))


def aggregation_weights(mask: Tensor, mode: str, num_tokens: float, num_sequences: float,
                        max_length: int) -> Tensor:
    """(B, R) weights w with loss = sum_{i,t} w_{i,t} * l_{i,t} over real tokens (0 elsewhere).

    Every mode is linear in the per-token losses, with denominators counted over the whole
    minibatch (`num_tokens` real tokens, `num_sequences` responses, over every micro-batch and
    rank): micro-batches then sum to exactly the one-pass loss and gradient.
      token_mean               1 / num_tokens               (DAPO; PPO-RLHF)
      seq_mean_token_mean      1 / (num_sequences * |o_i|)  (original GRPO: a mean per response, then over responses)
      seq_mean_token_sum       1 / num_sequences            (a sum per response, mean over responses)
      seq_mean_token_sum_norm  1 / (num_sequences * max_length)  (Dr. GRPO: a constant, no length bias)
    """
    mask = mask.bool()
    real = mask.float()
    if mode == "token_mean":
        weights = real / num_tokens
    elif mode == "seq_mean_token_mean":
        lengths = real.sum(dim=1, keepdim=True).clamp(min=1.0)
        weights = real / (lengths * num_sequences)
    elif mode == "seq_mean_token_sum":
        weights = real / num_sequences
    elif mode == "seq_mean_token_sum_norm":
        weights = real / (num_sequences * max_length)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose from {LOSS_AGGREGATIONS}")
    return weights


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): (B,) response lengths -> (B,) rewards
    0 up to max_new_tokens - buffer, then falling linearly to -penalty at max_new_tokens."""
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"need 0 < overlong buffer <= max_new_tokens, got {buffer} and {max_new_tokens}")
    start = max_new_tokens - buffer
    over = (lengths.float() - start).clamp(min=0.0)
    return -penalty * (over / buffer).clamp(max=1.0)


def uniform_groups(scores: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """(B,) scores -> (B/n,) bool: True where all n scores of a group are equal (DAPO's dynamic
    sampling drops those groups: their group-normalised advantages are all 0)."""
    groups = group_view(scores.double(), group_size)  # the precision `group_deviations` compares in
    return (groups.max(dim=1).values - groups.min(dim=1).values) <= atol
