"""What an update trains on, from the prompts to `PPOBatch`, the optimisation phase's input: how
responses are sampled, the rollout's groups (DAPO's dynamic sampling), its scores and per-token
rewards (step 2 of DESIGN.md §1), its advantages and returns (step 3). What advantage_estimator
changes is chosen here, in two pure functions: `estimator_scores` and `estimate_advantages`.

Statistics over the batch (score normalisation, whitening) use every rank's rows; groups never
straddle ranks (each rank holds whole prompts)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from tether import distributed
from tether.algo import (
    RunningMoments,
    apply_missing_eos_penalty,
    broadcast_to_tokens,
    clip_scores,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    overlong_penalty,
    returns_to_go,
    rloo_advantages,
    shape_rewards,
    uniform_groups,
)
from tether.config import PPOConfig
from tether.models import eos_token_ids
from tether.rollout import Rollout, concat_rollouts, select_rows
from tether.sampling import GenerationSettings

log = logging.getLogger(__package__)


@dataclass
class PPOBatch:
    """What the optimisation phase needs from one rollout."""

    input_ids: Tensor       # (B, P+R)
    attention_mask: Tensor  # (B, P+R)
    response_mask: Tensor   # (B, R) True = real response token
    old_logprobs: Tensor    # (B, R) log π_old, logits / temperature
    ref_logprobs: Tensor    # (B, R) log π_ref
    old_values: Tensor      # (B, R) V_old
    advantages: Tensor      # (B, R) by advantage_estimator, whitened where it asks (GAE: by default)
    returns: Tensor         # (B, R) value targets: GAE advantages (unwhitened) + values
    trunk: Optional[Tensor] = None  # (B, P+R, H) frozen lower blocks' output from the rollout (shared_base)
    graph: Optional[tuple] = None   # the rollout's policy logits (B, R, V) and values (B, R) with grad: first step only

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class ShapedRewards:
    """Step 2 of an update: the rollout's scores as logged, and the per-token rewards trained on."""

    logged_scores: Tensor   # (B,) with the missing-EOS penalty; before the overlong penalty, normalisation, clipping
    rewards: Tensor         # (B, R) -β·KL_t, plus the training score on the last real token
    kl: Tensor              # (B, R) per-token KL estimate (kl_estimator), 0 at masked positions
    kl_reward: Tensor       # (B, R) -β·KL_t; 0 with the KL in the loss
    overlong: Optional[Tensor] = None  # (B,) DAPO's overlong penalty in the training score, when on


def generation_settings(cfg: PPOConfig, tokenizer, model, warn: bool) -> GenerationSettings:
    """How the policy samples responses; with `warn`, a warning when top_k / top_p truncate it."""
    if (cfg.top_k or cfg.top_p < 1.0) and warn:
        log.warning("top_k=%s top_p=%s: responses are sampled from a truncated distribution while PPO scores them "
                    "under the policy's full one (as verl and OpenRLHF do), so updates are off-policy by "
                    "generation/truncation_gap nats per token; top_k=0 top_p=1 keep PPO on-policy",
                    cfg.top_k, cfg.top_p)
    return GenerationSettings(
        max_new_tokens=cfg.max_new_tokens, eos_ids=eos_token_ids(tokenizer, model), pad_id=tokenizer.pad_token_id,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop_strings=list(cfg.stop_strings),
        min_new_tokens=cfg.min_new_tokens)


def collect_groups(prompts: list[int], sample: Callable[[list[int]], Rollout], next_prompts: Callable[[], list[int]],
                   cfg: PPOConfig, pad_id: int) -> tuple[Rollout, dict[str, float]]:
    """The rollout of `prompts`, each sampled samples_per_prompt times in adjacent rows (`sample` takes
    the rows' prompt indices), and the dynamic-sampling metrics.

    With dynamic_sampling (DAPO), groups whose scores are all equal (zero group advantage) are dropped
    and the groups of further prompts (`next_prompts()`) refill the batch, up to dynamic_sampling_max_rounds
    extra rounds; what is then still missing is filled with dropped groups. Every rank samples every
    round together, so the prompt stream stays the same on all."""
    n = cfg.samples_per_prompt
    rollout = sample([i for i in prompts for _ in range(n)])
    if not cfg.dynamic_sampling:
        return rollout, {}
    wanted, good, spare, uniform, rounds = len(prompts), [], [], 0, 0
    while True:
        flat = uniform_groups(rollout.scores, n)
        uniform += int(flat.sum())
        rows = torch.arange(len(rollout)).view(-1, n)
        good += [select_rows(rollout, rows[g]) for g in range(len(flat)) if not flat[g]]
        spare += [select_rows(rollout, rows[g]) for g in range(len(flat)) if flat[g]]
        if rounds == cfg.dynamic_sampling_max_rounds or not distributed.any_rank(len(good) < wanted):
            break
        rounds += 1
        rollout = sample([i for i in next_prompts() for _ in range(n)])
    groups = (good + spare)[:wanted]
    refilled = max(0, wanted - len(good))
    uniform, refilled = distributed.sum_floats([float(uniform), float(refilled)])
    return concat_rollouts(groups, pad_id), {
        "sampling/uniform_groups": uniform, "sampling/extra_rounds": float(rounds),
        "sampling/kept_uniform_groups": refilled}


