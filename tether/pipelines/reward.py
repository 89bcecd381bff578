"""Build a reward-model run from its config: data first (cheap errors early), then the model.

``tether reward`` trains an ``AutoModelForSequenceClassification`` (one label) on preference
pairs ``{prompt, chosen, rejected}`` with the Bradley-Terry loss, optionally normalises its
scores on a policy's samples (Ziegler et al. 2019), and writes ``output_dir``:

    config.yaml     the resolved config
    metrics.jsonl   one row per optimizer step (see tether/trainers/reward.py for every metric)
    summary.json    the dict run_reward returns
    final/          model + tokenizer in save_pretrained format (plain transformers loads it)

How a pair becomes tokens — the same ids PPO will feed the reward model:
``prompt ids`` (a string through the tokenizer, chat messages through the chat template with the
generation prompt, exactly as ``tokenize_prompts`` does for PPO) ``+ response ids`` (tokenised
alone, no special tokens) ``+ EOS`` (PPO reads the score on the EOS token; N-details items 5, 8).
Sequences longer than ``max_length`` keep their last tokens: the end of a response matters most.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Mapping, Optional

import torch

from tether import distributed
from tether.algo import append_missing_eos
from tether.checkpoint import load_weights, read_trainer_state, save_checkpoint, seed_everything
from tether.config import ConfigError, RewardConfig, check_hub_ids, lora_settings
from tether.lora import LoraRewardModel, SCORE_HEAD_FILE, build_lora_reward_model, load_adapter_weights, require_full_model
from tether.data import DataError, load_records, tokenize_prompts
from tether.layouts import explicit_pairs, response_text
from tether.models import (
    disable_dropout,
    has_tokenizer_files,
    init_score_head,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resize_for_tokenizer,
    same_vocabulary,
    use_fused_kernels,
)
from tether.pipelines.stage import commit, join_ranks, locked, settle_precision, start_run
from tether.placement import use_attention
from tether.precision import BY_NAME
from tether.rundir import prune_checkpoints
from tether.rewards import reward_eos
from tether.tracking import JsonlSink
from tether.trainers.reward import (
    PreferencePairs,
    RewardTrainer,
    final_norm,
    normalize_reward_head,
    prompt_groups,
    sample_policy_sequences,
    score_head,
    score_sequences,
)

log = logging.getLogger(__name__)

# No prompt limit inside tokenize_prompts: whole sequences are truncated afterwards.
_NO_LIMIT = 2**31 - 1


def run_reward(cfg: RewardConfig, records: Optional[list[dict]] = None) -> dict[str, float]:
    """Train a reward model on preference pairs; returns (and writes to summary.json) the run summary.

    Summary keys: ``eval/accuracy``, ``eval/loss``, ``eval/margin`` (absent when there are no
    eval pairs), ``train/loss``, ``train/accuracy`` (last step), ``train/pairs``, ``train/steps``,
    ``eval/pairs``, ``data/skipped_identical``, ``data/skipped_identical_eval``,
    ``data/skipped_truncated_identical``, ``data/truncated``, ``time/train_s``, and with
    normalisation ``normalize/mean_before``, ``normalize/std_before``, ``normalize/mean_after``,
    ``normalize/std_after``, ``normalize/samples``.
    """
    # 1. Config, threads, seed, run directory.
    validate_reward_config(cfg)
    join_ranks(cfg)
    settle_precision(cfg)  # before the run directory compares a resumed config with its own
    check_hub_ids(cfg, "model", "tokenizer", "normalize_policy")
    with locked(start_run(cfg)) as start:
        return _run_reward(cfg, start, records)


def _run_reward(cfg: RewardConfig, start, records: Optional[list[dict]] = None) -> dict[str, float]:
    device, precision = pick_device(cfg.device), BY_NAME[cfg.precision]

    # 2. Data before models: a bad record fails in seconds, not after loading weights.
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    train_pairs, eval_pairs, summary = load_pair_splits(cfg, tokenizer, records)
    norm_prompts = load_normalization_prompts(cfg, tokenizer) if cfg.normalize_policy else None

    # 3. Model: backbone + scalar head, sized for the tokenizer, dropout off.
    lora = lora_settings(cfg)
    model = load_reward_backbone(cfg.model, tokenizer, precision.model_dtype(lora=lora is not None), lora,
                                 cfg.attn_implementation, precision.trainable).to(device)
    if cfg.normalize_policy and score_head(model) is not None and score_head(model).bias is None:
        final_norm(model)  # fail now, not after training, when the shift has nowhere to go

    # 4. Train, once every check has passed (config.yaml is written now, not before).
    def save(trainer: RewardTrainer) -> None:
        state, tensors = trainer.state()  # every rank: their random streams are gathered
        if distributed.is_main():
            save_reward_model(run_dir / f"checkpoint-{trainer.step}", model, tokenizer, state, tensors)
            prune_checkpoints(run_dir, cfg.keep_checkpoints)
        distributed.barrier()

    if start.checkpoint is not None:
        load_reward_weights(model, start.checkpoint)
    if distributed.active():  # identical starting weights (the score head's init included), own random streams
        distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
        seed_everything(distributed.rank_seed(cfg.seed))
    trainer = RewardTrainer(cfg, model, tokenizer.pad_token_id, train_pairs, eval_pairs, device=device, save=save,
                            precision=precision)
    if start.checkpoint is not None:
        trainer.load_state(*read_trainer_state(start.checkpoint))
        log.info("resuming %s from %s (step %d of %d)", start.path, start.checkpoint, trainer.step,
                 trainer.total_steps)
    run_dir = commit(start, cfg, trainer.step if start.checkpoint is not None else None)
    trainer.sink = sink = JsonlSink(run_dir / "metrics.jsonl") if distributed.is_main() else None  # rank 0 writes
    try:
        last = trainer.train()
        summary.update({k: last[k] for k in ("train/loss", "train/accuracy", "time/train_s")})
        summary.update({k: v for k, v in last.items() if k.startswith("eval/")})
        summary["train/steps"] = float(trainer.step)

        # 5. Optional gain/bias so the policy's responses score mean 0, std 1.
        if cfg.normalize_policy:
            stats = normalize_on_policy(cfg, model, tokenizer, norm_prompts, device, precision.frozen)
            summary.update(stats)  # not in metrics.jsonl: its rows are optimizer steps
    finally:
        if sink is not None:
            sink.close()

    # 6. Save: plain transformers format, written to a temporary directory and renamed (rank 0).
    if distributed.is_main():
        save_reward_model(run_dir / "final", model, tokenizer)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier()
    log.info("reward model saved to %s; %s", run_dir / "final",
             ", ".join(f"{k} {summary[k]:.4f}" for k in ("eval/loss", "eval/accuracy") if k in summary))
    return summary


def validate_reward_config(cfg: RewardConfig) -> None:
    """RewardConfig.validate plus the checks that need two fields together."""
    cfg.validate()
    if cfg.normalize_policy and cfg.normalize_max_new_tokens >= cfg.max_length:
        raise ConfigError(f"normalize_max_new_tokens={cfg.normalize_max_new_tokens} must be below "
                          f"max_length={cfg.max_length}: the prompt needs room in the scored sequence")


# --- data -------------------------------------------------------------------------------


def load_pair_splits(cfg: RewardConfig, tokenizer, records: Optional[list[dict]] = None
                     ) -> tuple[PreferencePairs, Optional[PreferencePairs], dict]:
    """Train and eval pairs (eval from ``eval_data`` or a seeded split by prompt) and data counts;
    `records`: the pairs already in memory instead of cfg.data."""
    records = records if records is not None else load_records(cfg.data)
    pairs, counts = encode_preference_pairs(records, tokenizer, cfg, source=cfg.data)
    if cfg.eval_data:
        eval_pairs, eval_counts = encode_preference_pairs(load_records(cfg.eval_data), tokenizer, cfg,
                                                          source=cfg.eval_data)
        train_pairs = pairs
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, cfg.eval_fraction, cfg.seed)
        eval_counts = {"skipped_identical": 0, "skipped_truncated_identical": 0, "truncated": 0}
    # skipped_identical: the `data` file (train, or train + split-off eval); *_eval: the eval_data file.
    # The truncation counts cover both files.
    summary = {"data/skipped_identical": float(counts["skipped_identical"]),
               "data/skipped_identical_eval": float(eval_counts["skipped_identical"]),
               "data/skipped_truncated_identical": float(counts["skipped_truncated_identical"]
                                                         + eval_counts["skipped_truncated_identical"]),
               "data/truncated": float(counts["truncated"] + eval_counts["truncated"])}
    if eval_pairs is None or len(eval_pairs) == 0:
        log.warning("no eval pairs (eval_fraction=0 and no eval_data): eval/accuracy will not be reported")
        eval_pairs = None
    summary["train/pairs"] = float(len(train_pairs))
    summary["eval/pairs"] = float(len(eval_pairs) if eval_pairs is not None else 0)
    log.info("%d training pairs, %d eval pairs", len(train_pairs), summary["eval/pairs"])
    return train_pairs, eval_pairs, summary


def encode_preference_pairs(records: list[Mapping], tokenizer, cfg: RewardConfig,
                            source: str = "<pairs>") -> tuple[PreferencePairs, dict[str, int]]:
    """Validate and tokenise ``{prompt, chosen, rejected}`` records (field names from ``cfg``).

    Any layout of tether/layouts.py (explicit, conversational with an implicit prompt, HH transcripts)
    becomes explicit first. A prompt is a string or chat messages; a response is a string or
    messages ending in an assistant turn (``layouts.response_text``).
    Pairs whose responses are equal after ``strip()`` carry no preference: they are skipped and
    counted (``skipped_identical``), as are pairs left identical by left truncation
    (``skipped_truncated_identical``). ``truncated`` counts sequences cut to ``max_length``.
    """
    fields = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    records = explicit_pairs(records, cfg.data_layout, fields, source)  # conversational / transcript -> explicit
    responses: list[tuple[str, str]] = []
    for index, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise DataError(
                f"{source}: record {index} has no {missing[0]!r} field (it has {sorted(map(str, record))}); "
                f"each pair needs {list(fields)} — set prompt_field / chosen_field / rejected_field to the "
                "columns holding them")
        prompt = record[cfg.prompt_field]
        responses.append(tuple(response_text(prompt, record[name], tokenizer, index, name, source)
                               for name in (cfg.chosen_field, cfg.rejected_field)))
    keep = [i for i, (chosen, rejected) in enumerate(responses) if chosen.strip() != rejected.strip()]
    skipped = len(records) - len(keep)
    if skipped:
        log.warning("%s: skipped %d of %d pairs whose chosen and rejected responses are identical",
                    source, skipped, len(records))
    if not keep:
        raise DataError(f"{source}: no usable preference pairs: all {len(records)} records have identical "
                        f"{cfg.chosen_field!r} and {cfg.rejected_field!r} responses")

    # Prompts exactly as PPO tokenises them (plain text, or the chat template + generation prompt);
    # all records, so an error names the record's index in the file.
    prompt_ids, _ = tokenize_prompts([{cfg.prompt_field: r[cfg.prompt_field]} for r in records], tokenizer,
                                     cfg.prompt_field, _NO_LIMIT, source=source)
    kept = [records[i] for i in keep]
    prompt_ids = [prompt_ids[i] for i in keep]
    chosen_ids = _response_ids([responses[i][0] for i in keep], tokenizer)
    rejected_ids = _response_ids([responses[i][1] for i in keep], tokenizer)

    pairs = PreferencePairs([], [], [])
    truncated = truncated_identical = 0
    bos_id = getattr(tokenizer, "bos_token_id", None)
    for record, prompt, chosen, rejected in zip(kept, prompt_ids, chosen_ids, rejected_ids):
        full_chosen, full_rejected = prompt + chosen, prompt + rejected
        truncated += (len(full_chosen) > cfg.max_length) + (len(full_rejected) > cfg.max_length)
        full_chosen = keep_last_tokens(full_chosen, cfg.max_length, bos_id)
        full_rejected = keep_last_tokens(full_rejected, cfg.max_length, bos_id)
        if full_chosen == full_rejected:
            truncated_identical += 1
            continue
        pairs.chosen.append(full_chosen)
        pairs.rejected.append(full_rejected)
        pairs.prompt_keys.append(json.dumps(record[cfg.prompt_field], sort_keys=True, default=str))
    if truncated:
        log.warning("%s: %d sequences were longer than max_length=%d and were truncated on the left",
                    source, truncated, cfg.max_length)
    if truncated_identical:
        log.warning("%s: skipped %d pairs whose responses became identical after truncation to max_length=%d; "
                    "raise max_length", source, truncated_identical, cfg.max_length)
    if len(pairs) == 0:
        raise DataError(f"{source}: no usable preference pairs after truncation to max_length={cfg.max_length}")
    counts = {"skipped_identical": skipped, "skipped_truncated_identical": truncated_identical,
              "truncated": truncated}
    return pairs, counts


def _response_ids(texts: list[str], tokenizer) -> list[list[int]]:
    """Response tokens alone (no BOS), ending in EOS: PPO reads the score on the EOS token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; reward scores are read on the EOS that ends a response")
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(ids) if ids and ids[-1] == eos else list(ids) + [eos] for ids in encoded]


