"""Typed configuration: one dataclass per stage, a YAML file plus `key=value` overrides.

Every field is documented where it is declared (`help` metadata); `tether <stage> --help`
prints them all with their defaults. Bad keys, wrong types and inconsistent sizes are
rejected here, before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from tether.data import _looks_like_path
from tether.doctor import thresholds_from  # the thresholds are declared beside the rules that use them
from tether.precision import PrecisionError, precision_name


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


# Precision and attention fields, the same in every stage (tether/precision.py, docs/scaling.md).
PrecisionName = Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true"]
PRECISION_HELP = "Numeric precision: 'fp32'; 'bf16-mixed' (trainable weights and optimizer state fp32, forward/backward under bf16 autocast, frozen roles stored in bf16); 'bf16-true' (everything bf16: small learning rates barely move the weights); 'auto' = bf16-mixed on CUDA GPUs with bf16, fp32 elsewhere. fp16-mixed is refused (no loss scaler). See docs/scaling.md."
DTYPE_HELP = "Replaced by precision (float32 = fp32, bfloat16 = bf16-true); still read, not with precision."
ATTENTION_HELP = "Attention kernel passed to transformers: 'sdpa', 'eager', 'flash_attention_2' (needs flash-attn), ...; null = transformers' default (sdpa where supported)."


@dataclass
class PPOConfig:
    # --- models -------------------------------------------------------------
    policy: str = opt(None, "Policy: a local path or hub id of an AutoModelForCausalLM (required).")
    reference: Optional[str] = opt(None, "Frozen reference model path; default: a copy of the initial policy.")
    critic: Optional[str] = opt(None, "Backbone for the critic; default: the reward model if it is a model, else the policy.")
    reward_model: Optional[str] = opt(None, "Reward model path (AutoModelForSequenceClassification, 1 label).")
    reward_fn: Optional[str] = opt(None, "Reward function 'module:function' taking list[str] responses, returning list[float]; it is also given prompts= and any field of the prompt records it names (e.g. answer=).")
    reward_fns: list[str] = opt([], "Several reward functions 'module:function', summed with reward_weights into one score; each is logged as reward/<function name>.")
    reward_weights: list[float] = opt([], "One weight per reward_fns entry (default: 1 each).")
    reward_timeout_s: Optional[float] = opt(None, "A reward_fn (or gold_reward_fn) call that takes longer than this many seconds stops the run with a checkpoint and one line naming the function (null = wait for ever).")
    reward_tokenizer: Optional[str] = opt(None, "Tokenizer of the reward model when it differs from the policy's; default: the reward model's own.")
    reward_url: Optional[str] = opt(None, "A reward server 'http://host:port/score' (e.g. `tether serve-reward`; protocol in docs/reward-server.md): prompts and responses are POSTed as JSON, one score per response comes back.")
    reward_url_timeout_s: float = opt(30.0, "reward_url: seconds to wait for the server's answer to one batch before that try counts as failed.")
    reward_url_retries: int = opt(2, "reward_url: tries after the first for a refused or dropped connection, a timeout or an HTTP 5xx (short backoff); then the run stops with a checkpoint.")
    reward_url_batch_size: int = opt(64, "reward_url: responses per request.")
    reward_url_concurrency: int = opt(4, "reward_url: requests in flight at once.")
    gold_reward_fn: Optional[str] = opt(None, "A second scorer 'module:function', never optimised, evaluated on the same samples (gold/score): shows reward-model over-optimisation.")
    tokenizer: Optional[str] = opt(None, "Policy tokenizer path; default: the policy path.")
    precision: PrecisionName = opt("auto", PRECISION_HELP)
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = opt(None, DTYPE_HELP)
    attn_implementation: Optional[str] = opt(None, ATTENTION_HELP)
    fp32_lm_head: bool = opt(False, "Under bf16-mixed, compute the policy's output projection (the logits) in fp32.")
    tf32: bool = opt(True, "On CUDA, let fp32 matmuls use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation; torch.backends.cuda.matmul.allow_tf32): precision=fp32 runs, and the fp32 LM head under bf16-mixed.")
    device: str = opt("auto", "Device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory in policy and critic.")
    reuse_scoring_forward: bool = opt(True, "The rollout's policy and critic forwards keep their graph and serve as the "
                                            "first optimizer step's forwards (same weights, same inputs): two forwards "
                                            "fewer per update. Applies with placement=separate, num_minibatches=1, "
                                            "gradient_accumulation_steps=1, one rollout chunk, no gradient checkpointing; "
                                            "false frees those activations until the optimisation phase.")
    release_memory: bool = opt(False, "glibc (Linux): give every allocation of 1 MiB or more its own mapping, returned to the OS when freed. glibc otherwise lets activation-sized blocks fragment its heap: measured on SmolLM2 (benchmarks/memory.py) -1.2 GB steady-state peak with adapters on every block, at ~40% slower optimisation on CPU.")

    # --- where the four roles live -------------------------------------------
    placement: Literal["separate", "shared_base"] = opt("separate", "'separate': four models, full fine-tuning. 'shared_base': one copy of the base weights with LoRA adapters (policy adapter; reference = adapters off; critic = second adapter + value head; reward = a LoRA reward model from `tether reward lora_rank=...` on the same base, or any reward_model / reward_fn).")
    lora_rank: int = opt(0, "LoRA rank of the policy and critic adapters (placement=shared_base; 0 = no LoRA).")
    lora_alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha / rank).")
    lora_target_modules: list[str] = opt([], "Layer names LoRA wraps; default per architecture (attention and MLP projections).")
    lora_layers: int = opt(0, "Adapters only on the top N transformer blocks (0 = all). The frozen blocks below are then computed once per rollout and shared by policy, reference, critic and reward in every epoch.")

    # --- data ---------------------------------------------------------------
    prompts: str = opt(None, "Prompt data: .jsonl/.json/.csv/.parquet file, a save_to_disk directory or a hub dataset id (required).")
    prompt_field: str = opt("prompt", "Field holding the prompt text or chat messages.")
    prompt_split: str = opt("train", "Split to read when `prompts` is a dataset with splits.")
    max_prompt_length: int = opt(128, "Prompts longer than this (in tokens) are truncated or rejected.")
    overlong_prompts: Literal["truncate", "error"] = opt("truncate", "'truncate' keeps the last max_prompt_length tokens; 'error' rejects the dataset.")
    eval_prompts: Optional[str] = opt(None, "Held-out prompts (same formats as prompts) scored at update 0, every eval_every updates and at the end.")
    eval_every: int = opt(10, "Evaluate on eval_prompts every N updates.")
    eval_max_prompts: int = opt(128, "Use at most this many eval prompts (the first ones).")

    # --- generation ---------------------------------------------------------
    max_new_tokens: int = opt(32, "Maximum response length in tokens.")
    min_new_tokens: int = opt(0, "Tokens sampled before EOS or a stop string may end a response (EOS is not "
                                 "sampled until then; log-probs stay the policy's, as with top_k/top_p). = max_new_tokens: "
                                 "every response has exactly that length (throughput comparisons with trainers that never stop).")
    temperature: float = opt(1.0, "Sampling temperature; log-probs for PPO use logits / temperature too.")
    top_k: int = opt(0, "Sample from the k most likely tokens (0 = off). PPO still scores the full distribution (as verl and OpenRLHF): the gap is logged as generation/truncation_gap; keep it off for training.")
    top_p: float = opt(1.0, "Nucleus sampling mass (1.0 = off). As top_k: scored under the full distribution, gap logged.")
    stop_strings: list[str] = opt([], "Extra strings that end a response (EOS always does).")
    generation_backend: Literal["builtin", "vllm"] = opt("builtin", "Who samples: 'builtin' (tether's batched sampler, any device) or 'vllm' (a vLLM engine colocated on each rank's GPU, `pip install 'tether[vllm]'`; weights or the policy adapter pushed after every update; log-probs for PPO are still the trainer's, the gap is logged as generation/logprob_gap).")
    vllm_gpu_memory_utilization: float = opt(0.3, "Share of each GPU's memory the vLLM engine may take (generation_backend=vllm); the rest is training's.")
    vllm_sleep: bool = opt(True, "generation_backend=vllm: the engine releases its GPU memory (KV cache dropped, weights offloaded to CPU) after each generation, while tether scores and optimises, and wakes for the weight push and the next generation.")
    data_parallel: Literal["ddp", "fsdp2"] = opt("ddp", "Under torchrun: 'ddp' (every rank holds whole models, gradients summed over ranks) or 'fsdp2' (torch FSDP2 `fully_shard`: every transformer block of the trained roles sharded over the ranks, gathered for each forward; see docs/scaling.md). One process: ignored.")
    fsdp_frozen: Literal["shard", "replicate"] = opt("shard", "data_parallel=fsdp2: the frozen roles (reference, reward model) sharded like the trained ones, or a whole copy on every rank (more memory, no gathers when scoring).")

    # --- batch sizes --------------------------------------------------------
    batch_size: int = opt(16, "Prompts per PPO update (over all ranks). Each is sampled samples_per_prompt times: the update trains on batch_size x samples_per_prompt responses (logged as batch/prompts and batch/responses).")
    samples_per_prompt: int = opt(1, "Responses sampled per prompt, in adjacent rows: the group that GRPO, Dr. GRPO, RLOO and REINFORCE++-baseline compare (n >= 2 for those).")
    num_minibatches: int = opt(1, "Minibatches per PPO epoch; optimizer steps per update = ppo_epochs x num_minibatches.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per minibatch (memory only: the update is the same).")
    rollout_batch_size: int = opt(0, "Prompts generated per forward chunk during rollout (0 = batch_size).")

    # --- PPO ----------------------------------------------------------------
    total_updates: int = opt(100, "Number of PPO updates (rollout + optimisation rounds).")
    ppo_epochs: int = opt(4, "Passes over each rollout batch.")
    clip_eps: float = opt(0.2, "Policy ratio clip range epsilon (PPO eq. 7).")
    clip_eps_low: Optional[float] = opt(None, "Lower clip epsilon if asymmetric (default clip_eps).")
    clip_eps_high: Optional[float] = opt(None, "Upper clip epsilon if asymmetric, e.g. 0.28 (DAPO clip-higher).")
    dual_clip: Optional[float] = opt(None, "Dual-clip constant c > 1 bounding the loss of negative advantages (Ye et al. 2020).")
    value_clip_eps: Optional[float] = opt(0.2, "Value clip range (PPO2); null disables value clipping.")
    vf_coef: float = opt(0.1, "Weight of the value loss (critic has its own optimizer; scales its gradient).")
    entropy_coef: float = opt(0.0, "Entropy bonus weight (0 by default, as in the RLHF reference implementations).")
    gamma: float = opt(1.0, "Discount factor; 1 for short language episodes.")
    lam: float = opt(0.95, "GAE lambda.")
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = opt("gae", "'gae': a critic and GAE (PPO-RLHF). Critic-free (no critic is loaded or trained): 'grpo' (group mean/std, Shao et al. 2024), 'dr_grpo' (group mean only, Liu et al. 2025), 'rloo' (leave-one-out mean, Ahmadian et al. 2024), 'reinforce_pp' (token returns-to-go whitened over the batch, Hu 2025), 'reinforce_pp_baseline' (the same after subtracting the group mean score).")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = opt("token_mean", "How per-token policy losses combine: 'token_mean' over the minibatch's tokens (PPO, DAPO); 'seq_mean_token_mean' (mean per response, then over responses: original GRPO); 'seq_mean_token_sum' (sum per response, mean over responses); 'seq_mean_token_sum_norm' (sum / (responses x max_new_tokens): Dr. GRPO).")
    whiten_advantages: bool = opt(True, "Shift GAE advantages to mean 0, std 1 over the batch's real tokens (advantage_estimator=gae; REINFORCE++ always whitens, the group estimators never do).")
    target_kl_stop: Optional[float] = opt(None, "Stop an update's remaining minibatches when approx-KL exceeds this.")
    critic_warmup_updates: int = opt(0, "First updates that train only the critic (policy frozen; they count in total_updates), "
                                        "so advantages mean something before the policy moves (verl critic_warmup).")

    # --- KL to the reference ------------------------------------------------
    kl_coef: float = opt(0.05, "Initial KL coefficient beta.")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "Per-token KL estimator (Schulman): k1 is the unbiased choice in the reward.")
    kl_placement: Literal["reward", "loss"] = opt("reward", "'reward': -beta*KL per token in the reward (PPO-RLHF); 'loss': beta*KL added to the policy loss.")
    adaptive_kl: bool = opt(False, "Adapt beta toward kl_target (Ziegler et al. 2019).")
    kl_target: float = opt(6.0, "Target KL for the adaptive controller, in nats per response (the summed KL of a response, `kl/mean`; Ziegler et al. 2019). verl and OpenRLHF compare their target with a mean per token (`kl/per_token`): multiply such a target by the mean response length to port it.")
    kl_horizon: int = opt(10000, "Horizon of the adaptive KL controller.")

    # --- reward processing --------------------------------------------------
    reward_append_eos: bool = opt(True, "Score responses cut at max_new_tokens with an EOS appended: the reward model reads "
                                         "its score at the EOS, as `tether reward` trains it. false scores the text as is.")
    missing_eos_penalty: Optional[float] = opt(None, "Subtract this from the score of responses that never emit EOS.")
    score_clip: Optional[float] = opt(None, "Clip scores to [-score_clip, score_clip].")
    normalize_scores: bool = opt(False, "Normalise scores with running mean/std (PPO-max).")
    overlong_buffer: int = opt(0, "DAPO overlong reward shaping: a penalty rising linearly from 0 to overlong_penalty over the last N tokens before max_new_tokens (0 = off).")
    overlong_penalty: float = opt(1.0, "The penalty at max_new_tokens for overlong_buffer > 0.")
    dynamic_sampling: bool = opt(False, "DAPO dynamic sampling: drop prompt groups whose samples_per_prompt scores are all equal (zero group advantage) and sample more prompts to refill the batch; the drops are logged.")
    dynamic_sampling_max_rounds: int = opt(3, "Extra sampling rounds to refill a batch with dynamic_sampling; what is still missing after them is filled with dropped groups.")
    allow_k1_kl_loss: bool = opt(False, "Accept kl_placement=loss with kl_estimator=k1 (its gradient is zero in expectation: the KL brake does nothing); refused unless set, with a loud warning when set.")

    # --- optimisation -------------------------------------------------------
    learning_rate: float = opt(1e-5, "Policy learning rate.")
    critic_learning_rate: Optional[float] = opt(None, "Critic learning rate (default: learning_rate).")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt("linear", "Schedule after warmup; linear decays to 0 (reference implementations).")
    warmup_steps: int = opt(0, "Optimizer steps of linear warmup.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_eps: float = opt(1e-5, "Adam epsilon (1e-5, TF style; N-details item 13).")
    max_grad_norm: Optional[float] = opt(1.0, "Clip gradient global norm (null = off).")

    # --- PPO-ptx ------------------------------------------------------------
    ptx_data: Optional[str] = opt(None, "Pretraining text for PPO-ptx (file, save_to_disk dir or hub id); null = off.")
    ptx_field: str = opt("text", "Text field of ptx_data records.")
    ptx_coef: float = opt(1.0, "Weight of the pretraining LM loss added to the policy loss (InstructGPT used 27.8).")
    ptx_batch_size: int = opt(4, "Pretraining blocks per optimizer step.")
    ptx_block_size: int = opt(128, "Tokens per pretraining block.")

    # --- run ----------------------------------------------------------------
    output_dir: str = opt("runs/ppo", "Run directory: config.yaml, metrics.jsonl, samples.jsonl, checkpoints.")
    seed: int = opt(0, "Random seed (python, numpy, torch, data order).")
    save_every: int = opt(0, "Save a checkpoint every N updates (0 = only at the end).")
    keep_checkpoints: int = opt(0, "Keep only the newest N checkpoint-* directories (0 = all).")
    resume: bool = opt(False, "Continue the run in output_dir from its latest complete checkpoint, exactly (weights, optimizers, schedulers, RNG states, data position, logs truncated to the checkpoint). Refused if the config differs from the run's, except keys safe to change: total_updates/max_steps, save_every, keep_checkpoints, eval_every, sample_every, num_samples, logging, progress, num_threads, doctor, doctor_stop_on, output_dir (a moved run directory), undo_skipped_updates.")
    overwrite: bool = opt(False, "Replace the run already in output_dir: its config, logs and checkpoints are deleted, once every check before training has passed.")
    undo_skipped_updates: bool = opt(True, "Keep a CPU copy of the trainable weights and optimizer state at the start of each update, so that an update skipped for a non-finite loss or gradient after some of its optimizer steps leaves them exactly as before it. false saves that copy's memory and time (a skipped update then keeps its earlier steps).")
    max_skipped_updates: int = opt(3, "Stop, with a checkpoint, after this many updates in a row skipped because a score, loss or gradient was not finite.")
    sample_every: int = opt(10, "Write samples.jsonl rows every N updates (and the first and last).")
    num_samples: int = opt(4, "How many samples to write each time.")
    log_with: list[str] = opt([], "Extra metric sinks: 'tensorboard', 'wandb' (JSONL is always written).")
    wandb_project: str = opt("tether", "Weights & Biases project.")
    progress: bool = opt(True, "Show a progress bar.")
    doctor: dict = opt({}, "Thresholds of the training doctor's rules, e.g. {flat_updates: 30, hacking_score_gain: 2} (or doctor.flat_updates=30 on the command line); every one is documented in docs/doctor.md.")
    doctor_stop_on: Literal["never", "warning", "critical"] = opt("never", "Stop the run, with a checkpoint and report.html, at the first doctor finding of this severity or worse ('never': findings are printed and written to doctor.jsonl only).")
    num_threads: int = opt(0, "torch CPU threads (0 = number of cores, never more).")

    def __post_init__(self) -> None:
        # Minibatches and micro-batches count responses (rows): batch_size prompts x samples_per_prompt.
        self.rollout_size = self.batch_size * max(self.samples_per_prompt, 1)
        self.minibatch_size = self.rollout_size // max(self.num_minibatches, 1)
        self.micro_batch_size = self.minibatch_size // max(self.gradient_accumulation_steps, 1)

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    def validate(self) -> None:
        """Reject missing and inconsistent settings before anything loads."""
        _require(self, "policy", "prompts")
        _check_estimator(self)
        _check_model_paths(self, "policy", "reference", "critic", "reward_model", "tokenizer", "reward_tokenizer")
        _check_reward_source(self)
        _check_reward_url(self)
        _positive(self, "batch_size", "num_minibatches", "gradient_accumulation_steps", "total_updates",
                  "ppo_epochs", "max_new_tokens", "max_prompt_length", "ptx_batch_size", "ptx_block_size")
        _positive(self, "samples_per_prompt")
        if self.samples_per_prompt == 1:
            _divisible(self, "batch_size", "num_minibatches")
        else:
            _divisible(self, "rollout_size", "num_minibatches", note="rollout_size = batch_size x samples_per_prompt")
        _divisible(self, "minibatch_size", "gradient_accumulation_steps",
                   note="minibatch_size = batch_size x samples_per_prompt / num_minibatches")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got "
                              f"{self.min_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise ConfigError("stop_strings holds an empty string, which would end every response after its first "
                              "token; remove it (an unset shell variable in stop_strings=[$STOP] gives one)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        if self.gold_reward_fn is not None and ":" not in self.gold_reward_fn:
            raise ConfigError(f"gold_reward_fn must look like 'package.module:function', got {self.gold_reward_fn!r}")
        _positive(self, "eval_every", "eval_max_prompts", "max_skipped_updates")
        _non_negative(self, "top_k", "warmup_steps", "save_every", "sample_every", "num_samples",
                      "rollout_batch_size", "kl_coef", "vf_coef", "entropy_coef", "num_threads", "critic_warmup_updates",
                      "keep_checkpoints", "ptx_coef", "weight_decay")
        _positive_if_set(self, "max_grad_norm", "value_clip_eps", "clip_eps_low", "clip_eps_high", "score_clip",
                         "critic_learning_rate", "target_kl_stop", "reward_timeout_s")
        for key in ("adam_eps",):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.clip_eps_low is not None and self.clip_eps_low >= 1:
            raise ConfigError(f"clip_eps_low must be in (0, 1): the ratio's lower bound is 1 - clip_eps_low, got "
                              f"{self.clip_eps_low}")
        if self.critic_warmup_updates >= self.total_updates:
            raise ConfigError(f"critic_warmup_updates={self.critic_warmup_updates} leaves no update for the policy; "
                              f"it must be below total_updates={self.total_updates}")
        for key in ("clip_eps", "learning_rate", "kl_target", "kl_horizon"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1, got {self.dual_clip}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        _check_lora(self)
        _check_precision(self)
        _check_attention(self)
        _check_device(self)
        if self.placement == "shared_base":
            if self.lora_rank < 1:
                raise ConfigError("placement=shared_base trains LoRA adapters on one base: set lora_rank (e.g. 16)")
            for key in ("reference", "critic"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{key}={getattr(self, key)!r} is a model of its own, but placement=shared_base "
                                      f"builds the {key} from the policy's base; unset {key}, or use "
                                      "placement=separate for four separate models")
        elif self.lora_rank:
            raise ConfigError("lora_rank is set but placement=separate trains full models; use placement=shared_base "
                              "for LoRA PPO (policy and critic adapters on one base)")
        if self.generation_backend == "vllm":  # what the pinned vLLM release cannot serve
            check_engine_settings(self)
        _non_negative(self, "overlong_buffer", "overlong_penalty", "dynamic_sampling_max_rounds")
        if self.overlong_buffer > self.max_new_tokens:
            raise ConfigError(f"overlong_buffer={self.overlong_buffer} is longer than max_new_tokens="
                              f"{self.max_new_tokens}; the penalty zone must fit inside the response (DAPO uses ~1/4)")
        _check_doctor(self)
        unknown = set(self.log_with) - {"tensorboard", "wandb"}
        if unknown:
            raise ConfigError(f"log_with: unknown sink(s) {sorted(unknown)}; allowed: tensorboard, wandb")


# --- generation_backend=vllm: what the pinned release can serve, refused before anything loads ---

VLLM_RELEASE = "0.33.0"  # the `tether[vllm]` pin; tether/generation.py is written against it
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
# Model classes registered without SupportsLoRA (vllm/model_executor/models/*.py): enable_lora fails
# at engine start. Only families a tether user plausibly trains; vLLM refuses the others itself.
VLLM_ARCHITECTURES_WITHOUT_LORA = ("GPT2LMHeadModel", "GPTJForCausalLM", "BloomForCausalLM", "FalconForCausalLM",
                                   "StableLmForCausalLM")


def engine_lora_rank(rank: int) -> int:
    """vLLM's max_lora_rank for an adapter of `rank`: the smallest value it accepts that holds it
    (the adapter keeps its own rank)."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ConfigError(f"lora_rank={rank}: vLLM {VLLM_RELEASE} serves LoRA adapters up to rank {VLLM_LORA_RANKS[-1]}; "
                      f"set lora_rank <= {VLLM_LORA_RANKS[-1]}, or generation_backend=builtin")


