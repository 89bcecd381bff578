"""Held-out exact-match accuracy of a model directory, with greedy decoding.

    .venv/bin/python examples/arithmetic/evaluate.py MODEL_DIR [MODEL_DIR ...] \
        [--eval runs/arithmetic/data/eval.jsonl]

MODEL_DIR is any `save_pretrained` directory with its tokenizer: the SFT run's final/ or the
PPO run's final/. Each prompt is decoded greedily (plain transformers `generate`, do_sample=False)
and scored with reward.exact_match, the reward PPO trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward import exact_match  # noqa: E402


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def greedy_responses(model_dir: str | Path, prompts: list[str], max_new_tokens: int = 6,
                     batch_size: int = 128) -> list[str]:
    """Each prompt's greedy continuation, cut at EOS (special tokens dropped)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # no "Loading weights" bar per model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    responses = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        responses += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return responses


def accuracy(model_dir: str | Path, eval_file: str | Path) -> tuple[float, int, list[dict]]:
    """(exact-match accuracy, number of prompts, one row per prompt with its response and score)."""
    records = read_jsonl(eval_file)
    responses = greedy_responses(model_dir, [r["prompt"] for r in records])
    scores = exact_match(responses, [r["answer"] for r in records])
    rows = [{**r, "response": response, "score": score} for r, response, score in zip(records, responses, scores)]
    return sum(scores) / len(scores), len(scores), rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Held-out exact-match accuracy, greedy decoding.")
    parser.add_argument("model_dirs", nargs="+", help="save_pretrained directories (e.g. a run's final/)")
    parser.add_argument("--eval", default="runs/arithmetic/data/eval.jsonl", help="held-out prompts with answers")
    parser.add_argument("--show", type=int, default=0, help="also print this many prompts and responses")
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    for model_dir in args.model_dirs:
        acc, n, rows = accuracy(model_dir, args.eval)
        print(f"{model_dir}: held-out exact match {100 * acc:.1f}% ({n} prompts)")
        for row in rows[:args.show]:
            print(f"  {row['prompt']}{row['response']!r:12} answer {row['answer']:>4}  score {row['score']:.0f}")


if __name__ == "__main__":
    main()
