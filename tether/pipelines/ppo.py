"""Build a PPO run from its config: data first (cheap errors early), then the four roles."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from tether.checkpoint import seed_everything
from tether.config import PPOConfig, save_config, config_to_dict
from tether.data import load_records, load_texts, pack_texts, tokenize_prompts
from tether.models import (
    disable_dropout,
    freeze,
    frozen_copy,
    has_tokenizer_files,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    pick_device,
    resize_for_tokenizer,
    same_vocabulary,
    torch_dtype,
)
from tether.rewards import ModelReward, load_reward_fn, reward_eos
from tether.tracking import check_sink_packages, make_tracker
from tether.trainers.ppo import PPOTrainer

log = logging.getLogger(__name__)


def set_threads(requested: int) -> None:
    """Never more torch threads than cores: oversubscription is catastrophic on small machines."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(min(requested, cores) if requested else cores)


def start_run(cfg) -> Path:
    """Every stage starts the same way: threads, seeds, run directory with the resolved config.
    (Validation is the caller's: it must come before anything is written.)"""
    set_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def build_ppo_trainer(cfg: PPOConfig) -> PPOTrainer:
    cfg.validate()
    run_dir = start_run(cfg)
    device, dtype = pick_device(cfg.device), torch_dtype(cfg.dtype)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.policy)
    prompts = load_prompts(cfg, tokenizer)
    reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None  # import errors before loading models
    check_sink_packages(cfg.log_with)
    ptx_blocks = None
    if cfg.ptx_data:
        ptx_blocks = pack_texts(load_texts(cfg.ptx_data, cfg.ptx_field), tokenizer, cfg.ptx_block_size)
        log.info("PPO-ptx: %d blocks of %d tokens from %s", len(ptx_blocks), cfg.ptx_block_size, cfg.ptx_data)

    policy = prepare(load_causal_lm(cfg.policy, dtype), tokenizer, device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    reference = (freeze(prepare(load_causal_lm(cfg.reference, dtype), tokenizer, device)) if cfg.reference
                 else frozen_copy(policy))
    reward = reward_fn or load_model_reward(cfg, tokenizer, dtype, device, policy)
    critic = load_critic(cfg, tokenizer, dtype, device)
    gold = load_reward_fn(cfg.gold_reward_fn) if cfg.gold_reward_fn else None
    eval_prompts = load_prompts(cfg, tokenizer, cfg.eval_prompts)[: cfg.eval_max_prompts] if cfg.eval_prompts else None
    tracker = make_tracker(run_dir, cfg.log_with, cfg.wandb_project, config_to_dict(cfg))
    return PPOTrainer(cfg, policy, reference, critic, reward, tokenizer, prompts, tracker=tracker,
                      ptx_blocks=ptx_blocks, run_dir=run_dir, device=device, gold=gold, eval_prompts=eval_prompts)


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


def prepare(model, tokenizer, device):
    """Every role: tokenizer-sized embeddings, no dropout (N-details item 4), on its device."""
    resize_for_tokenizer(model, tokenizer)
    disable_dropout(model)
    return model.to(device)


def load_model_reward(cfg: PPOConfig, tokenizer, dtype, device, policy=None) -> ModelReward:
    model = load_reward_model(cfg.reward_model, dtype)
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
