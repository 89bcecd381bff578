"""Build an SFT run from its config: tokenizer, documents, packed blocks, model; train; save."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Optional

from tether import distributed
from tether.checkpoint import load_weights, read_trainer_state, save_checkpoint, seed_everything
from tether.config import SFTConfig, check_hub_ids, lora_settings
from tether.data import DataError, load_records, load_texts, pack_segments, pack_texts, texts_of
from tether.layouts import check_sft_records, detect_sft_layout, resolve_loss_on, sft_segments
from tether.lora import add_lora, is_adapter_dir, load_adapter_weights, require_full_model
from tether.models import check_sequence_fits, load_causal_lm, load_tokenizer, pick_device
from tether.pipelines.stage import commit, join_ranks, locked, settle_precision, start_run
from tether.placement import use_attention
from tether.precision import BY_NAME
from tether.rundir import prune_checkpoints
from tether.tiny import tiny_config, train_tokenizer
from tether.tracking import JsonlSink
from tether.trainers.sft import SFTTrainer

log = logging.getLogger(__name__)


def run_sft(cfg: SFTConfig, records: Optional[list[dict]] = None) -> dict[str, float]:
    """Train; `records`: the data as rows already in memory (tether.sft(data=[...])) instead of cfg.data."""
    cfg.validate()
    join_ranks(cfg)
    settle_precision(cfg)  # before the run directory compares a resumed config with its own
    check_hub_ids(cfg, "model", "tokenizer")
    if cfg.init == "pretrained":  # before anything is written
        check_sequence_fits(cfg.model, cfg.block_size, "block_size", "lower block_size")
    with locked(start_run(cfg)) as start:
        return _run_sft(cfg, start, records)


def _run_sft(cfg: SFTConfig, start, records: Optional[list[dict]] = None) -> dict[str, float]:
    device = pick_device(cfg.device)

    records, layout = sft_records(cfg.data, cfg.text_field, cfg.data_layout, records)
    loss_on = resolve_loss_on(cfg.loss_on, layout)
    # A resumed run whose tokenizer was trained on the data reads it back rather than retraining it.
    if start.checkpoint is not None and cfg.init == "scratch" and not cfg.tokenizer:
        tokenizer = load_tokenizer(str(start.checkpoint))
    else:  # under torchrun rank 0 builds it (perhaps training it on the data) and hands it on
        tokenizer = distributed.broadcast_object(sft_tokenizer(cfg, records) if distributed.is_main() else None)
    documents = sft_segments(records, layout, loss_on, tokenizer, cfg.text_field, cfg.data)
    train_docs, eval_docs = split_documents(cfg, documents, tokenizer, loss_on)
    train_blocks, train_trained = pack_documents(train_docs, tokenizer, cfg.block_size)
    eval_blocks, eval_trained = pack_documents(eval_docs, tokenizer, cfg.block_size) if eval_docs else (None, None)
    counted = 1.0 if train_trained is None else train_trained[:, 1:].float().mean().item()
    log.info("SFT data: %d train blocks, %d eval blocks of %d tokens; layout %s, loss on %s (%.0f%% of the tokens)",
             len(train_blocks), 0 if eval_blocks is None else len(eval_blocks), cfg.block_size, layout, loss_on,
             100 * counted)

    model = sft_model(cfg, tokenizer).to(device)
    if cfg.gradient_checkpointing:
        # Non-reentrant: with a frozen base (LoRA) the reentrant variant would drop the adapters' gradients.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    def save(trainer: SFTTrainer) -> None:
        state, tensors = trainer.state()  # every rank: their random streams are gathered
        if distributed.is_main():
            save_checkpoint(run_dir / f"checkpoint-{trainer.step_count}", model, tokenizer, state=state,
                            tensors=tensors)
            prune_checkpoints(run_dir, cfg.keep_checkpoints)
        distributed.barrier()

    if start.checkpoint is not None:
        load_trained_weights(model, start.checkpoint)
    if distributed.active():  # identical starting weights; then each rank draws its own dropout
        distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
        seed_everything(distributed.rank_seed(cfg.seed))
    trainer = SFTTrainer(cfg, model, train_blocks, eval_blocks, None, device, save=save,
                         precision=BY_NAME[cfg.precision], train_trained=train_trained, eval_trained=eval_trained)
    if start.checkpoint is not None:
        trainer.load_state(*read_trainer_state(start.checkpoint))
        log.info("resuming %s from %s (step %d of %d)", start.path, start.checkpoint, trainer.step_count,
                 cfg.max_steps)
    run_dir = commit(start, cfg, trainer.step_count if start.checkpoint is not None else None)
    sink = JsonlSink(run_dir / "metrics.jsonl") if distributed.is_main() else None  # rank 0 alone writes
    trainer.sink = sink
    try:
        summary = trainer.train()
    finally:
        if sink is not None:
            sink.close()
    summary["train/blocks"] = float(len(train_blocks))
    if distributed.is_main():
        save_checkpoint(run_dir / "final", model, tokenizer)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    distributed.barrier()
    return summary


def load_trained_weights(model, checkpoint: Path) -> None:
    """A checkpoint's weights into the model built for the run: the adapter of a LoRA run, else all."""
    if is_adapter_dir(checkpoint):
        load_adapter_weights(model, "default", checkpoint)
    else:
        load_weights(model, checkpoint)


