"""Tiny models and tokenizers built locally from configs: for offline demos and tests.

Nothing here downloads anything: a byte-level BPE is trained in about a second, and
GPT-2 or Llama models are initialised from small configs.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the old man", "a small bird", "the film"]
_VERBS = ["is", "was", "looks", "seems", "felt", "became"]
_ADJECTIVES = ["good", "bad", "happy", "sad", "great", "slow", "bright", "quiet", "awful", "kind"]
_ENDINGS = ["today", "again", "at night", "in the park", "this time", "after lunch", "to me"]


def builtin_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Short English sentences from templates: enough for a tokenizer and a toy LM."""
    rng = random.Random(seed)
    combos = list(itertools.product(_SUBJECTS, _VERBS, _ADJECTIVES, _ENDINGS))
    rng.shuffle(combos)
    return [f"{s} {v} {a} {e}." for s, v, a, e in combos[:n]]


def train_tokenizer(texts: list[str], vocab_size: int = 256, chat_template: str | None = None):
    """A byte-level BPE with EOS and a dedicated pad token, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                        bos_token=EOS_TOKEN)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(arch: str, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 256,
                dropout: float | None = None, init_std: float = 0.02):
    """A small GPT-2 or Llama config sized for the tokenizer (dropout None keeps the library default).

    A larger `init_std` gives a random model peaked output distributions to begin with: at the
    default 0.02 a 32-wide model's logits are nearly uniform, and adapters, which leave the
    embeddings and final norm as they are, cannot make them peaked.
    """
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  initializer_range=init_std)
    if arch == "gpt2":
        drop = {} if dropout is None else dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **drop, **common)
    if arch == "llama":
        drop = {} if dropout is None else dict(attention_dropout=dropout)
        return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=max_positions, tie_word_embeddings=True, **drop, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose 'gpt2' or 'llama'")


def build_tiny_causal_lm(arch: str, tokenizer, seed: int = 0, **sizes):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer, **sizes))


def build_tiny_reward_model(arch: str, tokenizer, seed: int = 0, **sizes):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(arch, tokenizer, **sizes)
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config)


def save_tiny_policy(directory: Path, arch: str = "gpt2", texts: list[str] | None = None, vocab_size: int = 256,
                     seed: int = 0, **sizes) -> Path:
    """Write a tokenizer + randomly initialised tiny causal LM loadable with from_pretrained."""
    directory = Path(directory)
    tokenizer = train_tokenizer(texts or builtin_corpus(), vocab_size)
    model = build_tiny_causal_lm(arch, tokenizer, seed, **sizes)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
