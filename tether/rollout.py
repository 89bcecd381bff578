"""Rollout: sample responses from the policy, then score them with all four roles.

Prompts are left-padded; responses are cut after their first EOS / stop string and
right-padded. Every log-prob is computed from logits / temperature, exactly as sampled
(N-details item 3), and position ids skip the left padding (N-details item 2).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from tether.algo import entropy_from_logits, logprobs_from_logits
from tether.models import cache_keyword, output_cache, position_ids_from_mask

# Large but finite: keeps softmax/entropy free of NaN even after division by temperature.
SUPPRESSED_LOGIT = -1e4


@dataclass
class GenerationSettings:
    max_new_tokens: int
    eos_ids: list[int]
    pad_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    min_new_tokens: int = 0  # tokens sampled before EOS / a stop string may end a response


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
        else:
            picked[f.name] = value
    return type(batch)(**picked)


# --- sampling -------------------------------------------------------------------


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(B, V) logits with everything outside top-k / the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already exceeds top_p (the top token always stays).
        drop = (probs.cumsum(-1) - probs) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def truncates(settings: GenerationSettings) -> bool:
    """Whether the sampler draws from a distribution other than the policy's softmax(logits / T)."""
    return bool(settings.top_k) or settings.top_p < 1.0 or settings.min_new_tokens > 0


def sample_next_token(logits: Tensor, settings: GenerationSettings, allow_eos: bool = True,
                      eos: Optional[Tensor] = None, gaps: Optional[list] = None) -> Tensor:
    """(B,) tokens sampled from softmax(logits / T) after top-k / top-p; pad is never sampled, nor
    EOS when `allow_eos` is False (before min_new_tokens). `eos`: the EOS ids as a tensor on the
    logits' device (made once per response, not once per token). `gaps`: gets a (B,) tensor of
    log q(a) - log π(a) >= 0, the nats by which the sampled distribution q exceeds the policy's π
    (the one PPO scores) at the sampled token: -log of π's mass that q keeps."""
    logits = logits.float() / settings.temperature
    logits[:, settings.pad_id] = float("-inf")
    policy_norm = logits.logsumexp(-1) if gaps is not None else None
    if not allow_eos:
        eos = eos if eos is not None else torch.tensor(settings.eos_ids, device=logits.device)
        logits.index_fill_(1, eos, float("-inf"))
    logits = filter_logits(logits, settings.top_k, settings.top_p)
    if gaps is not None:
        gaps.append((policy_norm - logits.logsumexp(-1)).clamp(min=0.0))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


def accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@torch.no_grad()
def sample_responses(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, settings: GenerationSettings,
                     tokenizer=None, gaps: Optional[list] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Batched sampling with a KV cache from left-padded prompts.

    Returns response_ids (B, R) right-padded with pad_id, response_mask (B, R) bool (True up to
    and including the EOS / the token completing a stop string), ended (B,) bool. `gaps`: gets
    one (B,) tensor per token, as `sample_next_token`.
    """
    batch = prompt_ids.shape[0]
    device = prompt_ids.device
    eos = torch.tensor(settings.eos_ids, device=device)
    keep = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    mask = prompt_mask.long()
    position = position_ids_from_mask(mask)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position, use_cache=True, **keep)
    position = position[:, -1:] + 1  # (B, 1) next position of every row
    cache_key = cache_keyword(model)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, real = [], []
    for step in range(settings.max_new_tokens):
        may_end = step >= settings.min_new_tokens  # as transformers' min_new_tokens: EOS not counted
        token = sample_next_token(out.logits[:, -1], settings, allow_eos=may_end, eos=eos, gaps=gaps)
        token = torch.where(alive, token, torch.full_like(token, settings.pad_id))
        tokens.append(token)
        real.append(alive.clone())
        ended |= alive & torch.isin(token, eos)
        if settings.stop_strings and tokenizer is not None and may_end:
            ended |= alive & _hits_stop_string(torch.stack(tokens, 1), settings.stop_strings, tokenizer)
        alive &= ~ended
        if step == settings.max_new_tokens - 1 or not alive.any():  # the one host sync per token: stop?
            break
        mask = torch.cat([mask, real[-1].long().unsqueeze(1)], dim=1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position,
                    use_cache=True, **{cache_key: output_cache(out)})
        position = position + 1
    return torch.stack(tokens, 1), torch.stack(real, 1), ended


def _hits_stop_string(tokens: Tensor, stop_strings: list[str], tokenizer) -> Tensor:
    """(B,) True where the decoded response so far contains a stop string."""
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=tokens.device)


# --- scoring --------------------------------------------------------------------


def response_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_length: int,
                    pad_id: Optional[int] = None) -> Tensor:
    """(B, R, V) logits predicting each response token; only those R positions go through the
    LM head (`logits_to_keep`), so the full (B, P+R, V) tensor never exists.

    The positions are given as an index tensor, not a count: the model then gathers a contiguous
    (B, R, H) block, where a trailing slice is strided and makes the LM head a batched matmul
    against a broadcast weight, about 4x slower on CPU (measured on SmolLM2)."""
    length = input_ids.shape[1]
    keep = {}
    if accepts(model, "logits_to_keep"):
        keep["logits_to_keep"] = torch.arange(length - response_length - 1, length - 1, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False, **keep)
    logits = out.logits if keep else out.logits[:, -(response_length + 1) : -1]
    if pad_id is not None:
        # Same distribution as sampling: pad is never a response token.
        logits[..., pad_id] = SUPPRESSED_LOGIT
    return logits


def response_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_length: int,
                      temperature: float, pad_id: Optional[int] = None,
                      with_entropy: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """(B, R) log π(a_t|s_t) of the response tokens under logits / temperature, and optionally entropy."""
    logits = response_logits(model, input_ids, attention_mask, response_length, pad_id)
    tokens = input_ids[:, -response_length:]
    logprobs = logprobs_from_logits(logits, tokens, temperature)
    entropy = entropy_from_logits(logits.detach(), temperature) if with_entropy else None
    return logprobs, entropy


@torch.no_grad()
def collect_rollout(roles, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, settings: GenerationSettings,
                    chunk_size: int = 0, keep_graph: bool = False, backend=None) -> Rollout:
    """1) sample (the generation backend; default: the built-in sampler on the policy), 2) score with
    policy, reference, critic and reward — chunk by chunk.
    keep_graph (one chunk only): the policy and critic scoring forwards keep their graph (Rollout.graph)."""
    from tether.generation import BuiltinSampler

    backend = backend or BuiltinSampler()
    size = chunk_size or prompt_ids.shape[0]
    keep_graph = keep_graph and size >= prompt_ids.shape[0]
    parts = [_rollout_chunk(roles, tokenizer, prompt_ids[i : i + size], prompt_mask[i : i + size], settings,
                            keep_graph, backend) for i in range(0, prompt_ids.shape[0], size)]
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, settings.pad_id)


def synced_clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished the work queued so far: CUDA kernels run
    asynchronously, so an unsynchronised clock charges one phase's kernels to the next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _rollout_chunk(roles, tokenizer, prompt_ids, prompt_mask, settings, keep_graph: bool, backend) -> Rollout:
    start = synced_clock(prompt_ids.device)
    sampled = backend.generate(roles, prompt_ids, prompt_mask, settings, tokenizer)
    response_ids, response_mask, ended = sampled.response_ids, sampled.response_mask, sampled.ended
    generated = synced_clock(prompt_ids.device)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    out = roles.score(input_ids, attention_mask, response_ids.shape[1], settings, prompts, responses, keep_graph)
    engine = sampled.engine_logprobs
    return Rollout(input_ids, attention_mask, response_mask, out.logprobs * response_mask,
                   out.ref_logprobs * response_mask, out.values * response_mask, out.scores, ended, prompts,
                   responses, out.trunk, out.graph, generated - start,
                   synced_clock(prompt_ids.device) - generated, engine * response_mask if engine is not None else None)


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
    return Rollout(**joined, engine_logprobs=engine, scores=torch.cat([p.scores for p in parts]),
                   ended=torch.cat([p.ended for p in parts]),
                   prompts=sum((p.prompts for p in parts), []), responses=sum((p.responses for p in parts), []),
                   trunk=trunk, generate_s=sum(p.generate_s for p in parts), score_s=sum(p.score_s for p in parts))


def _pad(x: Tensor, left: int, right: int, value) -> Tensor:
    return torch.nn.functional.pad(x, (left, right), value=value)


def _pad_hidden(hidden: Tensor, left: int, width: int) -> Tensor:
    """(B, L, H) -> (B, width, H) with `left` zero positions in front (masked positions, never read)."""
    right = width - left - hidden.shape[1]
    return torch.nn.functional.pad(hidden, (0, 0, left, right))