def check_engine_settings(cfg) -> None:
    """generation_backend=vllm settings the pinned release cannot serve, refused before anything loads."""
    if cfg.placement != "shared_base":
        return
    engine_lora_rank(cfg.lora_rank)
    refused = [a for a in model_architectures(cfg.policy) if a in VLLM_ARCHITECTURES_WITHOUT_LORA]
    if refused:
        raise ConfigError(f"generation_backend=vllm with placement=shared_base samples with the policy adapter as a "
                          f"LoRA, but vLLM {VLLM_RELEASE} has no LoRA support for {refused[0]} ({cfg.policy}); use "
                          "placement=separate (the engine then receives the full weights) or "
                          "generation_backend=builtin")


# Where a PPO run's score comes from: exactly one of these is set.
REWARD_SOURCES = {"reward_model": "a model path", "reward_fn": "'module:function'",
                  "reward_fns": "a list of 'module:function'", "reward_url": "an http(s):// reward server"}
RESERVED_REWARD_NAMES = ("score", "score_std", "kl_penalty", "total", "overlong_penalty")  # reward/<name> taken


def _check_reward_source(cfg: "PPOConfig") -> None:
    chosen = [name for name in REWARD_SOURCES if getattr(cfg, name) not in (None, [], "")]
    if len(chosen) != 1:
        options = ", ".join(f"{name} ({what})" for name, what in REWARD_SOURCES.items())
        raise ConfigError(f"set exactly one of {options}; {'got ' + ' and '.join(chosen) if chosen else 'none is set'}")
    for key, spec in [("reward_fn", cfg.reward_fn)] + [("reward_fns", s) for s in cfg.reward_fns]:
        if spec is not None and ":" not in spec:
            raise ConfigError(f"{key} must look like 'package.module:function', got {spec!r}")
    if cfg.reward_weights and len(cfg.reward_weights) != len(cfg.reward_fns):
        raise ConfigError(f"reward_weights has {len(cfg.reward_weights)} weights for {len(cfg.reward_fns)} reward_fns; "
                          "give one weight per function (or none: each weighs 1)")
    names = [reward_fn_name(spec) for spec in cfg.reward_fns]
    for name in names:
        if names.count(name) > 1 or name in RESERVED_REWARD_NAMES:
            raise ConfigError(f"reward_fns: two functions are named {name!r}" if names.count(name) > 1 else
                              f"reward_fns: a function named {name!r} would be logged as reward/{name}, which tether "
                              "logs already; rename the function")


