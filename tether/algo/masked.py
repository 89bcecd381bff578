"""Reductions over the real tokens of a batch.

Convention (everywhere in tether): ``mask`` is a bool or 0/1 tensor, **True (non-zero) =
a real token that counts**. Masked-out positions are *selected away* with
``torch.where`` rather than multiplied by 0, so even ``inf``/``nan`` garbage there can
never leak into a result (``inf * 0 = nan``).

These reductions are local to one process; under data parallelism a trainer must
all-reduce the sums and counts itself (DESIGN.md §8).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "explained_variance",
]


def _as_bool_mask(x: Tensor, mask: Tensor) -> Tensor:
    """Return ``mask`` as bool, broadcast to ``x.shape`` (raises if not broadcastable)."""
    mask = mask.bool() if mask.dtype != torch.bool else mask
    if mask.shape != x.shape:
        try:
            mask = torch.broadcast_to(mask, x.shape)
        except RuntimeError as err:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape {tuple(x.shape)}"
            ) from err
    return mask


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with masked-out positions replaced by exactly 0 (shape of ``x``).

    Internal helper shared by the other ``tether.algo`` modules: sanitising inputs
    *before* any arithmetic keeps garbage at padded positions out of values and grads.
    """
    return torch.where(_as_bool_mask(x, mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is True.

    Shapes: ``x`` (...), ``mask`` broadcastable to ``x``. Returns a 0-dim tensor when
    ``dim`` is None, else ``x`` with ``dim`` reduced.
    """
    x = _zero_masked(x, mask)
    return x.sum() if dim is None else x.sum(dim=dim)


def _count(x: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    m = _as_bool_mask(x, mask)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over real positions: ``masked_sum / count``.

    Shapes as :func:`masked_sum`. Where the count is 0 the result is 0 (never NaN), so an
    empty row or an empty batch contributes nothing instead of poisoning a metric.
    """
    total = masked_sum(x, mask, dim)
    count = _count(x, mask, dim).to(total.dtype)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of ``x`` over all real positions (0-dim tensor).

    Biased (divide by N) by default, like TensorFlow ``tf.nn.moments`` used by the
    reference RLHF code (REFERENCES.md, N-details item 10). ``unbiased=True`` divides by
    ``N - 1``. Returns 0 when there are fewer real positions than the divisor needs
    (N = 0, or N = 1 with ``unbiased``), never NaN.
    """
    x = _zero_masked(x, mask)
    mean = masked_mean(x, mask)
    centered = _zero_masked(x - mean, mask)
    count = _count(x, mask, None).to(x.dtype)
    denom = count - 1 if unbiased else count
    return (centered * centered).sum() / denom.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Whiten ``x`` over the real positions of the whole tensor: ``(x - mean) / sqrt(var + eps)``.

    Shapes: ``x`` (B, R), ``mask`` (B, R) -> (B, R). Mean and (biased) variance are taken
    over all real tokens of the batch (N-details item 10: advantages are whitened to mean
    0, std 1). With ``shift_mean=False`` the mean is added back (scale only, used for
    rewards). Masked-out positions are 0 in the output. ``moments``: (mean, var) taken
    elsewhere, e.g. over every rank's share of the batch, instead of over ``x``.
    """
    x = _zero_masked(x, mask)  # sanitise first: inf garbage must not reach values or grads
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the variance of ``returns`` explained by ``values`` (a detached 0-dim metric).

    Shapes: ``values``, ``returns``, ``mask`` (B, R). ``1 - Var[R - V] / Var[R]`` over the
    real tokens (as CleanRL's ``losses/explained_variance``): 1 is a perfect critic, 0 is
    no better than a constant, negative is worse than a constant.
    If ``Var[R] == 0`` (incl. no real tokens) the ratio is undefined and **0.0** is
    returned ("explains nothing measurable") instead of NaN/inf.
    """
    with torch.no_grad():
        values = _zero_masked(values, mask)
        returns = _zero_masked(returns, mask)
        var_returns = masked_var(returns, mask)
        var_error = masked_var(returns - values, mask)
        safe = torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
        return torch.where(var_returns > 0, 1.0 - var_error / safe, torch.zeros_like(var_returns))


def _reduce_loss(per_token: Tensor, mask: Tensor, num_tokens: float | Tensor | None,
                 weights: Tensor | None = None) -> Tensor:
    """Masked mean of ``per_token``, or ``masked_sum / num_tokens`` when ``num_tokens`` is given,
    or ``masked_sum(weights * per_token)`` with (B, R) ``weights`` (a loss aggregation mode,
    tether/algo/estimators.py: aggregation_weights).

    Dividing every micro-batch by the *whole* minibatch's token count makes the summed
    micro-batch losses (and grads) equal the one-pass masked mean exactly.
    """
    if weights is not None:
        return masked_sum(per_token * weights, mask)
    if num_tokens is None:
        return masked_mean(per_token, mask)
    if not isinstance(num_tokens, Tensor) and not num_tokens > 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return masked_sum(per_token, mask) / num_tokens