def training_scores(rollout: Rollout, cfg: PPOConfig,
                    moments: RunningMoments) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(logged score, score used for training, overlong penalty): missing-EOS penalty, then DAPO's
    overlong penalty, then normalise (`moments` updated with the whole batch), then clip."""
    scores = rollout.scores.float()
    if cfg.missing_eos_penalty is not None:
        scores = apply_missing_eos_penalty(scores, rollout.ended, cfg.missing_eos_penalty)
    logged, overlong = scores, None
    if cfg.overlong_buffer:  # DAPO's soft overlong punishment, part of the training reward only
        overlong = overlong_penalty(rollout.response_mask.sum(-1), cfg.max_new_tokens, cfg.overlong_buffer,
                                    cfg.overlong_penalty)
        scores = scores + overlong
    if cfg.normalize_scores:
        moments.update(distributed.gather_rows(scores))  # the whole batch's statistics
        scores = moments.normalize(scores)
    if cfg.score_clip is not None:
        scores = clip_scores(scores, cfg.score_clip)
    return logged, scores, overlong


def estimator_scores(estimator: str, scores: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B,): the scores as `estimator` puts them into the per-token rewards, before the KL
    shaping. REINFORCE++-baseline (Hu 2025) subtracts each group's mean score (`dr_grpo_advantages`);
    every other estimator takes them as they are."""
    return dr_grpo_advantages(scores, group_size) if estimator == "reinforce_pp_baseline" else scores


def estimate_advantages(estimator: str, rewards: Tensor, values: Tensor, mask: Tensor, group_size: int,
                        gamma: float, lam: float, whiten_gae: bool) -> tuple[Tensor, Tensor, bool]:
    """(advantages, returns, whiten) of shaped per-token rewards by `estimator` (advantage_estimator);
    pure tensor math on this rank's rows. ``whiten``: whether the caller whitens the advantages over
    every rank's real tokens: GAE as ``whiten_gae`` says, REINFORCE++ always (Hu 2025 eqs. 6-8), the
    group estimators never. Shapes: ``rewards``, ``values``, ``mask`` (B, R) -> two (B, R) tensors.
      gae                     GAE(gamma, lam), returns = advantages + values (Schulman et al. 2016 eq. 16)
      reinforce_pp(_baseline) returns-to-go with gamma 1, as advantages and returns
      grpo, dr_grpo, rloo     each response's return (its summed rewards) against its group's, on every
                              token of it; returns = that return on every token
    """
    if estimator == "gae":
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        return advantages, returns, whiten_gae
    if estimator.startswith("reinforce_pp"):
        advantages = returns_to_go(rewards, mask)
        return advantages, advantages, True
    group = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}[estimator]
    sequence_returns = (rewards * mask).sum(-1)  # (B,) score + the KL shaping in the reward
    advantages = broadcast_to_tokens(group(sequence_returns, group_size), mask)
    return advantages, broadcast_to_tokens(sequence_returns, mask), False


def rollout_rewards(rollout: Rollout, cfg: PPOConfig, moments: RunningMoments, kl_coef: float) -> ShapedRewards:
    """Step 2: -kl_coef·KL_t per token, and the processed score (as the estimator takes it) on the
    last real token (Ziegler et al. 2019 eq. 2)."""
    logged, scores, overlong = training_scores(rollout, cfg, moments)
    scores = estimator_scores(cfg.advantage_estimator, scores, cfg.samples_per_prompt)
    rewards, kl, kl_reward = shape_rewards(scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask,
                                           kl_coef, cfg.kl_estimator)
    return ShapedRewards(logged, rewards, kl, kl_reward, overlong)


def batch_with_advantages(rollout: Rollout, rewards: Tensor, cfg: PPOConfig) -> tuple[PPOBatch, float]:
    """Step 3: the batch with `advantage_estimator`'s advantages and returns, and the mean advantage
    over every rank's real tokens before whitening (for REINFORCE++, whitening is its eqs. 6-8)."""
    mask = rollout.response_mask
    advantages, returns, whiten = estimate_advantages(cfg.advantage_estimator, rewards, rollout.values, mask,
                                                      cfg.samples_per_prompt, cfg.gamma, cfg.lam,
                                                      cfg.whiten_advantages)
    every_advantage, every_mask = distributed.gather_rows(advantages), distributed.gather_rows(mask)
    mean = masked_mean(every_advantage, every_mask)
    if whiten:  # mean and variance over every rank's tokens
        advantages = masked_whiten(advantages, mask, moments=(mean, masked_var(every_advantage, every_mask)))
    batch = PPOBatch(rollout.input_ids, rollout.attention_mask, mask, rollout.logprobs, rollout.ref_logprobs,
                     rollout.values, advantages, returns, rollout.trunk, rollout.graph)
    return batch, mean.item()
