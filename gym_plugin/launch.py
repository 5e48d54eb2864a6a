"""Start the servers a config names, in this process (one event loop) or one process per server.

`start_servers(cfg)` builds every configured server, binds it (port 0 picks a free port), fills a `Directory`
with the bound URLs so servers find each other, and starts a head server that serves the merged config with
the real ports. Servers started this way call each other directly (no HTTP) when they share the loop.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from gym_plugin import envservers, schema
from gym_plugin.collect import AgentRoute
from gym_plugin.config import HEAD_SERVER_KEY_NAME, GymConfig, ServerSpec
from gym_plugin.errors import (
    ConfigError,
    EndpointError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    MalformedResponseError,
    did_you_mean,
    truncate,
)
from gym_plugin.http import Transport
from gym_plugin.net import is_loopback, local_host, url_list
from gym_plugin.servers.auth import ALLOW_KEY, exposure_problem
from gym_plugin.servers.base import Directory, Server
from gym_plugin.servers.head import HeadServer, ServerInstance
from gym_plugin.servers.registry import POLICY_ENDPOINT, SERVER_TYPES, get_server_class

logger = logging.getLogger(__name__)

def build_local_endpoint(spec: dict) -> Server:
    """The OpenAI-compatible endpoint named by the config's ``policy_endpoint`` (port fixed at load time)."""
    params = dict(spec)
    cls = get_server_class(POLICY_ENDPOINT, params.pop("impl"))
    host, port = params.pop("host", "127.0.0.1"), int(params.pop("port"))
    return cls.from_config(POLICY_ENDPOINT, schema.build(cls.Config, params, POLICY_ENDPOINT, noun="option"),
                           host=host, port=port)


def build_server(spec: ServerSpec, directory: Directory) -> Server:
    """The server of one config instance, built from its section through its class's ``Config``."""
    cls = get_server_class(spec.server_type, spec.impl)
    where = f"{spec.name}.{spec.server_type}.{spec.impl}"
    config = schema.build(cls.Config, spec.params, where, noun="parameter") if cls.Config is not None else spec.params
    return cls.from_config(spec.name, config, directory, host=spec.host, port=spec.port)


def check_network_exposure(cfg: GymConfig, *, head: bool = True, only: str | None = None) -> None:
    """Before anything binds: one ConfigError naming every server (and the head server when ``head``) a config puts
    on an address other than loopback without ``auth_token``, with the two ways out; none when
    ``allow_unauthenticated_network`` is true. ``only``: the one server of a process-per-server child."""
    data = cfg.data
    binds = [(f"server {name!r} ({name}.{spec.server_type}.{spec.impl}.host)", spec.host)
             for name, spec in cfg.servers.items() if only in (None, name)]
    if head and only in (None, "__head__"):
        binds.append((f"the head server ({HEAD_SERVER_KEY_NAME}.host)", cfg.head_host))
    endpoint = data.get(POLICY_ENDPOINT)
    if isinstance(endpoint, dict) and only in (None, "__policy_endpoint__"):
        binds.append((f"the local policy endpoint ({POLICY_ENDPOINT}.host)", str(endpoint.get("host", "127.0.0.1"))))
    exposed = [(what, host) for what, host in binds if not is_loopback(host)]
    token = data.get("auth_token") or None
    if exposed and not token and not data.get(ALLOW_KEY):
        raise ConfigError(exposure_problem(exposed))
    if token and isinstance(endpoint, dict) and not is_loopback(str(endpoint.get("host", "127.0.0.1"))) \
            and data.get("policy_api_key") != token:
        raise ConfigError(
            f"{POLICY_ENDPOINT}.host: {endpoint.get('host')!r} is reachable from other machines, so the local policy "
            "endpoint requires auth_token, and the policy model server sends policy_api_key to it. Set "
            "policy_api_key: ${auth_token} (or bind the endpoint to 127.0.0.1).")


def bind_options(data: dict) -> dict:
    """Server.start's ``auth_token`` / ``allow_unauthenticated_network`` for a server of config ``data``."""
    return {"auth_token": data.get("auth_token") or None, "allow_unauthenticated_network": bool(data.get(ALLOW_KEY))}


def extra_options(data: dict, host: str) -> dict:
    """The same for the local policy endpoint and extra servers: they take the token only when reachable from the
    network (on loopback they keep answering the policy model server, which sends policy_api_key, unchecked)."""
    options = bind_options(data)
    if is_loopback(host):
        options["auth_token"] = None
    return options


