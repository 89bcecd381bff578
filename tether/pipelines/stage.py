"""How every stage starts: threads, allocator, seeds, the process group under torchrun, the
resolved precision, and the run directory checked, locked and committed (tether/rundir.py).

`tether sft`, `tether reward` and `tether ppo` all go through these, in this order: validate,
`join_ranks`, `settle_precision`, `start_run`, the stage's own checks and loading, `commit`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from tether import distributed
from tether.checkpoint import seed_everything
from tether.config import ConfigError, config_to_dict, save_config
from tether.models import pick_device
from tether.precision import Precision, PrecisionError, resolve_precision
from tether.rundir import RunStart, commit_run, open_run


def set_threads(requested: int) -> None:
    """Never more torch threads than cores: oversubscription is catastrophic on small machines.
    Under torchrun the ranks on one machine share its cores."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = max(1, (os.cpu_count() or 1) // ranks_here)
    torch.set_num_threads(min(requested, cores) if requested else cores)


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """glibc: every allocation of at least `threshold_bytes` gets its own mapping, returned to the
    OS when freed. By default glibc raises that threshold (up to 32 MiB) after the first large
    frees, and activations of a few MiB then fragment the heap: on SmolLM2 PPO that held +1.2 GB
    resident from the second update on (benchmarks/memory.py). The price is a page fault for every
    large tensor, ~40% slower optimisation on CPU, so it is opt-in (`release_memory=true`). A
    threshold the user set (MALLOC_MMAP_THRESHOLD_) is kept. Returns whether it was applied."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to set
        return False
    m_mmap_threshold = -3  # <malloc.h>; setting it also turns off the dynamic adjustment
    return bool(libc.mallopt(m_mmap_threshold, threshold_bytes))


def start_run(cfg) -> RunStart:
    """Every stage starts the same way: threads, allocator, seeds, and the run directory checked
    and locked (tether/rundir.py). Nothing is written yet: `commit` does that once every check
    has passed. (Validation is the caller's: it must come before this.)"""
    if distributed.launched() and not distributed.active():
        raise ConfigError("this stage runs in one process; under torchrun `tether ppo`, `tether sft` and `tether reward` are "
                          "data-parallel: run it without torchrun (python -m tether ...)")
    set_threads(cfg.num_threads)
    if getattr(cfg, "release_memory", False):
        return_freed_memory_to_os()
    seed_everything(cfg.seed)  # the same on every rank: models and adapters are built identically
    return open_run_on_main(cfg)


class _NoLock:
    """What the ranks other than 0 hold: rank 0 owns the run directory's lock."""

    def release(self) -> None:
        pass


def open_run_on_main(cfg) -> RunStart:
    """Rank 0 checks and locks the run directory; the other ranks learn what it found, or its error."""
    if distributed.is_main():
        try:
            start = open_run(cfg.output_dir, config_to_dict(cfg), getattr(cfg, "resume", False), cfg.overwrite,
                             defaults=config_to_dict(type(cfg)()))
        except Exception as err:
            distributed.broadcast_object(err)
            raise
        distributed.broadcast_object((start.path, start.checkpoint))
        return start
    found = distributed.broadcast_object(None)
    if isinstance(found, Exception):
        raise found
    return RunStart(found[0], found[1], _NoLock())


def commit(start: RunStart, cfg, resumed_step: Optional[int] = None) -> Path:
    """Every check has passed: clear an overwritten run, write config.yaml, truncate resumed logs (rank 0)."""
    if distributed.is_main():
        commit_run(start, lambda path: save_config(cfg, path), resumed_step)
    distributed.barrier()
    return start.path


def join_ranks(cfg) -> None:
    """Under torchrun: join the process group and check every batch divides into equal shares
    (any stage's config with device, batch_size and micro_batch_size)."""
    device = pick_device(cfg.device)
    if not distributed.init(device.type):
        return
    world = distributed.world_size()
    if device.type == "cuda" and cfg.device in ("auto", "cuda"):
        cfg.device = f"cuda:{distributed.local_rank()}"
    # The micro-batch is the smallest share: when it splits evenly, so do minibatch and batch.
    # With samples_per_prompt, ranks share prompts (a prompt's group stays on one rank).
    if getattr(cfg, "samples_per_prompt", 1) > 1 and cfg.batch_size % world:
        raise ConfigError(f"batch_size = {cfg.batch_size} prompts do not split into {world} equal shares, one per "
                          f"rank (each rank samples its prompts samples_per_prompt times); make it a multiple of {world}")
    if cfg.micro_batch_size % world:
        per = "num_minibatches / " if hasattr(cfg, "num_minibatches") else ""
        raise ConfigError(f"batch_size = {cfg.batch_size}: its micro-batch of {cfg.micro_batch_size} (batch_size / "
                          f"{per}gradient_accumulation_steps) does not split into {world} equal shares, "
                          f"one per rank; make it a multiple of {world} (torchrun --nproc_per_node)")


@contextmanager
def locked(start: RunStart, until_done: bool = True):
    """The run directory stays locked inside; the lock goes when the stage is done, or, with
    until_done=False (the PPO trainer holds it until training ends), only when it fails."""
    try:
        yield start
    except BaseException:
        start.lock.release()
        raise
    if until_done:
        start.lock.release()


def settle_precision(cfg) -> Precision:
    """The stage's precision for its device (`auto` resolved), written back into the config so that
    config.yaml records what ran; TF32 for fp32 matmuls on CUDA as configured (any stage's config)."""
    device = pick_device(cfg.device)
    try:
        precision = resolve_precision(cfg.precision, cfg.dtype, device)
    except PrecisionError as err:
        raise ConfigError(str(err)) from err
    cfg.precision, cfg.dtype = precision.name, None
    if device.type == "cuda":
        allow = getattr(cfg, "tf32", True)
        torch.backends.cuda.matmul.allow_tf32 = allow  # fp32 matmuls on tensor cores (10-bit mantissa inputs)
        torch.backends.cudnn.allow_tf32 = allow
    return precision
