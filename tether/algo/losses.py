"""PPO, value, entropy, language-model and reward-model losses.

Every loss returns ``(loss, stats)``; ``stats`` maps names to *detached 0-dim* tensors.
Token losses take ``num_tokens``: None -> masked mean over this call's tokens; a number ->
``masked_sum(per_token) / num_tokens``, so micro-batches of one minibatch, each divided by
the minibatch's total real-token count, sum to exactly the one-pass loss and gradient.
``weights`` (B, R), where a loss takes them, replace that normalisation: the loss is
``masked_sum(weights * per_token)`` (the loss aggregation modes of algo/estimators.py).
Stats are always masked means over *this* call's real tokens (the trainer weights them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logprobs import logprobs_from_logits
from .masked import _as_bool_mask, _reduce_loss, _zero_masked, masked_mean

__all__ = [
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_loss",
    "lm_loss",
    "pairwise_loss",
]


def _upcast(x: Tensor) -> Tensor:
    # Losses on bf16/fp16 critics or log-probs lose digits that matter for ratios near 1.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"tensors must have the same shape, got {shapes}")


def _masked_extreme(x: Tensor, mask: Tensor, largest: bool) -> Tensor:
    """Max (or min) over real positions; 0 if there are none (like ``masked_mean``)."""
    if not bool(mask.any()):
        return x.new_zeros(())
    fill = torch.tensor(float("-inf") if largest else float("inf"), dtype=x.dtype, device=x.device)
    x = torch.where(mask, x, fill)
    return x.max() if largest else x.min()


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    num_tokens: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), per token.

    Shapes: ``logprobs`` (B, R) with grad, ``old_logprobs``, ``advantages``, ``mask`` (B, R).
    ``ratio = exp(logprobs - old_logprobs)``;
    per-token loss ``= max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))``.
    ``clip_eps_low``/``clip_eps_high`` default to ``clip_eps``; a larger high bound is
    DAPO's "clip-higher" (Yu et al. 2025). ``dual_clip = c > 1`` (Ye et al. 2020) caps the
    loss of negative-advantage tokens at ``-c * A``, bounding the step on a huge ratio.

    Stats (detached, over this call's real tokens):
      ``loss``; ``approx_kl`` = mean of ``(ratio - 1) - log ratio`` (k3 of old vs new,
      CleanRL / Schulman); ``clipfrac`` = fraction of tokens where the clipped term is
      strictly larger (was chosen); ``ratio_mean``, ``ratio_max``, ``ratio_min``;
      plus ``dual_clipfrac`` when ``dual_clip`` is set. Stats of an empty mask are 0.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    eps_low = clip_eps if clip_eps_low is None else clip_eps_low
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (eps_low >= 0.0 and eps_high >= 0.0):  # eps_low >= 1: no lower bound (a ratio is always > 0)
        raise ValueError(f"need clip_eps_low >= 0 and clip_eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    mask = _as_bool_mask(logprobs, mask)
    # Zero garbage before exp(): an inf there would make NaN grads even if selected away later.
    logprobs = _zero_masked(_upcast(logprobs), mask)
    old_logprobs = _zero_masked(_upcast(old_logprobs), mask)
    advantages = _zero_masked(_upcast(advantages), mask)

    log_ratio = logprobs - old_logprobs  # (B, R)
    ratio = torch.exp(log_ratio)  # (B, R); exactly 1 when logprobs == old_logprobs
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)  # PPO eq. 7 (pessimistic bound)
    stats: dict[str, Tensor] = {}
    if dual_clip is not None:
        cap = -dual_clip * advantages  # dual-clip PPO (Ye et al. 2020): applies only where A < 0
        dual = (advantages < 0) & (per_token > cap)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, cap), per_token)
        stats["dual_clipfrac"] = masked_mean(dual.to(per_token.dtype), mask).detach()

    loss = _reduce_loss(per_token, mask, num_tokens, weights)  # weights: (B, R) loss aggregation, else token mean
    with torch.no_grad():
        stats.update(
            loss=masked_mean(per_token, mask),
            approx_kl=masked_mean((ratio - 1.0) - log_ratio, mask),
            clipfrac=masked_mean((pg_clipped > pg_unclipped).to(ratio.dtype), mask),
            ratio_mean=masked_mean(ratio, mask),
            ratio_max=_masked_extreme(ratio, mask, largest=True),
            ratio_min=_masked_extreme(ratio, mask, largest=False),
        )
    return loss, {k: v.detach() for k, v in stats.items()}


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``1/2 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``.

    Shapes: ``values`` (B, R) with grad, ``old_values``, ``returns``, ``mask`` (B, R).
    OpenAI baselines PPO2 / N-details item 11 (eps_v = 0.2). ``clip_eps=None`` disables
    clipping (plain ``1/2 (V - R)^2``).
    Stats (detached): ``loss``; ``clipfrac`` = fraction of tokens where the clipped error
    is strictly larger (was chosen); ``mean`` = mean of ``values``; ``error`` = mean of
    ``(V - R)^2``.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_eps is not None and not clip_eps >= 0:
        raise ValueError(f"clip_eps must be >= 0 or None, got {clip_eps}")
    mask = _as_bool_mask(values, mask)
    values = _zero_masked(_upcast(values), mask)
    old_values = _zero_masked(_upcast(old_values), mask)
    returns = _zero_masked(_upcast(returns), mask)

    error_unclipped = (values - returns) ** 2  # (B, R)
    if clip_eps is None:
        per_token = 0.5 * error_unclipped
        clipped = torch.zeros_like(mask)
    else:
        # Inside the band V itself, not V_old + (V - V_old), which can differ from V by an ulp and
        # then counted as clipped (the loss and gradient are the same either way).
        outside = (values - old_values).abs() > clip_eps
        values_clipped = torch.where(outside, old_values + torch.clamp(values - old_values, -clip_eps, clip_eps),
                                     values)
        error_clipped = (values_clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(error_unclipped, error_clipped)
        clipped = outside & (error_clipped > error_unclipped)

    loss = _reduce_loss(per_token, mask, num_tokens)
    with torch.no_grad():
        stats = {
            "loss": masked_mean(per_token, mask),
            "clipfrac": masked_mean(clipped.to(per_token.dtype), mask),
            "mean": masked_mean(values, mask),
            "error": masked_mean(error_unclipped, mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def entropy_loss(
    entropy: Tensor, mask: Tensor, num_tokens: float | None = None, weights: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Entropy bonus as a loss: ``-mean(entropy)`` over real tokens (PPO eq. 9, the S term).

    Shapes: ``entropy`` (B, R) (from ``entropy_from_logits``), ``mask`` (B, R).
    Add ``coef * loss`` to the total loss; RLHF usually uses coef 0 (N-details item 11).
    Stats (detached): ``loss``, ``entropy`` (mean entropy).
    """
    _check_same_shape(entropy=entropy, mask=mask)
    entropy = _zero_masked(_upcast(entropy), mask)
    loss = _reduce_loss(-entropy, mask, num_tokens, weights)
    mean_entropy = masked_mean(entropy, mask).detach()
    return loss, {"loss": -mean_entropy, "entropy": mean_entropy}


