"""Build a PPO run from its config: data first (cheap errors early), then the four roles."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tether import distributed
from tether.checkpoint import seed_everything
from tether.config import ConfigError, PPOConfig, check_hub_ids, config_to_dict, lora_settings, save_config
from tether.data import load_records, load_texts, pack_texts, tokenize_prompts
from tether.generation import engine_embedding_rows
from tether.models import (
    PAD_TOKEN,
    disable_dropout,
    freeze,
    frozen_copy,
    has_tokenizer_files,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    check_sequence_fits,
    pick_device,
    resize_for_tokenizer,
    same_vocabulary,
)
from tether.precision import Precision, PrecisionError, keep_lm_head_fp32, resolve_precision
from tether.rewards import ModelReward, load_reward_fn, reward_eos
from tether.rundir import RunDirError, RunStart, check_final_complete, commit_run, damaged_checkpoint_error, open_run
from tether.roles import SeparateRoles, SharedBaseRoles
from tether.tracking import check_sink_packages, make_tracker
from tether.trainers.ppo import PPOTrainer

log = logging.getLogger(__name__)


def set_threads(requested: int) -> None:
    """Never more torch threads than cores: oversubscription is catastrophic on small machines.
    Under torchrun the ranks on one machine share its cores."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = max(1, (os.cpu_count() or 1) // ranks_here)
    torch.set_num_threads(min(requested, cores) if requested else cores)


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """glibc: every allocation of at least `threshold_bytes` gets its own mapping, returned to the
    OS when freed. By default glibc raises that threshold (up to 32 MiB) after the first large
    frees, and activations of a few MiB then fragment the heap: on SmolLM2 PPO that held +1.2 GB
    resident from the second update on (benchmarks/memory.py). The price is a page fault for every
    large tensor, ~40% slower optimisation on CPU, so it is opt-in (`release_memory=true`). A
    threshold the user set (MALLOC_MMAP_THRESHOLD_) is kept. Returns whether it was applied."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to set
        return False
    m_mmap_threshold = -3  # <malloc.h>; setting it also turns off the dynamic adjustment
    return bool(libc.mallopt(m_mmap_threshold, threshold_bytes))


def start_run(cfg) -> RunStart:
    """Every stage starts the same way: threads, allocator, seeds, and the run directory checked
    and locked (tether/rundir.py). Nothing is written yet: `commit` does that once every check
    has passed. (Validation is the caller's: it must come before this.)"""
    if distributed.launched() and not distributed.active():
        raise ConfigError("this stage runs in one process; under torchrun `tether ppo`, `tether sft` and `tether reward` are "
                          "data-parallel: run it without torchrun (python -m tether ...)")
    set_threads(cfg.num_threads)
    if getattr(cfg, "release_memory", False):
        return_freed_memory_to_os()
    seed_everything(cfg.seed)  # the same on every rank: models and adapters are built identically
    return open_run_on_main(cfg)


class _NoLock:
    """What the ranks other than 0 hold: rank 0 owns the run directory's lock."""

    def release(self) -> None:
        pass


def open_run_on_main(cfg) -> RunStart:
    """Rank 0 checks and locks the run directory; the other ranks learn what it found, or its error."""
    if distributed.is_main():
        try:
            start = open_run(cfg.output_dir, config_to_dict(cfg), getattr(cfg, "resume", False), cfg.overwrite,
                             defaults=config_to_dict(type(cfg)()))
        except Exception as err:
            distributed.broadcast_object(err)
            raise
        distributed.broadcast_object((start.path, start.checkpoint))
        return start
    found = distributed.broadcast_object(None)
    if isinstance(found, Exception):
        raise found
    return RunStart(found[0], found[1], _NoLock())


def commit(start: RunStart, cfg, resumed_step: Optional[int] = None) -> Path:
    """Every check has passed: clear an overwritten run, write config.yaml, truncate resumed logs (rank 0)."""
    if distributed.is_main():
        commit_run(start, lambda path: save_config(cfg, path), resumed_step)
    distributed.barrier()
    return start.path


def join_ranks(cfg) -> None:
    """Under torchrun: join the process group and check every batch divides into equal shares
    (any stage's config with device, batch_size and micro_batch_size)."""
    device = pick_device(cfg.device)
    if not distributed.init(device.type):
        return
    world = distributed.world_size()
    if device.type == "cuda" and cfg.device in ("auto", "cuda"):
        cfg.device = f"cuda:{distributed.local_rank()}"
    # The micro-batch is the smallest share: when it splits evenly, so do minibatch and batch.
    # With samples_per_prompt, ranks share prompts (a prompt's group stays on one rank).
    if getattr(cfg, "samples_per_prompt", 1) > 1 and cfg.batch_size % world:
        raise ConfigError(f"batch_size = {cfg.batch_size} prompts do not split into {world} equal shares, one per "
                          f"rank (each rank samples its prompts samples_per_prompt times); make it a multiple of {world}")
    if cfg.micro_batch_size % world:
        per = "num_minibatches / " if hasattr(cfg, "num_minibatches") else ""
        raise ConfigError(f"batch_size = {cfg.batch_size}: its micro-batch of {cfg.micro_batch_size} (batch_size / "
                          f"{per}gradient_accumulation_steps) does not split into {world} equal shares, "
                          f"one per rank; make it a multiple of {world} (torchrun --nproc_per_node)")


@contextmanager
def locked(start: RunStart, until_done: bool = True):
    """The run directory stays locked inside; the lock goes when the stage is done, or, with
    until_done=False (the PPO trainer holds it until training ends), only when it fails."""
    try:
        yield start
    except BaseException:
        start.lock.release()
        raise
    if until_done:
        start.lock.release()


def build_ppo_trainer(cfg: PPOConfig, generation=None) -> PPOTrainer:
    """The trainer, ready to train. `generation`: a generation backend to use instead of the
    configured one (tether/generation.py)."""
    cfg.validate()
    join_ranks(cfg)
    precision = settle_precision(cfg)  # before the run directory compares a resumed config with its own
    check_hub_ids(cfg, "policy", "reference", "critic", "reward_model", "tokenizer", "reward_tokenizer")
    check_sequence_fits(cfg.policy, cfg.max_prompt_length + cfg.max_new_tokens,  # before anything is written
                        "max_prompt_length + max_new_tokens", "lower max_prompt_length or max_new_tokens")
    if cfg.resume:
        check_final_complete(Path(cfg.output_dir))
    start = start_run(cfg)
    with locked(start, until_done=False):
        return _build_ppo_trainer(cfg, start, precision, generation)


def _build_ppo_trainer(cfg: PPOConfig, start: RunStart, precision: Precision, generation=None) -> PPOTrainer:
    device = pick_device(cfg.device)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.policy, engine_embedding_rows(cfg))  # vllm: pad in its vocab
    check_tokenizer_matches_policy(cfg, tokenizer)
    prompts = load_prompts(cfg, tokenizer)
    reward_fn = load_reward_fn(cfg.reward_fn, cfg.reward_timeout_s) if cfg.reward_fn else None  # fail before models
    check_sink_packages(cfg.log_with)
    ptx_blocks = None
    if cfg.ptx_data:
        ptx_blocks = pack_texts(load_texts(cfg.ptx_data, cfg.ptx_field), tokenizer, cfg.ptx_block_size)
        log.info("PPO-ptx: %d blocks of %d tokens from %s", len(ptx_blocks), cfg.ptx_block_size, cfg.ptx_data)

    roles = build_roles(cfg, tokenizer, precision, device, reward_fn)
    gold = load_reward_fn(cfg.gold_reward_fn, cfg.reward_timeout_s) if cfg.gold_reward_fn else None
    eval_prompts = load_prompts(cfg, tokenizer, cfg.eval_prompts)[: cfg.eval_max_prompts] if cfg.eval_prompts else None
    if start.checkpoint is not None:
        with readable_checkpoint(start):
            roles.load(start.checkpoint)  # before any sharding: whole tensors into whole models
            check_finite_weights(roles, start)
    if distributed.active():  # identical starting weights; then each rank samples its own random numbers
        distributed.broadcast_parameters(roles.trainable("policy") + roles.trainable("critic"))
        seed_everything(distributed.rank_seed(cfg.seed))
        if cfg.data_parallel == "fsdp2":
            roles.shard(frozen=cfg.fsdp_frozen == "shard", compute_dtype=precision.autocast)
            log.info("FSDP2: transformer blocks sharded over %d ranks (frozen roles %s)", distributed.world_size(),
                     "sharded" if cfg.fsdp_frozen == "shard" else "whole on every rank")
    generation = generation or generation_backend(cfg)
    trainer = PPOTrainer(cfg, roles, tokenizer, prompts, ptx_blocks=ptx_blocks, run_dir=start.path, device=device,
                         gold=gold, eval_prompts=eval_prompts, generation=generation, precision=precision)
    if start.checkpoint is not None:
        with readable_checkpoint(start):
            trainer.load_state(start.checkpoint, weights=False)
        if trainer.update > cfg.total_updates:  # before config.yaml is rewritten to say otherwise
            raise ConfigError(f"total_updates={cfg.total_updates} is below the {trainer.update} updates {start.path} "
                              f"has already done; resume with total_updates >= {trainer.update}")
        log.info("resuming %s from %s (update %d of %d)", start.path, start.checkpoint, trainer.update,
                 cfg.total_updates)
    trainer.generation.sync_weights(roles)  # an engine starts from the policy as it is now (resumed or not)
    run_dir = commit(start, cfg, trainer.update if start.checkpoint is not None else None)
    if distributed.is_main():
        trainer.tracker = make_tracker(run_dir, cfg.log_with, cfg.wandb_project, config_to_dict(cfg))
    trainer.lock = start.lock
    return trainer


