"""The three trainers (SFT, reward model, PPO) and what they share."""

from __future__ import annotations

import math

import torch
from torch import nn


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
    from tether.sharding import is_dtensor

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
    from tether.sharding import grad_norm, is_dtensor

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
