"""Wire shapes of example rows and collector records, parsed and validated once, at the edge.

An example row is a dict with ``responses_create_params`` (OpenAI Responses API create params: ``input`` is a
string or a list of input items) and ``agent_ref`` (``{"name": ...}`` or a bare string). Extra keys travel to
the verifier. The collector yields success records (the agent's reply) and failure records (see
docs/architecture.md); `is_failure` is the one test for the latter.
"""

from __future__ import annotations

from typing import Any, Mapping

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
