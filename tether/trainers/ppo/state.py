"""Save and resume a PPO run: one checkpoint holds everything a resumed run needs to continue exactly
as an uninterrupted one would (DESIGN.md §7).

The format is PPO's own beside the SFT and reward trainers' (tether.checkpoint.with_random_streams):
each rank's ptx-sampler position travels with its random streams (``ranks[i] = {"rng", "ptx_sampler"}``),
and a resume on another number of ranks starts the streams afresh from the seed and the update."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from tether import distributed
from tether.checkpoint import read_trainer_state, rng_state, seed_everything, set_rng_state
from tether.rundir import prune_checkpoints
from tether.sharding import full_optimizer_state, local_optimizer_state

log = logging.getLogger(__package__)


def save_trainer(trainer, path: Path) -> Path:
    """Policy + tokenizer (plain transformers format), critic, and the training state of a PPOTrainer:
    everything `load_trainer` needs to continue exactly where this update left off. Every rank calls
    it (each rank's random streams are gathered); rank 0 writes."""
    ptx = trainer.ptx_sampler.state_dict() if trainer.ptx_sampler else None
    rng, rng_tensors = rng_state()
    per_rank = distributed.gather_objects({"rng": rng, "rng_tensors": rng_tensors, "ptx_sampler": ptx})
    state = {"update": trainer.update, "kl_coef": trainer.kl_controller.value,
             "kl_controller": trainer.kl_controller.state_dict(), "score_moments": trainer.score_moments.state_dict(),
             "prompt_sampler": trainer.prompt_sampler.state_dict(), "ptx_sampler": ptx,
             **rng, "doctor": trainer.doctor.state_dict(), "first_eval": trainer.first_eval,
             "skipped": trainer.control.state_dict(), "world_size": trainer.world}
    tensors = {"policy_optimizer": full_optimizer_state(trainer.policy_optimizer.state_dict()),
               "policy_scheduler": trainer.policy_scheduler.state_dict(),
               "shuffle_rng": trainer.shuffle_generator.get_state(), **rng_tensors}
    if trainer.critic_optimizer is not None:
        tensors["critic_optimizer"] = full_optimizer_state(trainer.critic_optimizer.state_dict())
        tensors["critic_scheduler"] = trainer.critic_scheduler.state_dict()
    if trainer.world > 1:
        state["ranks"] = [{"rng": r["rng"], "ptx_sampler": r["ptx_sampler"]} for r in per_rank]
        for index, r in enumerate(per_rank):
            tensors.update({f"rank{index}/{k}": v for k, v in r["rng_tensors"].items()})
    # FSDP2 shards are gathered on every rank; rank 0 writes them whole (the one-process format).
    trainer.roles.save(path, trainer.tokenizer, state, tensors, write=trainer.writes)
    distributed.barrier()  # nobody reads or prunes checkpoints before rank 0 has written this one
    return path


def save_checkpoint(trainer) -> Optional[Path]:
    """checkpoint-N in the run directory, keeping the newest `keep_checkpoints`."""
    if trainer.run_dir is None:
        return None
    path = trainer.save(trainer.run_dir / f"checkpoint-{trainer.update}")
    if trainer.writes:
        prune_checkpoints(trainer.run_dir, trainer.cfg.keep_checkpoints)
    return path


def load_trainer(trainer, path: Path, weights: bool = True) -> None:
    """Continue a PPOTrainer from a checkpoint `save_trainer` wrote: weights, optimizers, schedulers,
    controllers, data position, RNG streams, the doctor's memory and the update counter. weights=False:
    the roles already hold the checkpoint's weights (loaded before sharding, tether/pipelines/ppo.py)."""
    path = Path(path)
    state, tensors = read_trainer_state(path)
    if weights:
        trainer.roles.load(path)
    for (optimizer, scheduler), role in zip(trainer.optimizers(), ("policy", "critic")):
        optimizer.load_state_dict(local_optimizer_state(optimizer, tensors[f"{role}_optimizer"]))
        scheduler.load_state_dict(tensors[f"{role}_scheduler"])
    saved_world = state.get("world_size", 1)
    if saved_world == trainer.world:
        state, tensors = _own_random_streams(state, tensors, trainer.world)
        set_rng_state(state, tensors)
    else:  # weights, optimizers and data position continue; the random streams cannot
        log.warning("the checkpoint was written by %d rank(s), this run has %d: the random streams start afresh, "
                    "so this resume is not exact", saved_world, trainer.world)
        seed_everything(distributed.rank_seed(trainer.cfg.seed + state["update"]))
    trainer.shuffle_generator.set_state(tensors["shuffle_rng"])
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    trainer.score_moments.load_state_dict(state["score_moments"])
    trainer.prompt_sampler.load_state_dict(state["prompt_sampler"])
    if trainer.ptx_sampler is not None and state["ptx_sampler"] is not None:
        trainer.ptx_sampler.load_state_dict(state["ptx_sampler"])
    trainer.doctor.load_state_dict(state["doctor"])
    trainer.first_eval = state["first_eval"]
    trainer.control.load_state_dict(state["skipped"])
    trainer.update = state["update"]


def _own_random_streams(state: dict, tensors: dict, world: int) -> tuple[dict, dict]:
    """This rank's RNG and ptx-sampler states from a checkpoint written by as many ranks as run now."""
    if world == 1:
        return state, tensors
    mine, prefix = state["ranks"][distributed.rank()], f"rank{distributed.rank()}/"
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {**state, **mine["rng"], "ptx_sampler": mine["ptx_sampler"]}, {**tensors, **own}
