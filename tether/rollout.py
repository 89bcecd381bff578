"""Rollout: the batch contract, and the driver that samples responses (a generation backend) and
scores them with all four roles.

Prompts are left-padded; responses are cut after their first EOS / stop string and
right-padded. The sampling and scoring primitives are in tether/sampling.py.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tether.generation import BuiltinSampler
from tether.rewards import rows_of
from tether.sampling import GenerationSettings

@dataclass
class Rollout:
    input_ids: Tensor       # (B, P+R) prompt (left-padded) + response (right-padded)
    attention_mask: Tensor  # (B, P+R) 1 for real tokens
    response_mask: Tensor   # (B, R)   True for real response tokens, EOS included
    logprobs: Tensor        # (B, R)   log π_old(a_t|s_t), logits / temperature
    ref_logprobs: Tensor    # (B, R)   log π_ref(a_t|s_t)
    values: Tensor          # (B, R)   V_old(s_t)
    scores: Tensor          # (B,)     reward per sequence, before KL shaping
    ended: Tensor           # (B,)     True when the response emitted EOS or a stop string
    prompts: list[str]      # decoded prompts (special tokens removed)
    responses: list[str]    # decoded responses (special tokens removed)
    trunk: Optional[Tensor] = None  # (B, P+R, H) frozen lower blocks' output, shared by every role (shared_base)
    graph: Optional[tuple] = None   # policy logits and values with grad, for the first optimizer step (keep_graph)
    generate_s: float = 0.0         # seconds spent sampling
    score_s: float = 0.0            # seconds spent scoring with the four roles
    engine_logprobs: Optional[Tensor] = None  # (B, R) what the generation engine reported (never trained on)
    columns: Optional[dict] = None  # the prompt records' other fields, {name: one value per row}, for the reward
    reward_parts: Optional[Tensor] = None  # (B, K) each reward function's own score, when several are summed

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def response_ids(self) -> Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_length :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def select_rows(batch, index: Tensor):
    """The same dataclass with every tensor field indexed by `index` along dim 0 (lists too)."""
    picked = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            picked[f.name] = value[index]
        elif isinstance(value, list):
            picked[f.name] = [value[i] for i in index.tolist()]
        elif isinstance(value, dict):  # columns: a list per name
            picked[f.name] = {name: [values[i] for i in index.tolist()] for name, values in value.items()}
        else:
            picked[f.name] = value
    return type(batch)(**picked)


@torch.no_grad()
def collect_rollout(roles, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, settings: GenerationSettings,
                    chunk_size: int = 0, keep_graph: bool = False, backend=None,
                    columns: Optional[dict] = None) -> Rollout:
    """1) sample (the generation backend; default: the built-in sampler on the policy), 2) score with
    policy, reference, critic and reward — chunk by chunk. `columns`: the prompt records' other fields,
    one value per row, handed to the reward.
    keep_graph (one chunk only): the policy and critic scoring forwards keep their graph (Rollout.graph)."""
    backend = backend or BuiltinSampler()
    size = chunk_size or prompt_ids.shape[0]
    keep_graph = keep_graph and size >= prompt_ids.shape[0]
    parts = [_rollout_chunk(roles, tokenizer, prompt_ids[i : i + size], prompt_mask[i : i + size], settings,
                            keep_graph, backend, rows_of(columns, slice(i, i + size)))
             for i in range(0, prompt_ids.shape[0], size)]
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, settings.pad_id)


def synced_clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished the work queued so far: CUDA kernels run
    asynchronously, so an unsynchronised clock charges one phase's kernels to the next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _rollout_chunk(roles, tokenizer, prompt_ids, prompt_mask, settings, keep_graph: bool, backend,
                   columns: Optional[dict]) -> Rollout:
    start = synced_clock(prompt_ids.device)
    sampled = backend.generate(roles, prompt_ids, prompt_mask, settings, tokenizer)
    response_ids, response_mask, ended = sampled.response_ids, sampled.response_mask, sampled.ended
    generated = synced_clock(prompt_ids.device)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    out = roles.score(input_ids, attention_mask, response_ids.shape[1], settings, prompts, responses, keep_graph,
                      columns)
    engine = sampled.engine_logprobs
    return Rollout(input_ids, attention_mask, response_mask, out.logprobs * response_mask,
                   out.ref_logprobs * response_mask, out.values * response_mask, out.scores, ended, prompts,
                   responses, out.trunk, out.graph, generated - start,
                   synced_clock(prompt_ids.device) - generated, engine * response_mask if engine is not None else None,
                   columns, out.reward_parts)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join chunks whose prompt and response widths differ: left-pad prompts, right-pad responses."""
    prompt_width = max(p.prompt_length for p in parts)
    response_width = max(p.response_mask.shape[1] for p in parts)
    fields = {name: [] for name in ("input_ids", "attention_mask", "response_mask", "logprobs", "ref_logprobs",
                                    "values")}
    for p in parts:
        left, right = prompt_width - p.prompt_length, response_width - p.response_mask.shape[1]
        fields["input_ids"].append(_pad(p.input_ids, left, right, pad_id))
        fields["attention_mask"].append(_pad(p.attention_mask, left, right, 0))
        for name in ("response_mask", "logprobs", "ref_logprobs", "values"):
            fields[name].append(_pad(getattr(p, name), 0, right, 0))
    joined = {k: torch.cat(v) for k, v in fields.items()}
    trunk = None
    if parts[0].trunk is not None:  # (B, P+R(+1), H): left-pad to the prompt width, right-pad to the widest
        width = max(p.trunk.shape[1] + prompt_width - p.prompt_length for p in parts)
        trunk = torch.cat([_pad_hidden(p.trunk, prompt_width - p.prompt_length, width) for p in parts])
    engine = None
    if parts[0].engine_logprobs is not None:
        engine = torch.cat([_pad(p.engine_logprobs, 0, response_width - p.response_mask.shape[1], 0) for p in parts])
    columns = ({name: sum((p.columns[name] for p in parts), []) for name in parts[0].columns}
               if parts[0].columns else parts[0].columns)
    reward_parts = torch.cat([p.reward_parts for p in parts]) if parts[0].reward_parts is not None else None
    return Rollout(**joined, engine_logprobs=engine, columns=columns, reward_parts=reward_parts,
                   scores=torch.cat([p.scores for p in parts]),
                   ended=torch.cat([p.ended for p in parts]),
                   prompts=sum((p.prompts for p in parts), []), responses=sum((p.responses for p in parts), []),
                   trunk=trunk, generate_s=sum(p.generate_s for p in parts), score_s=sum(p.score_s for p in parts))


def _pad(x: Tensor, left: int, right: int, value) -> Tensor:
    return torch.nn.functional.pad(x, (left, right), value=value)


def _pad_hidden(hidden: Tensor, left: int, width: int) -> Tensor:
    """(B, L, H) -> (B, width, H) with `left` zero positions in front (masked positions, never read)."""
    right = width - left - hidden.shape[1]
    return torch.nn.functional.pad(hidden, (0, 0, left, right))