def reward_fn_name(spec: str) -> str:
    """The name a reward function's score is logged under: 'pkg.mod:exact_match' -> 'exact_match'."""
    return spec.rpartition(":")[2]


def _check_reward_url(cfg: "PPOConfig") -> None:
    if cfg.reward_url is not None:
        check_reward_url(cfg.reward_url)
    _positive(cfg, "reward_url_batch_size", "reward_url_concurrency")
    _non_negative(cfg, "reward_url_retries")
    if not cfg.reward_url_timeout_s > 0:
        raise ConfigError(f"reward_url_timeout_s must be > 0, got {cfg.reward_url_timeout_s}")


def check_reward_url(url: str) -> None:
    """A reward server is reached over HTTP: anything else (a path, a typo'd scheme) fails here, naming the fix."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"reward_url must be an http:// or https:// address such as http://127.0.0.1:8000/score, "
                          f"got {url!r} (a reward model directory goes in reward_model)")
    try:
        parts.port  # an out-of-range or non-numeric port raises here
    except ValueError as err:
        raise ConfigError(f"reward_url {url!r} has a bad port: {err}") from err


def model_architectures(path: str) -> list[str]:
    """The `architectures` a model's config.json names (empty when it cannot be read here)."""
    config = Path(path) / "config.json"
    if config.is_file():
        return list(json.loads(config.read_text()).get("architectures") or [])
    try:
        from transformers import AutoConfig

        return list(AutoConfig.from_pretrained(path).architectures or [])
    except OSError:  # not found or offline: vLLM refuses an unsupported model itself when it starts
        return []


