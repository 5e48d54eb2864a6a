"""math_verify's answer rule: boxed answers by value, otherwise the last number; free text is never evaluated."""

from __future__ import annotations

import asyncio

import pytest

from gym_plugin.servers.base import Directory
from gym_plugin.servers.resources.math_verify import MathVerifyConfig, MathVerifyResourceServer


def reward(text: str, gold: str) -> float:
    server = MathVerifyResourceServer("math", MathVerifyConfig(), Directory())
    response = {"output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": text}]}]}
    return asyncio.run(server.verify_row({"expected_answer": gold}, response, None))["reward"]


@pytest.mark.parametrize("text,gold,expected", [
    ("The answer is 13.", "13", 1.0),                     # last number 13
    ("9 + 4 = 13", "13", 1.0),                             # last number 13
    ("Please share the specific 9 + 4 that you need", "13", 0.0),  # echoing the question: last number 4, not 9+4
    ("What is 9 + 4?", "13", 0.0),
    ("I think \\boxed{13}", "13", 1.0),
    ("\\boxed{9 + 4}", "13", 1.0),                         # a boxed expression is the model's answer: evaluated
    ("It costs 1,000 dollars", "1000", 1.0),
    ("no number here", "13", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),                 # symbolic path (math-verify)
])
def test_answer_rule(text, gold, expected):
    assert reward(text, gold) == expected
