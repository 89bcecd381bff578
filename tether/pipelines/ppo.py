"""Build a PPO run from its config: data first (cheap errors early), then the four roles."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from tether import distributed
from tether.checkpoint import seed_everything
from tether.config import ConfigError, PPOConfig, check_hub_ids, config_to_dict, reward_fn_name
from tether.data import load_records, load_texts, pack_texts, record_columns, tokenize_prompts
from tether.generation import BuiltinSampler, VLLMBackend, engine_embedding_rows
from tether.http_reward import http_reward_from_config
from tether.models import check_sequence_fits, load_tokenizer, pick_device
from tether.pipelines.stage import commit, join_ranks, locked, settle_precision, start_run
from tether.placement import build_roles, check_tokenizer_matches_policy
from tether.precision import Precision
from tether.rewards import FunctionReward, WeightedRewards, load_reward_fn
from tether.rundir import RunDirError, RunStart, check_final_complete, damaged_checkpoint_error
from tether.tracking import check_sink_packages, make_tracker
from tether.trainers.ppo import PPOTrainer

log = logging.getLogger(__name__)


def build_ppo_trainer(cfg: PPOConfig, generation=None, reward_fn: Optional[FunctionReward] = None,
                      prompt_records: Optional[list[dict]] = None) -> PPOTrainer:
    """The trainer, ready to train. `generation`: a generation backend to use instead of the
    configured one (tether/generation.py). `reward_fn` and `prompt_records`: Python objects given
    through the API (tether/api.py) instead of what cfg.reward_fn and cfg.prompts name."""
    cfg.validate()
    join_ranks(cfg)
    precision = settle_precision(cfg)  # before the run directory compares a resumed config with its own
    check_hub_ids(cfg, "policy", "reference", "critic", "reward_model", "tokenizer", "reward_tokenizer")
    check_sequence_fits(cfg.policy, cfg.max_prompt_length + cfg.max_new_tokens,  # before anything is written
                        "max_prompt_length + max_new_tokens", "lower max_prompt_length or max_new_tokens")
    if cfg.resume:
        check_final_complete(Path(cfg.output_dir))
    start = start_run(cfg)
    with locked(start, until_done=False):
        return _build_ppo_trainer(cfg, start, precision, generation, reward_fn, prompt_records)


def _build_ppo_trainer(cfg: PPOConfig, start: RunStart, precision: Precision, generation=None,
                       reward_fn: Optional[FunctionReward] = None,
                       prompt_records: Optional[list[dict]] = None) -> PPOTrainer:
    device = pick_device(cfg.device)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.policy, engine_embedding_rows(cfg))  # vllm: pad in its vocab
    check_tokenizer_matches_policy(cfg, tokenizer)
    prompts, columns = load_prompts(cfg, tokenizer, records=prompt_records)
    reward_fn = reward_fn or configured_reward(cfg)  # fail before models
    check_reward_columns(reward_fn, columns, cfg.prompts or "the prompts")
    check_sink_packages(cfg.log_with)
    ptx_blocks = None
    if cfg.ptx_data:
        ptx_blocks = pack_texts(load_texts(cfg.ptx_data, cfg.ptx_field), tokenizer, cfg.ptx_block_size)
        log.info("PPO-ptx: %d blocks of %d tokens from %s", len(ptx_blocks), cfg.ptx_block_size, cfg.ptx_data)

    roles = build_roles(cfg, tokenizer, precision, device, reward_fn)
    gold = load_reward_fn(cfg.gold_reward_fn, cfg.reward_timeout_s) if cfg.gold_reward_fn else None
    check_reward_columns(gold, columns, cfg.prompts or "the prompts")
    eval_prompts, eval_columns = (load_prompts(cfg, tokenizer, cfg.eval_prompts, limit=cfg.eval_max_prompts)
                                  if cfg.eval_prompts else (None, None))
    if eval_prompts is not None:
        for source in (reward_fn, gold):
            check_reward_columns(source, eval_columns, cfg.eval_prompts)
    if start.checkpoint is not None:
        with readable_checkpoint(start):
            roles.load(start.checkpoint)  # before any sharding: whole tensors into whole models
            check_finite_weights(roles, start)
    if distributed.active():  # identical starting weights; then each rank samples its own random numbers
        distributed.broadcast_parameters(roles.trainable("policy") + roles.trainable("critic"))
        seed_everything(distributed.rank_seed(cfg.seed))
        if cfg.data_parallel == "fsdp2":
            roles.shard(frozen=cfg.fsdp_frozen == "shard", compute_dtype=precision.autocast)
            log.info("FSDP2: transformer blocks sharded over %d ranks (frozen roles %s)", distributed.world_size(),
                     "sharded" if cfg.fsdp_frozen == "shard" else "whole on every rank")
    generation = generation or generation_backend(cfg)
    trainer = PPOTrainer(cfg, roles, tokenizer, prompts, ptx_blocks=ptx_blocks, run_dir=start.path, device=device,
                         gold=gold, eval_prompts=eval_prompts, generation=generation, precision=precision,
                         prompt_columns=columns, eval_columns=eval_columns)
    if start.checkpoint is not None:
        with readable_checkpoint(start):
            trainer.load_state(start.checkpoint, weights=False)
        if trainer.update > cfg.total_updates:  # before config.yaml is rewritten to say otherwise
            raise ConfigError(f"total_updates={cfg.total_updates} is below the {trainer.update} updates {start.path} "
                              f"has already done; resume with total_updates >= {trainer.update}")
        log.info("resuming %s from %s (update %d of %d)", start.path, start.checkpoint, trainer.update,
                 cfg.total_updates)
    trainer.generation.sync_weights(roles)  # an engine starts from the policy as it is now (resumed or not)
    run_dir = commit(start, cfg, trainer.update if start.checkpoint is not None else None)
    if distributed.is_main():
        trainer.tracker = make_tracker(run_dir, cfg.log_with, cfg.wandb_project, config_to_dict(cfg))
    trainer.lock = start.lock
    return trainer


@contextmanager
def readable_checkpoint(start: RunStart):
    """A checkpoint that fails to load (a truncated or overwritten file, a missing piece) is named,
    with what failed and the way on, instead of an unexpected error; nothing has been written yet."""
    try:
        yield
    except (ConfigError, RunDirError):
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read a checkpoint's files means the same
        raise damaged_checkpoint_error(start.path, start.checkpoint, f"{type(err).__name__}: {str(err)[:300]}") from err


def check_finite_weights(roles, start: RunStart) -> None:
    """Loaded weights must be finite: overwritten bytes would otherwise resume into NaN weights."""
    for role in ("policy", "critic"):
        for index, param in enumerate(roles.trainable(role)):
            if not torch.isfinite(param).all():
                raise damaged_checkpoint_error(start.path, start.checkpoint, f"it holds non-finite {role} weights "
                                               f"(tensor {index} of {len(roles.trainable(role))}, shape "
                                               f"{tuple(param.shape)})")


def generation_backend(cfg: PPOConfig):
    """The configured sampler: the built-in one, or a vLLM engine colocated on this rank's GPU."""
    if cfg.generation_backend == "builtin":
        return BuiltinSampler()
    if not pick_device(cfg.device).type == "cuda":
        raise ConfigError("generation_backend=vllm runs on CUDA GPUs only; use generation_backend=builtin on "
                          f"device {cfg.device}")
    scratch = Path(tempfile.mkdtemp(prefix=f"tether-engine-rank{distributed.rank()}-"))  # adapters for the engine
    return VLLMBackend.start(cfg.policy, cfg, scratch, distributed.rank_seed(cfg.seed))


