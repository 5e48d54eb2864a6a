"""Server implementations and the registry that maps config names to them.

A config instance ``<name>: {<server_type>: {<implementation>: {...}}}`` is served by
``SERVER_REGISTRY[(server_type, implementation)]``; `get_server_class` looks it up with a helpful error.
The head server (`gym_plugin.servers.head.HeadServer`) is not in the registry: it is started from the
``head_server`` key, not from a server instance.
"""

from __future__ import annotations

from gym_plugin.errors import ConfigError, did_you_mean
from gym_plugin.servers.agent import AgentServer
from gym_plugin.servers.base import Server
from gym_plugin.servers.policy import PolicyModelServer
from gym_plugin.servers.resources.calculator import CalculatorResourceServer
from gym_plugin.servers.resources.capitals import CapitalsResourceServer, ContainsAnswerResourceServer
from gym_plugin.servers.resources.code_exec import CodeExecResourceServer
from gym_plugin.servers.resources.exact_match import ExactMatchResourceServer
from gym_plugin.servers.resources.math_verify import MathVerifyResourceServer

SERVER_TYPES = ("responses_api_models", "resources_servers", "responses_api_agents")

SERVER_REGISTRY: dict[tuple[str, str], type[Server]] = {
    ("responses_api_models", "vllm_model"): PolicyModelServer,
    ("responses_api_agents", "simple_agent"): AgentServer,
    ("resources_servers", "exact_match"): ExactMatchResourceServer,
    ("resources_servers", "math_verify"): MathVerifyResourceServer,
    ("resources_servers", "calculator"): CalculatorResourceServer,
    ("resources_servers", "capitals"): CapitalsResourceServer,
    ("resources_servers", "contains_answer"): ContainsAnswerResourceServer,
    ("resources_servers", "code_exec"): CodeExecResourceServer,
}
"""(server_type, implementation name) -> server class. Other modules may add entries (e.g. code_exec)."""


def get_server_class(server_type: str, impl: str) -> type[Server]:
    """The class serving ``impl`` of ``server_type``; ConfigError naming the known ones otherwise."""
    cls = SERVER_REGISTRY.get((server_type, impl))
    if cls is not None:
        return cls
    if server_type not in SERVER_TYPES:
        raise ConfigError(
            f"server type {server_type!r} (implementation {impl!r}) is unknown; expected one of "
            f"{list(SERVER_TYPES)}.{did_you_mean(server_type, SERVER_TYPES)}"
        )
    known = sorted(i for t, i in SERVER_REGISTRY if t == server_type)
    raise ConfigError(
        f"{server_type}: implementation {impl!r} is unknown; known: {known}.{did_you_mean(impl, known)} "
        "Fix the name in your config."
    )