@contextmanager
def readable_checkpoint(start: RunStart):
    """A checkpoint that fails to load (a truncated or overwritten file, a missing piece) is named,
    with what failed and the way on, instead of an unexpected error; nothing has been written yet."""
    try:
        yield
    except (ConfigError, RunDirError):
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read a checkpoint's files means the same
        raise damaged_checkpoint_error(start.path, start.checkpoint, f"{type(err).__name__}: {str(err)[:300]}") from err


def check_finite_weights(roles, start: RunStart) -> None:
    """Loaded weights must be finite: overwritten bytes would otherwise resume into NaN weights."""
    for role in ("policy", "critic"):
        for index, param in enumerate(roles.trainable(role)):
            if not torch.isfinite(param).all():
                raise damaged_checkpoint_error(start.path, start.checkpoint, f"it holds non-finite {role} weights "
                                               f"(tensor {index} of {len(roles.trainable(role))}, shape "
                                               f"{tuple(param.shape)})")


def settle_precision(cfg) -> Precision:
    """The stage's precision for its device (`auto` resolved), written back into the config so that
    config.yaml records what ran; TF32 for fp32 matmuls on CUDA as configured (any stage's config)."""
    device = pick_device(cfg.device)
    try:
        precision = resolve_precision(cfg.precision, cfg.dtype, device)
    except PrecisionError as err:
        raise ConfigError(str(err)) from err
    cfg.precision, cfg.dtype = precision.name, None
    if device.type == "cuda":
        allow = getattr(cfg, "tf32", True)
        torch.backends.cuda.matmul.allow_tf32 = allow  # fp32 matmuls on tensor cores (10-bit mantissa inputs)
        torch.backends.cudnn.allow_tf32 = allow
    return precision


