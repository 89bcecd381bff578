"""Per-token log-probabilities and entropies from logits, in float32.

Logits are divided by the sampling temperature, exactly as when sampling: otherwise the
PPO ratio and the KL are computed under a different distribution than the one sampled
from (N-details item 3).

Memory. The logits are the largest tensor of a PPO step (B*R*V: 16 x 256 x 49152 is 0.8 GB
in fp32), so whatever autograd keeps at their size costs as much again. Plain autograd
through the upcast, the division by T, the log-softmax and the entropy keeps a float32 copy
of the logits per intermediate (benchmarks/logprob_memory.py: 3.9 GB for that step). Here
the backward pass is written by hand: the forward saves only the logits themselves (in
their own dtype), the tokens and the entropy per row, and the backward recomputes the
softmax one row chunk at a time, so the step's transient memory is one float32 chunk on
top of the gradient. This is the recomputation of Cut Cross-Entropy (Wijmans et al. 2024,
arXiv:2411.09009) applied to logits already computed. With z = logits / T:
d log p_k / dz = onehot(k) - p, and dH / dz = -p (log p + H).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["logprobs_from_logits", "entropy_from_logits"]

# Upcast at most this many logits at a time: bounds the transient float32 copy of bf16/fp16
# logits in forward and the recomputed softmax in backward (B*R*V can be GBs) without a slow
# per-token Python loop.
_CHUNK_ELEMENTS = 1 << 24


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_chunks(num_rows: int, vocab: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return [(i, min(i + step, num_rows)) for i in range(0, num_rows, step)] or [(0, 0)]


def _needs_grad(logits: Tensor) -> bool:
    return torch.is_grad_enabled() and logits.requires_grad


# --- one row chunk: rows (n, V) of logits in their own dtype -------------------------
# The forward helpers compute nothing a backward would need, so the no-grad path (rollout
# scoring) costs what it did; the gradient helpers recompute the softmax in backward.


def _scaled(rows: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """z = rows / T (n, V) in ``dtype``; ``rows`` itself when nothing changes (no copy)."""
    z = rows.to(dtype)
    return z if temperature == 1.0 else z / temperature


def _probs_and_finite_log_probs(log_p: Tensor) -> tuple[Tensor, Tensor]:
    """p = exp(log p), and log p with 0 where p == 0 (-inf logits): p log p is then 0 there,
    not 0 * -inf = NaN, in the value and in the gradient. Overwrites ``log_p``."""
    p = log_p.exp()
    return p, log_p.masked_fill_(p == 0, 0.0)


def _chunk_logprobs(rows: Tensor, tokens: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """log p(token) (n,) as ``z[token] - logsumexp(z)``: no (n, V) log-softmax is materialised
    (as TRL's ``selective_log_softmax``)."""
    z = _scaled(rows, temperature, dtype)
    return z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _chunk_entropy(rows: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """H = -sum_v p_v log p_v (n,)."""
    p, log_p = _probs_and_finite_log_probs(torch.log_softmax(_scaled(rows, temperature, dtype), dim=-1))
    return -(p * log_p).sum(-1)


def _chunk_logprobs_grad(rows: Tensor, tokens: Tensor, grad_out: Tensor, temperature: float) -> Tensor:
    """d(g * log p(token)) / d rows = g * (onehot(token) - p) / T, (n, V) in g's dtype."""
    p = torch.softmax(_scaled(rows, temperature, grad_out.dtype), dim=-1)  # recomputed
    grad = p.mul_(-grad_out[:, None]).scatter_add_(-1, tokens[:, None], grad_out[:, None])
    return grad if temperature == 1.0 else grad.div_(temperature)


def _chunk_entropy_grad(rows: Tensor, entropy: Tensor, grad_out: Tensor, temperature: float) -> Tensor:
    """d(g * H) / d rows = -g * p * (log p + H) / T, (n, V) in g's dtype."""
    log_p = torch.log_softmax(_scaled(rows, temperature, grad_out.dtype), dim=-1)  # recomputed
    p, log_p = _probs_and_finite_log_probs(log_p)
    grad = log_p.add_(entropy[:, None]).mul_(p).mul_(-grad_out[:, None])
    return grad if temperature == 1.0 else grad.div_(temperature)


def _logprobs_forward(rows: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """(N, V), (N,) -> log p(token) (N,), chunk by chunk."""
    dtype = _compute_dtype(rows)
    return torch.cat([_chunk_logprobs(rows[lo:hi], tokens[lo:hi], temperature, dtype)
                      for lo, hi in _row_chunks(*rows.shape)])


def _entropy_forward(rows: Tensor, temperature: float) -> Tensor:
    """(N, V) -> entropy (N,), chunk by chunk."""
    dtype = _compute_dtype(rows)
    return torch.cat([_chunk_entropy(rows[lo:hi], temperature, dtype) for lo, hi in _row_chunks(*rows.shape)])


# --- autograd: save the logits, recompute each chunk in backward ------------------------
# The Functions take the logits in their own (contiguous) shape and return a gradient of that
# shape that is no view: autograd then sums the log-prob and entropy gradients in place, where
# a view (of a reshape outside) made it allocate a third logits-sized buffer.


def _rows(logits: Tensor) -> Tensor:
    """(..., V) contiguous -> (N, V) view."""
    return logits.view(-1, logits.shape[-1])


def _chunked_grad(logits: Tensor, chunk_grad) -> Tensor:
    """Gradient wrt ``logits``, in their dtype and shape, filled one row chunk at a time by
    ``chunk_grad(lo, hi, rows[lo:hi])`` (compute dtype, cast on write)."""
    rows = _rows(logits)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    grad_rows = _rows(grad)
    for lo, hi in _row_chunks(*rows.shape):
        grad_rows[lo:hi] = chunk_grad(lo, hi, rows[lo:hi])
    return grad


class _LogprobsFromLogits(torch.autograd.Function):
    """(..., V) logits, (N,) tokens -> (N,) log p(token). Saves the logits and tokens only."""

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(logits, tokens)
        ctx.temperature = temperature
        return _logprobs_forward(_rows(logits), tokens, temperature)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, tokens = ctx.saved_tensors
        grad_out = grad_out.to(_compute_dtype(logits))
        grad = _chunked_grad(logits, lambda lo, hi, rows: _chunk_logprobs_grad(
            rows, tokens[lo:hi], grad_out[lo:hi], ctx.temperature))
        return grad, None, None


class _EntropyFromLogits(torch.autograd.Function):
    """(..., V) logits -> (N,) entropy. Saves the logits and the entropy only."""

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, temperature: float) -> Tensor:
        entropy = _entropy_forward(_rows(logits), temperature)
        ctx.save_for_backward(logits, entropy)
        ctx.temperature = temperature
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, None]:
        logits, entropy = ctx.saved_tensors
        grad_out = grad_out.to(entropy.dtype)
        grad = _chunked_grad(logits, lambda lo, hi, rows: _chunk_entropy_grad(
            rows, entropy[lo:hi], grad_out[lo:hi], ctx.temperature))
        return grad, None


# --- public ---------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each chosen token under ``softmax(logits / temperature)``.

    Shapes: ``logits`` (B, R, V) (any leading dims work), ``tokens`` (B, R) long with
    values in [0, V) -> (B, R). Result is float32 (float64 if the logits are float64);
    bf16/fp16 logits are upcast chunk by chunk.

    Computed as ``logits[token] - logsumexp(logits)``: no full (B, R, V) log-softmax is
    materialised (as TRL's ``selective_log_softmax``). With grad, only the logits and tokens
    are kept for backward, which recomputes the softmax chunk by chunk and returns
    ``grad * (onehot(token) - p) / T`` in the logits' dtype (module docstring: memory).
    """
    _check_temperature(temperature)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    flat_tokens = tokens.reshape(-1).long()  # (N,)
    if _needs_grad(logits):
        # A strided slice is copied once, in the logits' dtype, as the reshape always did.
        out = _LogprobsFromLogits.apply(logits.contiguous(), flat_tokens, temperature)
    else:
        out = _logprobs_forward(logits.reshape(-1, logits.shape[-1]), flat_tokens, temperature)
    return out.reshape(tokens.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits / temperature)``.

    Shapes: ``logits`` (B, R, V) (any leading dims) -> (B, R), float32 (float64 for
    float64 logits). Vocab entries with ``-inf`` logits (p = 0) contribute 0, not NaN.
    With grad, only the logits and the entropy per row are kept for backward, which
    recomputes the softmax chunk by chunk: with z = logits / T, dH/dz_v = -p_v (log p_v + H),
    so dH/dlogits = -p (log p + H) / T, in the logits' dtype (module docstring: memory).
    """
    _check_temperature(temperature)
    if _needs_grad(logits):
        entropy = _EntropyFromLogits.apply(logits.contiguous(), temperature)
    else:
        entropy = _entropy_forward(logits.reshape(-1, logits.shape[-1]), temperature)
    return entropy.reshape(logits.shape[:-1])
