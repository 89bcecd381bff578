"""Turning one score per sequence into per-token rewards, and score hygiene.

Per-token reward (Ziegler et al. 2019 eq. 2; N-details item 9):
``r_t = -beta * KL_t`` on every real response token, plus the sequence score on the last
real token (the EOS itself when the response has one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .kl import kl_per_token
from .masked import _as_bool_mask, _zero_masked

__all__ = [
    "last_token_index",
    "append_missing_eos",
    "shape_rewards",
    "apply_missing_eos_penalty",
    "clip_scores",
    "RunningMoments",
]


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last True of each row.

    Shapes: ``mask`` (B, R) -> LongTensor (B,). Works for any mask, not only a True prefix
    followed by False (argmax of ``(t + 1) * mask`` is unique). A row with no True gets
    index **0**; callers that must not touch such rows should check ``mask.any(-1)``.
    """
    mask = mask.bool()
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)  # (R,)
    return (positions * mask).argmax(dim=-1)


def append_missing_eos(input_ids: Tensor, mask: Tensor, eos_ids: Tensor, eos_id: int,
                       pad_id: int) -> tuple[Tensor, Tensor]:
    """End every sequence with EOS: rows whose last real token is not in ``eos_ids`` get
    ``eos_id`` written just after it (one column is added when a row is full).

    Shapes: ``input_ids``/``mask`` (B, T) -> (B, T) or (B, T+1); left or right padding. A
    reward model trained on EOS-terminated texts reads its score at the EOS, so a response
    cut at max_new_tokens must end the same way before it is scored (OpenRLHF writes the
    EOS over the last token; appending keeps the response whole).
    """
    mask = mask.long()
    last = last_token_index(mask)  # (B,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    needs = ~torch.isin(input_ids[rows, last], eos_ids.to(input_ids.device)) & mask.bool().any(-1)
    if not needs.any():
        return input_ids, mask
    input_ids = torch.nn.functional.pad(input_ids, (0, 1), value=pad_id)
    mask = torch.nn.functional.pad(mask, (0, 1), value=0)
    at = (last + 1)[needs]
    input_ids[rows[needs], at] = eos_id
    mask[rows[needs], at] = 1
    if not mask[:, -1].any():  # every appended EOS fitted inside the padding
        input_ids, mask = input_ids[:, :-1], mask[:, :-1]
    return input_ids, mask


def shape_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards: KL penalty on every real token, the score on the last real one.

    Shapes: ``scores`` (B,), ``logprobs``/``ref_logprobs``/``mask`` (B, R); ``kl_coef`` a
    float (beta). Returns ``(rewards, kl, kl_reward)``, each (B, R) and 0 at masked positions:
      * ``kl = kl_per_token(logprobs, ref_logprobs, estimator)`` on real tokens,
      * ``kl_reward = -kl_coef * kl``,
      * ``rewards = kl_reward`` + ``scores`` at ``last_token_index(mask)`` - the EOS itself,
        never a pad after it (the TRL PPO bug #3750).
    Ziegler et al. 2019 eq. 2 / N-details item 9 (k1 "in the reward"). A row with no real
    token receives no score at all (there is no token to credit).
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must have the same shape"
        )
    if scores.shape != logprobs.shape[:1]:
        raise ValueError(f"scores must have shape (B,) = {tuple(logprobs.shape[:1])}, got {tuple(scores.shape)}")
    mask = _as_bool_mask(logprobs, mask)
    logprobs = _zero_masked(logprobs, mask)
    ref_logprobs = _zero_masked(ref_logprobs, mask)
    kl = _zero_masked(kl_per_token(logprobs, ref_logprobs, estimator), mask)  # (B, R)
    kl_reward = -kl_coef * kl  # (B, R)
    # Score on the last real token; rows without any real token get nothing.
    last = last_token_index(mask).unsqueeze(-1)  # (B, 1)
    score = torch.where(mask.any(-1), scores.to(kl_reward.dtype), torch.zeros_like(scores, dtype=kl_reward.dtype))
    rewards = kl_reward.scatter_add(-1, last, score.unsqueeze(-1))  # (B, R)
    return rewards, kl, kl_reward


def apply_missing_eos_penalty(scores: Tensor, has_eos: Tensor, penalty: float) -> Tensor:
    """Subtract ``penalty`` from the score of every response without an EOS.

    Shapes: ``scores`` (B,), ``has_eos`` (B,) bool -> (B,). TRL's ``missing_eos_penalty``
    semantics (N-details item 8: truncated responses get a fixed penalty; N+ uses ~1).
    Returns a new tensor.
    """
    return torch.where(has_eos.bool(), scores, scores - penalty)


def clip_scores(scores: Tensor, clip: float) -> Tensor:
    """Clamp scores to ``[-clip, clip]`` (Secrets of RLHF / PPO-max reward clipping). (B,) -> (B,)."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return scores.clamp(min=-clip, max=clip)


class RunningMoments:
    """Running mean and (population) std of every score seen so far.

    Batches are merged with the parallel update of Chan, Golub & LeVeque (1979), in
    float64, so the result equals the biased std of the concatenation of all batches.
    Used to normalise rewards with running statistics (Secrets of RLHF, PPO-max).
    Before any data ``mean = 0`` and ``std = 1`` (``normalize`` is then the identity up
    to ``eps``). Under data parallelism, gather the scores of all ranks before ``update``.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = float(eps)
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 0 else 1.0

    def update(self, x: Tensor) -> None:
        """Merge the values of ``x`` (any shape) into the running statistics.

        Empty ``x`` is a no-op; non-finite values raise ValueError (they would poison
        the statistics forever).
        """
        x = x.detach().reshape(-1).to(torch.float64)
        n = x.numel()
        if n == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("RunningMoments.update got non-finite values")
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / (std + eps)``, same shape and dtype as ``x``."""
        return (x - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers (JSON-serialisable)."""
        return {"mean": self.mean, "var": self.var, "count": self.count, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])
        self.eps = float(state.get("eps", self.eps))