def use_attention(model: nn.Module, name: Optional[str]) -> nn.Module:
    """The configured attention kernel (transformers' `set_attn_implementation`); None keeps the default."""
    if name:
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"attn_implementation={name}: {err}. Use sdpa or eager, or install what it names") from err
    return model


def generation_backend(cfg: PPOConfig):
    """The configured sampler: the built-in one, or a vLLM engine colocated on this rank's GPU."""
    from tether.generation import BuiltinSampler, VLLMBackend

    if cfg.generation_backend == "builtin":
        return BuiltinSampler()
    if not pick_device(cfg.device).type == "cuda":
        raise ConfigError("generation_backend=vllm runs on CUDA GPUs only; use generation_backend=builtin on "
                          f"device {cfg.device}")
    scratch = Path(tempfile.mkdtemp(prefix=f"tether-engine-rank{distributed.rank()}-"))  # adapters for the engine
    return VLLMBackend.start(cfg.policy, cfg, scratch, distributed.rank_seed(cfg.seed))


def build_roles(cfg: PPOConfig, tokenizer, precision: Precision, device, reward_fn=None):
    """The four roles in the configured placement (tether/roles.py): trained weights in the
    precision's trainable dtype (fp32 master weights under bf16-mixed), frozen roles in its frozen one."""
    if cfg.placement == "shared_base":
        return build_shared_base_roles(cfg, tokenizer, precision, device, reward_fn)
    policy = prepare(load_causal_lm(cfg.policy, precision.trainable), tokenizer, device, cfg)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if cfg.reference:
        reference = load_causal_lm(cfg.reference, precision.frozen)
        check_embedding_rows(reference, tokenizer, f"reference {cfg.reference}")
        reference = prepare(reference, tokenizer, device, cfg)
        check_reference_vocabulary(cfg, tokenizer)
    else:
        reference = frozen_copy(policy).to(precision.frozen)
    if cfg.fp32_lm_head and precision.mixed:
        keep_lm_head_fp32(policy)
    reward = reward_fn or load_model_reward(cfg, tokenizer, precision.frozen, device, policy)
    critic = load_critic(cfg, tokenizer, precision.trainable, device) if cfg.uses_critic else None  # critic-free: none
    return SeparateRoles(policy, reference, critic, reward)


