"""Role assembly: the four roles of a PPO run built from its config, in the configured placement
(tether/roles.py): four separate models, or LoRA adapters on one shared base. Also where a
reward model or critic is loaded from either kind of checkpoint, a full model or a LoRA reward
adapter (tether/lora.py), and every check that the roles share the policy's vocabulary.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from tether.config import ConfigError, PPOConfig, lora_settings
from tether.lora import (
    add_adapter,
    add_adapter_from_dir,
    add_lora,
    adapter_base_path,
    is_adapter_dir,
    is_lora_reward_dir,
    load_lora_reward_model,
    load_score_head,
    require_full_model,
    same_base,
)
from tether import models
from tether.models import (
    PAD_TOKEN,
    ValueModel,
    disable_dropout,
    freeze,
    frozen_copy,
    has_tokenizer_files,
    load_causal_lm,
    resize_for_tokenizer,
    same_vocabulary,
)
from tether.precision import Precision, keep_lm_head_fp32
from tether.rewards import ModelReward, reward_eos
from tether.roles import SeparateRoles, SharedBaseRoles

log = logging.getLogger(__name__)


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


def use_attention(model: nn.Module, name: Optional[str]) -> nn.Module:
    """The configured attention kernel (transformers' `set_attn_implementation`); None keeps the default."""
    if name:
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"attn_implementation={name}: {err}. Use sdpa or eager, or install what it names") from err
    return model


# --- either kind of reward checkpoint ------------------------------------------------------------


def load_reward_model(path: str, dtype: torch.dtype = torch.float32):
    """A reward model: AutoModelForSequenceClassification with one label, or a LoRA reward model."""
    if is_lora_reward_dir(path):
        return load_lora_reward_model(path, dtype)
    return models.load_reward_model(path, dtype)


def load_value_model(path: str, dtype: torch.dtype = torch.float32, head_from_reward: bool = False) -> ValueModel:
    """Critic from a policy, a reward model of either kind, or a saved critic (models.load_value_model)."""
    if head_from_reward and is_lora_reward_dir(path):
        # A LoRA reward model: its adapter merged into a backbone of the critic's own, its head copied.
        reward_model = load_lora_reward_model(path, dtype)
        critic = ValueModel(reward_model.peft.merge_and_unload().base_model)
        critic.value_head.load_state_dict(reward_model.score.state_dict())
        return critic.to(dtype)
    return models.load_value_model(path, dtype, head_from_reward)