@dataclass
class RunningServers:
    """Servers started in this process."""

    config: GymConfig
    """The validated config, with the bound host/port of every server written into ``config.data``."""
    directory: Directory
    """Instance name -> URL."""
    servers: list[Server] = field(default_factory=list)
    """Started servers (head server last)."""
    head: Server | None = None
    """The head server, if started."""

    def agent_urls(self) -> dict[str, str]:
        return {name: self.directory.url(name) for name in self.config.agents}

    def agent_routes(self) -> dict[str, AgentRoute]:
        """Agent -> route for the collector, as a NeMo Gym client sees this deployment (through each agent's
        environment server entry, which is served at the agent's own address)."""
        return agent_routes(self.config.data)

    async def stop(self) -> None:
        for s in reversed(self.servers):
            try:
                await s.stop()
            except Exception:  # keep stopping the others
                logger.exception("stopping %s failed", s.name)
        self.servers.clear()


async def start_servers(
    cfg: GymConfig,
    *,
    start_head: bool = True,
    extra: list[Server] = (),  # type: ignore[assignment]
) -> RunningServers:
    """Start ``extra`` servers (e.g. an embedded policy), then every configured server, then the head."""
    check_network_exposure(cfg, head=start_head)
    data = copy.deepcopy(cfg.data)
    directory = Directory()
    running = RunningServers(config=GymConfig(data=data, servers=cfg.servers,
                                              environment_servers=cfg.environment_servers), directory=directory)
    options = bind_options(data)  # servers of the config require the token (401 without), collector sends it
    try:
        if data.get("policy_endpoint"):
            extra = [build_local_endpoint(data["policy_endpoint"]), *extra]
        for s in extra:
            await s.start(**extra_options(data, s.host))
            running.servers.append(s)
        for name, spec in cfg.servers.items():
            server = build_server(spec, directory)
            try:
                await server.start(**options)
            except OSError as e:
                raise EndpointError(
                    f"server {name!r} could not bind {spec.host}:{spec.port}: {e}. Pick another port "
                    f"({name}.{spec.server_type}.{spec.impl}.port) or 0 for any free port.",
                    url=f"http://{spec.host}:{spec.port}",
                ) from e
            running.servers.append(server)
            directory.set(name, server.url)
            params = data[name][spec.server_type][spec.impl]
            if params is None:
                params = data[name][spec.server_type][spec.impl] = {}
            params["host"], params["port"] = server.host, server.port
        envservers.place(data, cfg.environment_servers)  # each entry at its agent's bound address
        if start_head:
            head_cfg = data.setdefault(HEAD_SERVER_KEY_NAME, {})
            host, port = head_cfg.get("host", "127.0.0.1"), int(head_cfg.get("port", 11000))
            head = HeadServer(data, host=host, port=port,
                              instances=server_instances(data, {}, time.time(), extra=running.servers[:len(extra)]))
            try:
                await head.start(**options)
            except OSError as e:
                raise EndpointError(
                    f"head server could not bind {host}:{port}: {e}. Set head_server.port to a free port "
                    f"(or 0 for any free port).",
                    url=f"http://{host}:{port}",
                ) from e
            head_cfg["host"], head_cfg["port"] = head.host, head.port
            running.servers.append(head)
            running.head = head
    except BaseException:
        await running.stop()
        raise
    return running


async def fetch_head_config(head_url: str, transport) -> dict:
    """The merged config a head server serves (NeMo Gym's JSON-encoded YAML, or plain YAML/JSON)."""
    reply = await transport.get(head_url.rstrip("/") + "/global_config_dict_yaml")
    data = reply.data
    if isinstance(data, str):
        data = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    if not isinstance(data, dict):
        raise MalformedResponseError(
            f"head server {head_url} returned no config mapping: {truncate(reply.data, 200)}. "
            f"Is that address a gym_plugin / NeMo Gym head server?"
        )
    return data


def directory_from_config(data: dict) -> tuple[Directory, list[str]]:
    """(Directory of every server instance with host/port in a served config, agent instance names)."""
    directory, agents = Directory(), []
    for name, section in data.items():
        if not isinstance(section, dict):
            continue
        for stype, impls in section.items():
            if stype not in SERVER_TYPES:
                continue
            if not isinstance(impls, dict):
                continue
            for _impl, params in impls.items():
                if isinstance(params, dict) and params.get("port"):
                    directory.set(name, f"http://{local_host(params.get('host', '127.0.0.1'))}:{params['port']}")
                    if stype == "responses_api_agents":
                        agents.append(name)
    return directory, agents