def keep_last_tokens(ids: list[int], max_length: int, bos_id: Optional[int]) -> list[int]:
    """Left-truncate to ``max_length`` ids, keeping a leading BOS the model expects."""
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and max_length > 1 and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - (max_length - 1):]
    return ids[len(ids) - max_length:]


def split_by_prompt(pairs: PreferencePairs, fraction: float, seed: int) -> tuple[PreferencePairs, PreferencePairs]:
    """Seeded held-out split that keeps all pairs of one prompt on the same side.

    Several comparisons of one prompt are common (InstructGPT ranks K responses per prompt);
    splitting them across train and eval would measure memory of the prompt, not preference.
    With a single distinct prompt the split falls back to individual pairs.
    """
    empty = PreferencePairs([], [], [])
    if fraction <= 0:
        return pairs, empty
    target = max(1, round(fraction * len(pairs)))
    groups = prompt_groups(pairs)
    units = groups if len(groups) > 1 else [[i] for i in range(len(pairs))]
    generator = torch.Generator().manual_seed(seed)
    eval_indices: list[int] = []
    for unit in torch.randperm(len(units), generator=generator).tolist():
        if len(eval_indices) >= target:
            break
        eval_indices += units[unit]
    held = set(eval_indices)
    train_indices = [i for i in range(len(pairs)) if i not in held]
    if not train_indices:
        raise DataError(f"only {len(pairs)} usable pairs: too few to hold out eval_fraction={fraction} and still "
                        "train; add pairs, lower eval_fraction, or pass eval_data")
    return pairs.select(train_indices), pairs.select(sorted(eval_indices))