def check_reference_vocabulary(cfg: PPOConfig, tokenizer) -> None:
    """A KL between two models means something only over the same token ids."""
    if not has_tokenizer_files(cfg.reference):
        return
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(cfg.reference)
    if not same_vocabulary(own, tokenizer):
        raise ValueError(f"reference {cfg.reference} has a different tokenizer/vocabulary than the policy "
                         f"({len(own)} vs {len(tokenizer)} tokens); the KL penalty compares the two models token by "
                         "token, so the reference must share the policy's vocabulary (e.g. the policy's SFT model)")


def build_shared_base_roles(cfg: PPOConfig, tokenizer, precision: Precision, device, reward_fn=None) -> SharedBaseRoles:
    """One base, LoRA adapters: policy, critic and (from a LoRA reward model) reward."""
    from tether.lora import (
        add_adapter,
        add_adapter_from_dir,
        add_lora,
        adapter_base_path,
        is_adapter_dir,
        is_lora_reward_dir,
        load_score_head,
        require_full_model,
        same_base,
    )

    require_full_model(cfg.policy, "policy")
    dtype = precision.model_dtype(lora=True)
    base = prepare(load_causal_lm(cfg.policy, dtype), tokenizer, device, cfg)
    if cfg.fp32_lm_head and precision.mixed:
        keep_lm_head_fp32(base)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = lora_settings(cfg)
    model = add_lora(base, settings, adapter="policy")
    hidden = base.config.get_text_config().hidden_size
    value_head = None
    if cfg.uses_critic:  # critic-free estimators: no critic adapter, no value head
        value_head = nn.Linear(hidden, 1).to(device=device, dtype=precision.trainable)
        nn.init.zeros_(value_head.weight)  # the first values are 0, not noise (N-details item 6)
        nn.init.zeros_(value_head.bias)
    reward_head = reward = reward_eos_ids = None
    if reward_fn is None and is_lora_reward_dir(cfg.reward_model):
        if not same_base(adapter_base_path(cfg.reward_model), cfg.policy):
            raise ValueError(f"reward model {cfg.reward_model} is a LoRA adapter on another base "
                             f"({adapter_base_path(cfg.reward_model)}), not on the policy {cfg.policy}; "
                             "placement=shared_base needs every adapter on the policy's base: train the reward "
                             "model on the policy's base, or use placement=separate")
        add_adapter_from_dir(model, "reward", cfg.reward_model, trainable=False)
        reward_head = load_score_head(cfg.reward_model, hidden, dtype).to(device)
        if value_head is not None:  # critic from the reward model (N+ details; InstructGPT): its adapter and head
            add_adapter_from_dir(model, "critic", cfg.reward_model, trainable=True)
            value_head.load_state_dict(reward_head.state_dict())
        reward_eos_ids = reward_eos(tokenizer, base) if cfg.reward_append_eos else None
    else:
        if cfg.reward_model and is_adapter_dir(cfg.reward_model):
            raise ValueError(f"reward model {cfg.reward_model} is a LoRA adapter without a score head "
                             "(score_head.safetensors); train it with `tether reward lora_rank=...`")
        reward = reward_fn or load_model_reward(cfg, tokenizer, dtype, device, base)
        if value_head is not None:
            add_adapter(model, "critic", settings)
    model.set_adapter("policy")
    return SharedBaseRoles(model, value_head, reward_head, reward, reward_eos_ids)


