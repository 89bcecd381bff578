import os

# Tests never touch a model hub and must not oversubscribe a 2-core machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tether.tiny import build_tiny_causal_lm, build_tiny_reward_model, builtin_corpus, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(builtin_corpus(400), vocab_size=256)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_tokenizer):
    """Saved tiny GPT-2 and Llama policies, a tiny reward model, and a prompt file."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for arch in ("gpt2", "llama"):
        model = build_tiny_causal_lm(arch, tiny_tokenizer, seed=0, hidden=32, layers=2, heads=2)
        model.save_pretrained(root / arch)
        tiny_tokenizer.save_pretrained(root / arch)
        dirs[arch] = root / arch
    reward = build_tiny_reward_model("gpt2", tiny_tokenizer, seed=1, hidden=32, layers=1, heads=2)
    reward.save_pretrained(root / "reward")
    tiny_tokenizer.save_pretrained(root / "reward")
    dirs["reward"] = root / "reward"
    prompts = root / "prompts.jsonl"
    with prompts.open("w") as f:
        for sentence in builtin_corpus(64, seed=5):
            f.write(json.dumps({"prompt": " ".join(sentence.split()[:2])}) + "\n")
    dirs["prompts"] = prompts
    return dirs


def letter_o_rate(responses):
    """A learnable reward: the share of characters that are the letter 'o'."""
    return [r.count("o") / max(1, len(r)) for r in responses]


def vowel_share(responses):
    """A learnable reward with spread from the first update: the share of letters that are vowels."""
    letters = [[c for c in r.lower() if c.isalpha()] for r in responses]
    return [sum(c in "aeiou" for c in ls) / max(1, len(ls)) for ls in letters]


def constant_reward(responses):
    """The same score for every response: every group of samples is uniform."""
    return [1.0 for _ in responses]


def base_overrides(tiny_dirs, tmp_path, arch="gpt2", **extra):
    values = dict(policy=str(tiny_dirs[arch]), prompts=str(tiny_dirs["prompts"]),
                  reward_fn=f"{Path(__file__)}:letter_o_rate", output_dir=str(tmp_path / "run"), total_updates=2,
                  batch_size=8, num_minibatches=2, ppo_epochs=2, max_new_tokens=8, learning_rate=1e-3,
                  progress=False, seed=0)
    values.update(extra)
    return values


def text_length(responses):
    """A dense reward with signal from the first update: characters in the response."""
    return [float(len(r)) / 10 for r in responses]


REWARDS = Path(__file__)

