"""The few collectives the trainers need under `torchrun`; identities on one process (DESIGN §2, §8).

Data parallelism here: every rank holds the whole model, generates and scores its own
contiguous share of the global batch, and the gradients of each optimizer step are summed
over ranks before clipping. The losses are already normalised by the *global* token count,
so that sum is exactly the gradient one process would compute on the whole batch (what
DistributedDataParallel computes, without its wrapper: several roles run through one shared
base module, and the first step reuses the rollout's graph, which a wrapper would not see).

Everything else that reduces over the batch — whitening, score statistics, the KL fed to the
controller, metric means, distinct-n, the doctor's inputs — reads the gathered rows of every
rank, so it equals the one-process value up to float summation order.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

RANK_SEED_STRIDE = 100003  # rank r samples with seed + r * stride: no two ranks draw the same numbers


def launched() -> bool:
    """True when this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_rank() -> int:
    """The rank torchrun gave this process, readable before the process group is joined."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device_type: str) -> bool:
    """Join torchrun's process group; False when not launched by torchrun.

    On CUDA the group gets two backends: NCCL for CUDA tensors (gradients, gathered rows) and gloo
    for CPU tensors (the few scalars and Python objects the trainers reduce). A group initialised
    with plain "nccl" serves CUDA tensors only: a CPU tensor fails with "No backend type associated
    with device type cpu"."""
    if not launched():
        return False
    if not dist.is_initialized():
        options = {}
        if device_type == "cuda":
            torch.cuda.set_device(local_rank())
            options["device_id"] = torch.device("cuda", local_rank())  # binds NCCL to this rank's GPU at once
        dist.init_process_group(backend_spec(device_type), timeout=timedelta(minutes=30), **options)
    return True


def backend_spec(device_type: str) -> str:
    """The backend of each device type tensors may live on: "cpu:gloo,cuda:nccl" for a CUDA run."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def rank_seed(seed: int) -> int:
    return seed + rank() * RANK_SEED_STRIDE


def share(items: Sequence) -> list:
    """This rank's contiguous share of a global batch (len(items) must divide by the world size)."""
    size = len(items) // world_size()
    return list(items[rank() * size : (rank() + 1) * size])


def all_sum(x: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; `x` itself is left as it was)."""
    if not active():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def sum_floats(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a list of Python floats (float64 on the wire)."""
    if not active():
        return list(values)
    return all_sum(torch.tensor(list(values), dtype=torch.float64)).tolist()


def max_float(value: float) -> float:
    if not active():
        return value
    out = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item()


def any_rank(flag: bool) -> bool:
    return max_float(1.0 if flag else 0.0) > 0


def gather_rows(x: Tensor, pad_value=0) -> Tensor:
    """Every rank's rows, concatenated in rank order (= the global batch order of `share`).
    Dim 1 (a response or sequence length, which differs between ranks) is right-padded with
    `pad_value` to the longest; pass masks with pad_value 0 so the padding never counts."""
    if not active():
        return x
    width = int(max_float(float(x.shape[1]))) if x.dim() > 1 else None
    if width is not None and x.shape[1] < width:
        pad = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
        x = torch.nn.functional.pad(x, pad, value=pad_value)
    flag = x.dtype == torch.bool  # gloo has no bool collectives
    x = x.to(torch.uint8) if flag else x
    rows = [torch.empty_like(x) for _ in range(world_size())]  # every rank holds an equal share
    dist.all_gather(rows, x.contiguous())
    out = torch.cat(rows)
    return out.bool() if flag else out


def gather_objects(obj: Any) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (pickled: small things only)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_lists(items: list) -> list:
    """Concatenation of every rank's list, in rank order."""
    return [x for part in gather_objects(items) for x in part]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_parameters(params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
    """Rank `src`'s values into every rank's parameters (identical starting weights, e.g. LoRA init)."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def sum_gradients(params: Sequence[torch.nn.Parameter], bucket_elements: int = 1 << 23) -> None:
    """Sum every rank's gradients in place, in flat buckets (few, large messages, as DDP's buckets).
    Gradients of FSDP2 shards (DTensor) are skipped: their reduce-scatter already summed them."""
    if not active():
        return
    from torch.distributed.tensor import DTensor

    whole = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    for bucket in _buckets(whole, bucket_elements):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(tensors: list[Tensor], limit: int):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() > limit or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