# --- model ------------------------------------------------------------------------------


def load_reward_backbone(path: str, tokenizer, dtype: torch.dtype = torch.float32, lora=None,
                         attn_implementation: Optional[str] = None, head_dtype: Optional[torch.dtype] = None):
    """``AutoModelForSequenceClassification(num_labels=1)`` from a causal LM (or a reward model);
    with ``lora`` (LoraSettings) a LoraRewardModel: the causal LM's backbone, a reward adapter and a head.

    A freshly added head gets N(0, 1/sqrt(d_model+1)), bias 0 (N-details item 6); a head that
    was in the checkpoint (continuing a reward model) is kept. Embeddings grow for a new pad
    token and ``config.pad_token_id`` is set so plain transformers pools the right token.
    """
    from transformers import AutoModelForSequenceClassification

    if lora is not None:
        require_full_model(path, "model")
        base = use_attention(load_causal_lm(path, dtype), attn_implementation)
        resize_for_tokenizer(base, tokenizer)
        disable_dropout(base)
        return build_lora_reward_model(base, lora, head_dtype)
    model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                     output_loading_info=True)
    use_fused_kernels(model)
    use_attention(model, attn_implementation)
    head = score_head(model)
    if head is not None and any(k.split(".")[0] == "score" for k in info.get("missing_keys", ())):
        init_score_head(head)
    elif head is not None:
        log.info("kept the score head found in %s", path)
    resize_for_tokenizer(model, tokenizer)
    # Dropout off: exact gradient accumulation and the same function PPO will evaluate.
    disable_dropout(model)
    return model


