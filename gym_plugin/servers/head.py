"""Head server: serves the merged configuration so collectors and servers in other processes find each other,
and the list of the servers it fronts.

``GET /global_config_dict_yaml`` answers, as NeMo Gym's head server does, a JSON-encoded string whose content
is ``OmegaConf.to_yaml(config)``; a client reads it with ``OmegaConf.create(json.loads(body))``. Every server
instance in it carries its ``host`` and ``port``.

``GET /server_instances`` answers what NeMo Gym 0.7.0's head server answers there (``ng_status`` / ``gym env
status`` read it): a list with one `ServerInstance` per running server, in its ``ServerInstanceDisplayConfig``
shape (``model_dump(mode="json")``: every field present, unknown ones null). ``status`` is filled here at request
time from each server's ``GET /health`` (2 s timeout, concurrently), with NeMo Gym's status words; NeMo Gym's own
head leaves it null and ``ng_status`` probes each ``url`` itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from gym_plugin.errors import EndpointTimeoutError, EndpointUnreachableError
from gym_plugin.http import HTTPStatusError, Transport
from gym_plugin.servers.base import RequestContext, Server

HEAD_SERVER_KEY = "head_server"
HEALTH_TIMEOUT_S = 2.0
"""How long /server_instances waits for one server's /health (ng_status waits 2 s too)."""


@dataclass(frozen=True)
class ServerInstance:
    """One running server as NeMo Gym 0.7.0 lists it (``nemo_gym.server_utils.ServerInstanceDisplayConfig``:
    same field names, all optional there)."""

    process_name: str
    """The config's instance name (top-level key), e.g. 'math_agent'."""
    server_type: str
    """'responses_api_agents' | 'resources_servers' | 'responses_api_models' | 'environment_servers' |
    'policy_endpoint'."""
    name: str
    """The implementation name, e.g. 'simple_agent'."""
    host: str
    port: int
    url: str
    """``http://host:port`` a client on this machine reaches it at."""
    pid: int
    """The process serving it."""
    start_time: float
    """``time.time()`` when it started listening."""
    entrypoint: str | None = None
    """The serving class (``module.Class``)."""
    config_path: str | None = None
    """The config key of its section (NeMo Gym writes the instance name too)."""
    dir_path: str | None = None
    status: str | None = None
    """'success' | 'connection_error' | 'timeout' | 'unknown_error' (NeMo Gym's ServerStatus), set when served."""
    uptime_seconds: float | None = None


async def probe_health(url: str, transport: Transport) -> str:
    """NeMo Gym's status word for ``GET {url}/health``: 'success' on HTTP 200."""
    try:
        await transport.get(url.rstrip("/") + "/health", timeout_s=HEALTH_TIMEOUT_S)
        return "success"
    except EndpointUnreachableError:
        return "connection_error"
    except EndpointTimeoutError:
        return "timeout"
    except (HTTPStatusError, Exception):  # any other answer: up, but not healthy
        return "unknown_error"


class HeadServer(Server):
    """Serves ``global_config`` (a dict or DictConfig; interpolations resolved when served) and ``instances``."""

    server_type = ""

    def __init__(self, global_config: Mapping[str, Any] | DictConfig, host: str = "127.0.0.1", port: int = 0,
                 instances: Sequence[ServerInstance] = ()):
        super().__init__(HEAD_SERVER_KEY, host=host, port=port)
        self._yaml: str | None = None
        self.instances: list[ServerInstance] = list(instances)
        self.set_config(global_config)

    def set_config(self, global_config: Mapping[str, Any] | DictConfig) -> None:
        """Replace the served config (e.g. once the ports picked at start are known)."""
        self.global_config = global_config
        self._yaml = None

    @property
    def yaml(self) -> str:
        if self._yaml is None:
            cfg = self.global_config
            if not isinstance(cfg, DictConfig):
                cfg = OmegaConf.create(dict(cfg))
            self._yaml = OmegaConf.to_yaml(cfg, resolve=True)
        return self._yaml

    def routes(self):
        return [("GET", "/global_config_dict_yaml", self.global_config_dict_yaml),
                ("GET", "/server_instances", self.server_instances)]

    async def global_config_dict_yaml(self, body: Any, ctx: RequestContext) -> str:
        return self.yaml

    async def server_instances(self, body: Any, ctx: RequestContext) -> list[dict]:
        # Over real HTTP, never the in-process shortcut: the status says whether the socket answers.
        transport = Transport(timeout_s=HEALTH_TIMEOUT_S, allow_local=False)
        try:
            statuses = await asyncio.gather(*(probe_health(i.url, transport) for i in self.instances))
        finally:
            await transport.close()
        return [asdict(replace(i, status=s)) for i, s in zip(self.instances, statuses)]
