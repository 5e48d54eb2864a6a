"""Environment servers: the hop NeMo Gym 0.7.0 puts in front of every agent.

NeMo Gym 0.7.0's collector (``ng_collect_rollouts``, ``RolloutCollectionHelper.run_examples``) never posts a row
to an agent: it looks up, in the head server's config, the ``environment_servers`` entry that fronts the row's
agent and posts ``/run`` (and, after the rows, ``/aggregate_metrics``) there. An agent without one is refused
(``AgentWithoutEnvironmentServerError``). A config entry looks like::

    math_environment_server:
      environment_servers:
        legacy_agent:
          agent_server: {type: responses_api_agents, name: math_agent}

``legacy_agent`` is an opaque relay: it forwards ``/run`` (body, cookies, status, headers) and
``/aggregate_metrics`` to its agent unchanged. gym_plugin therefore starts no relay process: the entry is served
with the agent's own host and port, so a NeMo Gym client reaches the agent in one hop with the same result.
Every agent of a gym_plugin config gets such an entry unless the config declares one (named as NeMo Gym names
the ones it generates: ``<agent without _<implementation> or _agent>_environment_server``).

The other direction: a NeMo Gym deployment's environment servers (any implementation: each serves ``/run`` for
flat rows) are honoured by our collector, which posts through the one fronting a row's agent
(`gym_plugin.launch.agent_routes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from gym_plugin.errors import did_you_mean, truncate
from gym_plugin.schema import unknown_key

ENVIRONMENT_SERVERS = "environment_servers"
"""The server type key of environment servers in a config."""
RELAY_IMPL = "legacy_agent"
"""The environment server implementation gym_plugin serves (an opaque relay to one agent)."""
AGENT_SERVER_KEY = "agent_server"
"""The field an environment server names its agent in."""
SUFFIX = "_environment_server"
RELAY_KEYS = frozenset({AGENT_SERVER_KEY, "max_concurrent_episodes", "queue_timeout_seconds",
                        "default_episode_timeout_seconds", "cleanup_timeout_seconds", "entrypoint", "host", "port",
                        "name", "description"})
"""Keys a legacy_agent entry may carry (NeMo Gym's relay config; the limits are ones a relay never enforces)."""


@dataclass(frozen=True)
class EnvironmentServerSpec:
    """One environment server entry of a config."""

    name: str
    """Instance name (top-level key), e.g. 'math_environment_server'."""
    impl: str
    """Implementation, e.g. 'legacy_agent'."""
    agent: str
    """The agent instance it fronts."""


def default_name(agent: str, agent_impl: str) -> str:
    """NeMo Gym's name for an agent's generated relay: 'math_simple_agent' (simple_agent) -> 'math_environment_server',
    'math_agent' -> 'math_environment_server', 'solver' -> 'solver_environment_server'."""
    stem = agent.removesuffix(f"_{agent_impl}").removesuffix(agent_impl).rstrip("_")
    if stem == agent:
        stem = agent.removesuffix("_agent").rstrip("_")
    return f"{stem or agent_impl}{SUFFIX}"


def fronted_agents(params: Mapping[str, Any]) -> list[str]:
    """Agent names one environment server entry references: its ``agent_server`` (type optional) and every field
    ``{type: responses_api_agents, name: ...}`` (a server may front several agents, e.g. a user and an assistant)."""
    names = []
    for key, ref in params.items():
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str) and (
            ref.get("type") == "responses_api_agents" or (key == AGENT_SERVER_KEY and ref.get("type") is None)
        ):
            names.append(ref["name"])
    return names


def entries(data: Mapping[str, Any]) -> dict[str, tuple[str, dict]]:
    """Environment server entries of a config: instance name -> (implementation, params)."""
    out = {}
    for name, section in data.items():
        if isinstance(section, Mapping) and isinstance(section.get(ENVIRONMENT_SERVERS), Mapping):
            for impl, params in section[ENVIRONMENT_SERVERS].items():
                out[str(name)] = (str(impl), dict(params or {}))
                break
    return out


def agent_impls(data: Mapping[str, Any]) -> dict[str, str]:
    """Agent instance name -> implementation, for every agent section of a config."""
    out = {}
    for name, section in data.items():
        agents = section.get("responses_api_agents") if isinstance(section, Mapping) else None
        if isinstance(agents, Mapping) and len(agents) == 1:
            out[str(name)] = str(next(iter(agents)))
    return out


