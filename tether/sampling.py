"""Sampling and scoring primitives on one causal LM: the token sampler (temperature, top-k, top-p,
min_new_tokens, stop strings), batched KV-cache generation from left-padded prompts, and the
response logits / log-probs every role scores with.

Every log-prob is computed from logits / temperature, exactly as sampled (N-details item 3), and
position ids skip the left padding (N-details item 2). The rollout driver is tether/rollout.py.
"""

from __future__ import annotations

import inspect
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
