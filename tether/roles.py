"""The four roles behind one object — policy, reference, critic, reward — whatever their placement.

The trainer and the rollout talk only to a `Roles` object (DESIGN §6), never to raw modules,
so where the roles live is configuration, not a rewrite:

  SeparateRoles    four models: full fine-tuning of policy and critic (`placement=separate`)
  SharedBaseRoles  one copy of the base weights with LoRA adapters (`placement=shared_base`):
                   policy = adapter "policy"; reference = the base with adapters disabled;
                   critic = adapter "critic" + value head; reward = adapter "reward" + score
                   head (or a separate reward model or a function)

With adapters only on the top blocks, the blocks below them are the same function for every
role: SharedBaseRoles runs them once per rollout (the "trunk") and every role, in every PPO
epoch, starts from that output instead of recomputing it.

With a critic-free advantage estimator (GRPO, RLOO, REINFORCE++) there is no critic: the roles
are built without it (critic=None / no critic adapter and value head), values are zeros that
nothing reads, and the checkpoint has no critic/.

Every role is built with dropout off (N-details item 4): a trainer handed models that still
have dropout would otherwise see a first-minibatch ratio != 1.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import Tensor, nn

from tether.algo import append_missing_eos, last_token_index, logprobs_from_logits
from tether.checkpoint import load_weights, save_checkpoint
from tether.models import (
    VALUE_HEAD_FILE,
    disable_dropout,
    freeze,
    last_hidden_state,
    lower_blocks_output,
    position_ids_from_mask,
    start_at_block,
)
from tether.lora import adapter_layers, load_adapter_weights, save_adapter
from tether.rewards import RewardError, scores_and_parts
from tether.sampling import response_logits, sample_responses
from tether.sharding import shard, whole_state, whole_weights

log = logging.getLogger(__name__)


@dataclass
class SequenceScores:
    """What the rollout needs from the roles for a batch of prompt+response sequences."""

    logprobs: Tensor         # (B, R) log π_old(a_t|s_t), logits / temperature
    ref_logprobs: Tensor     # (B, R) log π_ref(a_t|s_t)
    values: Tensor           # (B, R) V_old(s_t)
    scores: Tensor           # (B,)   reward per sequence
    trunk: Optional[Tensor]  # (B, P+R, H) output of the frozen lower blocks, shared by every role; None if not shared
    graph: Optional[tuple[Tensor, Tensor]] = None  # policy logits (B, R, V) and values (B, R) with grad (keep_graph)
    reward_parts: Optional[Tensor] = None  # (B, K) each reward function's own score, when several are summed


def external_scores(reward, prompts, responses, input_ids, attention_mask, columns) -> tuple[Tensor, Optional[Tensor]]:
    """(B,) scores of a reward that is not an adapter (a model or functions) on the sequences' device,
    and (B, K) the parts of a weighted sum of several functions (None otherwise)."""
    scores, parts = scores_and_parts(reward, prompts, responses, input_ids, attention_mask, columns)
    return scores.to(input_ids.device), parts


class Roles(Protocol):
    """One object for the four roles; see the module docstring for the placements."""

    generation_model: nn.Module  # the policy as a module that samples (its generation_config names EOS ids)

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, settings, tokenizer,
               gaps: Optional[list] = None) -> tuple[Tensor, Tensor, Tensor]:
        """(response_ids (B, R), response_mask (B, R), ended (B,)) sampled from the policy; `gaps` as
        `rollout.sample_responses`."""
        ...

    def score(self, input_ids: Tensor, attention_mask: Tensor, response_length: int, settings,
              prompts: list[str], responses: list[str], keep_graph: bool = False,
              columns: Optional[dict[str, list]] = None) -> SequenceScores:
        """Old log-probs, reference log-probs, values, scores (`columns`: the prompt records' other
        fields, one value per row, for a reward that reads them). keep_graph: the policy and critic
        forwards keep their autograd graph (SequenceScores.graph) for the first optimizer step;
        a placement that cannot returns graph None and the trainer runs those forwards itself."""
        ...

    def policy_logits(self, input_ids: Tensor, attention_mask: Tensor, response_length: int,
                      pad_id: Optional[int], trunk: Optional[Tensor] = None) -> Tensor:
        """(B, R, V) logits predicting each response token, with grad."""
        ...

    def values(self, input_ids: Tensor, attention_mask: Tensor, response_length: int,
               trunk: Optional[Tensor] = None) -> Tensor:
        """(B, R) V(s_t), with grad."""
        ...

    def lm_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, V) policy logits over whole texts (PPO-ptx), with grad."""
        ...

    def trainable(self, role: str) -> list[nn.Parameter]:
        """The parameters the optimizer of `role` ("policy" | "critic") owns."""
        ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def shard(self, frozen: bool, compute_dtype: Optional[torch.dtype] = None) -> None:
        """FSDP2 (tether/sharding.py): shard the trained roles' blocks over the ranks, and with
        `frozen` the frozen roles' too; `compute_dtype` under bf16-mixed. Call before any optimizer
        is built on `trainable`."""

    def save(self, path: Path, tokenizer, state: Optional[dict] = None, tensors: Optional[dict] = None,
             write: bool = True) -> Path:
        """Every rank calls it (FSDP2 gathers the shards); only with `write` is anything written."""

    def load(self, path: Path) -> None:
        """The trained weights (policy, critic) from a directory `save` wrote."""


