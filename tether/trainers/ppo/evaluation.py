"""Held-out evaluation of the PPO policy: proxy score, gold score, KL to the reference and text
health on fixed prompts, with a row of samples for the report."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tether.algo import kl_per_token
from tether.data import left_pad
from tether.rewards import source_scores
from tether.rollout import Rollout, collect_rollout
from tether.text_health import distinct_n


def gold_scores(gold, rollout: Rollout) -> Optional[Tensor]:
    """(B,) scores of the gold reward (a RewardSource never optimised), None without one."""
    return None if gold is None else source_scores(gold, rollout.prompts, rollout.responses, rollout.input_ids,
                                                   rollout.attention_mask, rollout.columns)


@torch.no_grad()
def evaluate(trainer) -> tuple[dict[str, float], dict]:
    """(metrics, texts) of a PPOTrainer's policy on its held-out prompts; texts holds the prompts,
    responses, their KL and scores (the demo's before/after reads them).

    Sampled from a random stream of its own, seeded the same at every evaluation: evaluating
    never changes what training samples (eval_every is not a training setting), and every
    evaluation draws the same random numbers, so before/after differ by the policy alone."""
    cfg = trainer.cfg
    prompt_ids, prompt_mask = left_pad(trainer.eval_prompts, trainer.tokenizer.pad_token_id)
    trainer.roles.eval()
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 3)
        with trainer.forwards():
            rollout = collect_rollout(trainer.roles, trainer.tokenizer, prompt_ids.to(trainer.device), prompt_mask.to(
                trainer.device), trainer.settings, cfg.rollout_batch_size or cfg.batch_size,
                                      columns=trainer.eval_columns)
    mask = rollout.response_mask
    kl = (kl_per_token(rollout.logprobs, rollout.ref_logprobs, "k1") * mask).sum(-1)  # k1 summed per response
    metrics = {"eval/score": rollout.scores.mean().item(), "eval/kl": kl.mean().item(),
               "eval/length": mask.sum(-1).float().mean().item(),
               "eval/distinct_2": distinct_n([ids[m].tolist() for ids, m in zip(rollout.response_ids, mask)], 2)}
    gold = gold_scores(trainer.gold, rollout)
    if gold is not None:
        metrics["eval/gold"] = gold.mean().item()
    if trainer.samples is not None and cfg.num_samples:
        n = min(len(rollout.prompts), max(cfg.num_samples, 8))
        extra = {"gold": gold[:n].tolist()} if gold is not None else {}
        trainer.samples.write(trainer.update, rollout.prompts[:n], rollout.responses[:n], rollout.scores[:n].tolist(),
                              split=["eval"] * n, kl=kl[:n].tolist(), **extra)
    texts = {"responses": rollout.responses, "prompts": rollout.prompts, "kl": kl.tolist(),
             "scores": rollout.scores.tolist(), "gold": gold.tolist() if gold is not None else None}
    return metrics, texts


def log_evaluation(trainer) -> dict[str, float]:
    """Evaluate a PPOTrainer, log the metrics and let the doctor read them (rank 0's alone)."""
    metrics = trainer.log(trainer.evaluate())
    trainer.control.say(trainer.doctor.observe({"update": trainer.update, **(metrics if trainer.writes else {})}))
    return metrics