def agent_routes(data: dict) -> dict[str, AgentRoute]:
    """Agent instance -> where a collector posts its rows, read from a served config (ours or NeMo Gym's): through
    the environment server that fronts the agent when the config has one (NeMo Gym 0.7.0 relays every row that
    way), else to the agent directly. ConfigError when several environment servers front one agent (a row cannot
    pick one) or an environment server has no address."""
    directory, agents = directory_from_config(data)
    fronting: dict[str, list[tuple[str, str, dict]]] = {}
    for name, (impl, params) in envservers.entries(data).items():
        for agent in envservers.fronted_agents(params):
            fronting.setdefault(agent, []).append((name, impl, params))
    routes, problems = {}, []
    for agent in agents:
        servers = fronting.get(agent, [])
        if not servers:
            routes[agent] = AgentRoute(directory.url(agent))
            continue
        if len(servers) > 1:
            problems.append(f"agent {agent!r} is fronted by several environment servers "
                            f"{sorted(s[0] for s in servers)}: a row routed by its agent_ref cannot pick one. Keep "
                            "one environment server per agent in the deployment's config.")
            continue
        name, impl, params = servers[0]
        if not params.get("port"):
            problems.append(f"{name}.{envservers.ENVIRONMENT_SERVERS}.{impl}: no port in the served config, so agent "
                            f"{agent!r} cannot be reached through it. Is that head server's deployment started?")
            continue
        routes[agent] = AgentRoute(f"http://{local_host(params.get('host', '127.0.0.1'))}:{params['port']}",
                                   environment_server=name,
                                   environment_server_type=impl)
    if problems:
        raise ConfigError(problems)
    return routes


def server_instances(data: dict, pids: dict[str, int], start_time: float, extra: list[Server] = ()  # type: ignore[assignment]
                     ) -> list[ServerInstance]:
    """The head server's /server_instances list: every server of a served config with its bound address (the
    config's instances, each environment server entry at its agent's address and process, the local
    ``policy_endpoint``), then the ``extra`` servers started with them. ``pids``: instance name -> serving process
    (this process when absent); '__policy_endpoint__' for the local endpoint."""
    own = os.getpid()
    out: list[ServerInstance] = []

    def add(name: str, stype: str, impl: str, params: dict, pid: int, entrypoint: str | None) -> None:
        host, port = str(params.get("host", "127.0.0.1")), int(params["port"])
        out.append(ServerInstance(process_name=name, server_type=stype, name=impl, host=host, port=port,
                                  url=f"http://{local_host(host)}:{port}", pid=pid, start_time=start_time,
                                  entrypoint=entrypoint, config_path=name))

    def entrypoint(kind: str, impl: str) -> str:
        cls = get_server_class(kind, impl)
        return f"{cls.__module__}.{cls.__qualname__}"

    for name, section in data.items():
        if not isinstance(section, dict) or len(section) != 1:
            continue
        (stype, impls), = section.items()
        if stype not in SERVER_TYPES or not isinstance(impls, dict):
            continue
        for impl, params in impls.items():
            if isinstance(params, dict) and params.get("port"):
                add(name, stype, impl, params, pids.get(name, own), entrypoint(stype, impl))
    for name, (impl, params) in envservers.entries(data).items():
        agents = envservers.fronted_agents(params)
        if params.get("port") and agents:  # no process of its own: served by its agent
            agent_impls = envservers.agent_impls(data)
            add(name, envservers.ENVIRONMENT_SERVERS, impl, params, pids.get(agents[0], own),
                entrypoint("responses_api_agents", agent_impls[agents[0]]) if agents[0] in agent_impls else None)
    endpoint = data.get(POLICY_ENDPOINT)
    if isinstance(endpoint, dict) and endpoint.get("port"):
        add(POLICY_ENDPOINT, POLICY_ENDPOINT, str(endpoint.get("impl")), endpoint,
            pids.get("__policy_endpoint__", own), entrypoint(POLICY_ENDPOINT, str(endpoint.get("impl"))))
    for server in extra:
        if server.name != POLICY_ENDPOINT:
            cls = type(server)
            out.append(ServerInstance(process_name=server.name, server_type=server.server_type or POLICY_ENDPOINT,
                                      name=cls.__name__, host=server.host, port=server.port, url=server.url, pid=own,
                                      start_time=start_time, entrypoint=f"{cls.__module__}.{cls.__qualname__}"))
    return out


