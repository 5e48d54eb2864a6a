"""A fake policy that 'solves' three task families deterministically, for end-to-end runs without a model.

`task_script` is a `FakeOpenAIServer` script (``(messages, body) -> Turn``). It reads the last user message and
the tool results so far and answers like a model that is right most of the time, so rewards are a mix of 1 and 0
and two collectors can be compared row by row:

- arithmetic (``What is A + B?``, `add_row`): ``The answer is \\boxed{A+B}.``; wrong (2(A+B)+1, far enough
  off that NeMo Gym's string_match gives no partial credit) when ``(7 * A + B) % 4 == 0``;
- calculator (``Compute (A * B) + C. Use the tools``, `gym_plugin.servers.resources.calculator.calculator_row`):
  ``multiply(A, B)``, then ``add(<its result>, C)``, then ``\\boxed{<result>}``; answers directly without tools
  (reward 0 under ``require_tools``) when ``(A + B + C) % 5 == 0``;
- weather (NeMo Gym's ``example_single_tool_call`` rows, `weather_row`): ``get_weather(city)`` then a sentence
  with the tool's text; answers without calling the tool (reward 0 there) when ``len(message) % 3 == 0``.

- reasoning-gym chain_sum (``...arithmetic problem: A + B =``, `gym_plugin.reasoning_tasks.generate_rows`):
  ``A + B = S. <answer>S</answer>`` with S = `add_answer` (so wrong by the same rule); ``A - B`` rows get ``OK``.

Anything else is answered ``OK``. `ScriptedTasksServer` is the fake answering with it: ``gym-plugin fake-openai
--tasks --port P`` serves it, a config starts it with ``policy_endpoint: {impl: scripted_tasks}``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

from gym_plugin.responses import content_text
from gym_plugin.servers.base import Directory
from gym_plugin.servers.registry import POLICY_ENDPOINT, register
from gym_plugin.testing.fake_openai import FakeOpenAIConfig, FakeOpenAIServer, ToolCall, Turn

_ADD = re.compile(r"What is (-?\d+) \+ (-?\d+)\?")
_CALC = re.compile(r"Compute \((-?\d+) \* (-?\d+)\) \+ (-?\d+)\. Use the tools")
_RG_SUM = re.compile(r"arithmetic problem: (-?\d+) \+ (-?\d+) =")
_WEATHER = re.compile(r"\b(?:sf|san francisco|weather|humidity|rain)\b", re.IGNORECASE)

WEATHER_TOOLS = [{
    "type": "function", "name": "get_weather", "description": "",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": ""}},
                   "required": ["city"], "additionalProperties": False},
    "strict": True,
}]
"""The tool of NeMo Gym's example_single_tool_call rows (Responses API format)."""


def add_answer(a: int, b: int) -> int:
    """What the fake answers to 'What is a + b?' (2(a + b) + 1, wrong, when (7a + b) % 4 == 0)."""
    return 2 * (a + b) + 1 if (7 * a + b) % 4 == 0 else a + b


def calculator_uses_tools(a: int, b: int, c: int) -> bool:
    """Whether the fake calls the tools for '(a * b) + c' (it skips them when (a + b + c) % 5 == 0)."""
    return (a + b + c) % 5 != 0


def weather_calls_tool(text: str) -> bool:
    """Whether the fake calls get_weather for this user message (not when len(text) % 3 == 0)."""
    return len(text) % 3 != 0


def add_row(a: int, b: int, agent: str, **extra: Any) -> dict:
    """A single-turn arithmetic row: expected_answer a+b (string_match / exact_match / math all read \\boxed{})."""
    prompt = f"What is {a} + {b}? Put your final answer in \\boxed{{}}."
    return {"responses_create_params": {"input": [{"role": "user", "content": prompt}]},
            "expected_answer": str(a + b), "agent_ref": {"name": agent}, **extra}


WEATHER_PROMPTS = ("what's it like in sf?", "going out in sf tn", "humidity in sf", "will it rain in sf today",
                   "sf weather this weekend", "should I bring a coat in san francisco")


def weather_row(i: int, agent: str) -> dict:
    """A row shaped like NeMo Gym's example_single_tool_call data (reward 1 iff get_weather was called)."""
    text = f"{WEATHER_PROMPTS[i % len(WEATHER_PROMPTS)]} (request {i})"
    return {"responses_create_params": {"input": [
        {"role": "developer", "content": "You are a helpful personal assistant."},
        {"role": "user", "content": text}], "tools": WEATHER_TOOLS}, "agent_ref": {"name": agent}}


def _tool_results(messages: list) -> list[str]:
    return [content_text(m.get("content")) for m in messages if m.get("role") == "tool"]


def _last_user(messages: list) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return content_text(m.get("content"))
    return ""


def _result_of(tool_output: str) -> Any:
    """The number in a calculator tool output ('{"result": 6}')."""
    try:
        data = json.loads(tool_output)
    except json.JSONDecodeError:
        return tool_output
    return data.get("result") if isinstance(data, Mapping) else data


def _plain(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def task_script(messages: list, body: Mapping[str, Any]) -> Turn:
    """The fake's answer to one chat request (see the module docstring)."""
    user = _last_user(messages)
    results = _tool_results(messages)
    m = _CALC.search(user)
    if m:
        a, b, c = (int(g) for g in m.groups())
        if not calculator_uses_tools(a, b, c):
            return Turn(text=f"The answer is \\boxed{{{a * b + c}}}.")
        if not results:
            return Turn(tool_calls=[ToolCall("multiply", {"a": a, "b": b})])
        if len(results) == 1:
            return Turn(tool_calls=[ToolCall("add", {"a": _result_of(results[0]), "b": c})])
        return Turn(text=f"The answer is \\boxed{{{_plain(_result_of(results[-1]))}}}.")
    m = _ADD.search(user)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        return Turn(text=f"The answer is \\boxed{{{add_answer(a, b)}}}.")
    m = _RG_SUM.search(user)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        return Turn(text=f"{a} + {b} = {add_answer(a, b)}. <answer>{add_answer(a, b)}</answer>")
    if _WEATHER.search(user) and body.get("tools"):
        if results:
            return Turn(text=f"Here is what I found: {results[-1]}")
        if weather_calls_tool(user):
            return Turn(tool_calls=[ToolCall("get_weather", {"city": "San Francisco"})])
        return Turn(text="I think it is fine outside.")
    return Turn(text="OK")


@dataclasses.dataclass
class ScriptedTasksConfig(FakeOpenAIConfig):
    """``policy_endpoint: {impl: scripted_tasks, ...}``: the fake's options; its script is always `task_script`."""

    model: str | None = "fake-model"
    """The one model name it serves."""


@register(POLICY_ENDPOINT, "scripted_tasks")
class ScriptedTasksServer(FakeOpenAIServer):
    """The fake endpoint answering with `task_script`."""

    Config = ScriptedTasksConfig

    @classmethod
    def from_config(cls, name: str, config: FakeOpenAIConfig, directory: Directory | None = None, *,
                    host: str = "127.0.0.1", port: int = 0) -> "ScriptedTasksServer":
        config = dataclasses.replace(config, script=task_script)
        return super().from_config(name, config, directory, host=host, port=port)  # type: ignore[return-value]
