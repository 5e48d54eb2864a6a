"""What makes an example row usable: the one check behind the collector's ``invalid_row`` records,
`validate_example` and ``gym-plugin prepare`` / the recipe's ``env.data_path`` (gym_plugin.datasets).

An example row is a dict with ``responses_create_params`` (``input``: a non-empty string or list of input items;
optional ``tools``) and ``agent_ref`` (``{"name": ...}`` or a bare string); see gym_plugin.protocol. Input items and
tools are checked by the conversion the policy model server applies to them (gym_plugin.responses), so a row that
passes here is one the server can render.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

from gym_plugin.errors import ProtocolError, did_you_mean, truncate
from gym_plugin.protocol import AGENT_REF_FIX
from gym_plugin.responses import input_to_messages, tools_to_chat

_INPUT_EXAMPLE = '[{"role": "user", "content": "..."}]'


def unknown_agent_message(name: str, agents: Collection[str]) -> str:
    """The message for an ``agent_ref`` that names none of ``agents`` (the configured agent instances)."""
    return (f"agent_ref {name!r} is not a configured agent. Configured agents: {sorted(agents)}."
            f"{did_you_mean(name, agents)} Fix the row's agent_ref or add the agent to your config.")


def row_problems(row: Any, agents: Collection[str] | None = None, *, render: bool = True) -> list[tuple[str, str]]:
    """Every reason a row cannot be run, as ``(field, message)`` pairs (empty for a usable row): the one row
    check behind the collector's ``invalid_row`` records, `validate_example` and ``gym-plugin prepare``.

    ``field`` says what is wrong ('row', 'responses_create_params', 'responses_create_params.input',
    'responses_create_params.input[i]', 'agent_ref'); each message names the bad value and the fix. Input items
    are checked by the conversion the policy model server applies to them (`gym_plugin.responses`), so a row
    that passes here is one the server can render. ``agents``: the configured agent names, when known; then
    ``agent_ref`` must name one of them. ``render=False`` checks the shape only (object, create params, non-empty
    input, agent_ref) and leaves items and tools to the receiver: the collector's setting, since a NeMo Gym
    deployment may accept item types (``item_reference``, images, ...) that our own policy server does not render.
    """
    if not isinstance(row, Mapping):
        return [("row", f"the row is a {type(row).__name__}, not a JSON object: {truncate(row, 200)}; write one "
                        f'object per row, e.g. {{"responses_create_params": {{"input": {_INPUT_EXAMPLE}}}}}')]
    problems: list[tuple[str, str]] = []
    params = row.get("responses_create_params")
    inp = params.get("input") if isinstance(params, Mapping) else None
    if not isinstance(params, Mapping):
        problems.append(("responses_create_params",
                         f"no 'responses_create_params' object (got {truncate(params, 100)}); expected e.g. "
                         f'{{"responses_create_params": {{"input": {_INPUT_EXAMPLE}}}}}'))
    elif not isinstance(inp, (str, list)) or not inp or (isinstance(inp, str) and not inp.strip()):
        problems.append(("responses_create_params.input",
                         f"responses_create_params.input must be a non-empty string or list of items, got "
                         f"{truncate(repr(inp), 100)}; give the prompt, e.g. {_INPUT_EXAMPLE}"))
    elif isinstance(inp, list) and render:
        for i, item in enumerate(inp):
            try:
                input_to_messages([item], carry_tokens=False)
            except ProtocolError as e:  # the item alone: every bad item is named, not only the first
                field = f"responses_create_params.input[{i}]"
                problems.append((field, f"{field}: {str(e).replace('input item 0 ', '', 1)}; an item is e.g. "
                                 '{"role": "user", "content": "..."}'))
    tools = params.get("tools") if isinstance(params, Mapping) else None
    if tools is not None and render:
        try:
            if not isinstance(tools, list):
                raise ProtocolError(f"tools must be a list of function tools, got {truncate(tools, 100)}")
            tools_to_chat(tools)
        except ProtocolError as e:
            problems.append(("responses_create_params.tools", f"responses_create_params.{e}; a tool is e.g. "
                             '{"type": "function", "name": "add", "parameters": {"type": "object", ...}}'))
    ref = row.get("agent_ref")
    name = ref.get("name") if isinstance(ref, Mapping) else ref
    if not isinstance(name, str) or not name:
        problems.append(("agent_ref", AGENT_REF_FIX.format(got=truncate(ref, 100))))
    elif agents is not None and name not in agents:
        problems.append(("agent_ref", unknown_agent_message(name, agents)))
    return problems


def check_row(row: Any, where: str = "example row", *, render: bool = False,
              need_agent: bool = True) -> Mapping[str, Any]:
    """`row_problems` as an exception: returns the row's create params, or raises ProtocolError naming ``where``
    and every problem. ``need_agent=False`` for a receiver that is the agent already (an agent's /run)."""
    problems = [message for field, message in row_problems(row, render=render)
                if need_agent or field != "agent_ref"]
    if problems:
        raise ProtocolError(f"{where}: " + "; ".join(problems))
    return row["responses_create_params"]


def validate_example(row: Any, index: int | None = None, *, render: bool = False) -> dict:
    """Check a row has the shape the agents need (`row_problems`; items and tools too with ``render=True``);
    returns it (as a dict). Raises ProtocolError naming the row and every problem. The collector calls it with
    the default (shape only), so rows for a NeMo Gym deployment are not refused for item types we do not render."""
    check_row(row, f"example row {index}" if index is not None else "example row", render=render)
    return dict(row)
