"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for `data_parallel=fsdp2`; nothing here runs otherwise.

Every transformer block of a sharded model holds 1/N of its weights on each of the N ranks and
gathers the rest for its own forward and backward. The gradients are reduce-scattered with a
*sum* (divide factor 1): the losses are already normalised by the global token count, exactly
as for data parallelism (tether/distributed.py), so the update equals one process's.

What stays whole on every rank:
- parameters outside the blocks when a role is reached through parts of its model (the
  shared base: the trunk and the critic call the inner transformer and its blocks directly,
  past the outer module's hooks) — embeddings, final norm and head; they are frozen there;
- the small heads outside the models (value and reward heads of the shared base).
Their gradients, where they have any, are summed by `distributed.sum_gradients`.

Checkpoints are gathered: weights and optimizer state are written whole by rank 0, in the same
format as one process writes, so a run can resume on any number of ranks.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tether import distributed

_RESHARD = "_tether_reshard_after_forward"  # what fully_shard was told, restored after whole_weights


def _mesh(model: nn.Module):
    """A 1-D mesh over every rank, on the device type the model's weights live on (a group serving
    CPU and CUDA has a backend string such as "cpu:gloo,cuda:nccl": the weights say which applies)."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = next(model.parameters()).device.type
    return init_device_mesh(device_type, (distributed.world_size(),))


def block_classes(model: nn.Module) -> set[str]:
    """Names of the transformer block classes inside `model`: what Hugging Face models list as
    `_no_split_modules` (the units device maps and FSDP wrap policies split at)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def shard(model: nn.Module, root: bool = True, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """fully_shard every transformer block of `model`, then (root=True) the rest of it as one unit.
    compute_dtype (bf16-mixed): blocks gathered in that dtype, gradients reduced in fp32, the shards
    (fp32 master weights where they learn) kept as they are (FSDP2 MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if compute_dtype is not None:
        fully_shard = functools.partial(fully_shard, mp_policy=MixedPrecisionPolicy(
            param_dtype=compute_dtype, reduce_dtype=torch.float32))
    mesh, names = _mesh(model), block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"data_parallel=fsdp2 found no transformer blocks in {type(model).__name__} (it lists no "
                         "_no_split_modules); use data_parallel=ddp for this model")
    for block in blocks:
        _fully_shard(fully_shard, block, mesh, reshard_after_forward=True)
    if root:  # the root keeps its weights gathered after forward: backward needs them next
        _fully_shard(fully_shard, model, mesh, reshard_after_forward=False)
    return model


def _fully_shard(fully_shard, module: nn.Module, mesh, reshard_after_forward: bool) -> None:
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    module.set_gradient_divide_factor(1.0)  # a sum over ranks, not a mean (see the module docstring)
    module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    setattr(module, _RESHARD, reshard_after_forward)


def units(*modules: Optional[nn.Module]) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for module in modules if module is not None for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(*modules: Optional[nn.Module]) -> bool:
    return bool(units(*modules))


def whole_state(module: nn.Module, keep=lambda name: True) -> Optional[dict[str, Tensor]]:
    """`module`'s state dict with every shard gathered whole, on the CPU, on every rank (a collective:
    every rank calls it together); None when nothing in `module` is sharded (its own state_dict
    serves). Tied weights stay one tensor under both names, as save_pretrained expects. `keep`
    filters by name (e.g. one adapter's weights only)."""
    if not is_sharded(module):
        return None
    whole: dict[str, Tensor] = {}
    gathered: dict[tuple, Tensor] = {}
    for name, value in module.state_dict().items():
        if not keep(name):
            continue
        local = local_shard(value)
        key = (local.data_ptr(), tuple(value.shape))  # tied names share one shard's storage
        if key not in gathered:
            gathered[key] = (value.full_tensor() if is_dtensor(value) else value).detach().cpu()
        whole[name] = gathered[key]
    return whole


@contextmanager
def whole_weights(*modules: Optional[nn.Module]):
    """Inside: every sharded unit of `modules` holds its whole weights, gathered once, for its
    forwards (generation runs a forward per token: one gather instead of one per token). Every
    rank must enter it together. No-op when nothing is sharded. (state_dict() stays sharded
    inside: FSDP2 always returns shards there; `whole_state` gathers for saving.)"""
    found = units(*modules)
    for unit in found:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in found:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, _RESHARD, True), recurse=False)


def is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded (DTensor) tensor, the tensor itself otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """The global L2 norm of gradients of which some may be shards (DTensor): the squares of the
    local shards are summed over ranks; whole gradients (the same on every rank) count once."""
    local = [g.to_local() for g in grads if is_dtensor(g)]
    whole = [g for g in grads if not is_dtensor(g)]
    device = (local or whole)[0].device
    sharded_sq = sum((g.float().pow(2).sum() for g in local), torch.zeros((), device=device))
    if local and distributed.active():
        dist.all_reduce(sharded_sq)
    whole_sq = sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=device))
    return (sharded_sq + whole_sq).sqrt()


def full_optimizer_state(state: dict) -> dict:
    """An optimizer's state_dict with every sharded tensor gathered whole (collective, every rank)."""
    gathered = {}
    for index, values in state["state"].items():
        gathered[index] = {k: (v.full_tensor().cpu() if is_dtensor(v) else v) for k, v in values.items()}
    return {**state, "state": gathered}


def local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse for loading: each whole tensor of a sharded parameter's state becomes this
    rank's shard, laid out like the parameter itself."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    local = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        local[index] = {k: (distribute_tensor(v.to(param.device), param.device_mesh, param.placements)
                            if is_dtensor(param) and torch.is_tensor(v) and v.shape == param.shape else v)
                        for k, v in values.items()}
    return {**state, "state": local}