def configured_reward(cfg: PPOConfig):
    """The reward source the config names, unless it is a reward model (None): one function, several
    summed, or a reward server (reward_url)."""
    if cfg.reward_fn:
        return load_reward_fn(cfg.reward_fn, cfg.reward_timeout_s)
    if cfg.reward_fns:
        return WeightedRewards([load_reward_fn(spec, cfg.reward_timeout_s) for spec in cfg.reward_fns],
                               [reward_fn_name(spec) for spec in cfg.reward_fns], cfg.reward_weights)
    if cfg.reward_url:
        return http_reward_from_config(cfg)  # a reward server: checked to be listening
    return None


def check_reward_columns(source, columns: Optional[dict], where: str) -> None:
    """Every argument a reward function requires must be a field of the prompt records."""
    for part in getattr(source, "sources", [source]):
        if isinstance(part, FunctionReward):
            part.check_columns(list(columns or {}), where)


def load_prompts(cfg: PPOConfig, tokenizer, source: Optional[str] = None, records: Optional[list[dict]] = None,
                 limit: Optional[int] = None) -> tuple[list[list[int]], dict[str, list]]:
    """Tokenised prompts from `source` (default cfg.prompts), or from `records` already in memory (the
    first `limit` of them), and the records' other fields, {name: one value per prompt} (data.record_columns)."""
    source = source or cfg.prompts
    records = records if records is not None else load_records(source, cfg.prompt_split)
    records = records[:limit] if limit else records
    prompts, stats = tokenize_prompts(records, tokenizer, cfg.prompt_field, cfg.max_prompt_length,
                                      cfg.overlong_prompts, source=source)
    if stats.truncated:
        log.warning("%d of %d prompts were longer than max_prompt_length=%d and were truncated on the left",
                    stats.truncated, stats.total, cfg.max_prompt_length)
    columns = record_columns(records, cfg.prompt_field)
    log.info("loaded %d %s prompts from %s%s", len(prompts), "chat" if stats.chat else "text", source,
             f" (fields for the reward: {', '.join(columns)})" if columns else "")
    return prompts, columns


def run_ppo(cfg: PPOConfig) -> dict[str, float]:
    trainer = build_ppo_trainer(cfg)
    return trainer.train()