def lm_loss(
    logits: Tensor,
    input_ids: Tensor,
    loss_mask: Tensor,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Causal LM cross-entropy: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.

    Shapes: ``logits`` (B, L, V), ``input_ids`` (B, L) long, ``loss_mask`` (B, L) over
    ``input_ids`` positions: True where that token is a *target* that counts (the shift is
    done here, using ``loss_mask[:, 1:]``). ``num_tokens`` = the total count of counted
    targets across micro-batches. Used for SFT and for PPO-ptx (InstructGPT eq. 2,
    ``objective += gamma_ptx * E[log pi(x_pretrain)]``).
    Only the real target positions are gathered, so masked positions (prompt, padding,
    ``-100`` labels) are never read. Stats (detached): ``loss`` (mean NLL), ``perplexity``
    (``exp`` of it), ``tokens`` (count of counted targets in this call).
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected logits (B, L, V), input_ids (B, L), loss_mask (B, L); got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(loss_mask.shape)}"
        )
    target_mask = loss_mask[:, 1:].bool()  # (B, L-1)
    selected_logits = logits[:, :-1][target_mask]  # (N, V), N real targets
    selected_targets = input_ids[:, 1:][target_mask]  # (N,)
    nll = -logprobs_from_logits(selected_logits, selected_targets)  # (N,) float32
    count = nll.new_tensor(float(nll.shape[0]))
    if num_tokens is None:
        loss = nll.sum() / count.clamp(min=1)
    else:
        if not isinstance(num_tokens, Tensor) and not num_tokens > 0:
            raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
        loss = nll.sum() / num_tokens
    mean_nll = (nll.sum() / count.clamp(min=1)).detach()
    return loss, {"loss": mean_nll, "perplexity": torch.exp(mean_nll), "tokens": count}


def pairwise_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: float | Tensor | None = None,
    num_pairs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry reward-model loss ``-mean log sigmoid(r_c - r_r - margin)``.

    Shapes: ``chosen_scores``, ``rejected_scores`` (B,); ``margin`` None, a float or (B,)
    (Llama 2's per-pair margin). Ouyang et al. 2022 eq. 1. ``num_pairs`` plays the role of
    ``num_tokens`` for gradient accumulation: the loss is then ``sum / num_pairs``.
    Stats (detached, over this call's pairs): ``loss``; ``accuracy`` = fraction with
    ``r_c > r_r`` strictly (ties count as wrong); ``margin`` = mean ``r_c - r_r``.
    """
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    diff = _upcast(chosen_scores) - _upcast(rejected_scores)  # (B,)
    logits = diff if margin is None else diff - margin
    per_pair = -F.logsigmoid(logits)  # stable for large |logits|
    count = max(per_pair.numel(), 1)
    if num_pairs is None:
        loss = per_pair.sum() / count
    else:
        if not isinstance(num_pairs, Tensor) and not num_pairs > 0:
            raise ValueError(f"num_pairs must be > 0, got {num_pairs}")
        loss = per_pair.sum() / num_pairs
    with torch.no_grad():
        stats = {
            "loss": per_pair.sum() / count,
            "accuracy": (diff > 0).to(diff.dtype).sum() / count,
            "margin": diff.sum() / count,
        }
    return loss, {k: v.detach() for k, v in stats.items()}
