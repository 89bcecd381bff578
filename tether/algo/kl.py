"""KL between the policy and the frozen reference, and the KL coefficient controllers.

Estimators from Schulman, "Approximating KL Divergence" (2020), for samples a ~ pi with
log r = log pi_ref(a) - log pi(a):
  k1 = -log r                      unbiased, high variance, can be negative
  k2 = 1/2 (log r)^2               biased, low variance, >= 0
  k3 = (r - 1) - log r             unbiased, low variance, >= 0
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .masked import _reduce_loss, _zero_masked, masked_mean

__all__ = ["KL_ESTIMATORS", "kl_per_token", "kl_loss", "FixedKLController", "AdaptiveKLController"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    Shapes: ``logprobs``, ``ref_logprobs`` (B, R) -> (B, R). ``estimator`` is one of
    ``"k1"``, ``"k2"``, ``"k3"`` (Schulman 2020, see module docstring). No masking here:
    use :func:`kl_loss` / ``shape_rewards`` or mask the result yourself.
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where k3 ~ (log r)^2 / 2
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    num_tokens: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL to the reference as a loss term added to the policy loss (GRPO style).

    Shapes: ``logprobs`` (B, R) with grad, ``ref_logprobs`` (B, R), ``mask`` (B, R).
    Loss = masked mean of the per-token estimator, or ``masked_sum / num_tokens`` when
    ``num_tokens`` is given (exact gradient accumulation over micro-batches).
    Stats (detached, masked means over this call's tokens): ``loss``, ``kl``.

    Which placement gives the right gradient (Tang & Munos 2025, arXiv 2506.09477;
    Liu et al. 2025, arXiv 2510.01555):
      * k1 *in the reward* (``shape_rewards``, tether's default) gives the principled
        reverse-KL policy gradient;
      * on-policy, k2 *as a loss* gives that same gradient (unbiased);
      * k3 *as a loss* (GRPO's choice, this function's default for compatibility) is a
        biased first-order approximation of it;
      * k1 *as a loss* is ineffective: its gradient has expectation zero.
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must have the same shape"
        )
    logprobs = _zero_masked(logprobs, mask)
    ref_logprobs = _zero_masked(ref_logprobs, mask)
    per_token = kl_per_token(logprobs, ref_logprobs, estimator)  # (B, R), 0 where masked
    loss = _reduce_loss(per_token, mask, num_tokens, weights)
    mean = masked_mean(per_token, mask).detach()
    return loss, {"loss": mean, "kl": mean}


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT: 0.02; N+ details: 0.05).

    ``update`` is a no-op so trainers can treat both controllers alike.
    """

    def __init__(self, coef: float) -> None:
        if not coef >= 0:
            raise ValueError(f"KL coef must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (the coefficient is fixed)."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient steering the measured KL toward ``target`` (Ziegler et al. 2019 §2.2).

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    Ziegler et al. used init 0.15, target 6 nats, horizon 10,000 and ``n_steps`` = the
    number of episodes (sequences) in the update that measured ``current_kl``.
    ``current_kl`` should be the mean *per-sequence* KL (sum over tokens), as there.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if not init_coef >= 0:
            raise ValueError(f"init_coef must be >= 0, got {init_coef}")
        if not target > 0:
            raise ValueError(f"target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` toward the target; raises ValueError on a non-finite KL."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            # A NaN/inf KL would silently turn beta into NaN forever: fail loudly instead.
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Only the learnt coefficient; ``target``/``horizon`` come from the config on resume."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
