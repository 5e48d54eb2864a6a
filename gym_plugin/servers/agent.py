"""``responses_api_agents / simple_agent``: the multi-turn tool-calling agent.

``POST /run`` (one rollout): ``/seed_session`` on the resource server, then turns: call the policy model
server's ``/v1/responses`` with the original input + every output item so far + the tool results; run each
``function_call`` against ``POST {resource}/{name}`` (the session threaded) and append a
``function_call_output``; stop on a turn without tool calls, on ``max_turns`` model calls or when the model
reply is incomplete (context full); then ``POST {resource}/verify`` with the row + ``response`` (a Responses
object whose ``output`` is every item of every turn in order, tool results included) and return its reply.

``POST /v1/responses`` runs the same loop without verifying and returns the Responses object.

``POST /aggregate_metrics`` summarises finished rollouts as NeMo Gym 0.7.0's collector asks after a run
(`gym_plugin.servers.aggregate`).

Error handling: an unknown tool, arguments that are not a JSON object, or a tool that rejects its arguments
(HTTP 4xx) become a ``function_call_output`` carrying the error, so the model can recover. A policy model
server failure answers 502 ("upstream_error") and a verifier failure 500 whose message starts with
"VerifierError:" (type "verifier_error"): the rollout fails, it is never scored 0.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from gym_plugin.errors import ConfigError, EndpointError, GymPluginError, ProtocolError, truncate
from gym_plugin.http import HTTPStatusError, Transport, bearer_headers
from gym_plugin.rows import check_row
from gym_plugin.servers.aggregate import aggregate_metrics
from gym_plugin.servers.base import Directory, HandlerError, RequestContext, Server
from gym_plugin.servers.policy.server import ROUTE_KEY_HEADER
from gym_plugin.schema import Checked
from gym_plugin.servers.registry import register

_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_RESERVED_ROUTES = frozenset(("seed_session", "verify", "health", "aggregate_metrics"))

VERIFIER_ERROR_PREFIX = "VerifierError:"
"""Start of the message of an agent reply that failed in /verify (direct calls lose the JSON error type)."""


def _ref_name(ref: Any, key: str) -> str:
    if isinstance(ref, str) and ref:
        return ref
    if isinstance(ref, Mapping) and isinstance(ref.get("name"), str) and ref["name"]:
        return ref["name"]
    raise ConfigError(f"{key}={ref!r}: expected {{type: ..., name: <server instance name>}} or the instance name")


@dataclass
class AgentConfig(Checked):
    """YAML keys under ``responses_api_agents: simple_agent:``."""

    resources_server: Any = None
    """The resource server: ``{type: resources_servers, name: <instance>}`` or the instance name."""
    model_server: Any = None
    """The policy model server: ``{type: responses_api_models, name: <instance>}`` or the instance name."""
    max_turns: int = 8
    """Most model calls per rollout (a turn = one model call and the tool calls it asked for)."""
    max_tool_output_chars: int = 0
    """Cut tool results longer than this many characters (0 = no limit)."""
    timeout_s: float = 600.0
    """Timeout of one call to the model server, a tool or the verifier, seconds."""
    connector_limit: int = 65536
    """aiohttp connection limit of this agent's client (usually ${global_aiohttp_connector_limit})."""
    connector_limit_per_host: int = 16384
    """aiohttp per-host connection limit (usually ${global_aiohttp_connector_limit_per_host})."""
    extra_params: dict = field(default_factory=dict)
    """Responses create params added to every model call unless the row sets them (e.g. temperature)."""

    def check(self) -> list[str]:
        problems = []
        for key in ("resources_server", "model_server"):
            try:
                _ref_name(getattr(self, key), key)
            except ConfigError as e:
                problems.extend(e.problems)
        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            problems.append(f"max_turns={self.max_turns!r}: must be an integer >= 1")
        return problems