def load_reward_weights(model, checkpoint: Path) -> None:
    """A reward checkpoint's trained weights into the model built for the run (adapter and head, or all)."""
    from safetensors.torch import load_file

    if isinstance(model, LoraRewardModel):
        load_adapter_weights(model.peft, "reward", checkpoint)
        model.score.load_state_dict(load_file(str(Path(checkpoint) / SCORE_HEAD_FILE)))
    else:
        load_weights(model, checkpoint)


def save_reward_model(path: Path, model, tokenizer, state=None, tensors=None) -> Path:
    """Model + tokenizer in save_pretrained format, atomically (temp dir, then rename).

    The saved tokenizer pads on the right and truncates on the left (kept in tokenizer_config.json),
    so plain ``tokenizer(texts, padding=True, truncation=True)`` + ``model(**batch).logits`` scores
    the end of each text with correct absolute positions. The caller's tokenizer is not changed.
    """
    saved = copy.deepcopy(tokenizer)
    saved.padding_side, saved.truncation_side = "right", "left"
    saved.init_kwargs.update(padding_side="right", truncation_side="left")  # what save_pretrained writes
    return save_checkpoint(path, model, saved, state=state, tensors=tensors)


# --- score normalisation ----------------------------------------------------------------


def load_normalization_prompts(cfg: RewardConfig, tokenizer) -> list[list[int]]:
    """Prompts for normalisation, truncated to leave room for the responses; checks the policy's vocabulary."""
    _check_same_vocabulary(cfg.normalize_policy, tokenizer)
    records = load_records(cfg.normalize_prompts)
    limit = cfg.max_length - cfg.normalize_max_new_tokens
    prompts, stats = tokenize_prompts(records, tokenizer, cfg.prompt_field, limit, source=cfg.normalize_prompts)
    if stats.truncated:
        log.warning("%d of %d normalisation prompts were longer than %d tokens and were truncated on the left",
                    stats.truncated, stats.total, limit)
    return prompts