# --- shared helpers -----------------------------------------------------------------


def _lm_forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, V) logits over whole texts."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits


def _no_values(input_ids: Tensor, response_length: int) -> Tensor:
    """(B, R) zeros standing in for values when no critic is trained (no forward runs)."""
    return torch.zeros(input_ids.shape[0], response_length, device=input_ids.device)


def _parameters(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


# --- separate: four models ------------------------------------------------------------


class SeparateRoles:
    """Four models: policy and critic fully trained, reference and reward model frozen."""

    def __init__(self, policy: nn.Module, reference: nn.Module, critic: Optional[nn.Module], reward):
        for model in (policy, reference, critic, getattr(reward, "model", None)):
            if isinstance(model, nn.Module):
                disable_dropout(model)
        self.policy, self.reference, self.critic, self.reward = policy, freeze(reference), critic, reward
        self.generation_model = policy

    def sample(self, prompt_ids, prompt_mask, settings, tokenizer, gaps=None):
        with whole_weights(self.policy):  # a sharded policy gathers once per rollout, not once per token
            return sample_responses(self.policy, prompt_ids, prompt_mask, settings, tokenizer, gaps)

    @torch.no_grad()
    def score(self, input_ids, attention_mask, response_length, settings, prompts, responses,
              keep_graph: bool = False, columns=None) -> SequenceScores:
        tokens = input_ids[:, -response_length:]

        def logprobs(logits):
            return logprobs_from_logits(logits, tokens, settings.temperature)

        # With keep_graph these are the first optimizer step's forwards, done once: same weights, same inputs.
        with torch.set_grad_enabled(keep_graph):
            policy_logits = self.policy_logits(input_ids, attention_mask, response_length, settings.pad_id)
            values = self.values(input_ids, attention_mask, response_length)
        graph = (policy_logits, values) if keep_graph else None
        policy_logits, values = policy_logits.detach(), values.detach()
        reference_logits = self._logits(self.reference, input_ids, attention_mask, response_length, settings.pad_id)
        scores, parts = external_scores(self.reward, prompts, responses, input_ids, attention_mask, columns)
        return SequenceScores(logprobs(policy_logits), logprobs(reference_logits), values, scores, None, graph, parts)

    @staticmethod
    def _logits(model, input_ids, attention_mask, response_length, pad_id):
        return response_logits(model, input_ids, attention_mask, response_length, pad_id)

    def policy_logits(self, input_ids, attention_mask, response_length, pad_id, trunk=None):
        return self._logits(self.policy, input_ids, attention_mask, response_length, pad_id)

    def values(self, input_ids, attention_mask, response_length, trunk=None):
        if self.critic is None:  # critic-free estimators: nothing reads these
            return _no_values(input_ids, response_length)
        return self.critic(input_ids, attention_mask)[:, -(response_length + 1) : -1]  # (B, R)

    def lm_logits(self, input_ids, attention_mask):
        return _lm_forward(self.policy, input_ids, attention_mask)

    def trainable(self, role: str) -> list[nn.Parameter]:
        if role == "critic" and self.critic is None:
            return []
        return _parameters(self.policy if role == "policy" else self.critic)

    def train(self) -> None:
        for model in (self.policy, self.critic):
            if model is not None:
                model.train()

    def eval(self) -> None:
        for model in (self.policy, self.critic):
            if model is not None:
                model.eval()

    def shard(self, frozen: bool, compute_dtype: Optional[torch.dtype] = None) -> None:
        shard(self.policy, compute_dtype=compute_dtype)
        if self.critic is not None:
            shard(self.critic, compute_dtype=compute_dtype)
        if frozen:
            shard(self.reference, compute_dtype=compute_dtype)
            if isinstance(getattr(self.reward, "model", None), nn.Module):
                # scored through its inner transformer, past the outer hooks
                shard(self.reward.model, root=False, compute_dtype=compute_dtype)

    def save(self, path, tokenizer, state=None, tensors=None, write=True) -> Path:
        """Policy in plain transformers format at `path`, the critic in `path/critic`."""
        policy = whole_state(self.policy)  # None unless sharded
        critic = whole_state(self.critic) if self.critic is not None else None
        if write:
            save_checkpoint(path, _Writer(self.policy, policy), tokenizer,
                            _Writer(self.critic, critic) if self.critic is not None else None, state, tensors)
        return Path(path)

    def load(self, path) -> None:
        """Policy and critic (backbone and value head) from a directory `save` wrote, exactly."""
        from safetensors.torch import load_file

        path = Path(path)
        load_weights(self.policy, path)
        if self.critic is None:
            return
        load_weights(self.critic.backbone, path / "critic", skip=(VALUE_HEAD_FILE,))
        self.critic.value_head.load_state_dict(load_file(str(path / "critic" / VALUE_HEAD_FILE)))


# --- shared_base: one base, LoRA adapters ----------------------------------------------


class SharedBaseRoles:
    """One base model in a PeftModel with adapters "policy", "critic" and optionally "reward".

    `value_head` (H -> 1) turns the critic adapter's last hidden state into values;
    `reward_head` (H -> 1, with the bias that holds score normalisation) does the same for
    the reward adapter at the last real token. `reward` is the RewardSource used when the
    reward is not an adapter (a separate model or a function); `reward_eos` is the
    (end ids, EOS id, pad id) with which the reward adapter's inputs are EOS-terminated.
    """

    def __init__(self, model, value_head: Optional[nn.Linear], reward_head: Optional[nn.Linear] = None, reward=None,
                 reward_eos: Optional[tuple[list[int], int, int]] = None):
        if (reward_head is None) == (reward is None):
            raise ValueError("SharedBaseRoles needs exactly one reward: a reward adapter with its head, or a source")
        self.model, self.value_head, self.reward_head, self.reward = model, value_head, reward_head, reward
        self.reward_eos = reward_eos
        disable_dropout(model)  # base dropout and every adapter's lora_dropout (forced to 0 in RL)
        # The wrapped transformers model, adapters injected: called directly it keeps its own
        # forward signature (logits_to_keep, cache), and peft's adapter switches still apply.
        self.causal_lm = model.get_base_model()
        self.generation_model = self.causal_lm
        # Which adapters exist decides where the trunk ends: below the lowest adapted block.
        self.adapters = (["policy"] + (["critic"] if value_head is not None else [])
                         + (["reward"] if reward_head is not None else []))
        lowest = [adapter_layers(model, a) for a in self.adapters]
        self.trunk_end = 0 if any(x is None for x in lowest) else min(min(x) for x in lowest)
        if reward_head is not None:
            reward_head.requires_grad_(False)
        # peft's set_adapter marks the active adapter trainable and the others frozen; which role
        # trains is ours to decide: policy and critic adapters, never the base or the reward adapter.
        self._index_parameters()

    def _index_parameters(self) -> None:
        """Which parameters train, by identity (sharding replaces every parameter object)."""
        self._trainable = {}
        for name, p in self.model.named_parameters():
            trains = "lora_" in name and (".policy." in name or ".critic." in name)
            p.requires_grad_(trains)
            self._trainable[id(p)] = trains
        self._params = list(self.model.parameters())

    # --- switching roles ---

    @contextmanager
    def role(self, name: str):
        """Run the block inside as role `name` ("policy" | "critic" | "reward" | "reference")."""
        if name == "reference":
            with self.model.disable_adapter():
                yield
            return
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
            for p in self._params:
                p.requires_grad_(self._trainable[id(p)])
        yield

    def _from_trunk(self, trunk: Optional[Tensor], length: int):
        """Start at the first adapted block from a trunk that may be wider than this sequence."""
        if trunk is None or self.trunk_end == 0:
            return nullcontext()
        return start_at_block(self.causal_lm, self.trunk_end, trunk[:, :length])

    @torch.no_grad()
    def compute_trunk(self, input_ids: Tensor, attention_mask: Tensor) -> Optional[Tensor]:
        """(B, L, H) input of the lowest adapted block; the blocks above it are not run."""
        if self.trunk_end == 0:
            return None
        with self.role("reference"):
            return lower_blocks_output(self.causal_lm.base_model, self.trunk_end, input_ids, attention_mask)

    # --- the Roles protocol ---

    def sample(self, prompt_ids, prompt_mask, settings, tokenizer, gaps=None):
        with self.role("policy"), whole_weights(self.causal_lm):
            return sample_responses(self.causal_lm, prompt_ids, prompt_mask, settings, tokenizer, gaps)

    @torch.no_grad()
    def score(self, input_ids, attention_mask, response_length, settings, prompts, responses,
              keep_graph: bool = False, columns=None) -> SequenceScores:
        # keep_graph is not supported here (adapters switch between the forwards): graph stays None.
        # The reward adapter reads EOS-terminated texts (as `tether reward` trains it); the
        # other roles the sequences as sampled. One trunk, of the longer of the two, serves all.
        reward_ids, reward_mask = input_ids, attention_mask
        if self.reward_head is not None and self.reward_eos is not None:
            ends, eos_id, pad_id = self.reward_eos
            reward_ids, reward_mask = append_missing_eos(input_ids, attention_mask, torch.tensor(ends), eos_id, pad_id)
        trunk = self.compute_trunk(reward_ids, reward_mask)

        def logprobs(role):
            with self.role(role):
                logits = self._logits(input_ids, attention_mask, response_length, settings.pad_id, trunk)
            return logprobs_from_logits(logits, input_ids[:, -response_length:], settings.temperature)

        policy, reference = logprobs("policy"), logprobs("reference")
        values = self.values(input_ids, attention_mask, response_length, trunk)
        parts = None
        if self.reward_head is not None:
            scores = self.adapter_scores(reward_ids, reward_mask, trunk)
        else:
            scores, parts = external_scores(self.reward, prompts, responses, input_ids, attention_mask, columns)
        return SequenceScores(policy, reference, values, scores, trunk, reward_parts=parts)

    def _logits(self, input_ids, attention_mask, response_length, pad_id, trunk):
        with self._from_trunk(trunk, input_ids.shape[1]):
            return response_logits(self.causal_lm, input_ids, attention_mask, response_length, pad_id)

    def _hidden(self, role: str, input_ids, attention_mask, trunk) -> Tensor:
        with self.role(role), self._from_trunk(trunk, input_ids.shape[1]):
            return last_hidden_state(self.causal_lm.base_model, input_ids, attention_mask)

    def adapter_scores(self, input_ids, attention_mask, trunk=None) -> Tensor:
        """(B,) reward-adapter scores read at the last real token (N-details item 5)."""
        hidden = self._hidden("reward", input_ids, attention_mask, trunk)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        scores = self.reward_head(pooled.to(self.reward_head.weight.dtype)).squeeze(-1).float()
        if not torch.isfinite(scores).all():
            bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
            raise RewardError(f"reward adapter produced a non-finite score for item {bad[0]}")
        return scores

    def policy_logits(self, input_ids, attention_mask, response_length, pad_id, trunk=None):
        with self.role("policy"):
            return self._logits(input_ids, attention_mask, response_length, pad_id, trunk)

    def values(self, input_ids, attention_mask, response_length, trunk=None):
        if self.value_head is None:  # critic-free estimators: nothing reads these
            return _no_values(input_ids, response_length)
        hidden = self._hidden("critic", input_ids, attention_mask, trunk)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # (B, L)
        return values[:, -(response_length + 1) : -1]

    def lm_logits(self, input_ids, attention_mask):
        with self.role("policy"):
            return _lm_forward(self.causal_lm, input_ids, attention_mask)

    def trainable(self, role: str) -> list[nn.Parameter]:
        if role == "policy":
            return [p for n, p in self.model.named_parameters() if ".policy." in n and self._trainable[id(p)]]
        if self.value_head is None:
            return []
        adapter = [p for n, p in self.model.named_parameters() if ".critic." in n and self._trainable[id(p)]]
        return adapter + list(self.value_head.parameters())

    def train(self) -> None:
        self.model.train()
        if self.value_head is not None:
            self.value_head.train()

    def eval(self) -> None:
        self.model.eval()
        if self.value_head is not None:
            self.value_head.eval()

    def shard(self, frozen: bool, compute_dtype: Optional[torch.dtype] = None) -> None:
        """The base's blocks (LoRA weights inside them included); embeddings, final norm and head stay
        whole: the trunk and the critic reach into the base past its outer module (tether/sharding.py)."""
        # bf16-mixed: one gather dtype for the bf16 base and its fp32 adapters inside each block
        shard(self.causal_lm, root=False, compute_dtype=compute_dtype)
        if frozen and isinstance(getattr(self.reward, "model", None), nn.Module):
            shard(self.reward.model, root=False, compute_dtype=compute_dtype)
        self._index_parameters()

    def save(self, path, tokenizer, state=None, tensors=None, write=True) -> Path:
        """The policy adapter (peft format) + tokenizer at `path`; the critic adapter and value head in
        `path/critic`. `tether export` merges the policy adapter into a plain transformers model."""
        policy = self._adapter_state("policy")
        critic = self._adapter_state("critic") if self.value_head is not None else None
        if write:
            save_checkpoint(path, _AdapterWriter(self, "policy", policy), tokenizer,
                            _AdapterWriter(self, "critic", critic) if self.value_head is not None else None,
                            state, tensors)
        return Path(path)

    def _adapter_state(self, adapter: str) -> Optional[dict]:
        """One adapter's weights gathered whole when sharded (every rank), else None."""
        return whole_state(self.model, keep=lambda name: "lora_" in name and f".{adapter}." in name)

    def policy_adapter(self, path) -> Path:
        """Only the policy adapter, in peft format, at `path` (what a generation engine on the same base needs)."""
        save_adapter(self.model, "policy", path, self._adapter_state("policy"))
        return Path(path)

    def load(self, path) -> None:
        """Policy and critic adapters and the value head from a directory `save` wrote."""
        from safetensors.torch import load_file

        path = Path(path)
        load_adapter_weights(self.model, "policy", path)
        if self.value_head is None:
            return
        load_adapter_weights(self.model, "critic", path / "critic")
        self.value_head.load_state_dict(load_file(str(path / "critic" / VALUE_HEAD_FILE)))


class _AdapterWriter:
    """What save_checkpoint calls `save_pretrained` on: one adapter (+ the value head for the critic)."""

    def __init__(self, roles: SharedBaseRoles, adapter: str, state: Optional[dict] = None):
        self.roles, self.adapter, self.state = roles, adapter, state

    def save_pretrained(self, path, **_kwargs) -> None:
        from safetensors.torch import save_file

        save_adapter(self.roles.model, self.adapter, path, self.state)
        if self.adapter == "critic":
            head = {k: v.detach().contiguous().cpu() for k, v in self.roles.value_head.state_dict().items()}
            save_file(head, str(Path(path) / VALUE_HEAD_FILE))


class _Writer:
    """What save_checkpoint calls `save_pretrained` on: a model, with its weights gathered whole
    from FSDP2 shards when `state` is given."""

    def __init__(self, model: nn.Module, state: Optional[dict] = None):
        self.model, self.state = model, state

    def save_pretrained(self, path, **kwargs) -> None:
        if self.state is not None:
            kwargs["state_dict"] = self.state
        self.model.save_pretrained(path, **kwargs)