def sft_records(source: str, text_field: str, layout: str = "auto",
                records: Optional[list[dict]] = None) -> tuple[list[dict], str]:
    """The SFT records (a .txt file: one text record per paragraph) and their layout, detected
    from the first record's columns unless `layout` names it; the choice is logged in one line."""
    if records is None and Path(source).suffix.lower() == ".txt":
        return [{text_field: t} for t in load_texts(source, text_field)], "text"
    records = records if records is not None else load_records(source)
    if layout == "auto":
        layout = detect_sft_layout(records[0], text_field)
        log.info("%s: SFT layout %s (detected from the columns; data_layout= chooses)", source, layout)
    if layout != "text":
        check_sft_records(records, layout, source)
        return records, layout
    records = [{text_field: t} for t in texts_of(records, text_field, source) if t.strip()]  # as load_texts
    if not records:
        raise DataError(f"dataset {source} is empty: it has no non-blank text")
    return records, layout


def plain_text(record: dict, text_field: str) -> str:
    """A record's words alone (no template), to train a tokenizer on."""
    values = [record.get(text_field), record.get("prompt"), record.get("completion"), record.get("messages")]
    pieces = []
    for value in values:
        if isinstance(value, str):
            pieces.append(value)
        elif isinstance(value, list):
            pieces += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return " ".join(pieces)


def pack_documents(documents: list, tokenizer, block_size: int):
    """(blocks, trained) of documents in segments; trained is None when every token counts (packed
    exactly as plain text is)."""
    if all(trained for doc in documents for _, trained in doc):
        return pack_texts(["".join(text for text, _ in doc) for doc in documents], tokenizer, block_size), None
    return pack_segments(documents, tokenizer, block_size)


def sft_tokenizer(cfg: SFTConfig, records: list[dict]):
    if cfg.tokenizer or cfg.init == "pretrained":
        return load_tokenizer(cfg.tokenizer or cfg.model)
    tokenizer = train_tokenizer([plain_text(r, cfg.text_field) for r in records], vocab_size=cfg.vocab_size)
    log.info("trained a byte-level BPE tokenizer with %d tokens on the training text", len(tokenizer))
    return tokenizer


def split_documents(cfg: SFTConfig, docs: list, tokenizer, loss_on: str) -> tuple[list, list]:
    """Held-out documents: eval_data (same layout rules), or a seeded eval_fraction of the documents."""
    if cfg.eval_data:
        records, layout = sft_records(cfg.eval_data, cfg.text_field, cfg.data_layout)
        return docs, sft_segments(records, layout, resolve_loss_on(cfg.loss_on, layout), tokenizer, cfg.text_field,
                                  cfg.eval_data)
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = int(len(docs) * cfg.eval_fraction)
    if cfg.eval_fraction > 0 and n_eval == 0 and len(docs) > 1:
        n_eval = 1
    held = set(order[:n_eval])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def sft_model(cfg: SFTConfig, tokenizer):
    precision = BY_NAME[cfg.precision]
    from transformers import AutoModelForCausalLM

    if cfg.init == "scratch":
        config = tiny_config(cfg.arch, tokenizer, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                             max_positions=max(cfg.block_size, 512), dropout=cfg.dropout)
        return use_attention(AutoModelForCausalLM.from_config(config).to(precision.trainable),
                             cfg.attn_implementation)
    settings = lora_settings(cfg)
    if settings is not None:
        require_full_model(cfg.model, "model")
    model = use_attention(load_causal_lm(cfg.model, precision.model_dtype(lora=settings is not None)),
                          cfg.attn_implementation)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if settings is None:
        return model
    # The adapter alone trains; final/ holds it in peft format (`tether export` merges it).
    model = add_lora(model, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d: %.2fM trainable parameters", settings.rank, trainable / 1e6)
    return model
