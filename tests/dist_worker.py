"""One rank of a PPO run under torchrun, for tests/test_distributed.py (not collected by pytest).

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/dist_worker.py '<json>'

The JSON holds the PPO config values plus:
  fixed_responses  sample with FixedResponses (responses a function of the prompt alone, so 1 rank
                   and N ranks see the same rollouts whatever each rank's random numbers)
  stop_after       run this many updates, checkpoint, and exit as a crashed run would (no final/)

Rank 0 writes layout.json: how many FSDP2 units the roles hold and which share of the policy's
trainable weights this rank keeps (1.0 when nothing is sharded).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tether import distributed, sharding  # noqa: E402
from tether.config import PPOConfig, config_from_dict  # noqa: E402
from tether.generation import Generation  # noqa: E402
from tether.pipelines.ppo import build_ppo_trainer  # noqa: E402


class FixedResponses:
    """A stand-in engine: each response is a fixed function of its prompt's tokens; it reports
    log-probs of 0 (so the engine/trainer gap metric has something to measure), and counts
    weight syncs."""

    def __init__(self):
        self.syncs = 0

    def generate(self, roles, prompt_ids, prompt_mask, settings, tokenizer) -> Generation:
        width = settings.max_new_tokens
        ids = torch.full((len(prompt_ids), width), settings.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompt_ids), width, dtype=torch.bool)
        ended = torch.zeros(len(prompt_ids), dtype=torch.bool)
        special = set(settings.eos_ids) | {settings.pad_id}
        vocab = [t for t in range(5, 200) if t not in special]
        for row, (prompt, real) in enumerate(zip(prompt_ids, prompt_mask)):
            key = int(prompt[real.bool()].sum())
            length = 2 + key % (width - 1)
            tokens = [vocab[(key * 7 + 13 * t) % len(vocab)] for t in range(length)]
            if key % 2:  # half the responses end with EOS, the others run to their length
                tokens[-1] = settings.eos_ids[0]
                ended[row] = True
            ids[row, :length] = torch.tensor(tokens)
            mask[row, :length] = True
        return Generation(ids, mask, ended, torch.zeros(len(prompt_ids), width))

    def sync_weights(self, roles) -> None:
        self.syncs += 1


def layout(trainer) -> dict:
    modules = [m for m in vars(trainer.roles).values() if isinstance(m, torch.nn.Module)]
    params = trainer.roles.trainable("policy")
    local = sum((p.to_local() if sharding.is_dtensor(p) else p).numel() for p in params)
    return {"units": len(sharding.units(*modules)), "local_share": local / sum(p.numel() for p in params)}


def main() -> None:
    values = json.loads(sys.argv[1])
    fixed = values.pop("fixed_responses", False)
    stop_after = values.pop("stop_after", None)
    cfg = config_from_dict(PPOConfig, values)
    backend = FixedResponses() if fixed else None
    trainer = build_ppo_trainer(cfg, generation=backend)
    if distributed.is_main():
        (Path(cfg.output_dir) / "layout.json").write_text(json.dumps(layout(trainer)))
    if stop_after is None:
        trainer.train()
    else:
        while trainer.update < stop_after:
            trainer.step()
        trainer.save_checkpoint()
    if backend is not None and distributed.is_main():
        (Path(cfg.output_dir) / "syncs.json").write_text(json.dumps({"syncs": backend.syncs,
                                                                     "updates": trainer.update}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
