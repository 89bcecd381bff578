"""Checkpoints in Hugging Face `save_pretrained` format, written atomically.

A checkpoint directory loads with plain transformers (`AutoModelForCausalLM.from_pretrained(dir)`);
the critic sits in `critic/` and the training state (optimizers, schedulers, KL controller,
RNG states, data position, update counter) in `trainer_state.pt` + `trainer_state.json`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tether import distributed

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the partial copy is gone and earlier checkpoints are intact."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(err.errno, f"could not write checkpoint {path}: {err.strerror or err} (at "
                                    f"{err.filename or path}); its partial copy was removed and every earlier "
                                    "checkpoint is intact: free space (or fix the path) and resume=true continues "
                                    "from the last one")
        self.path = path


def save_checkpoint(path: Path, policy, tokenizer, critic=None, state: Optional[dict] = None,
                    tensors: Optional[dict] = None) -> Path:
    """Write into `path.tmp`, then rename: a crash mid-save never leaves a half checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        policy.save_pretrained(tmp, safe_serialization=True)
        _fault_point()
        tokenizer.save_pretrained(tmp)
        if critic is not None:
            critic.save_pretrained(tmp / "critic")
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if tensors is not None:
            torch.save(tensors, tmp / "trainer_state.pt")
    except OSError as err:  # e.g. a full disk: give back the space the partial copy holds, say which save failed
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(path, err) from err
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


FAULT_ENV = "TETHER_FAULT_KILL_IN_SAVE"
_saves = [0]


def _fault_point() -> None:
    """Fault injection for benchmarks/chaos.py: with TETHER_FAULT_KILL_IN_SAVE=N the process kills
    itself (SIGKILL, no cleanup) halfway through writing its N-th checkpoint. Unset: nothing."""
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    _saves[0] += 1
    if _saves[0] == int(target):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def load_weights(model: torch.nn.Module, directory: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the weights `save_pretrained` wrote in `directory` (safetensors, one file or shards) into
    `model`, exactly. Keys save_pretrained leaves out are only ever tied copies of saved ones."""
    from safetensors.torch import load_file

    files = [f for f in sorted(Path(directory).glob("*.safetensors")) if f.name not in skip]
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors) in {directory}: the checkpoint is incomplete")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    saved_storage = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in saved_storage]
    if untied or unexpected:
        raise ValueError(f"the checkpoint {directory} does not match the model: missing {untied[:5]}, "
                         f"unexpected {list(unexpected)[:5]}; resume with the model the run was started with")


def load_trainer_tensors(path: Path) -> dict[str, Any]:
    """Optimizer/scheduler/RNG states; weights_only so nothing foreign is ever unpickled."""
    return torch.load(Path(path) / "trainer_state.pt", weights_only=True)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The python, numpy and torch (CPU, CUDA) random streams as (JSON state, tensors) for a checkpoint."""
    numpy_rng = np.random.get_state()
    state = {"python_rng": _to_lists(random.getstate()), "numpy_rng": [numpy_rng[0], *numpy_rng[2:]]}
    tensors = {"torch_rng": torch.get_rng_state(), "numpy_rng_keys": torch.from_numpy(numpy_rng[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state, tensors


def set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put back what `rng_state` took: the next random number is the one the saved run would have drawn."""
    random.setstate(_to_tuples(state["python_rng"]))
    name, *rest = state["numpy_rng"]
    np.random.set_state((name, tensors["numpy_rng_keys"].numpy().astype(np.uint32), *rest))
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])


def read_trainer_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.json, trainer_state.pt) of a checkpoint directory."""
    return json.loads((Path(path) / "trainer_state.json").read_text()), load_trainer_tensors(path)


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def with_random_streams(state: dict, tensors: dict) -> tuple[dict, dict]:
    """`state` and `tensors` plus this process's RNG streams and, under torchrun, every rank's
    (rank i's under "ranks"[i] and "rank{i}/..."), with the world size that wrote them. Every rank calls it."""
    rng, rng_tensors = rng_state()
    per_rank = distributed.gather_objects({"rng": rng, "rng_tensors": rng_tensors})
    state = {**state, **rng, "world_size": distributed.world_size()}
    tensors = {**tensors, **rng_tensors}
    if distributed.world_size() > 1:
        state["ranks"] = [r["rng"] for r in per_rank]
        for index, r in enumerate(per_rank):
            tensors.update({f"rank{index}/{k}": v for k, v in r["rng_tensors"].items()})
    return state, tensors


def restore_random_streams(state: dict, tensors: dict, seed: int) -> None:
    """This rank's RNG streams from `with_random_streams`; with another number of ranks than wrote them,
    fresh per-rank streams (the resume is then not exact, and a warning says so)."""
    world = distributed.world_size()
    if state.get("world_size", 1) != world:
        log.warning(
            "the checkpoint was written by %d rank(s), this run has %d: the random streams start afresh, so this "
            "resume is not exact", state.get("world_size", 1), world)
        seed_everything(distributed.rank_seed(seed + 1))
        return
    if world > 1:
        prefix = f"rank{distributed.rank()}/"
        state = {**state, **state["ranks"][distributed.rank()]}
        tensors = {**tensors, **{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}}
    set_rng_state(state, tensors)
