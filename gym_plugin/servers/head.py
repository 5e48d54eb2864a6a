"""Head server: serves the merged configuration so collectors and servers in other processes find each other.

``GET /global_config_dict_yaml`` answers, as NeMo Gym's head server does, a JSON-encoded string whose content
is ``OmegaConf.to_yaml(config)``; a client reads it with ``OmegaConf.create(json.loads(body))``. Every server
instance in it carries its ``host`` and ``port``.
"""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from gym_plugin.servers.base import RequestContext, Server

HEAD_SERVER_KEY = "head_server"


class HeadServer(Server):
    """Serves ``global_config`` (a dict or DictConfig; interpolations resolved when served)."""

    server_type = ""

    def __init__(self, global_config: Mapping[str, Any] | DictConfig, host: str = "127.0.0.1", port: int = 0):
        super().__init__(HEAD_SERVER_KEY, host=host, port=port)
        self._yaml: str | None = None
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
        return [("GET", "/global_config_dict_yaml", self.global_config_dict_yaml)]

    async def global_config_dict_yaml(self, body: Any, ctx: RequestContext) -> str:
        return self.yaml