def with_environment_servers(data: dict) -> dict:
    """``data`` plus a ``legacy_agent`` entry for every agent no environment server fronts (a new dict when any is
    added). Names follow NeMo Gym's rule; a taken name gets ``<agent>_environment_server`` instead."""
    agents = agent_impls(data)
    fronted = {a for _impl, params in entries(data).values() for a in fronted_agents(params)}
    missing = [a for a in agents if a not in fronted]
    if not missing:
        return data
    data = dict(data)
    for agent in missing:
        name = default_name(agent, agents[agent])
        if name in data:
            name = f"{agent}{SUFFIX}"
        while name in data:
            name += SUFFIX
        data[name] = {ENVIRONMENT_SERVERS: {RELAY_IMPL: {
            AGENT_SERVER_KEY: {"type": "responses_api_agents", "name": agent}}}}
    return data


def check(name: str, section: Mapping[str, Any], agents: Mapping[str, str], problems: list[str]
          ) -> EnvironmentServerSpec | None:
    """Validate one ``environment_servers`` section; append every problem (dotted key, value, fix)."""
    impls = section[ENVIRONMENT_SERVERS]
    if len(section) != 1:
        problems.append(f"{name}: an environment server section holds only '{ENVIRONMENT_SERVERS}', got {sorted(section)}")
        return None
    if not isinstance(impls, Mapping) or len(impls) != 1:
        problems.append(f"{name}.{ENVIRONMENT_SERVERS}: needs exactly one implementation name, got {truncate(impls, 80)}")
        return None
    impl, params = next(iter(impls.items()))
    where = f"{name}.{ENVIRONMENT_SERVERS}.{impl}"
    if impl != RELAY_IMPL:
        problems.append(
            f"{where}: implementation {impl!r} is not one gym_plugin serves; gym_plugin serves '{RELAY_IMPL}' (NeMo "
            f"Gym's opaque relay to an agent's /run).{did_you_mean(str(impl), [RELAY_IMPL])} Use {RELAY_IMPL} with "
            f"agent_server: {{type: responses_api_agents, name: <agent>}}, or remove the section (every agent gets one)."
        )
        return None
    params = dict(params or {})
    problems.extend(unknown_key(f"{where}.{key}", key, RELAY_KEYS, params[key]) for key in params
                    if key not in RELAY_KEYS)
    ref = params.get(AGENT_SERVER_KEY)
    if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not ref["name"]:
        problems.append(f"{where}.{AGENT_SERVER_KEY}: {truncate(ref, 80)} must be "
                        "{type: responses_api_agents, name: <agent instance name>}")
        return None
    agent = ref["name"]
    if ref.get("type", "responses_api_agents") != "responses_api_agents":
        problems.append(f"{where}.{AGENT_SERVER_KEY}.type: {ref.get('type')!r} must be responses_api_agents")
    if agent not in agents:
        problems.append(f"{where}.{AGENT_SERVER_KEY}.name: {agent!r} is not a configured agent."
                        f"{did_you_mean(agent, agents)} Configured agents: {sorted(agents)}.")
        return None
    return EnvironmentServerSpec(name=name, impl=str(impl), agent=agent)


def check_one_per_agent(specs: Mapping[str, EnvironmentServerSpec], problems: list[str]) -> None:
    """NeMo Gym's collector routes a row by its agent and refuses an agent fronted by several environment servers
    (``AmbiguousEnvironmentServerError``): report it here, before any server starts."""
    by_agent: dict[str, list[str]] = {}
    for spec in specs.values():
        by_agent.setdefault(spec.agent, []).append(spec.name)
    for agent, names in sorted(by_agent.items()):
        if len(names) > 1:
            problems.append(f"environment servers {sorted(names)} all front agent {agent!r}; NeMo Gym's collector "
                            "cannot route that agent's rows then. Keep one of them.")


def place(data: dict, specs: Mapping[str, EnvironmentServerSpec]) -> None:
    """Serve each environment server entry at its agent's address (in place): ``host``/``port`` of the entry become
    the agent's, since the relay it stands for is opaque. Agents without a port yet are left out."""
    for spec in specs.values():
        agent_params = next(iter(data[spec.agent]["responses_api_agents"].values())) or {}
        entry = data[spec.name][ENVIRONMENT_SERVERS][spec.impl]
        if entry is None:
            entry = data[spec.name][ENVIRONMENT_SERVERS][spec.impl] = {}
        if agent_params.get("port"):
            entry["host"], entry["port"] = agent_params.get("host", "127.0.0.1"), agent_params["port"]
