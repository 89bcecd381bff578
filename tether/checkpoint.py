"""Checkpoints in Hugging Face `save_pretrained` format, written atomically.

A checkpoint directory loads with plain transformers (`AutoModelForCausalLM.from_pretrained(dir)`);
the critic sits in `critic/` and the training state (optimizers, schedulers, KL controller,
RNG states, data position, update counter) in `trainer_state.pt` + `trainer_state.json`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def save_checkpoint(path: Path, policy, tokenizer, critic=None, state: Optional[dict] = None,
                    tensors: Optional[dict] = None) -> Path:
    """Write into `path.tmp`, then rename: a crash mid-save never leaves a half checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if critic is not None:
        critic.save_pretrained(tmp / "critic")
    if state is not None:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if tensors is not None:
        torch.save(tensors, tmp / "trainer_state.pt")
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def load_trainer_tensors(path: Path) -> dict[str, Any]:
    """Optimizer/scheduler/RNG states; weights_only so nothing foreign is ever unpickled."""
    return torch.load(Path(path) / "trainer_state.pt", weights_only=True)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
