"""Wire shapes of example rows and collector records, parsed and validated once, at the edge.

An example row is a dict with ``responses_create_params`` (OpenAI Responses API create params: ``input`` is a
string or a list of input items) and ``agent_ref`` (``{"name": ...}`` or a bare string). Extra keys travel to
the verifier. The collector yields success records (the agent's reply) and failure records (see
docs/architecture.md); `is_failure` is the one test for the latter.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from gym_plugin.errors import ProtocolError, truncate

TASK_INDEX_KEY = "_ng_task_index"
ROLLOUT_INDEX_KEY = "_ng_rollout_index"
AGENT_REF_KEY = "agent_ref"
ENVIRONMENT_SERVER_KEY = "_ng_environment_server"
"""Stamped on a record by the collector: the environment server instance the row was posted through."""
RESULT_TYPE_KEY = "_ng_result_type"
"""Stamped with it: that environment server's implementation (e.g. 'legacy_agent'), as NeMo Gym 0.7.0 does."""
TOKEN_FIELDS = ("prompt_token_ids", "generation_token_ids", "generation_log_probs")

FAILURE_KINDS = (
    "timeout",
    "connection",
    "http_status",
    "malformed_response",
    "verifier",
    "agent",
    "invalid_row",
)


DRIFT = -1
"""`splice_offsets` value of a model call whose prompt does not extend the tokens before it."""


def splice_offsets(calls: Sequence[Sequence[Any]]) -> list[int]:
    """The multi-turn token splice and its prefix check: the one definition behind `process_rollouts` rows and
    NeMo-RL message logs.

    ``calls``: one entry per model call of a rollout, in order, each starting with ``(prompt_token_ids,
    generation_token_ids, ...)`` as lists. A rollout is one token sequence when every call's prompt starts with
    the previous call's prompt + generation (tool output and template scaffolding come after):

        sequence = prompt_0 + gen_0 + prompt_1[offset_1:] + gen_1 + prompt_2[offset_2:] + gen_2 ...

    Returns ``offset_k`` for each call: 0 for the first; ``len(prompt_{k-1}) + len(gen_{k-1})`` when call k
    extends call k-1 (so ``prompt_k[offset_k:]`` is the context added since: tool results, scaffolding);
    `DRIFT` (-1) when it does not (the chat template rewrote the history, e.g. dropped reasoning), where a new
    sequence has to start. Two C-speed list-slice comparisons per call; nothing is concatenated.
    """
    offsets = [0] * len(calls)
    if len(calls) < 2:
        return offsets
    prev_prompt, prev_gen = calls[0][0], calls[0][1]
    for k in range(1, len(calls)):
        prompt, gen = calls[k][0], calls[k][1]
        n_p, n_g = len(prev_prompt), len(prev_gen)
        if len(prompt) >= n_p + n_g and prompt[:n_p] == prev_prompt and prompt[n_p : n_p + n_g] == prev_gen:
            offsets[k] = n_p + n_g
        else:
            offsets[k] = DRIFT
        prev_prompt, prev_gen = prompt, gen
    return offsets


def first_difference(prompt: Sequence[int], prev_prompt: Sequence[int], prev_gen: Sequence[int]) -> int:
    """Where ``prompt`` stops matching ``prev_prompt + prev_gen`` (for error messages about a `DRIFT`)."""
    seen = list(prev_prompt) + list(prev_gen)
    for i, (a, b) in enumerate(zip(prompt, seen)):
        if a != b:
            return i
    return min(len(prompt), len(seen))


def agent_name(row: Mapping[str, Any], where: str = "example row") -> str:
    """The agent a row is routed to: ``agent_ref`` as ``{"name": ...}`` or a string."""
    ref = row.get("agent_ref")
    if isinstance(ref, Mapping):
        ref = ref.get("name")
    if not isinstance(ref, str) or not ref:
        raise ProtocolError(
            f"{where} has no usable 'agent_ref' (got {truncate(row.get('agent_ref'), 100)}); "
            'add "agent_ref": {"name": "<agent instance name from your config>"} to the row'
        )
    return ref


def validate_example(row: Any, index: int | None = None) -> dict:
    """Check a row has the shape the agents need; returns it (as a dict). Raises ProtocolError naming the row."""
    where = f"example row {index}" if index is not None else "example row"
    if not isinstance(row, Mapping):
        raise ProtocolError(f"{where} is a {type(row).__name__}, expected a JSON object: {truncate(row, 200)}")
    params = row.get("responses_create_params")
    if not isinstance(params, Mapping):
        raise ProtocolError(
            f"{where} has no 'responses_create_params' object (got {truncate(params, 100)}); "
            'expected e.g. {"responses_create_params": {"input": [{"role": "user", "content": "..."}]}}'
        )
    inp = params.get("input")
    if not isinstance(inp, (str, list)) or (isinstance(inp, list) and not inp):
        raise ProtocolError(
            f"{where}: responses_create_params.input must be a non-empty string or list of items, "
            f"got {truncate(inp, 100)}"
        )
    agent_name(row, where)
    return dict(row)


def is_failure(record: Mapping[str, Any]) -> bool:
    """True for a collector failure record (the row did not produce a usable rollout)."""
    return record.get("failure") is not None


def failure_record(
    row: Mapping[str, Any] | Any,
    *,
    kind: str,
    reason: str,
    attempts: int = 0,
    last_error: str = "",
    url: str | None = None,
    task_index: int | None = None,
    rollout_index: int = 0,
) -> dict:
    """A failure record: the input row's keys, ``reward: None`` and a ``failure`` object that says why."""
    assert kind in FAILURE_KINDS, kind
    base = dict(row) if isinstance(row, Mapping) else {"invalid_row": truncate(row, 500)}
    base.update(
        {
            TASK_INDEX_KEY: task_index,
            ROLLOUT_INDEX_KEY: rollout_index,
            "reward": None,
            "failure": {
                "kind": kind,
                "reason": reason,
                "attempts": attempts,
                "last_error": last_error,
                "url": url,
            },
        }
    )
    return base


def describe_failure(record: Mapping[str, Any], limit: int = 300) -> str:
    """One line for a failure record: 'row 3 (repeat 0) failed: http_status after 3 attempts: <reason>; last error:
    <the last attempt's error>' (each cut to ``limit`` characters)."""
    failure = record.get("failure") or {}
    attempts = failure.get("attempts")
    tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
    reason, last = str(failure.get("reason") or ""), str(failure.get("last_error") or "")
    detail = f"; last error: {truncate(last, limit)}" if last and last not in reason else ""
    return (f"row {record.get(TASK_INDEX_KEY)} (repeat {record.get(ROLLOUT_INDEX_KEY, 0)}) failed: "
            f"{failure.get('kind', '?')}{tries}: {truncate(reason, limit)}{detail}")
