"""The PPO trainer: rollout -> shaped rewards -> advantages -> ppo_epochs over minibatches.

One update, top to bottom (DESIGN.md §1), each phase a call in `PPOTrainer.step`:
  1. rollout   sample responses, score them with policy / reference / critic / reward
  2. shape     per-token -β·KL plus the score on the last real token (batch.py)
  3. advantage GAE(γ, λ) and whitening, or a critic-free estimator (batch.py)
  4. optimise  ppo_epochs × num_minibatches optimizer steps (clipped surrogate, clipped
               value loss, optional PPO-ptx LM loss), whatever the gradient accumulation
  5. control   KL controller, metrics (metrics.py), evaluation, doctor, samples and stops
               (control.py), checkpoints (state.py)
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tether import distributed
from tether.algo import AdaptiveKLController, FixedKLController, RunningMoments, clipped_value_loss, lm_loss
from tether.config import PPOConfig, config_to_dict
from tether.data import BlockSampler, PromptSampler, left_pad
from tether.doctor import Doctor
from tether.generation import BuiltinSampler, GenerationBackend
from tether.precision import FP32, Precision
from tether.rewards import RewardUnavailable, reward_part_names, rows_of
from tether.roles import Roles
from tether.rollout import Rollout, collect_rollout, select_rows, synced_clock
from tether.tracking import SampleWriter, Tracker
from tether.trainers import NonFiniteError, adamw, clip_and_step, lr_lambda
from tether.trainers.ppo.batch import (PPOBatch, ShapedRewards, batch_with_advantages, collect_groups,
                                       generation_settings, rollout_rewards, training_scores)
from tether.trainers.ppo.control import (RunControl, Stop, UpdateUndo, abandon_update, check_finite_losses,
                                         injected_fault, non_finite_reason, stop_requests)
from tether.trainers.ppo.evaluation import evaluate, gold_scores, log_evaluation
from tether.trainers.ppo.loss import policy_objective
from tether.trainers.ppo.metrics import (engine_gap_metrics, kl_means, reward_part_metrics, rollout_metrics,
                                         truncation_gap_metrics)
from tether.trainers.ppo.state import load_trainer, save_checkpoint, save_trainer


class PPOTrainer:
    """Handed its collaborators (the four roles in one `Roles` object, data, sinks, the generation
    backend); owns the optimizers, the KL controller and the data position.

    Under torchrun every rank runs this same loop on its share of each batch (tether/distributed.py);
    only rank 0 writes files."""

    def __init__(self, cfg: PPOConfig, roles: Roles, tokenizer, prompts: list[list[int]],
                 tracker: Optional[Tracker] = None, ptx_blocks: Optional[Tensor] = None,
                 run_dir: Optional[Path] = None, device: torch.device = torch.device("cpu"), gold=None,
                 eval_prompts: Optional[list[list[int]]] = None, generation: Optional[GenerationBackend] = None,
                 precision: Precision = FP32, prompt_columns: Optional[dict[str, list]] = None,
                 eval_columns: Optional[dict[str, list]] = None):
        self.cfg, self.roles, self.precision = cfg, roles, precision
        self.tokenizer, self.prompts, self.tracker, self.device = tokenizer, prompts, tracker, device
        self.generation = generation or BuiltinSampler()
        self.world = distributed.world_size()
        self.writes = distributed.is_main()  # rank 0 alone writes logs, samples, reports and checkpoints
        # Each rank takes an equal share of every batch, minibatch and micro-batch (checked by the pipeline).
        self.local_minibatch_size = cfg.minibatch_size // self.world
        self.local_micro_batch_size = cfg.micro_batch_size // self.world
        self.run_dir = Path(run_dir) if run_dir else None
        self.samples = SampleWriter(self.run_dir / "samples.jsonl") if self.run_dir and self.writes else None
        self.settings = generation_settings(cfg, tokenizer, roles.generation_model, warn=self.writes)
        self.kl_controller = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                              else FixedKLController(cfg.kl_coef))
        self.score_moments = RunningMoments()
        self.prompt_sampler = PromptSampler(len(prompts), seed=cfg.seed)
        self.ptx_sampler = (BlockSampler(ptx_blocks, seed=distributed.rank_seed(cfg.seed + 1))
                            if ptx_blocks is not None else None)
        self.shuffle_generator = torch.Generator().manual_seed(cfg.seed + 2)
        total_steps = cfg.total_updates * cfg.ppo_epochs * cfg.num_minibatches
        policy_steps = (cfg.total_updates - cfg.critic_warmup_updates) * cfg.ppo_epochs * cfg.num_minibatches
        # Disjoint parameter lists: one role's step never touches the other's weights or Adam moments.
        self.policy_optimizer, self.policy_scheduler = self._optimizer(roles.trainable("policy"), cfg.learning_rate,
                                                                       policy_steps)
        # Critic-free estimators: no critic, so no critic optimizer (and no value loss, no value metrics).
        self.critic_optimizer, self.critic_scheduler = (self._optimizer(
            roles.trainable("critic"), cfg.critic_learning_rate or cfg.learning_rate, total_steps)
            if cfg.uses_critic else (None, None))
        self.doctor = Doctor(config_to_dict(cfg))
        self.control = RunControl(cfg, self.doctor, self.samples, self.run_dir, self.writes)
        self.gold = gold  # a RewardSource never optimised: measures over-optimisation of the proxy
        self.eval_prompts = eval_prompts
        # The prompt records' other fields, one value per prompt ({"answer": [...]}): the reward reads them.
        self.prompt_columns, self.eval_columns = prompt_columns, eval_columns
        self.first_eval: Optional[dict] = None  # the first evaluation's texts (update 0), kept beside last_eval
        self.last_eval: Optional[dict] = None
        self.update = 0
        self.lock = None  # the run directory's lock (tether/rundir.py), released when training ends
        self.on_update: Optional[Callable[[dict], None]] = None  # tether.ppo(on_update=...): each update's row
        self.first_minibatch_stats: dict[str, float] = {}  # the last update's first step: ratio 1, approx-KL 0

    # --- one update ----------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One PPO update; returns its metrics."""
        cfg = self.cfg
        start = synced_clock(self.device)  # CUDA-synchronised: each phase is charged its own kernels
        # 1. Rollout (no grad): sample and score with all the roles; each rank takes its share of the
        # prompts and samples each samples_per_prompt times (a group, in adjacent rows).
        rollout, sampling = self.collect(self.next_prompts())
        rollout_s = synced_clock(self.device) - start
        bad = [b for b in distributed.gather_objects(non_finite_reason(rollout)) if b]
        if bad:  # before the score statistics or any weight see it; every rank skips together
            return self.skip_update(bad[0])
        # 2. Shape rewards: -β·KL_t per token (β in the loss instead with kl_placement=loss), the
        # processed score on the last real token.
        beta = self.kl_controller.value
        shaped = rollout_rewards(rollout, cfg, self.score_moments, beta if cfg.kl_placement == "reward" else 0.0)
        # 3. Advantages by advantage_estimator, whitened over every rank's real tokens where it asks.
        batch, advantage_mean = batch_with_advantages(rollout, shaped.rewards, cfg)
        # 4. Optimise: ppo_epochs passes over shuffled minibatches.
        train_start = synced_clock(self.device)
        before = UpdateUndo(self.optimizers()) if cfg.undo_skipped_updates else None
        try:
            opt_stats = self.optimise(batch)
        except NonFiniteError as err:  # that step was not applied; the rest of the update is abandoned
            abandon_update(self.optimizers(), before)
            return self.skip_update(str(err))
        # 5. Control: KL controller, metrics, evaluation when due, the doctor, samples.
        times = {"time/rollout_s": rollout_s, "time/generate_s": rollout.generate_s, "time/score_s": rollout.score_s,
                 "time/train_s": synced_clock(self.device) - train_start}
        return self.after_update(rollout, shaped, batch.returns, advantage_mean, beta,
                                 {**opt_stats, **sampling, **times}, start)

    def after_update(self, rollout: Rollout, shaped: ShapedRewards, returns: Tensor, advantage_mean: float,
                     beta: float, stats: dict[str, float], start: float) -> dict[str, float]:
        """Step 5 of an update that trained: its metrics (`stats` from the earlier steps among them),
        logged, read by the doctor, with an evaluation when due; the KL controller and the engine follow."""
        cfg = self.cfg
        self.control.trained()
        # The KL controller sees the mean summed KL per response (Ziegler et al. 2019).
        kl_per_response, kl_per_token = kl_means(shaped.kl, rollout.response_mask)
        self.kl_controller.update(kl_per_response, cfg.rollout_size)
        self.generation.sync_weights(self.roles)  # the next rollout samples from the updated policy
        self.update += 1
        gold = gold_scores(self.gold, rollout)
        gaps = {**engine_gap_metrics(rollout), **truncation_gap_metrics(self.generation, self.settings)}
        metrics = {
            **rollout_metrics(rollout, shaped, returns, advantage_mean, kl_per_response, beta, gold,
                              self.critic_optimizer is not None, cfg.samples_per_prompt, gaps),
            **stats, "time/update_s": synced_clock(self.device) - start,
            "ppo/skipped_updates": float(self.control.skipped_updates), "kl/per_token": kl_per_token,
            **reward_part_metrics(rollout, reward_part_names(getattr(self.roles, "reward", None))),
        }
        if self.eval_prompts and (self.update % cfg.eval_every == 0 or self.update == cfg.total_updates):
            # Every rank evaluates the same prompts with the same random numbers (a sharded model
            # needs every rank in each forward); rank 0 logs and writes.
            evaluation = self.evaluate()
            metrics.update(evaluation if self.writes else {})
        self.log(metrics)
        self.control.record(self.update, metrics, rollout, shaped.logged_scores, gold)
        return metrics

    def skip_update(self, reason: str) -> dict[str, float]:
        self.update += 1
        return self.log(self.control.skipped(self.update, reason))

    def log(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.tracker is not None:  # set by the pipeline once the run directory is ready
            self.tracker.log(metrics, self.update)
        return metrics

    # --- the run -------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Run the remaining updates with a progress bar; checkpoint when due and at the end."""
        bar = tqdm(total=self.cfg.total_updates, initial=self.update, desc="ppo", unit="update",
                   disable=not self.cfg.progress or not self.writes, dynamic_ncols=True)
        try:  # doctor warnings print above the bar; a stop signal stops the run after the current update
            with logging_redirect_tqdm(), stop_requests(lambda sig: self.control.request_stop(sig, self.update + 1)):
                metrics = self._run_updates(bar)
            if self.run_dir is not None:
                self.save(self.run_dir / "final")
        finally:
            bar.close()
            if self.tracker is not None:
                self.tracker.close()
            if self.lock is not None:
                self.lock.release()
        return metrics

    def _run_updates(self, bar) -> dict[str, float]:
        cfg, metrics = self.cfg, {}
        if self.eval_prompts and self.update == 0:
            self.log_evaluation()  # the starting point: the SFT policy on held-out prompts
        while self.update < cfg.total_updates:
            try:
                metrics = self.step()
            except RewardUnavailable as err:  # nothing of this update reached the weights: stop where it started
                raise Stop(str(err)).error(self.save_checkpoint(), self.run_dir, self.writes)
            bar.update(1)
            if self.on_update is not None:
                self.on_update(dict(metrics))
            if "reward/score" in metrics:
                bar.set_postfix(score=f"{metrics['reward/score']:.3f}", kl=f"{metrics['kl/mean']:.2f}",
                                clip=f"{metrics['policy/clipfrac']:.2f}", len=f"{metrics['response/length']:.1f}")
            stop = self.control.stop_after(self.update)
            if stop is not None:  # checkpoint (a doctor stop: report.html too), then one message saying how to go on
                raise stop.error(self.save_checkpoint(), self.run_dir, self.writes)
            if cfg.save_every and self.update % cfg.save_every == 0 and self.update < cfg.total_updates:
                self.save_checkpoint()
        return metrics

    # --- the rollout ---------------------------------------------------------------

    def next_prompts(self) -> list[int]:
        """This rank's share of the next batch of prompts; every rank draws, so the stream stays the same on all."""
        return distributed.share(self.prompt_sampler.next_batch(self.cfg.batch_size))

    def collect(self, prompts: list[int]) -> tuple[Rollout, dict[str, float]]:
        """This rank's rollout: every prompt sampled samples_per_prompt times, in adjacent rows; with
        dynamic_sampling, groups of equal scores replaced by further prompts' (batch.collect_groups)."""
        return collect_groups(prompts, self.rollout, self.next_prompts, self.cfg, self.tokenizer.pad_token_id)

    def rollout(self, indices: list[int]) -> Rollout:
        prompt_ids, prompt_mask = left_pad([self.prompts[i] for i in indices], self.tokenizer.pad_token_id)
        self.roles.eval()
        with self.forwards():
            return collect_rollout(self.roles, self.tokenizer, prompt_ids.to(self.device), prompt_mask.to(self.device),
                                   self.settings, self.cfg.rollout_batch_size, keep_graph=self.reuses_scoring_forward(),
                                   backend=self.generation, columns=rows_of(self.prompt_columns, indices))

    def forwards(self):
        """Where every model forward runs: under bf16 autocast for precision=bf16-mixed (backward then
        follows the dtypes autocast chose); log-probs and losses stay fp32 (tether/algo upcasts)."""
        return self.precision.forward_context(self.device)

    def reuses_scoring_forward(self) -> bool:
        """The first optimizer step sees the whole batch in one micro-batch with the rollout's weights:
        its policy and critic forwards are the rollout's, kept with their graph."""
        cfg = self.cfg
        return (cfg.reuse_scoring_forward and cfg.num_minibatches == 1 and cfg.gradient_accumulation_steps == 1
                and not cfg.gradient_checkpointing and not self.policy_frozen())

    # Steps 2 and 3 one at a time, for callers that build a batch by hand (tests, benchmarks).
    def process_scores(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """(logged score, score used for training) of `rollout` (batch.training_scores)."""
        return training_scores(rollout, self.cfg, self.score_moments)[:2]

    def make_batch(self, rollout: Rollout, rewards: Tensor) -> PPOBatch:
        return batch_with_advantages(rollout, rewards, self.cfg)[0]

    # --- optimisation --------------------------------------------------------------

    def optimise(self, batch: PPOBatch) -> dict[str, float]:
        """Exactly ppo_epochs × num_minibatches optimizer steps (fewer only on a KL early stop)."""
        cfg = self.cfg
        self.roles.train()
        totals: dict[str, list[float]] = defaultdict(list)
        steps, stopped, first_stats = 0, False, {}
        first, batch = batch, dataclasses.replace(batch, graph=None)
        reuse = first.graph is not None and self.local_micro_batch_size >= len(first)
        # Each epoch's shuffle is drawn as the epoch starts: a KL early stop draws none for the epochs it skips.
        minibatches = (minibatch for _epoch in range(cfg.ppo_epochs) for minibatch in torch.randperm(
            len(batch), generator=self.shuffle_generator).split(self.local_minibatch_size))
        for minibatch in minibatches:
            if steps == 0 and reuse:  # the whole batch in one micro-batch, as the rollout scored it
                stats = self.optimizer_step(first)
                first.graph = None  # a graph serves one backward only
            else:
                stats = self.optimizer_step(select_rows(batch, minibatch.to(batch.input_ids.device)))
            first_stats, steps = first_stats or dict(stats), steps + 1
            for key, value in stats.items():
                totals[key].append(value)
            stopped = cfg.target_kl_stop is not None and stats["policy/approx_kl"] > cfg.target_kl_stop
            if stopped:
                break
        metrics = {k: (max(v) if k == "policy/ratio_max" else sum(v) / len(v)) for k, v in totals.items()}
        # The first minibatch sees exactly the rollout's policy: approx-KL 0, ratio 1 (the doctor checks).
        self.first_minibatch_stats = first_stats
        metrics["policy/first_minibatch_approx_kl"] = first_stats["policy/approx_kl"]
        metrics["policy/first_minibatch_ratio_mean"] = first_stats["policy/ratio_mean"]
        metrics["ppo/optimizer_steps"] = float(steps)
        metrics["ppo/early_stopped"] = float(stopped)
        metrics["policy/lr"] = self.policy_scheduler.get_last_lr()[0]
        if self.critic_scheduler is not None:
            metrics["value/lr"] = self.critic_scheduler.get_last_lr()[0]
        return metrics

    def optimizer_step(self, minibatch: PPOBatch) -> dict[str, float]:
        """Accumulate gradients over micro-batches, add PPO-ptx, clip, step both optimizers."""
        # Token-level normalisation over the whole minibatch (every rank's share): accumulating k
        # micro-batches, then summing over ranks, gives exactly the gradient of one pass over it.
        num_tokens, num_sequences = distributed.sum_floats([minibatch.response_mask.sum().item(), len(minibatch)])
        # Statistics and loss checks stay on the device until the last micro-batch: one host sync
        # per optimizer step for them, not one per statistic per micro-batch.
        sums: dict[str, Tensor] = {}
        ratio_max = torch.zeros((), device=minibatch.input_ids.device)
        losses: list[tuple[str, Tensor]] = []
        for micro_index in torch.arange(len(minibatch)).split(self.local_micro_batch_size):
            micro = select_rows(minibatch, micro_index.to(minibatch.input_ids.device))
            weight = micro.response_mask.sum() / num_tokens
            micro_stats = self.micro_step(micro, num_tokens, num_sequences, losses)
            ratio_max = torch.maximum(ratio_max, micro_stats.pop("policy/ratio_max"))
            for key, value in micro_stats.items():
                sums[key] = sums.get(key, 0.0) + weight * value
        check_finite_losses(losses, self.update)
        local = torch.stack([*sums.values(), ratio_max]).tolist()
        stats = dict(zip(sums, distributed.sum_floats(local[:-1])))  # token-weighted over all ranks
        stats["policy/ratio_max"] = distributed.max_float(local[-1])
        frozen = self.policy_frozen()
        stats["ptx/loss"] = self.ptx_backward() if self.ptx_sampler is not None and not frozen else 0.0
        stats["policy/grad_norm"] = 0.0 if frozen else self._clip_and_step(
            self.policy_optimizer, self.policy_scheduler, "policy")
        if self.critic_optimizer is not None:
            stats["value/grad_norm"] = self._clip_and_step(self.critic_optimizer, self.critic_scheduler, "value")
        return dict(stats)

    def policy_frozen(self) -> bool:
        """During critic warmup the policy is measured but not trained."""
        return self.update < self.cfg.critic_warmup_updates

    def micro_step(self, micro: PPOBatch, num_tokens: float, num_sequences: float,
                   losses: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
        """Forward + backward of policy and critic losses on one micro-batch; its statistics as 0-dim
        tensors. The losses are appended to `losses`, checked finite before any optimizer step."""
        cfg = self.cfg
        length = micro.response_mask.shape[1]
        frozen = self.policy_frozen()
        with torch.set_grad_enabled(not frozen), self.forwards():
            loss, stats = self.policy_loss(micro, num_tokens, num_sequences)
        if not frozen:
            losses.append(("policy loss", loss.detach()))
            loss.backward()
        if self.critic_optimizer is None:  # critic-free estimators
            return stats
        with self.forwards():
            values = (micro.graph[1] if micro.graph is not None
                      else self.roles.values(micro.input_ids, micro.attention_mask, length, micro.trunk))
        v_loss, vs = clipped_value_loss(values, micro.old_values, micro.returns, micro.response_mask,
                                        cfg.value_clip_eps, num_tokens=num_tokens)
        losses.append(("value loss", v_loss.detach()))
        (cfg.vf_coef * v_loss).backward()
        return {**stats, "value/loss": vs["loss"], "value/clipfrac": vs["clipfrac"]}

    def policy_loss(self, micro: PPOBatch, num_tokens: float, num_sequences: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped surrogate (+ KL in the loss, − entropy bonus) on one micro-batch, and its statistics."""
        length, pad_id = micro.response_mask.shape[1], self.tokenizer.pad_token_id
        logits = micro.graph[0] if micro.graph is not None else self.roles.policy_logits(
            micro.input_ids, micro.attention_mask, length, pad_id, micro.trunk)
        return policy_objective(logits, micro, self.cfg, self.kl_controller.value, num_tokens, num_sequences)

    def ptx_backward(self) -> float:
        """PPO-ptx (Ouyang et al. 2022 eq. 2): ptx_coef × LM loss on pretraining text, same loss as SFT."""
        blocks = self.ptx_sampler.next_batch(self.cfg.ptx_batch_size).to(self.device)
        mask = torch.ones_like(blocks)
        with self.forwards():
            logits = self.roles.lm_logits(blocks, mask)
        loss, stats = lm_loss(logits, blocks, mask)
        check_finite_losses([("ptx loss", loss.detach())], self.update)
        # Each rank's own blocks; the gradients are summed over ranks, so each counts 1/world of the mean.
        (self.cfg.ptx_coef / self.world * loss).backward()
        return distributed.sum_floats([stats["loss"].item()])[0] / self.world

    def _clip_and_step(self, optimizer, scheduler, name: str) -> float:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return clip_and_step(optimizer, scheduler, params, self.cfg.max_grad_norm,
                             f"non-finite {name} gradient norm at update {self.update}; the step was not applied. "
                             "Lower learning_rate, or check the reward for extreme values.", injected_fault(name))

    def _optimizer(self, params: list[nn.Parameter], lr: float, total_steps: int):
        optimizer = adamw(params, lr=lr, eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)
        schedule = lr_lambda(self.cfg.lr_schedule, self.cfg.warmup_steps, total_steps)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def optimizers(self) -> list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]:
        """(optimizer, scheduler) of the policy, then of the critic when there is one."""
        pairs = [(self.policy_optimizer, self.policy_scheduler), (self.critic_optimizer, self.critic_scheduler)]
        return [(optimizer, scheduler) for optimizer, scheduler in pairs if optimizer is not None]

    # --- evaluation, checkpoints, resume (evaluation.py, state.py) ---------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation; its texts are kept as last_eval (and the first ones as first_eval)."""
        metrics, self.last_eval = evaluate(self)
        self.first_eval = self.first_eval or self.last_eval
        return metrics

    log_evaluation = log_evaluation  # evaluate, then log the metrics and let the doctor read them
    save = save_trainer  # (path) -> path: weights, tokenizer and the whole training state
    save_checkpoint = save_checkpoint  # () -> checkpoint-N in the run directory (None without one)
    load_state = load_trainer  # (path, weights=True): continue exactly where `save` left off

    # The run's skip counters live in its control; tools and tests read them here.
    skipped_in_a_row = property(lambda self: self.control.skipped_in_a_row)
    first_skip_reason = property(lambda self: self.control.first_skip_reason)
