"""The PPO trainer: rollout -> shaped rewards -> GAE -> ppo_epochs over minibatches.

One update, top to bottom (DESIGN.md §1):
  1. rollout   sample responses, score them with policy / reference / critic / reward
  2. shape     per-token -β·KL plus the score on the last real token
  3. advantage GAE(γ, λ), returns = advantages + values, whiten advantages
  4. optimise  ppo_epochs × num_minibatches optimizer steps (clipped surrogate, clipped
               value loss, optional PPO-ptx LM loss), whatever the gradient accumulation
  5. control   KL controller, metrics, samples, doctor, checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from tether import distributed
from tether.algo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    aggregation_weights,
    apply_missing_eos_penalty,
    broadcast_to_tokens,
    clip_scores,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    entropy_loss,
    explained_variance,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    kl_loss,
    lm_loss,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    overlong_penalty,
    returns_to_go,
    rloo_advantages,
    shape_rewards,
    uniform_groups,
)
from tether.checkpoint import read_trainer_state, rng_state, seed_everything, set_rng_state
from tether.config import PPOConfig, config_to_dict
from tether.data import BlockSampler, PromptSampler, left_pad
from tether.doctor import Doctor, Finding, severity_rank
from tether.text_health import distinct_n, repeated_ngram_rate
from tether.generation import BuiltinSampler, GenerationBackend, logprob_gap
from tether.models import eos_token_ids
from tether.precision import FP32, Precision
from tether.rewards import RewardTimeout
from tether.roles import Roles
from tether.rollout import (GenerationSettings, Rollout, collect_rollout, concat_rollouts, select_rows, synced_clock,
                            truncates)
from tether.sharding import full_optimizer_state, local_optimizer_state, local_shard
from tether.tracking import SampleWriter, Tracker
from tether.trainers import adamw, clip_grad_norm

log = logging.getLogger(__name__)


@dataclass
class PPOBatch:
    """What the optimisation phase needs from one rollout."""

    input_ids: Tensor       # (B, P+R)
    attention_mask: Tensor  # (B, P+R)
    response_mask: Tensor   # (B, R) True = real response token
    old_logprobs: Tensor    # (B, R) log π_old, logits / temperature
    ref_logprobs: Tensor    # (B, R) log π_ref
    old_values: Tensor      # (B, R) V_old
    advantages: Tensor      # (B, R) whitened GAE advantages
    returns: Tensor         # (B, R) advantages (unwhitened) + values
    trunk: Optional[Tensor] = None  # (B, P+R, H) frozen lower blocks' output from the rollout (shared_base)
    graph: Optional[tuple] = None   # the rollout's policy logits (B, R, V) and values (B, R) with grad: first step only

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; the step was not applied."""


class TrainingStopped(RuntimeError):
    """The run stopped before its last update; `checkpoint` holds everything needed to resume it."""

    def __init__(self, message: str, checkpoint: Optional[Path] = None, exit_code: int = 1,
                 reason: Optional[str] = None):
        super().__init__(message)
        self.checkpoint, self.exit_code = checkpoint, exit_code
        self.reason = reason or message  # why it stopped, without where it is and how to resume


STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit codes as a shell reports them
LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}  # doctor findings


