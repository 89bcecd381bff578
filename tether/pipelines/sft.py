"""Build an SFT run from its config: tokenizer, documents, packed blocks, model; train; save."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from tether import distributed
from tether.checkpoint import load_weights, read_trainer_state, save_checkpoint, seed_everything
from tether.config import SFTConfig, check_hub_ids, lora_settings
from tether.data import DataError, check_messages, load_records, load_texts, pack_texts
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


def run_sft(cfg: SFTConfig) -> dict[str, float]:
    cfg.validate()
    join_ranks(cfg)
    settle_precision(cfg)  # before the run directory compares a resumed config with its own
    check_hub_ids(cfg, "model", "tokenizer")
    if cfg.init == "pretrained":  # before anything is written
        check_sequence_fits(cfg.model, cfg.block_size, "block_size", "lower block_size")
    with locked(start_run(cfg)) as start:
        return _run_sft(cfg, start)


def _run_sft(cfg: SFTConfig, start) -> dict[str, float]:
    device = pick_device(cfg.device)

    raw = raw_documents(cfg.data, cfg.text_field)
    # A resumed run whose tokenizer was trained on the data reads it back rather than retraining it.
    if start.checkpoint is not None and cfg.init == "scratch" and not cfg.tokenizer:
        tokenizer = load_tokenizer(str(start.checkpoint))
    else:  # under torchrun rank 0 builds it (perhaps training it on the data) and hands it on
        tokenizer = distributed.broadcast_object(sft_tokenizer(cfg, raw) if distributed.is_main() else None)
    train_docs, eval_docs = split_documents(cfg, render_documents(raw, tokenizer))
    train_blocks = pack_texts(train_docs, tokenizer, cfg.block_size)
    eval_blocks = pack_texts(eval_docs, tokenizer, cfg.block_size) if eval_docs else None
    log.info("SFT data: %d train blocks, %d eval blocks of %d tokens", len(train_blocks),
             0 if eval_blocks is None else len(eval_blocks), cfg.block_size)

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
                         precision=BY_NAME[cfg.precision])
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


def raw_documents(source: str, text_field: str) -> list:
    """Plain-text documents, or chat conversations (lists of messages) to render later."""
    if Path(source).suffix.lower() == ".txt":
        return load_texts(source, text_field)
    records = load_records(source)
    if all("messages" in r for r in records):
        return [check_messages(r["messages"], i, source) if isinstance(r["messages"], list) else r["messages"]
                for i, r in enumerate(records)]
    return load_texts(source, text_field)


def render_documents(raw: list, tokenizer) -> list[str]:
    """Chat conversations become text through the tokenizer's chat template."""
    if not raw or isinstance(raw[0], str):
        return raw
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the SFT data is in chat (messages) form but the tokenizer has no chat template; "
                        "use plain text, or a tokenizer with a chat template")
    return [tokenizer.apply_chat_template(messages, tokenize=False) for messages in raw]


def sft_tokenizer(cfg: SFTConfig, raw: list):
    if cfg.tokenizer or cfg.init == "pretrained":
        return load_tokenizer(cfg.tokenizer or cfg.model)
    texts = [t if isinstance(t, str) else " ".join(m["content"] for m in t) for t in raw]
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    log.info("trained a byte-level BPE tokenizer with %d tokens on the training text", len(tokenizer))
    return tokenizer


def split_documents(cfg: SFTConfig, docs: list[str]) -> tuple[list[str], list[str]]:
    """Held-out documents: eval_data, or a seeded eval_fraction of the documents."""
    if cfg.eval_data:
        return docs, raw_documents(cfg.eval_data, cfg.text_field)
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