def _check_same_vocabulary(policy_path: str, tokenizer) -> None:
    from transformers import AutoTokenizer

    if not has_tokenizer_files(policy_path):
        return
    own = AutoTokenizer.from_pretrained(policy_path)
    if not same_vocabulary(own, tokenizer):
        raise ConfigError(f"normalize_policy {policy_path} uses a different tokenizer than the reward model; "
                          "normalisation scores the policy's token ids directly, so they must share a vocabulary")


def normalize_on_policy(cfg: RewardConfig, model, tokenizer, prompts: list[list[int]], device: torch.device,
                        dtype: torch.dtype) -> dict[str, float]:
    """Sample the policy, score with the trained model, fold ``(s - mean)/std`` into its weights.

    Ziegler et al. 2019 §2.2 / N-details item 7: the initial policy's responses then score mean 0,
    std 1, so PPO's KL coefficient and clipping mean the same whatever the reward model's scale.
    The statistics are biased (population) moments, as in the reference code (N-details item 10).
    """
    policy = load_causal_lm(cfg.normalize_policy, dtype)
    resize_for_tokenizer(policy, tokenizer)
    disable_dropout(policy)
    policy.to(device)
    input_ids, attention_mask = sample_policy_sequences(
        policy, tokenizer, prompts, cfg.normalize_samples, cfg.normalize_max_new_tokens, seed=cfg.seed,
        chunk_size=cfg.batch_size, device=device, temperature=cfg.normalize_temperature)
    # Scored as PPO scores them by default (reward_append_eos): cut responses get an EOS.
    ends, eos_id, pad_id = reward_eos(tokenizer, policy)
    input_ids, attention_mask = append_missing_eos(input_ids, attention_mask, torch.tensor(ends), eos_id, pad_id)
    del policy
    before = score_sequences(model, input_ids, attention_mask, cfg.micro_batch_size, device)
    mean, std = before.mean().item(), before.std(unbiased=False).item()
    where = normalize_reward_head(model, mean, std)
    after = score_sequences(model, input_ids, attention_mask, cfg.micro_batch_size, device)
    mean_after, std_after = after.mean().item(), after.std(unbiased=False).item()
    if abs(mean_after) > 1e-3 + 1e-3 * abs(mean / std) or abs(std_after - 1) > 1e-3:
        raise RuntimeError(f"score normalisation did not take: mean {mean_after:.5f}, std {std_after:.5f} after "
                           f"folding the shift into {where}; please report this model architecture")
    log.info("normalised scores on %d samples of %s: mean %.4f -> %.4f, std %.4f -> %.4f (shift stored in %s)",
             len(before), cfg.normalize_policy, mean, mean_after, std, std_after, where)
    return {"normalize/mean_before": mean, "normalize/std_before": std, "normalize/mean_after": mean_after,
            "normalize/std_after": std_after, "normalize/samples": float(len(before))}