def load_prompts(cfg: PPOConfig, tokenizer, source: Optional[str] = None) -> list[list[int]]:
    source = source or cfg.prompts
    records = load_records(source, cfg.prompt_split)
    prompts, stats = tokenize_prompts(records, tokenizer, cfg.prompt_field, cfg.max_prompt_length,
                                      cfg.overlong_prompts, source=source)
    if stats.truncated:
        log.warning("%d of %d prompts were longer than max_prompt_length=%d and were truncated on the left",
                    stats.truncated, stats.total, cfg.max_prompt_length)
    log.info("loaded %d prompts from %s", len(prompts), source)
    return prompts


def check_embedding_rows(model, tokenizer, what: str) -> None:
    """A frozen model may gain the pad row tether adds, nothing more: rows grown for other ids would be
    random, and the KL would compare the policy against noise there."""
    rows = model.get_input_embeddings().num_embeddings
    missing = len(tokenizer) - rows
    if missing > 1 or (missing == 1 and tokenizer.pad_token != PAD_TOKEN):
        raise ValueError(f"{what} has {rows} embedding rows but the policy's tokenizer has {len(tokenizer)} tokens; "
                         "the reference must be a model of the policy's vocabulary (e.g. the policy's SFT model)")


def check_tokenizer_matches_policy(cfg: PPOConfig, tokenizer) -> None:
    """`tokenizer=` from another model would feed the policy ids it never learned."""
    if cfg.tokenizer is None or not has_tokenizer_files(cfg.policy):
        return
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(cfg.policy)
    if not same_vocabulary(own, tokenizer):
        raise ValueError(f"tokenizer={cfg.tokenizer} has a different vocabulary than the policy {cfg.policy} "
                         f"({len(tokenizer)} vs {len(own)} tokens); unset tokenizer to use the policy's own")


def prepare(model, tokenizer, device, cfg=None):
    """Every role: tokenizer-sized embeddings, no dropout (N-details item 4), the configured
    attention kernel, on its device."""
    resize_for_tokenizer(model, tokenizer)
    disable_dropout(model)
    use_attention(model, getattr(cfg, "attn_implementation", None))
    return model.to(device)


def load_model_reward(cfg: PPOConfig, tokenizer, dtype, device, policy=None) -> ModelReward:
    model = use_attention(load_reward_model(cfg.reward_model, dtype), cfg.attn_implementation)
    own = reward_tokenizer(cfg, tokenizer)
    if own is None:
        resize_for_tokenizer(model, tokenizer)
    disable_dropout(model)
    eos = reward_eos(own or tokenizer, policy if own is None else None) if cfg.reward_append_eos else None
    return ModelReward(freeze(model.to(device)), own, eos=eos)


def reward_tokenizer(cfg: PPOConfig, policy_tokenizer):
    """The reward model's own tokenizer when it differs from the policy's, else None (reuse ids)."""
    from transformers import AutoTokenizer

    path = cfg.reward_tokenizer or cfg.reward_model
    if cfg.reward_tokenizer is None and not has_tokenizer_files(path):
        return None
    own = AutoTokenizer.from_pretrained(path)
    if same_vocabulary(own, policy_tokenizer):
        return None
    if own.pad_token_id is None:
        own.pad_token = own.eos_token  # any id works: the attention mask decides what counts
    log.info("reward model has its own tokenizer: texts are decoded and re-encoded for it")
    return own


def load_critic(cfg: PPOConfig, tokenizer, dtype, device):
    """Critic from `critic`, else the reward model (common in the N+ details / InstructGPT), else the policy."""
    path = cfg.critic or cfg.reward_model or cfg.policy
    from_reward = cfg.critic is None and cfg.reward_model is not None
    critic = load_value_model(path, dtype, head_from_reward=from_reward)
    use_attention(critic.backbone, cfg.attn_implementation)
    if from_reward and reward_tokenizer(cfg, tokenizer) is not None:
        raise ValueError("the reward model uses a different tokenizer than the policy, so the critic cannot be "
                         "initialised from it; set critic=<path> (e.g. the policy path)")
    resize_for_tokenizer(critic.backbone, tokenizer)
    disable_dropout(critic.backbone)
    if cfg.gradient_checkpointing:
        critic.gradient_checkpointing_enable()
    return critic.to(device)


def run_ppo(cfg: PPOConfig) -> dict[str, float]:
    trainer = build_ppo_trainer(cfg)
    return trainer.train()
