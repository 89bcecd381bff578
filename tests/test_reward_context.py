"""Rewards with context: a reward function reads the prompt records' other fields by name (a
verifiable reward reads `answer`), on the right rows under samples_per_prompt groups and dynamic
sampling refills; several functions are summed with weights and each is logged as reward/<name>."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import tether
from tether.config import ConfigError, PPOConfig
from tether.data import record_columns
from tether.rewards import FunctionReward, RewardError, RewardLoadError, WeightedRewards

from conftest import base_overrides


def ppo_options(tiny_dirs, tmp_path, **extra) -> dict:
    options = base_overrides(tiny_dirs, tmp_path, **extra)
    del options["prompts"], options["reward_fn"]
    return options


def numbered_prompts(count: int) -> list[dict]:
    """Prompts that say their own number, with that number in a separate field."""
    return [{"prompt": f"item {i} is", "answer": str(i), "parity": i % 2} for i in range(count)]


def test_a_function_gets_the_fields_it_names_and_all_of_them_with_kwargs():
    seen = {}

    def named(responses, prompts, answer):
        seen["named"] = (prompts, answer)
        return [0.0] * len(responses)

    def everything(responses, **fields):
        seen["all"] = fields
        return [0.0] * len(responses)

    columns = {"answer": ["1", "2"], "parity": [1, 0]}
    FunctionReward(named).score(["p1", "p2"], ["a", "b"], columns=columns)
    FunctionReward(everything).score(["p1", "p2"], ["a", "b"], columns=columns)
    assert seen["named"] == (["p1", "p2"], ["1", "2"])
    assert seen["all"] == {"prompts": ["p1", "p2"], "answer": ["1", "2"], "parity": [1, 0]}


def test_a_required_argument_that_is_no_field_is_refused_before_models_load():
    def needs_solution(responses, solution):
        return [0.0] * len(responses)

    reward = FunctionReward(needs_solution)
    with pytest.raises(RewardLoadError, match=r"takes 'solution', which is not a field of prompts.jsonl.*answer"):
        reward.check_columns(["answer"], "prompts.jsonl")
    FunctionReward(lambda responses, solution=None: [0.0]).check_columns([], "x")  # a default is fine


def test_a_failing_row_is_named_with_its_own_fields():
    def picky(responses, answer):
        return [1.0 / (int(a) - 1) for a in answer]

    with pytest.raises(RewardError, match=r"ZeroDivisionError.*response 1 'b'"):
        FunctionReward(picky).score(["p", "q", "r"], ["a", "b", "c"], columns={"answer": ["0", "1", "2"]})


def test_record_columns_leave_out_the_prompt_and_fill_missing_fields_with_none():
    records = [{"prompt": "a", "answer": 1}, {"prompt": "b", "extra": True}]
    assert record_columns(records) == {"answer": [1, None], "extra": [None, True]}
    assert record_columns([{"messages": [], "answer": 1}]) == {"answer": [1]}


def test_weighted_rewards_sum_and_keep_each_part():
    combined = WeightedRewards([FunctionReward(lambda r: [1.0] * len(r)), FunctionReward(lambda r: [len(x) for x in r])],
                               ["one", "length"], [2.0, 0.5])
    scores, parts = combined.scored(["p", "q"], ["ab", "abcd"])
    assert scores.tolist() == [3.0, 4.0] and combined.score(["p", "q"], ["ab", "abcd"]).tolist() == [3.0, 4.0]
    assert parts.tolist() == [[1.0, 2.0], [1.0, 4.0]]


@pytest.mark.parametrize("options, message", [
    ({"reward_fns": ["m:a", "m:b"]}, r"set exactly one of reward_model.*got reward_fn and reward_fns"),
    ({"reward_fn": None, "reward_fns": ["m:a", "n:a"]}, r"two functions are named 'a'"),
    ({"reward_fn": None, "reward_fns": ["m:score"]}, r"reward/score, which tether logs already"),
    ({"reward_fn": None, "reward_fns": ["m:a", "m:b"], "reward_weights": [1.0]}, r"1 weights for 2 reward_fns"),
    ({"reward_fn": None, "reward_fns": ["m.a"]}, r"reward_fns must look like 'package.module:function'"),
])
def test_bad_reward_function_lists_are_refused(tiny_dirs, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        tether.make_config(PPOConfig, None, {**base_overrides(tiny_dirs, tmp_path), **options})


def as_module(monkeypatch, name: str, **functions) -> str:
    """Register functions as an importable module (gold_reward_fn takes 'module:function')."""
    module = types.ModuleType(name)
    for key, fn in functions.items():
        setattr(module, key, fn)
    monkeypatch.setitem(sys.modules, name, module)
    return name


def test_each_row_gets_its_own_record_under_groups_and_dynamic_sampling_refills(tiny_dirs, tmp_path, monkeypatch):
    mismatches, calls, rows = [], [], []

    def checked(responses, prompts, answer, parity):
        # The number in the decoded prompt must be this row's answer.
        calls.append(len(responses))
        for prompt, a in zip(prompts, answer):
            rows.append(a)
            if f"item {a} is" not in prompt:
                mismatches.append((prompt, a))
        # Odd items score the same for every sample (a uniform group, dropped and refilled).
        return [0.0 if p else float(len(r)) for r, p in zip(responses, parity)]

    def gold(responses, prompts, answer):  # scored on the kept groups, after the refills
        assert len(answer) == len(prompts) == len(responses)
        mismatches.extend((p, a) for p, a in zip(prompts, answer) if f"item {a} is" not in p)
        return [0.0] * len(responses)

    updates = []
    overrides = ppo_options(tiny_dirs, tmp_path, advantage_estimator="grpo", samples_per_prompt=4,
                            dynamic_sampling=True, dynamic_sampling_max_rounds=3, total_updates=3,
                            rollout_batch_size=8, gold_reward_fn=as_module(monkeypatch, "gold_rows", gold=gold) + ":gold")
    tether.ppo(prompts=numbered_prompts(40), reward=checked, on_update=updates.append, **overrides)
    assert not mismatches
    assert sum(u["sampling/extra_rounds"] for u in updates) > 0  # refills happened
    assert len(rows) > 3 * 8 * 4  # more rows scored than trained on: the refills were checked too
    # Groups are whole: each prompt's samples_per_prompt rows sit together.
    assert all(len(set(rows[i:i + 4])) == 1 for i in range(0, len(rows), 4))


def test_several_reward_functions_are_summed_and_logged_each(tiny_dirs, tmp_path):
    def has_o(responses):
        return [float("o" in r) for r in responses]

    def length(responses, answer):
        return [len(r) / 10 + 0 * len(a) for r, a in zip(responses, answer)]

    updates = []
    overrides = ppo_options(tiny_dirs, tmp_path, reward_weights=[1.0, 0.5])
    result = tether.ppo(prompts=numbered_prompts(16), reward={"has_o": has_o, "length": length},
                        on_update=updates.append, **overrides)
    for row in updates:
        assert row["reward/score"] == pytest.approx(row["reward/has_o"] + 0.5 * row["reward/length"], abs=1e-5)
    saved = (result.run_dir / "config.yaml").read_text()
    assert "python:has_o" in saved and "python:length" in saved


def test_the_gold_scorer_reads_the_fields_too(tiny_dirs, tmp_path, monkeypatch):
    received = []

    def gold(responses, answer):
        received.extend(answer)
        return [0.0] * len(responses)

    overrides = ppo_options(tiny_dirs, tmp_path, total_updates=1,
                            gold_reward_fn=as_module(monkeypatch, "gold_with_answer", gold=gold) + ":gold")
    tether.ppo(prompts=numbered_prompts(16), reward=lambda responses: [0.0] * len(responses), **overrides)
    assert len(received) == 8 and all(isinstance(a, str) for a in received)
    assert torch.tensor([int(a) for a in received]).max() < 16
