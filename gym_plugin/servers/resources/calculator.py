"""``resources_servers / calculator``: a tool environment that needs several tool calls.

Tools (Responses API function tools, `CALCULATOR_TOOLS`): ``add(a, b)`` and ``multiply(a, b)``, each answering
``{"result": <number>}`` and remembered in the rollout's session. A task (`calculator_row`) asks for
``(a * b) + c`` "using the tools": solving it takes a ``multiply`` call and then an ``add`` call.

Verify: the answer is the last ``\\boxed{}`` of the final message (else its last number) and must equal the
row's ``expected_answer``; when ``require_tools`` is on and the row lists ``required_tools``, each of them must
have been called in this rollout's session, else the reward is 0 even for a right answer (the environment
teaches tool use, not mental arithmetic). Reply keys: ``reward``, ``extracted_answer``, ``answer_correct``,
``tools_used`` (names, in call order), ``tool_calls`` (count).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from gym_plugin.servers.base import HandlerError
from gym_plugin.servers.resources.base import (
    ResourceServer,
    ResourceServerConfig,
    expected_answer,
    extract_boxed,
    final_text,
)
from gym_plugin.servers.resources.math_verify import numbers_equal, plain_number
from gym_plugin.servers.registry import register

_LAST_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _binary_tool(name: str, description: str) -> dict:
    return {
        "type": "function",
        "name": name,
        "description": description,
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
        "strict": True,
    }


CALCULATOR_TOOLS = [
    _binary_tool("add", "Return a + b."),
    _binary_tool("multiply", "Return a * b."),
]
"""The calculator's tools in Responses API format (put them in a row's responses_create_params.tools)."""


def calculator_row(a: int, b: int, c: int, agent: str = "calculator_agent") -> dict:
    """A task that needs multiply then add: '(a * b) + c'. expected_answer = str(a * b + c)."""
    prompt = (
        f"Compute ({a} * {b}) + {c}. Use the tools: first multiply, then add. "
        "Give the final answer as \\boxed{N}."
    )
    return {
        "responses_create_params": {"input": [{"role": "user", "content": prompt}], "tools": CALCULATOR_TOOLS},
        "expected_answer": str(a * b + c),
        "required_tools": ["multiply", "add"],
        "agent_ref": {"name": agent},
    }


def _number(args: Mapping[str, Any], key: str, tool: str) -> float | int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HandlerError(400, f"tool {tool!r}: argument {key!r} must be a number, got {value!r}; "
                                f'call it as {{"a": 2, "b": 3}}')
    return value


@dataclass
class CalculatorConfig(ResourceServerConfig):
    """YAML keys under ``resources_servers: calculator:``."""

    require_tools: bool = True
    """Reward 0 unless every tool in the row's ``required_tools`` was called in the rollout."""


@register("resources_servers", "calculator")
class CalculatorResourceServer(ResourceServer):
    Config = CalculatorConfig

    def tools(self):
        return {"add": self.add, "multiply": self.multiply}

    def new_session(self, row: Mapping[str, Any]) -> dict:
        return {"calls": []}

    async def add(self, args: dict, state: dict) -> dict:
        result = _number(args, "a", "add") + _number(args, "b", "add")
        state.setdefault("calls", []).append("add")
        return {"result": result}

    async def multiply(self, args: dict, state: dict) -> dict:
        result = _number(args, "a", "multiply") * _number(args, "b", "multiply")
        state.setdefault("calls", []).append("multiply")
        return {"result": result}

    async def verify_row(self, row: Mapping[str, Any], response: Mapping[str, Any], state: dict | None) -> dict:
        gold = expected_answer(row, self.name)
        text = final_text(response)
        boxed = extract_boxed(text)
        if boxed is None:
            numbers = _LAST_NUMBER.findall(text)
            boxed = numbers[-1] if numbers else ""
        pred, want = plain_number(boxed), plain_number(gold)
        correct = pred is not None and want is not None and numbers_equal(pred, want)
        used = list((state or {}).get("calls", []))
        tools_ok = True
        if self.config.require_tools:
            tools_ok = all(t in used for t in row.get("required_tools") or ())
        return {
            "reward": 1.0 if correct and tools_ok else 0.0,
            "extracted_answer": boxed.strip(),
            "answer_correct": correct,
            "tools_used": used,
            "tool_calls": len(used),
        }