# --- shared checks ---------------------------------------------------------------------------


def _check_doctor(cfg: "PPOConfig") -> None:
    if not isinstance(cfg.doctor, dict):
        raise ConfigError(f"doctor must be a mapping of threshold: value (e.g. {{flat_updates: 30}}), got {cfg.doctor!r}")
    try:
        thresholds_from(cfg.doctor)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _check_estimator(cfg: "PPOConfig") -> None:
    """Combinations of estimator, group size, KL handling and critic options that cannot work."""
    grouped = cfg.advantage_estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
    if grouped and cfg.samples_per_prompt < 2:
        raise ConfigError(f"advantage_estimator={cfg.advantage_estimator} compares the responses to one prompt: set "
                          "samples_per_prompt >= 2 (4-16 is usual); with 1 every advantage is the raw score")
    if cfg.dynamic_sampling and cfg.samples_per_prompt < 2:
        raise ConfigError("dynamic_sampling drops prompt groups whose scores are all equal: set samples_per_prompt >= 2")
    if cfg.advantage_estimator.startswith("reinforce_pp") and cfg.kl_placement != "reward":
        raise ConfigError(f"advantage_estimator={cfg.advantage_estimator} puts the token-level KL in the reward (Hu "
                          "2025): set kl_placement=reward")
    if not cfg.uses_critic:
        for key in ("critic", "critic_learning_rate"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"{key} is set but advantage_estimator={cfg.advantage_estimator} trains no critic; "
                                  f"unset {key}, or use advantage_estimator=gae")
        if cfg.critic_warmup_updates:
            raise ConfigError(f"critic_warmup_updates={cfg.critic_warmup_updates} warms up a critic, but "
                              f"advantage_estimator={cfg.advantage_estimator} has none; set it to 0")
    if cfg.kl_placement == "loss" and cfg.kl_estimator == "k1":
        message = ("kl_placement=loss with kl_estimator=k1: the gradient of the k1 estimate is zero in expectation "
                   "(E_pi[grad log pi] = 0), so the KL term does not hold the policy near the reference. Use "
                   "kl_estimator=k2 (the reverse-KL gradient, on-policy) or k3 (GRPO's choice), or put the KL in the "
                   "reward (kl_placement=reward, where k1 is right)")
        if not cfg.allow_k1_kl_loss:
            raise ConfigError(message + "; allow_k1_kl_loss=true runs it anyway")
        import logging

        logging.getLogger(__name__).warning("allow_k1_kl_loss=true: %s", message)