@register("responses_api_agents", "simple_agent")
class AgentServer(Server):
    """The simple multi-turn agent; see the module docstring."""

    server_type: ClassVar[str] = "responses_api_agents"
    Config: ClassVar[type] = AgentConfig

    def __init__(self, name: str, config: AgentConfig, directory: Directory, *,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(name, host=host, port=port)
        self.config = config
        self.directory = directory
        self.resources_name = _ref_name(config.resources_server, "resources_server")
        self.model_name = _ref_name(config.model_server, "model_server")
        self.transport: Transport | None = None
        self._rollout_ids = itertools.count()

    def routes(self):
        return [("POST", "/run", self.run), ("POST", "/v1/responses", self.responses),
                ("POST", "/aggregate_metrics", self.aggregate_metrics)]

    async def on_start(self) -> None:
        token = getattr(self, "auth_token", None)  # the resource and policy model servers require the same one
        self.transport = Transport(
            limit=self.config.connector_limit,
            limit_per_host=self.config.connector_limit_per_host,
            timeout_s=self.config.timeout_s,
            headers=bearer_headers(token),
        )

    async def on_stop(self) -> None:
        if self.transport is not None:
            await self.transport.close()

    # ---- routes ---------------------------------------------------------------------------------------------
    async def run(self, body: Any, ctx: RequestContext) -> dict:
        params = self._params(body)
        resource_url = self.directory.url(self.resources_name)
        transport = self._transport()
        try:
            seeded = await transport.post(f"{resource_url}/seed_session", body)
        except EndpointError as e:
            raise self._upstream("resource server", self.resources_name, "/seed_session", e) from e
        session_id = seeded.session_id
        response = await self._loop(params, resource_url, session_id)
        verify_body = dict(body)
        verify_body["response"] = response
        try:
            verified = await transport.post(f"{resource_url}/verify", verify_body, session_id=session_id)
        except EndpointError as e:
            detail = e.body if isinstance(e, HTTPStatusError) and e.body else str(e)
            raise HandlerError(
                500,
                f"{VERIFIER_ERROR_PREFIX} resource server {self.resources_name!r} ({resource_url}/verify) could "
                f"not verify the rollout: {truncate(detail, 500)}. The rollout is a failure, not reward 0.",
                "verifier_error",
            ) from e
        result = verified.data
        if not isinstance(result, Mapping) or not isinstance(result.get("reward"), (int, float)):
            raise HandlerError(
                500,
                f"{VERIFIER_ERROR_PREFIX} resource server {self.resources_name!r} /verify answered without a numeric "
                f"'reward': {truncate(result, 300)}",
                "verifier_error",
            )
        return result

    async def aggregate_metrics(self, body: Any, ctx: RequestContext) -> dict:
        return aggregate_metrics(body)

    async def responses(self, body: Any, ctx: RequestContext) -> dict:
        if not isinstance(body, Mapping) or not isinstance(body.get("input"), (str, list)):
            raise ProtocolError(f"{self.name}: /v1/responses expects Responses create params with 'input' "
                                f"(a string or a list of items), got {truncate(body, 200)}")
        resource_url = self.directory.url(self.resources_name)
        try:
            seeded = await self._transport().post(f"{resource_url}/seed_session", {"responses_create_params": body})
        except EndpointError as e:
            raise self._upstream("resource server", self.resources_name, "/seed_session", e) from e
        return await self._loop(body, resource_url, seeded.session_id)

    # ---- the tool loop --------------------------------------------------------------------------------------
    async def _loop(self, params: Mapping[str, Any], resource_url: str, session_id: str | None) -> dict:
        transport = self._transport()
        model_url = f"{self.directory.url(self.model_name)}/v1/responses"
        inp = params["input"]
        history: list = [{"role": "user", "content": inp}] if isinstance(inp, str) else list(inp)
        outputs: list = []
        request = dict(self.config.extra_params)
        request.update(params)
        allowed = {t.get("name") for t in params.get("tools") or () if isinstance(t, Mapping)} or None
        headers = {ROUTE_KEY_HEADER: f"{self.name}-{next(self._rollout_ids)}"}
        in_tok = out_tok = 0
        response: dict = {}
        for _turn in range(self.config.max_turns):
            request["input"] = history
            try:
                reply = await transport.post(model_url, request, headers=headers)
            except EndpointError as e:
                raise self._upstream("policy model server", self.model_name, "/v1/responses", e) from e
            response = reply.data
            if not isinstance(response, Mapping) or not isinstance(response.get("output"), list):
                raise HandlerError(502, f"{self.name}: policy model server {self.model_name!r} answered without an "
                                        f"'output' list: {truncate(response, 300)}", "upstream_error")
            usage = response.get("usage") or {}
            in_tok += usage.get("input_tokens", 0)
            out_tok += usage.get("output_tokens", 0)
            items = response["output"]
            outputs.extend(items)
            history.extend(items)
            calls = [it for it in items if it.get("type") == "function_call"]
            if not calls or response.get("incomplete_details"):
                break
            for call in calls:
                result = await self._call_tool(call, allowed, resource_url, session_id)
                history.append(result)
                outputs.append(result)
        final = dict(response)
        final["output"] = outputs
        final["usage"] = {"input_tokens": in_tok, "output_tokens": out_tok, "total_tokens": in_tok + out_tok}
        return final

    async def _call_tool(self, call: Mapping[str, Any], allowed: set | None, resource_url: str,
                         session_id: str | None) -> dict:
        name = call.get("name") or ""
        call_id = call.get("call_id")
        if allowed is not None and name not in allowed:
            return _tool_output(call_id, f"Error: unknown tool {name!r}; available tools: {sorted(allowed)}")
        if name in _RESERVED_ROUTES or not _TOOL_NAME.fullmatch(name):
            # The name becomes a URL path: never let a model reach /verify or /seed_session, or another path.
            return _tool_output(call_id, f"Error: unknown tool {name!r}")
        try:
            args = json.loads(call.get("arguments") or "{}")
        except json.JSONDecodeError as e:
            return _tool_output(call_id, f"Error: the arguments of {name!r} are not valid JSON ({e}): "
                                         f"{truncate(call.get('arguments'), 200)}")
        if not isinstance(args, dict):
            return _tool_output(call_id, f"Error: the arguments of {name!r} must be a JSON object, got "
                                         f"{truncate(args, 200)}")
        try:
            reply = await self._transport().post(f"{resource_url}/{name}", args, session_id=session_id)
        except HTTPStatusError as e:
            if e.status == 404:
                return _tool_output(call_id, f"Error: unknown tool {name!r}")
            if 400 <= e.status < 500:
                return _tool_output(call_id, f"Error: {_error_message(e)}")
            raise self._upstream("resource server", self.resources_name, f"/{name}", e) from e
        except EndpointError as e:
            raise self._upstream("resource server", self.resources_name, f"/{name}", e) from e
        text = json.dumps(reply.data)
        limit = self.config.max_tool_output_chars
        if limit and len(text) > limit:
            text = text[:limit]
        return _tool_output(call_id, text)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _transport(self) -> Transport:
        if self.transport is None:
            raise HandlerError(503, f"agent {self.name!r} is not started (call start() first)")
        return self.transport

    def _params(self, row: Any) -> Mapping[str, Any]:
        """The row's create params, after the checks the collector applies before posting (a 400 naming the
        problem otherwise, before any model or tool call)."""
        return check_row(row, f"{self.name}: the /run row", need_agent=False)

    def _upstream(self, what: str, instance: str, path: str, e: GymPluginError) -> HandlerError:
        status = e.status if isinstance(e, HTTPStatusError) and e.status >= 500 else 502
        if isinstance(e, HTTPStatusError) and 400 <= e.status < 500:
            status = e.status  # a request problem (bad row, missing token ids): not worth retrying
        return HandlerError(
            status,
            f"agent {self.name!r}: {what} {instance!r} failed on {path}: {_error_message(e)}",
            "upstream_error",
        )


def _tool_output(call_id: Any, output: str) -> dict:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def _error_message(e: Exception) -> str:
    """The server's own error message when the body is our JSON error shape, else the exception text."""
    body = getattr(e, "body", None)
    if body:
        try:
            data = json.loads(body)
            if isinstance(data, Mapping) and isinstance(data.get("error"), Mapping):
                return str(data["error"].get("message"))
        except (json.JSONDecodeError, TypeError):
            pass
        return truncate(body, 500)
    return str(e)
