"""Resource servers: per-rollout sessions, tool routes and a verifier.

A resource server is a small subclass of `ResourceServer` that implements ``verify_row`` (and optionally
``tools()`` and ``new_session``):

- ``POST /seed_session``: starts a session for one rollout (row in, ``{}`` out, session id as a cookie over
  HTTP / ``Reply.session_id`` in process) and creates its state with ``new_session(row)``;
- ``POST /<tool_name>``: one route per entry of ``tools()`` (name -> ``async fn(args, state) -> JSON``), the
  session's state threaded in;
- ``POST /verify``: row + ``response`` in, row + ``reward`` + verifier keys out; the session is dropped
  (sessions are also bounded by ``max_sessions``, oldest evicted, so rollouts that never verify cannot leak);
- ``POST /aggregate_metrics``: NeMo Gym 0.7.0's run summary of finished rollouts (`gym_plugin.servers.aggregate`).

A verifier that cannot judge (bad row, internal error, timeout) raises; the agent turns that into a failed
rollout, never a reward of 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, ClassVar, Mapping

from gym_plugin.errors import ConfigError, ProtocolError, truncate
from gym_plugin.responses import output_text
from gym_plugin.schema import Checked
from gym_plugin.servers.aggregate import aggregate_metrics
from gym_plugin.servers.base import Directory, HandlerError, RequestContext, Server

Tool = Callable[[dict, dict], Awaitable[Any]]
"""A tool: ``async fn(arguments, session_state) -> JSON-serialisable result``."""


@dataclass
class ResourceServerConfig(Checked):
    """YAML keys common to every resource server (a subclass adds its own, and its value rules in ``check()``)."""

    max_sessions: int = 100_000
    """Sessions kept at once; the oldest is evicted past this (a session ends at /verify)."""


class ResourceServer(Server):
    """Base class: sessions, tool routes, /verify. Subclasses implement `verify_row` (and `tools`)."""

    server_type: ClassVar[str] = "resources_servers"
    Config: ClassVar[type] = ResourceServerConfig

    def __init__(self, name: str, config: Any = None, directory: Directory | None = None, *,
                 host: str = "127.0.0.1", port: int = 0):
        self.config = config if config is not None else type(self).Config()
        self.directory = directory
        self._tools: dict[str, Tool] = dict(self.tools())
        self._sessions: dict[str, dict] = {}
        super().__init__(name, host=host, port=port)

    # ---- what subclasses implement -----------------------------------------------------------------------
    def tools(self) -> Mapping[str, Tool]:
        """Tool name -> async fn(arguments, state). Each is served as ``POST /<name>``."""
        return {}

    def new_session(self, row: Mapping[str, Any]) -> dict:
        """State of a new session (per rollout), from the row sent to /seed_session."""
        return {}

    async def verify_row(self, row: Mapping[str, Any], response: Mapping[str, Any], state: dict | None) -> dict:
        """Keys to add to the row: at least ``reward`` (float). Raise when the row cannot be judged."""
        raise NotImplementedError

    # ---- routes ---------------------------------------------------------------------------------------------
    def routes(self):
        routes = [("POST", "/seed_session", self.seed_session), ("POST", "/verify", self.verify),
                  ("POST", "/aggregate_metrics", self.aggregate_metrics)]
        for tool_name in self._tools:
            if tool_name in ("seed_session", "verify", "aggregate_metrics", "health"):
                raise ConfigError(f"resource server {self.name!r}: tool name {tool_name!r} is a reserved route; "
                                  "rename the tool")
            routes.append(("POST", f"/{tool_name}", self._tool_route(tool_name)))
        return routes

    async def seed_session(self, body: Any, ctx: RequestContext) -> dict:
        sid = ctx.start_session()
        sessions = self._sessions
        if len(sessions) >= self.config.max_sessions:
            sessions.pop(next(iter(sessions)))  # insertion order: the oldest session goes
        sessions[sid] = self.new_session(body if isinstance(body, Mapping) else {})
        return {}

    def _tool_route(self, tool_name: str):
        fn = self._tools[tool_name]

        async def route(body: Any, ctx: RequestContext) -> Any:
            if body is None:
                body = {}
            if not isinstance(body, Mapping):
                raise HandlerError(
                    400, f"tool {tool_name!r} of {self.name!r}: arguments must be a JSON object, got {truncate(body, 200)}"
                )
            state = self._sessions.get(ctx.session_id) if ctx.session_id is not None else None
            if state is None:
                if ctx.session_id is not None:
                    raise HandlerError(
                        400, f"tool {tool_name!r} of {self.name!r}: unknown session {ctx.session_id!r} (never "
                        "seeded, already verified, or evicted). Call /seed_session first and send its cookie."
                    )
                state = {}  # a stateless call (no session): the tool still works, nothing is remembered
            return await fn(dict(body), state)

        return route

    async def verify(self, body: Any, ctx: RequestContext) -> dict:
        if not isinstance(body, Mapping):
            raise ProtocolError(f"{self.name}: /verify expects the row plus 'response', got {truncate(body, 200)}")
        response = body.get("response")
        if (not isinstance(response, Mapping) or not isinstance(response.get("output"), list)
                or not all(isinstance(item, Mapping) for item in response["output"])):
            raise ProtocolError(
                f"{self.name}: /verify body has no 'response' with an 'output' list of item objects (got {truncate(response, 200)}); "
                "send the row plus the agent's Responses object as 'response'"
            )
        state = self._sessions.pop(ctx.session_id, None) if ctx.session_id is not None else None
        result = await self.verify_row(body, response, state)
        out = dict(body)
        out.update(result)
        return out

    async def aggregate_metrics(self, body: Any, ctx: RequestContext) -> dict:
        return aggregate_metrics(body)

    @property
    def session_count(self) -> int:
        return len(self._sessions)


def final_text(response: Mapping[str, Any]) -> str:
    """Text of the last assistant message of a Responses object ('' when the model wrote none)."""
    return output_text(response.get("output") or [])


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in text, braces balanced; None if absent."""
    start = text.rfind("\\boxed{")
    skip = 7
    if start < 0:
        start = text.rfind("\\fbox{")
        skip = 6
        if start < 0:
            return None
    i = start + skip
    depth = 1
    n = len(text)
    j = i
    while j < n:
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
        j += 1
    return None


def expected_answer(row: Mapping[str, Any], server: str) -> str:
    """The row's ``expected_answer`` as a string; ProtocolError (a verifier failure) when it is missing."""
    value = row.get("expected_answer")
    if value is None:
        raise ProtocolError(
            f"{server}: the row has no 'expected_answer' (keys: {sorted(k for k in row if k != 'response')}); "
            "add the reference answer to every row of this environment"
        )
    return value if isinstance(value, str) else str(value)