def _check_device(cfg: Any) -> None:
    """A device this machine has: `device=cuda` without a GPU fails here, not deep inside the first forward."""
    import torch

    if cfg.device == "auto":
        return
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"device={cfg.device!r} is not a device: use auto, cpu, cuda or cuda:N ({err})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device} but this machine has no usable CUDA GPU (torch "
                              f"{torch.__version__}); use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={cfg.device} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(f"device={cfg.device}: tether runs on cpu or cuda (auto picks)")


def _check_precision(cfg: Any) -> None:
    """fp16-mixed, an unknown precision, or precision beside the old dtype key: refused before anything loads."""
    try:
        precision_name(cfg.precision, cfg.dtype)
    except PrecisionError as err:
        raise ConfigError(str(err)) from err


def _check_attention(cfg: Any) -> None:
    if cfg.attn_implementation is not None and not str(cfg.attn_implementation).strip():
        raise ConfigError("attn_implementation is empty; use null for transformers' default, or sdpa, eager, "
                          "flash_attention_2")


@dataclass
class LoraSettings:
    """The LoRA fields of a stage's config, as the adapters are built from them."""

    rank: int = 16
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=list)  # empty: DEFAULT_TARGETS of the architecture
    top_layers: int = 0  # adapters only on the top N transformer blocks (0 = all)
    dropout: float = 0.0


