"""The three trainers (SFT, reward model, PPO) and what they share: AdamW, the learning-rate
schedule, gradient clipping, and the optimizer step that no non-finite loss or gradient gets past."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from tether import distributed
from tether.sharding import grad_norm, is_dtensor


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; the step was not applied."""


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after `step` optimizer steps."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def adamw(params: list[nn.Parameter], **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one (CPU and CUDA floating-point weights): one pass
    over each parameter per step instead of about ten (sqrt, lerp, addcdiv, ... each a pass), a tenth
    of a 10.8M-parameter GPT-2's PPO training time on CPU (benchmarks/ppo_speed.py). Same update up
    to float rounding; the state dict is the same, so checkpoints load either way."""
    params = list(params)
    fusable = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(_sharded_apart(params), fused=fusable or None, **kwargs)


def _sharded_apart(params: list[nn.Parameter]):
    """FSDP2 shards (DTensor) and whole tensors in separate groups: one fused kernel call takes one kind."""
    shards = [p for p in params if is_dtensor(p)]
    if not shards or len(shards) == len(params):
        return params
    return [{"params": shards}, {"params": [p for p in params if not is_dtensor(p)]}]


def clip_grad_norm(params: list[nn.Parameter], max_norm) -> float:
    """Global gradient norm before clipping; gradients are scaled only when it exceeds max_norm
    (torch's clip_grad_norm_ multiplies every gradient by the clipped factor, 1.0 included: a pass
    over all of them each step for nothing). A non-finite norm is returned and nothing is scaled."""
    if not params:
        return 0.0
    grads = [p.grad for p in params]
    sharded = any(is_dtensor(g) for g in grads)
    norm = grad_norm(grads) if sharded else torch.nn.utils.get_total_norm(grads)
    value = norm.item()
    if max_norm is not None and math.isfinite(value) and value > max_norm:
        if sharded:  # torch's clipping multiplies shards and whole tensors in one kernel: not both kinds
            with torch.no_grad():
                for g in grads:
                    g.mul_(max_norm / (value + 1e-6))
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return value


def check_finite(losses: Sequence[tuple[str, Tensor]], message: str,
                 optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Raises NonFiniteError on every rank when a loss is not finite on any (no rank may go on to the
    gradient sum alone), before any backward of it reaches an optimizer; one host sync for the list.

    `message` may name `{what}` and `{value}`: this rank's first non-finite loss ("loss on another
    rank", nan, when its own are finite). The gradients of `optimizers` are dropped first."""
    finite = bool(torch.stack([torch.isfinite(loss).all() for _, loss in losses]).all()) if losses else True
    if not distributed.any_rank(not finite):
        return
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    bad = [(what, loss.item()) for what, loss in losses if not torch.isfinite(loss).all()]
    what, value = bad[0] if bad else ("loss on another rank", float("nan"))
    raise NonFiniteError(message.format(what=what, value=value))


def clip_and_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                  params: list[nn.Parameter], max_norm, message: str, fault: bool = False) -> float:
    """Sum the gradients of `params` over ranks, clip them to `max_norm`, then step the optimizer and
    its schedule; returns the norm before clipping. A non-finite norm drops the gradients and raises
    NonFiniteError(message) instead: nothing reaches the weights. `fault`: the norm is taken as NaN
    (fault injection, as a real one would be)."""
    distributed.sum_gradients(params)  # data parallel: every rank's share (FSDP2 shards: summed in backward)
    norm = float("nan") if fault else clip_grad_norm(params, max_norm)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(message)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
