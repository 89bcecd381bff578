"""The verifiable reward of the arithmetic example: exact match of the answer.

tether calls `exact_match(responses, answer)` with one response and one `answer` per row: the
`answer` field of the prompt record each response was sampled for (prompts.jsonl holds
`{"prompt": "23+58=", "answer": "81"}`). Configure it as

    reward_fn: examples/arithmetic/reward.py:exact_match

Parsing rule: the response's first number is the first run of digits in it, with a minus sign
when one comes right before the digits; it must equal the answer as an integer (whitespace around
the answer is stripped). What follows the number is ignored: "81\n12+3=15" and " 81 apples" both
score 1 for the answer "81"; "8 1", "eighty-one" and an empty response score 0.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def first_number(response: str) -> int | None:
    """The first number in a response, None when it has none."""
    match = NUMBER.search(response)
    return int(match.group()) if match else None


def exact_match(responses: list[str], answer: list[str]) -> list[float]:
    """1.0 where a response's first number is the answer, else 0.0."""
    return [float(first_number(response) == int(str(expected).strip()))
            for response, expected in zip(responses, answer)]
