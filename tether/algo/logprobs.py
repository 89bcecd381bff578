"""Per-token log-probabilities and entropies from logits, in float32.

Logits are divided by the sampling temperature, exactly as when sampling: otherwise the
PPO ratio and the KL are computed under a different distribution than the one sampled
from (N-details item 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["logprobs_from_logits", "entropy_from_logits"]

# Upcast at most this many logits at a time: bounds the transient float32 copy of
# bf16/fp16 logits (B*R*V can be GBs) without a slow per-token Python loop.
_CHUNK_ELEMENTS = 1 << 24


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_chunks(num_rows: int, vocab: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return [(i, min(i + step, num_rows)) for i in range(0, num_rows, step)] or [(0, 0)]


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each chosen token under ``softmax(logits / temperature)``.

    Shapes: ``logits`` (B, R, V) (any leading dims work), ``tokens`` (B, R) long with
    values in [0, V) -> (B, R). Result is float32 (float64 if the logits are float64);
    bf16/fp16 logits are upcast chunk by chunk.

    Computed as ``logits[token] - logsumexp(logits)``: no full (B, R, V) log-softmax is
    materialised or kept for backward (as TRL's ``selective_log_softmax``).
    """
    _check_temperature(temperature)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    vocab = logits.shape[-1]
    dtype = _compute_dtype(logits)
    flat_logits = logits.reshape(-1, vocab)  # (N, V)
    flat_tokens = tokens.reshape(-1, 1).long()  # (N, 1)
    out = []
    for lo, hi in _row_chunks(flat_logits.shape[0], vocab):
        chunk = flat_logits[lo:hi].to(dtype)
        if temperature != 1.0:
            chunk = chunk / temperature
        chosen = chunk.gather(-1, flat_tokens[lo:hi]).squeeze(-1)  # (n,)
        out.append(chosen - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out).reshape(tokens.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits / temperature)``.

    Shapes: ``logits`` (B, R, V) (any leading dims) -> (B, R), float32 (float64 for
    float64 logits). Vocab entries with ``-inf`` logits (p = 0) contribute 0, not NaN.
    """
    _check_temperature(temperature)
    vocab = logits.shape[-1]
    dtype = _compute_dtype(logits)
    flat_logits = logits.reshape(-1, vocab)
    out = []
    for lo, hi in _row_chunks(flat_logits.shape[0], vocab):
        chunk = flat_logits[lo:hi].to(dtype)
        if temperature != 1.0:
            chunk = chunk / temperature
        logp = torch.log_softmax(chunk, dim=-1)
        p = logp.exp()
        # p == 0 where logp == -inf: select logp away first so neither value nor grad is NaN.
        logp = torch.where(p > 0, logp, torch.zeros((), dtype=dtype, device=logp.device))
        out.append(-(p * logp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])
