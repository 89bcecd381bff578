"""examples/arithmetic (RLVR): the exact-match reward on hand-made responses, the data generator's
determinism and disjoint splits, and one GRPO update of the example's own ppo.yaml on a tiny policy,
in which every response reaches the reward with its own prompt's `answer`. Accuracies and timings
are measured by examples/arithmetic/run.py, not here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import tether
from tether.config import SFTConfig, read_yaml
from tether.rewards import RewardLoadError, load_reward_fn
from tether.tiny import build_tiny_causal_lm, train_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "arithmetic"


def load(name: str):
    """An example module by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"arithmetic_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


reward = load("reward")
make_data = load("make_data")


@pytest.mark.parametrize("response, answer, score", [
    ("81", "81", 1.0),                 # right
    ("80", "81", 0.0),                 # wrong
    ("18", "81", 0.0),                 # right digits, wrong order
    ("81\n12+3=15", "81", 1.0),        # the answer, then junk: only the first number counts
    ("81abc", "81", 1.0),
    ("811", "81", 0.0),                # a longer number is another number
    ("8 1", "81", 0.0),                # the first number is 8
    ("", "81", 0.0),                   # no number
    ("abc", "81", 0.0),
    ("  81", "81", 1.0),               # leading spaces (the SFT model right-aligns its answers)
    ("  4", "4", 1.0),
    (" 81", " 81 ", 1.0),              # the answer's own whitespace is stripped
    ("-5", "-5", 1.0),                 # a minus sign right before the digits belongs to the number
    ("-5", "5", 0.0),
    ("=81", "81", 1.0),                # text before the number is skipped
])
def test_exact_match_reads_the_first_number(response, answer, score):
    assert reward.exact_match([response], [answer]) == [score]


def test_exact_match_scores_each_response_against_its_own_answer():
    assert reward.exact_match(["81", "81", " 7"], ["81", "80", "7"]) == [1.0, 0.0, 1.0]


def test_the_reward_file_loads_through_tether_and_needs_the_answer_field():
    source = load_reward_fn(f"{EXAMPLE / 'reward.py'}:exact_match")
    scores = source.score(["23+58=", "52-38="], ["81", " 24"], columns={"answer": ["81", "14"]})
    assert scores.tolist() == [1.0, 0.0]
    with pytest.raises(RewardLoadError, match="takes 'answer', which is not a field of prompts.jsonl"):
        source.check_columns(["solution"], "prompts.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_data_is_deterministic_and_its_splits_are_disjoint(tmp_path):
    first = make_data.write_data(tmp_path / "a", seed=3)
    again = make_data.write_data(tmp_path / "b", seed=3)
    other = make_data.write_data(tmp_path / "c", seed=4)
    for name in ("sft", "prompts", "eval"):
        assert first[name].read_bytes() == again[name].read_bytes()
    assert first["eval"].read_bytes() != other["eval"].read_bytes()

    sft = [r["prompt"] for r in read_jsonl(first["sft"])]
    prompts = [r["prompt"] for r in read_jsonl(first["prompts"])]
    held_out = [r["prompt"] for r in read_jsonl(first["eval"])]
    assert (len(held_out), len(sft)) == (500, 8000)
    assert len(sft) + len(prompts) + len(held_out) == len(make_data.all_problems()) == 12195
    assert len(set(sft) | set(prompts) | set(held_out)) == 12195  # no problem twice, within or across files
    assert not set(held_out) & (set(sft) | set(prompts))


def arithmetic(prompt: str) -> int:
    a, op, b = prompt[:2], prompt[2], prompt[3:5]
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_the_answer_key_is_right_and_only_carries_are_forgotten_in_the_demonstrations(tmp_path):
    paths = make_data.write_data(tmp_path, seed=0)
    for name in ("prompts", "eval"):
        assert all(int(r["answer"]) == arithmetic(r["prompt"]) for r in read_jsonl(paths[name]))
    demonstrations = read_jsonl(paths["sft"])
    # Every example is 9 characters: one per block of block_size 10 with its EOS.
    assert {len(r["prompt"] + r["completion"]) for r in demonstrations} == {9}
    assert tether.make_config(SFTConfig, str(EXAMPLE / "sft.yaml"), {}).block_size == 10
    wrong = 0
    for r in demonstrations:
        a, op, b = int(r["prompt"][:2]), r["prompt"][2], int(r["prompt"][3:5])
        given, right = int(r["completion"]), arithmetic(r["prompt"])
        if given != right:
            wrong += 1
            assert make_data.needs_carry((a, op, b)) and given == make_data.careless_answer((a, op, b))
    carries = sum(make_data.needs_carry((int(r["prompt"][:2]), r["prompt"][2], int(r["prompt"][3:5])))
                  for r in demonstrations)
    assert 0.6 < wrong / carries < 0.73  # 2 in 3 by default


@pytest.fixture(scope="module")
def tiny_char_policy(tmp_path_factory) -> Path:
    """A random tiny GPT-2 with the example's tokenizer: 258 tokens, one per character."""
    directory = tmp_path_factory.mktemp("arithmetic-policy")
    tokenizer = train_tokenizer(["0123456789+-= "], vocab_size=258)
    build_tiny_causal_lm("gpt2", tokenizer, seed=0, hidden=32, layers=1, heads=2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_one_update_of_the_example_config_gives_every_response_its_own_answer(tmp_path, tiny_char_policy):
    data = make_data.write_data(tmp_path / "data", seed=0, num_prompts=64)
    calls = []

    def spying_exact_match(responses, prompts, answer):
        calls.append(list(zip(prompts, answer)))
        return reward.exact_match(responses, answer)

    result = tether.ppo(str(EXAMPLE / "ppo.yaml"), reward=spying_exact_match, policy=str(tiny_char_policy),
                        prompts=str(data["prompts"]), eval_prompts=str(data["eval"]), eval_max_prompts=4,
                        total_updates=1, batch_size=4, output_dir=str(tmp_path / "ppo"))
    example = read_yaml(str(EXAMPLE / "ppo.yaml"))
    assert example["reward_fn"] == "examples/arithmetic/reward.py:exact_match"
    assert (example["advantage_estimator"], example["samples_per_prompt"]) == ("grpo", 8)
    train_rows = [rows for rows in calls if len(rows) == 4 * 8]
    assert len(train_rows) == 1 and len(calls) == 3  # the update's 4 prompts x 8 samples; evaluations before and after
    for rows in calls:
        for prompt, answer in rows:
            assert int(answer) == arithmetic(prompt.strip()), (prompt, answer)
    groups = train_rows[0]
    assert all(len(set(groups[i:i + 8])) == 1 for i in range(0, 32, 8))  # each group is one prompt's 8 samples
    assert (result.final_dir / "config.json").is_file()