@contextmanager
def stop_requests(on_signal: Callable[[int], None]):
    """While inside, SIGINT/SIGTERM call `on_signal` once (the run stops after the current update);
    a second one interrupts at once. Outside the main thread signals cannot be caught: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(sig, _frame):
        for s in STOP_SIGNALS:  # the second signal gets Python's default: KeyboardInterrupt / exit
            signal.signal(s, previous[s] if s != signal.SIGINT else signal.default_int_handler)
        on_signal(sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after `step` optimizer steps."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


class PPOTrainer:
    """Handed its collaborators (the four roles in one `Roles` object, data, sinks, the generation
    backend); owns the optimizers, the KL controller and the data position.

    Under torchrun every rank runs this same loop on its share of each batch (tether/distributed.py);
    only rank 0 writes files."""

    def __init__(self, cfg: PPOConfig, roles: Roles, tokenizer, prompts: list[list[int]],
                 tracker: Optional[Tracker] = None, ptx_blocks: Optional[Tensor] = None,
                 run_dir: Optional[Path] = None, device: torch.device = torch.device("cpu"), gold=None,
                 eval_prompts: Optional[list[list[int]]] = None, generation: Optional[GenerationBackend] = None,
                 precision: Precision = FP32):
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
        self.settings = GenerationSettings(
            max_new_tokens=cfg.max_new_tokens, eos_ids=eos_token_ids(tokenizer, roles.generation_model), pad_id=tokenizer.pad_token_id,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop_strings=list(cfg.stop_strings),
            min_new_tokens=cfg.min_new_tokens)
        if (cfg.top_k or cfg.top_p < 1.0) and self.writes:
            log.warning("top_k=%s top_p=%s: responses are sampled from a truncated distribution while PPO scores them "
                        "under the policy's full one (as verl and OpenRLHF do), so updates are off-policy by "
                        "generation/truncation_gap nats per token; top_k=0 top_p=1 keep PPO on-policy",
                        cfg.top_k, cfg.top_p)
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
        self.doctor_stop: Optional[str] = None  # the finding that stops the run (doctor_stop_on)
        self.gold = gold  # a RewardSource never optimised: measures over-optimisation of the proxy
        self.eval_prompts = eval_prompts
        self.first_eval: Optional[dict] = None  # the first evaluation (update 0), kept beside last_eval
        self.update = 0
        self.skipped_updates = 0    # over the run: updates whose score, loss or gradient was not finite
        self.skipped_in_a_row = 0
        self.first_skip_reason: Optional[str] = None
        self.stop_signal: Optional[int] = None
        self.lock = None  # the run directory's lock (tether/rundir.py), released when training ends
        self.first_minibatch_stats: dict[str, float] = {}

    def _optimizer(self, params: list[nn.Parameter], lr: float, total_steps: int):
        optimizer = adamw(params, lr=lr, eps=self.cfg.adam_eps, weight_decay=self.cfg.weight_decay)
        schedule = lr_lambda(self.cfg.lr_schedule, self.cfg.warmup_steps, total_steps)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # --- the run -------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Run the remaining updates with a progress bar; checkpoint when due and at the end."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=self.cfg.total_updates, initial=self.update, desc="ppo", unit="update",
                   disable=not self.cfg.progress or not self.writes, dynamic_ncols=True)
        try:
            with logging_redirect_tqdm(), stop_requests(self._request_stop):  # doctor warnings print above the bar
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

    def _request_stop(self, sig: int) -> None:
        self.stop_signal = sig
        log.warning("%s: stopping after update %d (a second one stops at once, without a checkpoint)",
                    signal.Signals(sig).name, self.update + 1)

    def _run_updates(self, bar) -> dict[str, float]:
        cfg, metrics = self.cfg, {}
        if self.eval_prompts and self.update == 0:
            self.log_evaluation()  # the starting point: the SFT policy on held-out prompts
        while self.update < cfg.total_updates:
            try:
                metrics = self.step()
            except RewardTimeout as err:  # nothing of this update reached the weights: stop where it started
                self._stop(str(err))
            bar.update(1)
            if "reward/score" in metrics:
                bar.set_postfix(score=f"{metrics['reward/score']:.3f}", kl=f"{metrics['kl/mean']:.2f}",
                                clip=f"{metrics['policy/clipfrac']:.2f}", len=f"{metrics['response/length']:.1f}")
            if self.skipped_in_a_row >= cfg.max_skipped_updates:
                self._stop(f"{self.skipped_in_a_row} updates in a row were skipped; the first because "
                           f"{self.first_skip_reason}")
            if distributed.any_rank(self.doctor_stop is not None):  # rank 0's evaluation may be what fired
                self._stop(f"the doctor stopped the run (doctor_stop_on={cfg.doctor_stop_on}): "
                           f"{self.doctor_stop or 'a finding on rank 0'}", report=True)
            if distributed.any_rank(self.stop_signal is not None):  # every rank stops at the same update
                sig = self.stop_signal or signal.SIGTERM
                self._stop(f"stopped by {signal.Signals(sig).name} after update {self.update}", STOP_SIGNALS[sig])
            if cfg.save_every and self.update % cfg.save_every == 0 and self.update < cfg.total_updates:
                self.save_checkpoint()
        return metrics

    def save_checkpoint(self) -> Optional[Path]:
        """checkpoint-N in the run directory, keeping the newest `keep_checkpoints`."""
        from tether.rundir import prune_checkpoints

        if self.run_dir is None:
            return None
        path = self.save(self.run_dir / f"checkpoint-{self.update}")
        if self.writes:
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        return path

    def _stop(self, reason: str, exit_code: int = 1, report: bool = False) -> None:
        """Checkpoint (and with `report`, report.html), then stop the run with one message saying
        where it is and how to go on."""
        path = self.save_checkpoint()
        where = (f"; checkpoint {path}; continue with the same command plus resume=true" if path is not None
                 else "; no run directory, nothing saved")
        if report and path is not None and self.writes:
            where += f"; report {self._write_report()}"
        raise TrainingStopped(reason + where, path, exit_code, reason=reason)

    def _write_report(self) -> str:
        """report.html of the run so far; a failure to draw it never hides why the run stopped."""
        from tether.report import build_report

        try:
            return str(build_report(self.run_dir))
        except Exception as err:  # noqa: BLE001 - the stop's own message matters more
            return f"not written ({type(err).__name__}: {err}; `tether report {self.run_dir}` retries)"

    def save(self, path: Path) -> Path:
        """Policy + tokenizer (plain transformers format), critic, and the training state: everything
        `load_state` needs to continue exactly where this update left off. Every rank calls it (each
        rank's random streams are gathered); rank 0 writes."""
        rng, rng_tensors = rng_state()
        per_rank = distributed.gather_objects({"rng": rng, "rng_tensors": rng_tensors,
                                               "ptx_sampler": self.ptx_sampler.state_dict() if self.ptx_sampler else None})
        state = {"update": self.update, "kl_coef": self.kl_controller.value,
                 "kl_controller": self.kl_controller.state_dict(), "score_moments": self.score_moments.state_dict(),
                 "prompt_sampler": self.prompt_sampler.state_dict(),
                 "ptx_sampler": self.ptx_sampler.state_dict() if self.ptx_sampler else None,
                 **rng, "doctor": self.doctor.state_dict(), "first_eval": self.first_eval,
                 "skipped": [self.skipped_updates, self.skipped_in_a_row, self.first_skip_reason],
                 "world_size": self.world}
        tensors = {"policy_optimizer": full_optimizer_state(self.policy_optimizer.state_dict()),
                   "policy_scheduler": self.policy_scheduler.state_dict(),
                   "shuffle_rng": self.shuffle_generator.get_state(), **rng_tensors}
        if self.critic_optimizer is not None:
            tensors["critic_optimizer"] = full_optimizer_state(self.critic_optimizer.state_dict())
            tensors["critic_scheduler"] = self.critic_scheduler.state_dict()
        if self.world > 1:
            state["ranks"] = [{"rng": r["rng"], "ptx_sampler": r["ptx_sampler"]} for r in per_rank]
            for index, r in enumerate(per_rank):
                tensors.update({f"rank{index}/{k}": v for k, v in r["rng_tensors"].items()})
        # FSDP2 shards are gathered on every rank; rank 0 writes them whole (the one-process format).
        self.roles.save(path, self.tokenizer, state, tensors, write=self.writes)
        distributed.barrier()  # nobody reads or prunes checkpoints before rank 0 has written this one
        return path

    def load_state(self, path: Path, weights: bool = True) -> None:
        """Continue from a checkpoint `save` wrote: weights, optimizers, schedulers, controllers, data
        position, RNG streams, the doctor's memory and the update counter. weights=False: the roles
        already hold the checkpoint's weights (loaded before sharding, tether/pipelines/ppo.py)."""
        path = Path(path)
        state, tensors = read_trainer_state(path)
        if weights:
            self.roles.load(path)
        for (optimizer, scheduler), role in zip(self.optimizers(), ("policy", "critic")):
            optimizer.load_state_dict(local_optimizer_state(optimizer, tensors[f"{role}_optimizer"]))
            scheduler.load_state_dict(tensors[f"{role}_scheduler"])
        saved_world = state.get("world_size", 1)
        if saved_world == self.world:
            state, tensors = self._own_random_streams(state, tensors)
            set_rng_state(state, tensors)
        else:  # weights, optimizers and data position continue; the random streams cannot
            log.warning("the checkpoint was written by %d rank(s), this run has %d: the random streams start afresh, "
                        "so this resume is not exact", saved_world, self.world)
            seed_everything(distributed.rank_seed(self.cfg.seed + state["update"]))
        self.shuffle_generator.set_state(tensors["shuffle_rng"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        if self.ptx_sampler is not None and state["ptx_sampler"] is not None:
            self.ptx_sampler.load_state_dict(state["ptx_sampler"])
        self.doctor.load_state_dict(state["doctor"])
        self.first_eval = state["first_eval"]
        self.skipped_updates, self.skipped_in_a_row, self.first_skip_reason = state["skipped"]
        self.update = state["update"]

    def _own_random_streams(self, state: dict, tensors: dict) -> tuple[dict, dict]:
        """This rank's RNG and ptx-sampler states from a checkpoint written by as many ranks as run now."""
        if self.world == 1:
            return state, tensors
        mine, prefix = state["ranks"][distributed.rank()], f"rank{distributed.rank()}/"
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return {**state, **mine["rng"], "ptx_sampler": mine["ptx_sampler"]}, {**tensors, **own}

    # --- the update ----------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One PPO update; returns its metrics."""
        cfg = self.cfg
        start = synced_clock(self.device)  # CUDA-synchronised: each phase is charged its own kernels
        # 1. Rollout (no grad): sample and score with all the roles; each rank takes its share of the
        # prompts and samples each samples_per_prompt times (a group, in adjacent rows).
        rollout, sampling = self.collect(distributed.share(self.prompt_sampler.next_batch(cfg.batch_size)))
        rollout_s = synced_clock(self.device) - start
        bad = [b for b in distributed.gather_objects(self.non_finite_reason(rollout)) if b]
        if bad:  # before the score statistics or any weight see it; every rank skips together
            return self.skip_update(bad[0])
        # 2. Shape rewards: -β·KL_t per token, processed score on the last real token.
        raw_scores, scores = self.process_scores(rollout)
        if cfg.advantage_estimator == "reinforce_pp_baseline":  # each score minus its group's mean (Hu 2025)
            scores = dr_grpo_advantages(scores, cfg.samples_per_prompt)
        beta = self.kl_controller.value
        in_reward = beta if cfg.kl_placement == "reward" else 0.0
        rewards, kl, kl_reward = shape_rewards(scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask,
                                               in_reward, cfg.kl_estimator)
        # 3. Advantages: GAE (whitened over the global batch's real tokens), or a critic-free estimator.
        batch = self.make_batch(rollout, rewards)
        # 4. Optimise: ppo_epochs passes over shuffled minibatches.
        train_start = synced_clock(self.device)
        before = UpdateUndo(self.optimizers()) if cfg.undo_skipped_updates else None
        try:
            opt_stats = self.optimise(batch)
        except NonFiniteError as err:  # that step was not applied; the rest of the update is abandoned
            for optimizer, _ in self.optimizers():
                optimizer.zero_grad(set_to_none=True)  # nothing accumulated so far may leak into the next step
            if before is not None:  # the update's earlier steps are undone too: weights as before it
                before.restore()
            return self.skip_update(str(err))
        train_s = synced_clock(self.device) - train_start
        self.skipped_in_a_row = 0
        # 5. Control: the KL controller sees the mean summed KL per response (Ziegler et al. 2019).
        kl_per_response = distributed.gather_rows(kl.sum(-1)).mean().item()
        self.kl_controller.update(kl_per_response, cfg.rollout_size)
        # verl's and OpenRLHF's reading of "the KL": a mean per token of each response, then over responses
        lengths = rollout.response_mask.sum(-1).clamp(min=1)
        kl_per_token = distributed.gather_rows(kl.sum(-1) / lengths).mean().item()
        self.generation.sync_weights(self.roles)  # the next rollout samples from the updated policy
        self.update += 1
        metrics = {
            **self.rollout_metrics(rollout, raw_scores, rewards, kl_reward, kl_per_response, beta, batch),
            **opt_stats, **sampling,
            "time/rollout_s": rollout_s, "time/generate_s": rollout.generate_s, "time/score_s": rollout.score_s,
            "time/train_s": train_s, "time/update_s": synced_clock(self.device) - start,
            "ppo/skipped_updates": float(self.skipped_updates), "kl/per_token": kl_per_token,
        }
        self.after_update(rollout, raw_scores, metrics)
        return metrics

    @staticmethod
    def non_finite_reason(rollout: Rollout) -> Optional[str]:
        """Why this rank's rollout must not reach the score statistics or the weights, or None."""
        bad = _first_non_finite(score=rollout.scores, **{"policy log-prob": rollout.logprobs,
                                "reference log-prob": rollout.ref_logprobs, "value": rollout.values})
        if not bad:
            return None
        name, row, value = bad
        return (f"the rollout had a non-finite {name} ({value}) for response {row} {rollout.responses[row][:100]!r}: "
                + ("check the reward model or function for that input" if name == "score" else
                   "lower learning_rate (or check the models for inf/NaN weights)"))

    def optimizers(self) -> list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]:
        """(optimizer, scheduler) of the policy, then of the critic when there is one."""
        pairs = [(self.policy_optimizer, self.policy_scheduler)]
        if self.critic_optimizer is not None:
            pairs.append((self.critic_optimizer, self.critic_scheduler))
        return pairs

    def skip_update(self, reason: str) -> dict[str, float]:
        """Count the update and log why; no non-finite value reached the weights."""
        self.update += 1
        self.skipped_updates += 1
        self.skipped_in_a_row += 1
        self.first_skip_reason = self.first_skip_reason if self.skipped_in_a_row > 1 else reason
        self.say(self.doctor.skipped(self.update, reason))
        metrics = {"ppo/skipped_updates": float(self.skipped_updates)}
        if self.tracker is not None:
            self.tracker.log(metrics, self.update)
        return metrics

    def collect(self, prompts: list[int]) -> tuple[Rollout, dict[str, float]]:
        """This rank's rollout: every prompt sampled samples_per_prompt times, in adjacent rows. With
        dynamic_sampling (DAPO), groups whose scores are all equal (zero group advantage) are dropped
        and further prompts sampled to refill, up to dynamic_sampling_max_rounds extra rounds; what is
        then still missing is filled with dropped groups. Every rank samples every round together."""
        cfg, n = self.cfg, self.cfg.samples_per_prompt
        rollout = self.rollout([i for i in prompts for _ in range(n)])
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
            rounds += 1  # every rank draws the next prompts, so the prompt stream stays the same on all
            more = distributed.share(self.prompt_sampler.next_batch(cfg.batch_size))
            rollout = self.rollout([i for i in more for _ in range(n)])
        groups = (good + spare)[:wanted]
        refilled = max(0, wanted - len(good))
        uniform, refilled = distributed.sum_floats([float(uniform), float(refilled)])
        return concat_rollouts(groups, self.tokenizer.pad_token_id), {
            "sampling/uniform_groups": uniform, "sampling/extra_rounds": float(rounds),
            "sampling/kept_uniform_groups": refilled}

    def rollout(self, indices: list[int]) -> Rollout:
        prompt_ids, prompt_mask = left_pad([self.prompts[i] for i in indices], self.tokenizer.pad_token_id)
        self.roles.eval()
        with self.forwards():
            return collect_rollout(self.roles, self.tokenizer, prompt_ids.to(self.device), prompt_mask.to(self.device),
                                   self.settings, self.cfg.rollout_batch_size, keep_graph=self.reuses_scoring_forward(),
                                   backend=self.generation)

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

    def process_scores(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """(logged score, score used for training): missing-EOS penalty, then normalise, then clip."""
        cfg = self.cfg
        scores = rollout.scores.float()
        if cfg.missing_eos_penalty is not None:
            scores = apply_missing_eos_penalty(scores, rollout.ended, cfg.missing_eos_penalty)
        logged = scores
        if cfg.overlong_buffer:  # DAPO's soft overlong punishment, part of the training reward only
            self._overlong = overlong_penalty(rollout.response_mask.sum(-1), cfg.max_new_tokens, cfg.overlong_buffer,
                                              cfg.overlong_penalty)
            scores = scores + self._overlong
        if cfg.normalize_scores:
            self.score_moments.update(distributed.gather_rows(scores))  # the whole batch's statistics
            scores = self.score_moments.normalize(scores)
        if cfg.score_clip is not None:
            scores = clip_scores(scores, cfg.score_clip)
        return logged, scores

    def make_batch(self, rollout: Rollout, rewards: Tensor) -> PPOBatch:
        advantages, returns = self.advantages(rollout, rewards)
        return PPOBatch(rollout.input_ids, rollout.attention_mask, rollout.response_mask, rollout.logprobs,
                        rollout.ref_logprobs, rollout.values, advantages, returns, rollout.trunk, rollout.graph)

    def advantages(self, rollout: Rollout, rewards: Tensor) -> tuple[Tensor, Tensor]:
        """(advantages, returns), both (B, R), by `advantage_estimator`. Statistics over the batch use
        every rank's rows; groups never straddle ranks (each rank holds whole prompts)."""
        cfg, mask = self.cfg, rollout.response_mask
        estimator = cfg.advantage_estimator
        if estimator == "gae":
            advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
            whiten = cfg.whiten_advantages
        elif estimator.startswith("reinforce_pp"):  # returns-to-go (gamma 1), whitened over the batch
            advantages = returns = returns_to_go(rewards, mask)
            whiten = True
        else:  # one advantage per response from its return, given to every token of it
            sequence_returns = (rewards * mask).sum(-1)  # (B,) score + the KL shaping in the reward
            group = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}[estimator]
            advantages = broadcast_to_tokens(group(sequence_returns, cfg.samples_per_prompt), mask)
            returns = broadcast_to_tokens(sequence_returns, mask)
            whiten = False
        every_advantage, every_mask = distributed.gather_rows(advantages), distributed.gather_rows(mask)
        self._raw_advantage_mean = masked_mean(every_advantage, every_mask).item()
        if whiten:  # mean and variance over every rank's tokens (for REINFORCE++: its eqs. 6-8)
            moments = (masked_mean(every_advantage, every_mask), masked_var(every_advantage, every_mask))
            advantages = masked_whiten(advantages, mask, moments=moments)
        return advantages, returns

    # --- optimisation --------------------------------------------------------------

    def optimise(self, batch: PPOBatch) -> dict[str, float]:
        """Exactly ppo_epochs × num_minibatches optimizer steps (fewer only on a KL early stop)."""
        cfg = self.cfg
        self.roles.train()
        totals: dict[str, list[float]] = defaultdict(list)
        steps, stopped = 0, False
        first, batch = batch, dataclasses.replace(batch, graph=None)
        reuse = first.graph is not None and self.local_micro_batch_size >= len(first)
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(batch), generator=self.shuffle_generator)
            for minibatch in order.split(self.local_minibatch_size):
                if steps == 0 and reuse:  # the whole batch in one micro-batch, as the rollout scored it
                    stats = self.optimizer_step(first)
                    first.graph = None  # a graph serves one backward only
                else:
                    stats = self.optimizer_step(select_rows(batch, minibatch.to(batch.input_ids.device)))
                if steps == 0:
                    self.first_minibatch_stats = dict(stats)
                steps += 1
                for key, value in stats.items():
                    totals[key].append(value)
                if cfg.target_kl_stop is not None and stats["policy/approx_kl"] > cfg.target_kl_stop:
                    stopped = True
                    break
            if stopped:
                break
        metrics = {k: (max(v) if k == "policy/ratio_max" else sum(v) / len(v)) for k, v in totals.items()}
        # The first minibatch sees exactly the rollout's policy: approx-KL 0, ratio 1 (the doctor checks).
        metrics["policy/first_minibatch_approx_kl"] = self.first_minibatch_stats["policy/approx_kl"]
        metrics["policy/first_minibatch_ratio_mean"] = self.first_minibatch_stats["policy/ratio_mean"]
        metrics["ppo/optimizer_steps"] = float(steps)
        metrics["ppo/early_stopped"] = float(stopped)
        metrics["policy/lr"] = self.policy_scheduler.get_last_lr()[0]
        if self.critic_scheduler is not None:
            metrics["value/lr"] = self.critic_scheduler.get_last_lr()[0]
        return metrics

    def optimizer_step(self, minibatch: PPOBatch) -> dict[str, float]:
        """Accumulate gradients over micro-batches, add PPO-ptx, clip, step both optimizers."""
        cfg = self.cfg
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
        _check_finite(losses, self.update)
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
        """Clipped surrogate (+ KL in the loss, − entropy bonus) on one micro-batch, and its statistics.
        Every term combines its tokens by `loss_aggregation`, with whole-minibatch denominators."""
        cfg = self.cfg
        mask = micro.response_mask
        weights = None if cfg.loss_aggregation == "token_mean" else aggregation_weights(
            mask, cfg.loss_aggregation, num_tokens, num_sequences, cfg.max_new_tokens)
        length = mask.shape[1]
        logits = micro.graph[0] if micro.graph is not None else self.roles.policy_logits(
            micro.input_ids, micro.attention_mask, length, self.tokenizer.pad_token_id, micro.trunk)
        logprobs = logprobs_from_logits(logits, micro.input_ids[:, -length:], cfg.temperature)
        # PPO eq. 7 (clipped surrogate); ratio is exactly 1 on the first minibatch (N-details item 15).
        loss, pg = clipped_policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, cfg.clip_eps,
                                       cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip, num_tokens=num_tokens,
                                       weights=weights)
        if cfg.kl_placement == "loss":
            kl_term, _ = kl_loss(logprobs, micro.ref_logprobs, mask, cfg.kl_estimator, num_tokens=num_tokens,
                                 weights=weights)
            loss = loss + self.kl_controller.value * kl_term
        if cfg.entropy_coef > 0:
            entropy = entropy_from_logits(logits, cfg.temperature)
            ent_loss, _ = entropy_loss(entropy, mask, num_tokens=num_tokens, weights=weights)
            loss = loss + cfg.entropy_coef * ent_loss
        else:
            entropy = entropy_from_logits(logits.detach(), cfg.temperature)
        return loss, {  # 0-dim tensors, detached: read once per optimizer step (optimizer_step)
            "policy/loss": pg["loss"], "policy/approx_kl": pg["approx_kl"], "policy/clipfrac": pg["clipfrac"],
            "policy/ratio_mean": pg["ratio_mean"], "policy/ratio_max": pg["ratio_max"],
            "policy/entropy": masked_mean(entropy.detach(), mask),
        }

    def ptx_backward(self) -> float:
        """PPO-ptx (Ouyang et al. 2022 eq. 2): ptx_coef × LM loss on pretraining text, same loss as SFT."""
        blocks = self.ptx_sampler.next_batch(self.cfg.ptx_batch_size).to(self.device)
        mask = torch.ones_like(blocks)
        with self.forwards():
            logits = self.roles.lm_logits(blocks, mask)
        loss, stats = lm_loss(logits, blocks, mask)
        _check_finite([("ptx loss", loss.detach())], self.update)
        # Each rank's own blocks; the gradients are summed over ranks, so each counts 1/world of the mean.
        (self.cfg.ptx_coef / self.world * loss).backward()
        return distributed.sum_floats([stats["loss"].item()])[0] / self.world

    def _clip_and_step(self, optimizer, scheduler, name: str) -> float:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        distributed.sum_gradients(params)  # data parallel: every rank's share (FSDP2 shards: summed in backward)
        norm = clip_grad_norm(params, self.cfg.max_grad_norm) if not _injected_fault(name) else float("nan")
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"non-finite {name} gradient norm at update {self.update}; the step was not "
                                 "applied. Lower learning_rate, or check the reward for extreme values.")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # --- metrics, samples, control -------------------------------------------------

    def rollout_metrics(self, rollout: Rollout, raw_scores: Tensor, rewards: Tensor, kl_reward: Tensor,
                        kl_per_response: float, beta: float, batch: PPOBatch) -> dict[str, float]:
        """Metrics of the whole batch: under torchrun, of every rank's rows gathered in batch order."""
        g = distributed.gather_rows
        mask, values, returns = g(rollout.response_mask), g(rollout.values), g(batch.returns)
        ref_logprobs = g(rollout.ref_logprobs)
        scores = g(raw_scores)
        responses = distributed.gather_lists([ids[m].tolist() for ids, m in zip(rollout.response_ids,
                                                                                 rollout.response_mask)])
        gold = {}
        if self.gold is not None:
            self._last_gold = self.gold.score(rollout.prompts, rollout.responses, rollout.input_ids,
                                              rollout.attention_mask)
            gold_scores = g(self._last_gold.float())
            gold = {"gold/score": gold_scores.mean().item(), "gold/score_std": gold_scores.std(unbiased=False).item()}
        critic = {}
        if self.critic_optimizer is not None:
            critic = {"value/explained_variance": explained_variance(values, returns, mask).item(),
                      "value/mean": masked_mean(values, mask).item()}
        overlong = {"reward/overlong_penalty": g(self._overlong).mean().item()} if self.cfg.overlong_buffer else {}
        return {
            **gold, **critic, **overlong,
            **self.engine_gap_metrics(rollout), **self.truncation_gap_metrics(),
            "batch/prompts": float(len(scores) // self.cfg.samples_per_prompt),
            "batch/responses": float(len(scores)),
            "reward/score": scores.mean().item(),
            "reward/score_std": scores.std(unbiased=False).item(),
            "reward/kl_penalty": g(kl_reward.sum(-1)).mean().item(),
            "reward/total": g(rewards.sum(-1)).mean().item(),
            "kl/mean": kl_per_response,
            "kl/coef": beta,
            "returns/mean": masked_mean(returns, mask).item(),
            "advantages/mean": self._raw_advantage_mean,
            "response/length": mask.sum(-1).float().mean().item(),
            "response/eos_rate": g(rollout.ended).float().mean().item(),
            "response/distinct_1": distinct_n(responses, 1),
            "response/distinct_2": distinct_n(responses, 2),
            "response/repeated_3gram_rate": repeated_ngram_rate(responses, 3),
            "response/ref_perplexity": reference_perplexity(ref_logprobs, mask),
        }

    def truncation_gap_metrics(self) -> dict[str, float]:
        """How far the sampled distribution (top_k / top_p / min_new_tokens) is from the policy's that PPO
        scores: mean log q(a) - log π(a) per response token, as the built-in sampler measured it."""
        take = getattr(self.generation, "take_truncation_gap", None)
        if take is None or not truncates(self.settings):
            return {}
        tokens = self.generation.gap_tokens
        gap = take() or 0.0
        total, count = distributed.sum_floats([gap * tokens, float(tokens)])
        return {"generation/truncation_gap": total / max(count, 1.0)}

    def engine_gap_metrics(self, rollout: Rollout) -> dict[str, float]:
        """How far the generation engine's log-probs are from the trainer's (absent for the built-in sampler)."""
        if rollout.engine_logprobs is None:
            return {}
        total, largest = logprob_gap(rollout.engine_logprobs, rollout.logprobs, rollout.response_mask)
        total, count = distributed.sum_floats([total.item(), rollout.response_mask.sum().item()])
        return {"generation/logprob_gap": total / max(count, 1.0),
                "generation/logprob_gap_max": distributed.max_float(largest.item())}

    def after_update(self, rollout: Rollout, raw_scores: Tensor, metrics: dict[str, float]) -> None:
        cfg = self.cfg
        if self.eval_prompts and (self.update % cfg.eval_every == 0 or self.update == cfg.total_updates):
            # Every rank evaluates the same prompts with the same random numbers (a sharded model
            # needs every rank in each forward); rank 0 logs and writes.
            evaluation = self.evaluate()
            metrics.update(evaluation if self.writes else {})
        if self.tracker is not None:
            self.tracker.log(metrics, self.update)
        responses = distributed.gather_lists(rollout.responses)
        self.say(self.doctor.observe({"update": self.update, **metrics})
                 + self.doctor.observe_phrases(self.update, responses))
        due = self.update == 1 or self.update == cfg.total_updates or (
            cfg.sample_every and self.update % cfg.sample_every == 0)
        if self.samples is not None and due and cfg.num_samples:
            # One response per prompt group (the first of its samples_per_prompt), so they are different prompts.
            rows = list(range(0, len(rollout), cfg.samples_per_prompt))[: cfg.num_samples]
            extra = {"gold": [self._last_gold[i].item() for i in rows]} if self.gold is not None else {}
            self.samples.write(self.update, [rollout.prompts[i] for i in rows], [rollout.responses[i] for i in rows],
                               [raw_scores[i].item() for i in rows], split=["train"] * len(rows), **extra)

    def say(self, findings: list[Finding]) -> None:
        """The doctor's new findings go to the log (once each) and to doctor.jsonl, which the report
        and `tether doctor` show; one at doctor_stop_on's severity or worse stops the run."""
        stop_on = self.cfg.doctor_stop_on
        for finding in findings:
            if self.writes:
                log.log(LOG_LEVELS[finding.severity], "doctor: %s", finding.message)
                if self.run_dir is not None:
                    with (self.run_dir / "doctor.jsonl").open("a") as f:
                        f.write(json.dumps(finding.to_dict()) + "\n")
            if stop_on != "never" and severity_rank(finding.severity) >= severity_rank(stop_on):
                self.doctor_stop = self.doctor_stop or f"{finding.rule} ({finding.severity}) at update {finding.update}"

    # --- held-out evaluation -------------------------------------------------------

    def log_evaluation(self) -> dict[str, float]:
        metrics = self.evaluate()
        if self.tracker is not None:
            self.tracker.log(metrics, self.update)
        self.say(self.doctor.observe({"update": self.update, **(metrics if self.writes else {})}))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Proxy score, gold score, KL and text health on the fixed held-out prompts.

        Sampled from a random stream of its own, seeded the same at every evaluation: evaluating
        never changes what training samples (eval_every is not a training setting), and every
        evaluation draws the same random numbers, so before/after differ by the policy alone."""
        cfg = self.cfg
        prompt_ids, prompt_mask = left_pad(self.eval_prompts, self.tokenizer.pad_token_id)
        self.roles.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed + 3)
            with self.forwards():
                rollout = collect_rollout(self.roles, self.tokenizer, prompt_ids.to(self.device), prompt_mask.to(
                    self.device), self.settings, cfg.rollout_batch_size or cfg.batch_size)
        mask = rollout.response_mask
        kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1)  # k1 summed per response
        metrics = {"eval/score": rollout.scores.mean().item(), "eval/kl": kl.mean().item(),
                   "eval/length": mask.sum(-1).float().mean().item(),
                   "eval/distinct_2": distinct_n([ids[m].tolist() for ids, m in zip(rollout.response_ids, mask)], 2)}
        gold = self.gold.score(rollout.prompts, rollout.responses, rollout.input_ids, rollout.attention_mask) \
            if self.gold is not None else None
        if gold is not None:
            metrics["eval/gold"] = gold.mean().item()
        if self.samples is not None and cfg.num_samples:
            n = min(len(rollout.prompts), max(cfg.num_samples, 8))
            extra = {"gold": gold[:n].tolist()} if gold is not None else {}
            self.samples.write(self.update, rollout.prompts[:n], rollout.responses[:n], rollout.scores[:n].tolist(),
                               split=["eval"] * n, kl=kl[:n].tolist(), **extra)
        self.last_eval = {"responses": rollout.responses, "prompts": rollout.prompts, "kl": kl.tolist(),
                          "scores": rollout.scores.tolist(), "gold": gold.tolist() if gold is not None else None}
        self.first_eval = self.first_eval or self.last_eval
        return metrics


class UpdateUndo:
    """A CPU copy of everything an update's optimizer steps change — trainable weights, AdamW
    moments and step counts, learning rates, schedulers — so that a skipped update leaves them
    exactly as they were before it (an update of several steps may fail after its first).
    Sharded weights (FSDP2) are copied shard by shard, each rank its own."""

    def __init__(self, optimizers: list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]):
        self.optimizers = optimizers
        with torch.no_grad():
            self.saved = [self._save(optimizer, scheduler) for optimizer, scheduler in optimizers]

    @staticmethod
    def _save(optimizer, scheduler) -> dict:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {"weights": [local_shard(p).to("cpu", copy=True) for p in params],
                "state": [{k: local_shard(v).to("cpu", copy=True) if torch.is_tensor(v) else v
                           for k, v in optimizer.state[p].items()} if p in optimizer.state else None for p in params],
                "lrs": [group["lr"] for group in optimizer.param_groups],
                "scheduler": scheduler.state_dict()}

    def restore(self) -> None:
        with torch.no_grad():
            for (optimizer, scheduler), saved in zip(self.optimizers, self.saved):
                params = [p for group in optimizer.param_groups for p in group["params"]]
                for p, weight, state in zip(params, saved["weights"], saved["state"]):
                    local_shard(p).copy_(weight)
                    if state is None:
                        optimizer.state.pop(p, None)  # no step had been taken on it before this update
                    else:
                        for key, value in state.items():
                            current = optimizer.state[p][key]
                            if torch.is_tensor(current):
                                local_shard(current).copy_(value)
                            else:
                                optimizer.state[p][key] = value
                for group, lr in zip(optimizer.param_groups, saved["lrs"]):
                    group["lr"] = lr
                scheduler.load_state_dict(saved["scheduler"])


def reference_perplexity(ref_logprobs: Tensor, mask: Tensor) -> float:
    """exp of the reference's mean negative log-prob per response token (at the sampling temperature):
    gibberish raises it; a policy collapsed onto what the reference finds likely lowers it."""
    return math.exp(-masked_mean(ref_logprobs.float(), mask).item())


def _first_non_finite(**tensors: Tensor) -> Optional[tuple[str, int, float]]:
    """(name, batch row, value) of the first NaN/inf in the first tensor holding one, else None."""
    for name, tensor in tensors.items():
        bad = ~torch.isfinite(tensor.float())
        if bad.any():
            first = bad.flatten().nonzero()[0, 0]
            return name, int(bad.nonzero()[0, 0]), tensor.flatten()[first].item()
    return None


NONFINITE_FAULT_ENV = "TETHER_FAULT_NONFINITE_STEP"
_policy_steps = [0]


def _injected_fault(name: str) -> bool:
    """Fault injection for benchmarks/chaos.py: with TETHER_FAULT_NONFINITE_STEP=N the N-th policy
    step of the process sees a non-finite gradient norm (as a real one would). Unset: never."""
    target = os.environ.get(NONFINITE_FAULT_ENV)
    if not target or name != "policy":
        return False
    _policy_steps[0] += 1
    return _policy_steps[0] == int(target)


def _check_finite(losses: list[tuple[str, Tensor]], update: int) -> None:
    """Raises on every rank when a loss is not finite on any (no rank may go on to the gradient sum
    alone); one host sync for the whole list."""
    finite = bool(torch.stack([torch.isfinite(loss).all() for _, loss in losses]).all()) if losses else True
    if not distributed.any_rank(not finite):
        return
    bad = [(what, loss.item()) for what, loss in losses if not torch.isfinite(loss).all()]
    what, value = bad[0] if bad else ("loss on another rank", float("nan"))
    raise NonFiniteError(f"non-finite {what} ({value}) at update {update}; nothing was applied to the "
                         "weights. Lower learning_rate, or check the reward for extreme values.")
