"""An update's rollout metrics, computed from tensors the trainer hands over (scores included: the
gold scorer is the trainer's to call). Under torchrun, every rank's rows gathered in batch order;
every rank calls each function (they hold collectives). docs/metrics.md says what each one means."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from tether import distributed
from tether.algo import explained_variance, masked_mean
from tether.generation import GenerationBackend, logprob_gap
from tether.rollout import Rollout
from tether.sampling import GenerationSettings, truncates
from tether.text_health import distinct_n, repeated_ngram_rate
from tether.trainers.ppo.batch import ShapedRewards


def reward_part_metrics(rollout: Rollout, names: list[str]) -> dict[str, float]:
    """`reward/<name>`: each summed reward function's own mean score (unweighted), over every rank's rows."""
    if rollout.reward_parts is None or not names:
        return {}
    parts = distributed.gather_rows(rollout.reward_parts)  # (B, K)
    return {f"reward/{name}": parts[:, k].mean().item() for k, name in enumerate(names)}


def rollout_metrics(rollout: Rollout, shaped: ShapedRewards, returns: Tensor, advantage_mean: float,
                    kl_per_response: float, beta: float, gold: Optional[Tensor], critic: bool, group_size: int,
                    gaps: dict[str, float]) -> dict[str, float]:
    """Metrics of the whole batch. `gold`: this rank's gold scores, None without a gold reward;
    `critic`: whether a critic is trained (value metrics); `gaps`: the generation gap metrics."""
    g = distributed.gather_rows
    mask, values, every_return = g(rollout.response_mask), g(rollout.values), g(returns)
    ref_logprobs = g(rollout.ref_logprobs)
    scores = g(shaped.logged_scores)
    responses = distributed.gather_lists([ids[m].tolist() for ids, m in zip(rollout.response_ids,
                                                                             rollout.response_mask)])
    extra = {}
    if gold is not None:
        gold_scores = g(gold.float())
        extra = {"gold/score": gold_scores.mean().item(), "gold/score_std": gold_scores.std(unbiased=False).item()}
    if critic:
        extra.update({"value/explained_variance": explained_variance(values, every_return, mask).item(),
                      "value/mean": masked_mean(values, mask).item()})
    if shaped.overlong is not None:
        extra["reward/overlong_penalty"] = g(shaped.overlong).mean().item()
    return {
        **extra, **gaps,
        "batch/prompts": float(len(scores) // group_size),
        "batch/responses": float(len(scores)),
        "reward/score": scores.mean().item(),
        "reward/score_std": scores.std(unbiased=False).item(),
        "reward/kl_penalty": g(shaped.kl_reward.sum(-1)).mean().item(),
        "reward/total": g(shaped.rewards.sum(-1)).mean().item(),
        "kl/mean": kl_per_response,
        "kl/coef": beta,
        "returns/mean": masked_mean(every_return, mask).item(),
        "advantages/mean": advantage_mean,
        "response/length": mask.sum(-1).float().mean().item(),
        "response/eos_rate": g(rollout.ended).float().mean().item(),
        "response/distinct_1": distinct_n(responses, 1),
        "response/distinct_2": distinct_n(responses, 2),
        "response/repeated_3gram_rate": repeated_ngram_rate(responses, 3),
        "response/ref_perplexity": reference_perplexity(ref_logprobs, mask),
    }


def kl_means(kl: Tensor, mask: Tensor) -> tuple[float, float]:
    """(mean summed KL per response, mean over responses of each one's mean KL per token) of the
    whole batch: the first is what the KL controller reads (Ziegler et al. 2019), the second verl's
    and OpenRLHF's reading of "the KL"."""
    per_response = distributed.gather_rows(kl.sum(-1)).mean().item()
    lengths = mask.sum(-1).clamp(min=1)
    return per_response, distributed.gather_rows(kl.sum(-1) / lengths).mean().item()


def truncation_gap_metrics(generation: GenerationBackend, settings: GenerationSettings) -> dict[str, float]:
    """How far the sampled distribution (top_k / top_p / min_new_tokens) is from the policy's that PPO
    scores: mean log q(a) - log π(a) per response token, as the built-in sampler measured it."""
    take = getattr(generation, "take_truncation_gap", None)
    if take is None or not truncates(settings):
        return {}
    tokens = generation.gap_tokens
    gap = take() or 0.0
    total, count = distributed.sum_floats([gap * tokens, float(tokens)])
    return {"generation/truncation_gap": total / max(count, 1.0)}


def engine_gap_metrics(rollout: Rollout) -> dict[str, float]:
    """How far the generation engine's log-probs are from the trainer's (absent for the built-in sampler)."""
    if rollout.engine_logprobs is None:
        return {}
    total, largest = logprob_gap(rollout.engine_logprobs, rollout.logprobs, rollout.response_mask)
    total, count = distributed.sum_floats([total.item(), rollout.response_mask.sum().item()])
    return {"generation/logprob_gap": total / max(count, 1.0),
            "generation/logprob_gap_max": distributed.max_float(largest.item())}


def reference_perplexity(ref_logprobs: Tensor, mask: Tensor) -> float:
    """exp of the reference's mean negative log-prob per response token (at the sampling temperature):
    gibberish raises it; a policy collapsed onto what the reference finds likely lowers it."""
    return math.exp(-masked_mean(ref_logprobs.float(), mask).item())
