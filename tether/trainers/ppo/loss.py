"""The PPO policy loss of one micro-batch from the policy's logits: clipped surrogate, plus the KL
to the reference where it is in the loss, minus the entropy bonus (tether/algo's terms, combined as
the config says)."""

from __future__ import annotations

from torch import Tensor

from tether.algo import (aggregation_weights, clipped_policy_loss, entropy_from_logits, entropy_loss, kl_loss,
                         logprobs_from_logits, masked_mean)
from tether.config import PPOConfig
from tether.trainers.ppo.batch import PPOBatch


def policy_objective(logits: Tensor, micro: PPOBatch, cfg: PPOConfig, kl_coef: float, num_tokens: float,
                     num_sequences: float) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, stats) of `micro` from its policy logits (B, R, V). Every term combines its tokens by
    `loss_aggregation`, with whole-minibatch denominators (`num_tokens`, `num_sequences` over every
    micro-batch and rank), so micro-batches sum to the one-pass loss; stats are detached 0-dim tensors."""
    mask = micro.response_mask
    weights = None if cfg.loss_aggregation == "token_mean" else aggregation_weights(
        mask, cfg.loss_aggregation, num_tokens, num_sequences, cfg.max_new_tokens)
    logprobs = logprobs_from_logits(logits, micro.input_ids[:, -mask.shape[1]:], cfg.temperature)
    # PPO eq. 7 (clipped surrogate); ratio is exactly 1 on the first minibatch (N-details item 15).
    loss, pg = clipped_policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, cfg.clip_eps,
                                   cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip, num_tokens=num_tokens,
                                   weights=weights)
    if cfg.kl_placement == "loss":
        kl_term, _ = kl_loss(logprobs, micro.ref_logprobs, mask, cfg.kl_estimator, num_tokens=num_tokens,
                             weights=weights)
        loss = loss + kl_coef * kl_term
    if cfg.entropy_coef > 0:
        entropy = entropy_from_logits(logits, cfg.temperature)
        ent_loss, _ = entropy_loss(entropy, mask, num_tokens=num_tokens, weights=weights)
        loss = loss + cfg.entropy_coef * ent_loss
    else:
        entropy = entropy_from_logits(logits.detach(), cfg.temperature)
    return loss, {  # read once per optimizer step (PPOTrainer.optimizer_step)
        "policy/loss": pg["loss"], "policy/approx_kl": pg["approx_kl"], "policy/clipfrac": pg["clipfrac"],
        "policy/ratio_mean": pg["ratio_mean"], "policy/ratio_max": pg["ratio_max"],
        "policy/entropy": masked_mean(entropy.detach(), mask),
    }