def _check_lora(cfg: Any) -> None:
    _non_negative(cfg, "lora_rank", "lora_layers")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if not 0 <= getattr(cfg, "lora_dropout", 0.0) < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")


def lora_settings(cfg: Any):
    """The LoRA fields of a stage's config as LoraSettings (None when lora_rank is 0)."""
    if not cfg.lora_rank:
        return None
    return LoraSettings(rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules),
                        top_layers=cfg.lora_layers, dropout=getattr(cfg, "lora_dropout", 0.0))


def _require(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) in (None, ""):
            raise ConfigError(f"{key} is required: {_help(cfg, key)}")


def _positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")


def _check_model_paths(cfg: Any, *keys: str) -> None:
    """A model given as a local path must exist (a hub id is left to the hub): a typo fails here, in
    one line, before anything loads."""
    for key in keys:
        value = getattr(cfg, key)
        if value is None or not isinstance(value, str):
            continue
        path = Path(value).expanduser()
        if not path.exists():
            if _looks_like_path(value):
                raise ConfigError(f"{key}={value}: no such directory; point {key} at a model directory "
                                  "(with config.json) or a hub id")
        elif path.is_file():
            raise ConfigError(f"{key}={value} is a file; {key} takes a model directory (save_pretrained) or a hub id")
        elif not any((path / name).is_file() for name in ("config.json", "adapter_config.json", "tokenizer.json",
                                                           "tokenizer_config.json")):
            raise ConfigError(f"{key}={value} holds no model (no config.json or adapter_config.json); point it at "
                              "the directory save_pretrained wrote (a run's final/)")


def check_hub_ids(cfg: Any, *keys: str) -> None:
    """A hub id that cannot load fails before anything loads or is written, naming the key: with
    HF_HUB_OFFLINE set, one missing from the local cache; without it, one neither cached nor
    reachable (the hub's own retries take about a minute before an error that names no key).
    (Called by the stages as they start, not by `validate`: a config can be checked on any machine.)"""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, str) and value and not Path(value).expanduser().exists() and not _in_hub_cache(value):
            if offline:
                raise ConfigError(f"{key}={value} is not a local directory, and as a hub id it is not in the local "
                                  "cache while HF_HUB_OFFLINE=1; point it at a model directory (save_pretrained), "
                                  "or unset HF_HUB_OFFLINE to download it")
            _check_hub_reachable(key, value)


def _in_hub_cache(repo_id: str) -> bool:
    """True also for what is not a valid repo id: the loader then says what it makes of it."""
    from huggingface_hub import try_to_load_from_cache

    names = ("config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json")
    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names)
    except Exception:  # noqa: BLE001 - not a repo id (e.g. a typo'd path)
        return True


def _check_hub_reachable(key: str, repo_id: str, timeout_s: float = 5.0) -> None:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"{key}={repo_id} is not a local directory nor in the local hub cache, and the hub "
                          f"({constants.ENDPOINT}) cannot be reached to download it ({err}); point {key} at a model "
                          "directory (save_pretrained), or check the network") from err


def _positive_if_set(cfg: Any, *keys: str) -> None:
    """Optional settings that mean nothing at or below 0 (max_grad_norm=-1 would flip every gradient)."""
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise ConfigError(f"{key} must be > 0 or null (off), got {value}")


def _non_negative(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")


def _divisible(cfg: Any, key: str, by: str, note: str = "") -> None:
    a, b = getattr(cfg, key), getattr(cfg, by)
    if a % b:
        hint = f" ({note})" if note else ""
        raise ConfigError(f"{key}={a} is not divisible by {by}={b}{hint}; choose sizes so it divides evenly")


def _help(cfg: Any, key: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cfg) if f.name == key)


# --- loading ----------------------------------------------------------------


