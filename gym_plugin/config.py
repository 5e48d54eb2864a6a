"""Configuration: load (Hydra/OmegaConf compose), validate (every problem at once), and the server directory."""

from __future__ import annotations

from gym_plugin.errors import ConfigError, did_you_mean


class Directory:
    """Server instance name -> base URL ('http://host:port') of the running server.

    Filled by whoever starts the servers (ports may be picked at start) or from the head server's config
    for servers in other processes. Servers resolve each other through it at request time.
    """

    def __init__(self, urls: dict[str, str] | None = None):
        self._urls: dict[str, str] = dict(urls or {})

    def set(self, name: str, url: str) -> None:
        self._urls[name] = url.rstrip("/")

    def url(self, name: str) -> str:
        try:
            return self._urls[name]
        except KeyError:
            raise ConfigError(
                f"server instance {name!r} is not configured (or not started). Known instances: "
                f"{sorted(self._urls)}.{did_you_mean(name, self._urls)} Fix the reference or add the server."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._urls)

    def __contains__(self, name: str) -> bool:
        return name in self._urls