async def start_only(cfg: GymConfig, name: str, pids: dict[str, int] | None = None) -> RunningServers:
    """Start one server of a process-per-server launch (every port fixed in the config), or the head server
    alone when ``name`` is '__head__' (``pids``: instance name -> the child process serving it, for its
    /server_instances). The directory is filled from the configured ports."""
    check_network_exposure(cfg, only=name)
    directory, _ = directory_from_config(cfg.data)
    running = RunningServers(config=cfg, directory=directory)
    if name == "__head__":
        data = copy.deepcopy(cfg.data)
        envservers.place(data, cfg.environment_servers)  # every port is fixed in a process-per-server launch
        head = HeadServer(data, host=cfg.head_host, port=cfg.head_port,
                          instances=server_instances(data, pids or {}, time.time()))
        await head.start(**bind_options(cfg.data))
        running.servers.append(head)
        running.head = head
        return running
    if name == "__policy_endpoint__":
        endpoint = build_local_endpoint(cfg.data["policy_endpoint"])
        await endpoint.start(**extra_options(cfg.data, endpoint.host))
        running.servers.append(endpoint)
        return running
    if name not in cfg.servers:
        raise ConfigError(f"--only {name!r}: no such server. Configured: {sorted(cfg.servers)}")
    server = build_server(cfg.servers[name], directory)
    await server.start(**bind_options(cfg.data))
    running.servers.append(server)
    return running


def policy_base_urls(cfg: GymConfig) -> list[tuple[str, str]]:
    """(server instance, base_url) for every OpenAI-compatible endpoint the policy model servers call."""
    out = []
    for name, spec in cfg.servers.items():
        if spec.server_type != "responses_api_models":
            continue
        for url in url_list(spec.params.get("base_url")):
            out.append((name, str(url)))
    return out


def _check_model_served(cfg: GymConfig, name: str, url: str, models: Any) -> None:
    """ConfigError when ``GET /models`` lists models and the one the policy server sends is not among them (every
    request would fail with a 404 otherwise). Silent when the reply lists nothing we can read."""
    wanted = cfg.servers[name].params.get("model")
    data = models.get("data") if isinstance(models, dict) else None
    if wanted is None or not isinstance(data, list):
        return
    served = [m.get("id") for m in data if isinstance(m, dict) and m.get("id")]
    roots = [m.get("root") for m in data if isinstance(m, dict) and m.get("root")]
    if served and wanted not in served and wanted not in roots:
        raise ConfigError(
            f"policy endpoint {url} serves {served} but the config asks for model {wanted!r} (server {name!r}: "
            f"model_name / policy_model_name).{did_you_mean(str(wanted), served)} Set the model name to one of "
            f"{served}, or start the endpoint with that name (vLLM: --served-model-name {wanted})."
        )


async def check_policy_endpoints(cfg: GymConfig, timeout_s: float = 10.0) -> None:
    """Fail fast when a policy endpoint cannot be reached: ``GET {base_url}/models`` on each one (any HTTP
    answer, even 404, proves something listens). Raises EndpointUnreachableError / EndpointTimeoutError naming
    the URL and the config key, instead of every rollout failing later with the same connection error."""
    transport = Transport(timeout_s=timeout_s)
    try:
        for name, url in policy_base_urls(cfg):
            try:
                reply = await transport.get(f"{url}/models")
                _check_model_served(cfg, name, url, reply.data)
            except EndpointUnreachableError as e:
                raise EndpointUnreachableError(
                    f"policy endpoint {url} (server {name!r}, from policy_base_url) is unreachable "
                    f"({getattr(e.__cause__, 'os_error', None) or e.__cause__ or e}). Start "
                    "your OpenAI-compatible server (e.g. vLLM) there first, or fix base_urls / policy_base_url.",
                    url=url,
                ) from e
            except EndpointTimeoutError as e:
                raise EndpointTimeoutError(
                    f"policy endpoint {url} (server {name!r}) did not answer GET /models within {timeout_s:g} s; "
                    "is it still loading the model? Wait for it, or fix base_urls / policy_base_url.",
                    url=url,
                ) from e
            except EndpointError:
                pass  # an HTTP status (404, 401, ...): something is listening; requests will say more
    finally:
        await transport.close()
