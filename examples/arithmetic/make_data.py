"""The arithmetic task, generated here (seeded, offline): two-digit additions and subtractions.

    .venv/bin/python examples/arithmetic/make_data.py [--out runs/arithmetic/data] [--seed 0]

writes three files of disjoint problems:

- sft.jsonl      {"prompt": "23+58=", "completion": " 71"}: worked examples for the warm-up (`tether sft`,
                 loss on the completion) by a *careless demonstrator*: in a problem that needs a carry
                 (or a borrow) it forgets it `--careless` of the time (2 in 3 by default), so 23+58 reads
                 71 and 52-38 reads 24; every other answer is right.
- prompts.jsonl  {"prompt": "23+58=", "answer": "81"}: what `tether ppo` samples from, with the right
                 answer (an answer key, no worked solution); the reward function reads `answer`.
- eval.jsonl     the same form: held-out problems, in no training file, for the before/after figures.

Why careless demonstrations: SFT imitates its examples, mistakes included, while a verifiable reward
scores what is right. The SFT model learns the carry and its omission, and greedy decoding picks the
more frequent one, the omission; PPO with the exact-match reward has to learn to carry. (With correct
examples, more SFT is all a tiny model needs: README.md.)

SFT answers are right-aligned to three characters, as in a column of sums ("16-12=  4"), so every
example is 9 characters, 9 tokens with a character-level tokenizer: with `block_size: 10` each packed
SFT block holds exactly one example and its EOS, starting at position 0 as a PPO prompt does. Packed
several to a block, the model attends across examples and learns far slower (README.md).

Every problem is `a+b=` or `a-b=` with 10 <= a, b <= 99 and a >= b for subtraction (no negative
answers): 12,195 problems, of which 43% need a carry or a borrow. The split is a seeded shuffle, so the
same seed always writes the same files, and no problem is in two of them.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

Problem = tuple[int, str, int]  # (a, "+" or "-", b)
ANSWER_WIDTH = 3  # SFT answers right-aligned: every example "ab+cd=xyz" is 9 characters


def all_problems(low: int = 10, high: int = 99) -> list[Problem]:
    """Every a+b and a-b (a >= b) with both operands in [low, high]."""
    problems = []
    for a in range(low, high + 1):
        for b in range(low, high + 1):
            problems.append((a, "+", b))
            if a >= b:
                problems.append((a, "-", b))
    return problems


def prompt_of(problem: Problem) -> str:
    a, op, b = problem
    return f"{a}{op}{b}="


def answer_of(problem: Problem) -> int:
    a, op, b = problem
    return a + b if op == "+" else a - b


def needs_carry(problem: Problem) -> bool:
    """Whether the units column carries into the tens (a+b) or borrows from them (a-b)."""
    a, op, b = problem
    return a % 10 + b % 10 >= 10 if op == "+" else a % 10 < b % 10


def careless_answer(problem: Problem) -> int:
    """The answer with the carry or borrow forgotten, each column done on its own: 23+58 -> 71, 52-38 -> 24."""
    return answer_of(problem) + (-10 if problem[1] == "+" else 10)


def split_problems(seed: int = 0, num_eval: int = 500, num_sft: int = 8000,
                   num_prompts: int | None = None) -> dict[str, list[Problem]]:
    """Disjoint eval / sft / prompts lists; prompts takes the rest by default."""
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    if num_eval + num_sft >= len(problems):
        raise ValueError(f"num_eval + num_sft must leave problems for PPO: {num_eval} + {num_sft} of {len(problems)}")
    rest = problems[num_eval + num_sft:]
    return {"eval": problems[:num_eval], "sft": problems[num_eval:num_eval + num_sft],
            "prompts": rest if num_prompts is None else rest[:num_prompts]}


def demonstrations(problems: list[Problem], careless: float, seed: int) -> list[dict]:
    """Prompt-completion records; one that needs a carry gets the careless answer with probability `careless`."""
    rng = random.Random(seed + 1)
    rows = []
    for problem in problems:
        wrong = needs_carry(problem) and rng.random() < careless
        answer = careless_answer(problem) if wrong else answer_of(problem)
        rows.append({"prompt": prompt_of(problem), "completion": f"{answer:>{ANSWER_WIDTH}}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_data(out: str | Path, seed: int = 0, careless: float = 2 / 3, num_eval: int = 500, num_sft: int = 8000,
               num_prompts: int | None = None) -> dict[str, Path]:
    """Write sft.jsonl, prompts.jsonl and eval.jsonl under `out`; returns their paths."""
    if not 0 <= careless <= 1:
        raise ValueError(f"careless is a probability, got {careless}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = split_problems(seed, num_eval, num_sft, num_prompts)
    paths = {name: out / f"{name}.jsonl" for name in ("sft", "prompts", "eval")}
    write_jsonl(paths["sft"], demonstrations(split["sft"], careless, seed))
    for name in ("prompts", "eval"):
        write_jsonl(paths[name], [{"prompt": prompt_of(p), "answer": str(answer_of(p))} for p in split[name]])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/arithmetic/data", help="directory for the three files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the demonstrator's slips")
    parser.add_argument("--careless", type=float, default=2 / 3,
                        help="how often the demonstrator forgets a carry or borrow that a problem needs")
    parser.add_argument("--num-eval", type=int, default=500, help="held-out problems")
    parser.add_argument("--num-sft", type=int, default=8000, help="worked examples for SFT")
    parser.add_argument("--num-prompts", type=int, default=None, help="PPO prompts (default: all the rest)")
    args = parser.parse_args(argv)
    paths = write_data(args.out, args.seed, args.careless, args.num_eval, args.num_sft, args.num_prompts)
    for name, path in paths.items():
        print(f"{name}: {sum(1 for _ in path.open())} problems in {path}")


if __name__ == "__main__":
    main()