def load_config(cls: type, path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Any:
    """Build `cls` from a YAML file and `key=value` overrides (overrides win), then validate."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml(path))
    mappings = {f.name for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), dict)}
    for item in overrides or []:
        key, value = _parse_override(item)
        head, _, sub = key.partition(".")
        if sub and head in mappings:  # doctor.flat_updates=30 sets one entry of the mapping
            values[head] = {**(values.get(head) or {}), sub: value}
        else:
            values[key] = value
    return config_from_dict(cls, values)


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    checked = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; see `tether {_stage(cls)} --help`"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        checked[key] = coerce(key, value, hints[key])
    cfg = cls(**checked)
    cfg.validate()
    return cfg


def _stage(cls: type) -> str:
    return cls.__name__.replace("Config", "").lower()


def read_yaml(path: str) -> dict[str, Any]:
    """A config file's key: value mapping, with one clear error for each way it can be unreadable."""
    file = Path(path)
    if not file.is_file():
        if file.is_dir():
            raise ConfigError(f"config file {path} is a directory; give the YAML file (e.g. {path}/config.yaml)")
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the annotation `hint`; convert the few safe cases (int -> float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [coerce(key, v, args[0]) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # inf/nan (or 1e400 in YAML) would train an all-NaN model
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in stage_fields(type(cfg))}


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_options(cls: type) -> str:
    """Every option with its type, default and help, for `--help`."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in stage_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _type_name(hints[f.name])
        lines.append(f"  {f.name}={default!r}  [{kind}]\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(hint, "__name__", str(hint))


@dataclass
class StageRun:
    """The run block `tether sft` and `tether reward` share, and its checks. A stage redeclares
    output_dir (its default) and resume (what it restores); `stage_fields` lists the block last."""

    output_dir: str = opt(None, "Run directory.")
    save_every: int = opt(0, "Also save a checkpoint-N every N optimizer steps (0 = only final/).")
    keep_checkpoints: int = opt(0, "Keep only the newest N checkpoint-* directories (0 = all).")
    resume: bool = opt(False, "Continue the run in output_dir from its latest complete checkpoint-N.")
    overwrite: bool = opt(False, "Replace the run already in output_dir: its config, logs and checkpoints are deleted, once every check before training has passed.")
    seed: int = opt(0, "Random seed.")
    progress: bool = opt(True, "Show a progress bar.")
    num_threads: int = opt(0, "torch CPU threads (0 = number of cores).")

    def __post_init__(self) -> None:
        self.micro_batch_size = self.batch_size // max(self.gradient_accumulation_steps, 1)

    def validate_run(self) -> None:
        """What every stage checks the same way: optimiser counts, LoRA, precision, attention, device."""
        _positive(self, "batch_size", "gradient_accumulation_steps", "eval_every")
        _divisible(self, "batch_size", "gradient_accumulation_steps")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _non_negative(self, "warmup_steps", "num_threads", "weight_decay", "save_every", "keep_checkpoints")
        _positive_if_set(self, "max_grad_norm")
        _check_lora(self)
        _check_precision(self)
        _check_attention(self)
        _check_device(self)


RUN_BLOCK = tuple(f.name for f in dataclasses.fields(StageRun))


def stage_fields(cls: type) -> list:
    """A config's fields in reading order: the stage's own, then the run block (StageRun) last."""
    fields = dataclasses.fields(cls)
    if not issubclass(cls, StageRun):
        return list(fields)
    return [f for f in fields if f.name not in RUN_BLOCK] + [f for f in fields if f.name in RUN_BLOCK]


@dataclass
class SFTConfig(StageRun):
    # --- model ----------------------------------------------------------------
    model: Optional[str] = opt(None, "Model to fine-tune (path or hub id); null with init=scratch builds a new one.")
    init: Literal["pretrained", "scratch"] = opt("pretrained", "'scratch' builds a small model from arch/hidden/layers/heads.")
    tokenizer: Optional[str] = opt(None, "Tokenizer path; default: the model's. With init=scratch and none given, a byte-level BPE is trained on the data.")
    vocab_size: int = opt(4096, "Vocabulary size of a tokenizer trained on the data (init=scratch).")
    arch: Literal["gpt2", "llama"] = opt("gpt2", "Architecture for init=scratch.")
    hidden: int = opt(256, "Hidden size for init=scratch.")
    layers: int = opt(4, "Transformer layers for init=scratch.")
    heads: int = opt(4, "Attention heads for init=scratch.")
    dropout: float = opt(0.0, "Dropout of a model built with init=scratch: 0 suits short pretraining runs, where a small "
                              "model underfits. Pretrained models keep their own.")
    precision: PrecisionName = opt("auto", PRECISION_HELP)
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = opt(None, DTYPE_HELP)
    attn_implementation: Optional[str] = opt(None, ATTENTION_HELP)
    device: str = opt("auto", "Device: 'auto', 'cpu', 'cuda', ...")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory.")

    # --- LoRA -------------------------------------------------------------------
    lora_rank: int = opt(0, "Train a LoRA adapter of this rank instead of every weight (0 = full fine-tuning); saved in peft format, `tether export` merges it.")
    lora_alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha / rank).")
    lora_target_modules: list[str] = opt([], "Layer names LoRA wraps; default per architecture (attention and MLP projections).")
    lora_layers: int = opt(0, "Adapter only on the top N transformer blocks (0 = all).")
    lora_dropout: float = opt(0.0, "Dropout on the adapter's input.")

    # --- data -----------------------------------------------------------------
    data: str = opt(None, "Training text: .jsonl/.json/.csv/.parquet/.txt file, a save_to_disk dir or a hub id (required).")
    text_field: str = opt("text", "Field holding plain text; records with a 'messages' field are rendered with the chat template.")
    data_layout: Literal["auto", "text", "messages", "prompt_completion"] = opt("auto", "Layout of the records: 'text' (text_field), 'messages' (a chat, rendered with the chat template), 'prompt_completion' ('prompt' and 'completion': strings, or messages); auto = detected from the first record's columns.")
    loss_on: Literal["auto", "all", "completion", "assistant"] = opt("auto", "Tokens the LM loss counts: 'all'; 'completion' (prompt_completion data: the completion and its EOS); 'assistant' (messages data: the assistant turns as the chat template renders them). auto = completion for prompt_completion data, all otherwise (as TRL's defaults).")
    eval_data: Optional[str] = opt(None, "Held-out text; default: eval_fraction of the training documents.")
    eval_fraction: float = opt(0.05, "Fraction of documents held out for eval loss / perplexity when eval_data is not given.")
    block_size: int = opt(128, "Tokens per packed training block.")

    # --- optimisation ---------------------------------------------------------
    batch_size: int = opt(16, "Blocks per optimizer step.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    max_steps: int = opt(1000, "Optimizer steps (the run also stops at max_seconds).")
    max_seconds: Optional[float] = opt(None, "Stop training after this many seconds (a compute budget).")
    learning_rate: float = opt(1e-3, "Peak learning rate.")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt("cosine", "Schedule after warmup.")
    warmup_steps: int = opt(50, "Linear warmup steps.")
    weight_decay: float = opt(0.1, "AdamW weight decay.")
    adam_eps: float = opt(1e-8, "Adam epsilon.")
    max_grad_norm: Optional[float] = opt(1.0, "Gradient clipping (null = off).")
    eval_every: int = opt(200, "Evaluate held-out loss every N steps (and at the end).")

    # --- run (StageRun: save_every, keep_checkpoints, overwrite, seed, progress, num_threads) ---
    output_dir: str = opt("runs/sft", "Run directory: config.yaml, metrics.jsonl and the model in save_pretrained format.")
    resume: bool = opt(False, "Continue the run in output_dir from its latest complete checkpoint-N (save_every), exactly: weights or adapter, optimizer, schedule, RNG streams, data position, metrics truncated to the checkpoint. Refused if the config differs from the run's, except keys safe to change (max_steps, max_seconds, save_every, keep_checkpoints, progress, num_threads).")

    def validate(self) -> None:
        _require(self, "data")
        _check_model_paths(self, "model", "tokenizer")
        if self.init == "pretrained" and not self.model:
            raise ConfigError("model is required unless init=scratch (then arch/hidden/layers/heads define it)")
        _positive(self, "max_steps", "block_size", "vocab_size", "hidden", "layers", "heads")
        self.validate_run()
        _divisible(self, "hidden", "heads")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        _positive_if_set(self, "max_seconds")
        if self.lora_rank and self.init == "scratch":
            raise ConfigError("lora_rank needs a pretrained model to adapt; with init=scratch train every weight "
                              "(lora_rank=0)")


@dataclass
class RewardConfig(StageRun):
    # --- model ----------------------------------------------------------------
    model: str = opt(None, "Backbone to start from, e.g. an SFT checkpoint (required); a scalar head is added.")
    tokenizer: Optional[str] = opt(None, "Tokenizer path; default: the model's.")
    precision: PrecisionName = opt("auto", PRECISION_HELP)
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = opt(None, DTYPE_HELP)
    attn_implementation: Optional[str] = opt(None, ATTENTION_HELP)
    device: str = opt("auto", "Device: 'auto', 'cpu', 'cuda', ...")

    # --- LoRA -------------------------------------------------------------------
    lora_rank: int = opt(0, "Train a LoRA adapter of this rank instead of every weight (0 = full fine-tuning); saved in peft format, PPO with placement=shared_base uses it as the reward adapter.")
    lora_alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha / rank).")
    lora_target_modules: list[str] = opt([], "Layer names LoRA wraps; default per architecture (attention and MLP projections).")
    lora_layers: int = opt(0, "Adapter only on the top N transformer blocks (0 = all).")
    lora_dropout: float = opt(0.0, "Dropout on the adapter's input.")
    trunk_cache_mb: int = opt(2048, "With lora_layers, keep the output of the frozen blocks below the adapter for each distinct sequence, up to this many MB, so later epochs and evaluations run only the adapted blocks (0 = off; off by itself when the base has dropout).")

    # --- data -----------------------------------------------------------------
    data: str = opt(None, "Preference pairs: file, save_to_disk dir or hub id with prompt/chosen/rejected (required).")
    prompt_field: str = opt("prompt", "Field holding the prompt (text or chat messages).")
    chosen_field: str = opt("chosen", "Field holding the preferred response.")
    rejected_field: str = opt("rejected", "Field holding the dispreferred response.")
    data_layout: Literal["auto", "explicit", "conversational", "transcript"] = opt("auto", "Layout of the pairs: 'explicit' (prompt, chosen, rejected fields); 'conversational' (chosen/rejected whole conversations and no prompt: the shared leading turns are the prompt, as UltraFeedback-binarized); 'transcript' (HH-RLHF strings split on the last \\n\\nAssistant:); auto = detected from the first record.")
    eval_data: Optional[str] = opt(None, "Held-out pairs; default: eval_fraction of the pairs.")
    eval_fraction: float = opt(0.1, "Fraction of pairs held out for pairwise accuracy when eval_data is not given.")
    max_length: int = opt(256, "Prompt + response tokens; longer pairs are truncated on the left.")

    # --- optimisation ---------------------------------------------------------
    batch_size: int = opt(32, "Pairs per optimizer step.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    epochs: float = opt(1.0, "Passes over the training pairs.")
    batch_by_prompt: bool = opt(False, "Keep each prompt's pairs in the same batch (InstructGPT): a response shared by several pairs is scored once, so K ranked responses cost K forward passes, not K(K-1).")
    learning_rate: float = opt(1e-4, "Peak learning rate.")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt("linear", "Schedule after warmup.")
    warmup_steps: int = opt(0, "Linear warmup steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: Optional[float] = opt(1.0, "Gradient clipping (null = off).")
    eval_every: int = opt(100, "Evaluate held-out accuracy every N steps (and at the end).")

    # --- score normalisation (Ziegler et al. 2019) ------------------------------
    normalize_policy: Optional[str] = opt(None, "Policy whose responses should score mean 0, std 1 after training (gain/bias on the head).")
    normalize_prompts: Optional[str] = opt(None, "Prompts to sample normalize_policy on (file, dir or hub id; field prompt_field).")
    normalize_samples: int = opt(256, "Responses sampled for the normalisation statistics.")
    normalize_max_new_tokens: int = opt(32, "Response length for normalisation samples.")
    normalize_temperature: float = opt(1.0, "Sampling temperature for normalisation samples (use PPO's).")

    # --- run (StageRun: save_every, keep_checkpoints, overwrite, seed, progress, num_threads) ---
    output_dir: str = opt("runs/reward", "Run directory: config.yaml, metrics.jsonl and the model (AutoModelForSequenceClassification).")
    resume: bool = opt(False, "Continue the run in output_dir from its latest complete checkpoint-N (save_every), exactly: weights or adapter and head, optimizer, schedule, RNG streams, data order, metrics truncated to the checkpoint. Refused if the config differs from the run's, except keys safe to change (save_every, keep_checkpoints, progress, num_threads).")

    def validate(self) -> None:
        _require(self, "model", "data")
        _check_model_paths(self, "model", "tokenizer", "normalize_policy")
        _positive(self, "max_length", "normalize_samples", "normalize_max_new_tokens")
        if self.epochs <= 0 or self.learning_rate <= 0:
            raise ConfigError(f"epochs and learning_rate must be > 0, got {self.epochs}, {self.learning_rate}")
        if (self.normalize_policy is None) != (self.normalize_prompts is None):
            raise ConfigError("normalize_policy and normalize_prompts go together: set both or neither")
        _non_negative(self, "trunk_cache_mb")
        self.validate_run()
