"""PPO from Python: a Python function as the reward, a `datasets.Dataset` of prompts, a callback
after every update. Runs offline in about a minute on CPU, on a tiny GPT built here.

    .venv/bin/python examples/ppo_in_python.py [OUTPUT_DIR]

With your own model, drop the tiny-model part and pass `policy="your/sft-model"`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from datasets import Dataset

import tether
from tether.tiny import build_tiny_causal_lm, builtin_corpus, train_tokenizer


def tiny_policy(directory: Path) -> Path:
    """A small GPT and its tokenizer, trained on nothing yet: enough to watch the reward move."""
    tokenizer = train_tokenizer(builtin_corpus(400), vocab_size=256)
    model = build_tiny_causal_lm("gpt2", tokenizer, seed=0, hidden=32, layers=2, heads=2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def letter_o_rate(responses: list[str]) -> list[float]:
    """The reward: the share of the letter 'o' among a response's letters."""
    return [sum(c == "o" for c in r) / max(1, sum(c.isalpha() for c in r)) for r in responses]


def main(output_dir: str = "runs/ppo-in-python") -> tether.RunResult:
    out = Path(output_dir)
    policy = tiny_policy(out.parent / f"{out.name}-policy")
    prompts = Dataset.from_list([{"prompt": " ".join(s.split()[:2])} for s in builtin_corpus(64, seed=5)])
    scores = []
    result = tether.ppo(
        policy=str(policy), prompts=prompts, reward=letter_o_rate,
        on_update=lambda metrics: scores.append(metrics["reward/score"]),
        total_updates=8, batch_size=16, num_minibatches=2, max_new_tokens=12, learning_rate=1e-3,
        advantage_estimator="grpo", samples_per_prompt=4, output_dir=str(out), overwrite=True, progress=False,
    )
    print(f"reward/score by update: {', '.join(f'{s:.3f}' for s in scores)}")
    print(f"run directory {result.run_dir}; the policy: {result.final_dir}")
    return result


if __name__ == "__main__":
    main(*sys.argv[1:2])
