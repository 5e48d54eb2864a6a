"""The one error hierarchy of gym_plugin.

Every error a user can cause is one of these. Messages name the thing, the bad value and the fix,
e.g. ``UnknownAgentError: agent_ref 'math_agnet' is not configured. Configured agents: ['math_agent'].
Did you mean 'math_agent'? Fix the row's agent_ref or add the agent to your config.``
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

DEBUG_ENV_VARS = ("GYM_PLUGIN_DEBUG", "HYDRA_FULL_ERROR")
"""Either set to 1 shows the traceback of a user error instead of only its message."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def truncate(payload: object, limit: int = 500) -> str:
    """A payload for an error message: repr'd and cut to ``limit`` characters."""
    text = payload if isinstance(payload, str) else repr(payload)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def error_body(message: str, error_type: str, param: str | None = None, code: int | None = None) -> dict:
    """The JSON body of every error reply of gym_plugin's servers, OpenAI's shape: ``{"error": {"message", "type"}}``
    plus ``param`` (the request field at fault) and ``code`` (the HTTP status, as vLLM writes it) when given."""
    error: dict = {"message": message, "type": error_type}
    if param is not None:
        error["param"] = param
    if code is not None:
        error["code"] = code
    return {"error": error}


class GymPluginError(Exception):
    """Base class of every error gym_plugin raises on purpose."""


class ConfigError(GymPluginError):
    """The configuration is invalid. ``problems`` lists every problem found (dotted key, value, fix)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


class UnknownAgentError(GymPluginError, KeyError):
    """An example's ``agent_ref`` names no configured agent (also a KeyError, as in NeMo Gym)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ProtocolError(GymPluginError):
    """A row, request or server reply does not have the shape the wire protocol requires."""


class DataError(ProtocolError):
    """Example rows read from a file (or generated) are unusable. ``problems`` holds every one as
    ``(origin, message)``, origin being e.g. 'rows.jsonl:12'; the message lists them (the first 50) and the fix."""

    SHOWN = 50

    def __init__(self, summary: str, problems: list[tuple[str, str]] = (), fix: str = ""):
        self.problems = list(problems)
        lines = [f"  - {origin}: {message}" for origin, message in self.problems[: self.SHOWN]]
        if len(self.problems) > self.SHOWN:
            lines.append(f"  ... and {len(self.problems) - self.SHOWN} more")
        super().__init__("\n".join([summary, *lines, *([fix] if fix else [])]))


class MalformedResponseError(ProtocolError):
    """A server replied with something that cannot be parsed (payload truncated in the message)."""


class MissingTokenIdsError(ProtocolError):
    """A model output item lacks its token fields (`gym_plugin.protocol.TOKEN_FIELDS`) or has them incomplete."""


class EndpointError(GymPluginError):
    """An HTTP endpoint failed (connection refused, timeout, 5xx after retries). ``url`` names it."""

    def __init__(self, message: str, url: str | None = None, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status


class EndpointUnreachableError(EndpointError, ConnectionError):
    """Cannot connect to an endpoint (nothing listening, DNS, refused)."""


class EndpointTimeoutError(EndpointError, TimeoutError):
    """An endpoint did not answer within the configured timeout."""


class VerifierError(GymPluginError):
    """A resource server's verify step failed: the rollout is a failure, never reward 0."""


class ModelLoadError(GymPluginError):
    """A model or tokenizer could not be loaded or converted (path, package, format)."""


class SandboxError(GymPluginError):
    """The code sandbox itself failed (interpreter would not start, no free sandbox uid): not the answer's fault,
    so the rollout is a failure, never reward 0."""


class TrackerError(GymPluginError):
    """An experiment tracker (TensorBoard, W&B, MLflow) is not installed or cannot start a run."""


def debug_enabled() -> bool:
    """True when the user asked for tracebacks (``GYM_PLUGIN_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``)."""
    return any(os.environ.get(name, "").strip() not in ("", "0", "false") for name in DEBUG_ENV_VARS)


def format_user_error(exc: BaseException) -> str:
    """The block a command prints for an error the user caused: its type and message, and how to see more."""
    return (f"error: {type(exc).__name__}: {exc}\n"
            f"(no traceback shown: set GYM_PLUGIN_DEBUG=1 to see it)")


def exit_on_user_error(fn: Callable[[], T], code: int = 2) -> T:
    """Run ``fn``; a GymPluginError it raises becomes one printed block and exit ``code`` (a traceback only when
    ``debug_enabled()``). For the top of commands and scripts, never for library code."""
    try:
        return fn()
    except GymPluginError as exc:
        if debug_enabled():
            raise
        print(format_user_error(exc), file=sys.stderr, flush=True)
        raise SystemExit(code) from None
