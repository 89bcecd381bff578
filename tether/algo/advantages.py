"""Generalized Advantage Estimation over response tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from .masked import _as_bool_mask, _zero_masked

__all__ = ["gae"]


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) -> ``(advantages, returns)``.

    Shapes: ``rewards``, ``values``, ``mask`` (B, R) -> two (B, R) tensors, 0 at masked positions.
    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``returns = A + V``. The value after the last real token is 0 (the episode ends there).
    Rewards and values at masked positions are never read (zeroed first, so garbage cannot leak).

    Masked positions are *not steps*: ``V_{t+1}`` / ``A_{t+1}`` are those of the next real
    token. For right-padded responses (a True prefix, the normal case) this is identical to
    treating pads as zero-reward, zero-value steps; for masks with holes (e.g. tool/observation
    tokens in multi-turn) it equals GAE on the sequence with the holes removed.
    Defaults gamma = 1, lam = 0.95 for language (N-details item 12).
    Vectorised over the batch, a reverse loop over time.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must be the same (B, R) shape"
        )
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    mask = _as_bool_mask(rewards, mask)
    rewards = _zero_masked(rewards, mask)
    values = _zero_masked(values, mask)
    if rewards.shape[1] == 0:
        return torch.zeros_like(values), torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])  # (B,) terminal value after the last real token
    next_advantage = values.new_zeros(values.shape[0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # Masked step: output 0 and carry the next real token's value/advantage through.
        advantages_reversed.append(torch.where(real, advantage, torch.zeros_like(advantage)))
        next_advantage = torch.where(real, advantage, next_advantage)
        next_value = torch.where(real, values[:, t], next_value)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, R)
    returns = _zero_masked(advantages + values, mask)
    return advantages, returns
