"""The seed's API: `GymIntegration` and `RolloutCollectionHelper` (see docs/seed: "Connect Gym to Your Training Loop").

`GymIntegration` starts the configured servers (agents, resource servers, the policy model server, a head
server) in this process, on an event loop of their own in a background thread, so it works the same from
async code (the seed's ``async for rollout in gym.collect_rollouts(batch)``) and from plain code
(``gym.collect(batch)``). The collector runs on that same loop, so collector, agents, verifiers and the policy
model server call each other directly; only the policy endpoint (vLLM) is reached over HTTP.

`RolloutCollectionHelper().run_examples(examples, head_server_config=...)` reads the config from a head server
(ours or NeMo Gym's) and returns awaitables that give results in completion order, as in the seed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Iterable, Iterator, Mapping, Sequence

from gym_plugin import schema
from gym_plugin.collect import CollectorConfig, RolloutCollector
from gym_plugin.config import HEAD_SERVER_KEY_NAME, ConfigSource, GymConfig, load_config
from gym_plugin.errors import ConfigError, GymPluginError
from gym_plugin.http import Transport, bearer_headers
from gym_plugin.net import local_host, url_list
from gym_plugin.launch import (
    RunningServers,
    agent_routes,
    check_policy_endpoints,
    fetch_head_config,
    start_servers,
)
from gym_plugin.protocol import ROLLOUT_INDEX_KEY, TASK_INDEX_KEY, describe_failure, is_failure
from gym_plugin.servers.base import Server

__all__ = ["GymIntegration", "RolloutCollectionHelper", "BaseServerConfig", "HEAD_SERVER_KEY_NAME"]

_END = object()


@dataclass
class BaseServerConfig:
    """Where a server listens (the seed's ``BaseServerConfig(host=..., port=...)``)."""

    host: str = "127.0.0.1"
    """Host name or address."""
    port: int = 11000
    """TCP port."""

    @property
    def url(self) -> str:
        return f"http://{local_host(self.host)}:{self.port}"


def _collector_config(data: Mapping[str, Any], override: CollectorConfig | None) -> CollectorConfig:
    if override is not None:
        return override
    cfg = schema.build(CollectorConfig, dict(data.get("collector") or {}), "collector")
    if data.get("global_aiohttp_connector_limit") is not None:
        cfg.connector_limit = int(data["global_aiohttp_connector_limit"])
    if data.get("global_aiohttp_connector_limit_per_host") is not None:
        cfg.connector_limit_per_host = int(data["global_aiohttp_connector_limit_per_host"])
    if data.get("auth_token") and cfg.auth_token is None:
        cfg.auth_token = str(data["auth_token"])
    return cfg


class GymIntegration:
    """Start Gym servers from a config and collect rollouts from them.

    model_name / base_urls: the policy endpoint(s) (OpenAI-compatible, e.g. vLLM), written into the config as
    ``policy_model_name`` / ``policy_base_url``; base_urls=None uses the ``base_url`` of the extra_servers
    (started first, so an embedded policy on port 0 works). config_path: YAML file(s) (or the same content as
    mappings, merged in order) with the agents, resource servers and settings (``${oc.env:VAR}`` and the seed's ``${VAR}`` read environment variables). overrides: dotlist
    overrides (``math_agent.responses_api_agents.simple_agent.max_turns=4``). extra_servers: servers to start
    first on the same loop (e.g. an embedded policy, so the policy model server calls it directly).
    check_endpoints: probe every policy endpoint once at start (``GET /models``) and raise
    EndpointUnreachableError naming the URL if one is down (or ConfigError if it does not serve ``model_name``),
    instead of every rollout failing later. progress_every_s: while ``collect_rollouts`` waits, print a line to
    stderr this often (rollouts done, in flight, elapsed) so a slow policy is not mistaken for a hang; every
    failure record is printed there too (row, kind, reason) as it arrives. 0 turns both off.
    """

    def __init__(
        self,
        model_name: str,
        base_urls: Sequence[str] | str | None,
        config_path: ConfigSource | Sequence[ConfigSource] | None = None,
        head_server_host: str = "127.0.0.1",
        head_server_port: int = 8080,
        *,
        policy_api_key: str = "dummy_key",
        overrides: Sequence[str] = (),
        collector_config: CollectorConfig | None = None,
        extra_servers: Sequence[Server] = (),
        check_endpoints: bool = True,
        progress_every_s: float = 15.0,
    ):
        self.model_name = model_name
        self.progress_every_s = progress_every_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gym_plugin-servers", daemon=True)
        self._thread.start()
        self._closed = False
        extras, started = list(extra_servers), []
        try:
            if base_urls is None:
                # The policy is one of extra_servers (e.g. an embedded policy on port 0): start it first, then
                # its bound URL is the policy_base_url.
                for server in extras:
                    self._call(server.start())
                    started.append(server)
                base_urls = [s.base_url for s in extras if getattr(s, "base_url", None)]
                if not base_urls:
                    raise ConfigError(
                        "base_urls=None needs an OpenAI-compatible endpoint among extra_servers (an object with "
                        f".base_url, e.g. EmbeddedPolicyServer); got {[type(s).__name__ for s in extras]}. Pass "
                        "base_urls=['http://host:port/v1'] instead."
                    )
            self.base_urls = url_list(base_urls)
            initial = {
                "policy_model_name": model_name,
                "policy_base_url": self.base_urls,
                "policy_api_key": policy_api_key,
                HEAD_SERVER_KEY_NAME: {"host": head_server_host, "port": head_server_port},
            }
            self.config: GymConfig = load_config(config_path, overrides, initial)
            self.collector_config = _collector_config(self.config.data, collector_config)
            self.servers: RunningServers = self._call(
                start_servers(self.config, extra=[s for s in extras if s not in started])
            )
            self.servers.servers[0:0] = started  # stopped last, like every extra server
            started = []
            if check_endpoints:
                self._call(check_policy_endpoints(self.servers.config))
            self._collector = self._call(self._make_collector())
        except BaseException:
            for server in started:
                self._call(server.stop())
            if getattr(self, "servers", None) is not None:
                self._call(self.servers.stop())
            self._stop_loop()
            raise
        self.head_server_config = BaseServerConfig(
            host=self.servers.config.head_host, port=self.servers.config.head_port
        )

    async def _make_collector(self) -> RolloutCollector:
        return RolloutCollector(self.servers.agent_urls(), self.collector_config)

    def _call(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def run_on_servers_loop(self, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` on the servers' event loop and return its result (blocking): code there calls the
        servers directly, without HTTP (e.g. a batch of /verify calls)."""
        if self._closed:
            raise GymPluginError("GymIntegration is shut down; create a new one.")
        return self._call(coro)

    @property
    def closed(self) -> bool:
        """True after shutdown()."""
        return self._closed

    @property
    def agents(self) -> list[str]:
        return self.config.agents

    @property
    def last_stats(self):
        """CollectionStats of the last collection (counts of rollouts and failures by kind)."""
        return self._collector.last_stats

    async def collect_rollouts(self, examples: Iterable[Mapping[str, Any]], repeats: int = 1) -> AsyncIterator[dict]:
        """Yield one record per (example, repeat) as they finish: a rollout, or a failure record."""
        if self._closed:
            raise GymPluginError("GymIntegration is shut down; create a new one to collect again.")
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        examples = list(examples)

        async def pump() -> None:
            try:
                async for record in self._collector.collect(examples, repeats=repeats):
                    caller.call_soon_threadsafe(queue.put_nowait, record)
            except BaseException as e:  # reaches the caller instead of hanging it
                caller.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                caller.call_soon_threadsafe(queue.put_nowait, _END)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        total, done, started = len(examples) * repeats, 0, time.monotonic()
        try:
            while True:
                if self.progress_every_s > 0:
                    try:
                        item = await asyncio.wait_for(queue.get(), self.progress_every_s)
                    except asyncio.TimeoutError:
                        _notice(f"{done}/{total} rollouts done, {total - done} in flight "
                                f"({time.monotonic() - started:.0f} s elapsed)")
                        continue
                else:
                    item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                done += 1
                if self.progress_every_s > 0 and is_failure(item):
                    _notice(describe_failure(item))
                yield item
        finally:
            if not future.done():
                future.cancel()

    def collect(
        self, examples: Iterable[Mapping[str, Any]], repeats: int = 1, progress: bool = False
    ) -> list[dict]:
        """Blocking collection for plain code: every record, sorted by (row index, repeat index)."""

        async def run() -> list[dict]:
            bar = None
            rows = list(examples)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(rows) * repeats, desc="rollouts", unit="rollout", leave=False)
            out = []
            try:
                async for record in self._collector.collect(rows, repeats=repeats):
                    out.append(record)
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            return out

        if self._closed:
            raise GymPluginError("GymIntegration is shut down; create a new one to collect again.")
        records = self._call(run())
        records.sort(key=lambda r: (r[TASK_INDEX_KEY], r[ROLLOUT_INDEX_KEY]))
        return records

    def shutdown(self) -> None:
        """Stop the servers and the background loop. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._collector.close())
            self._call(self.servers.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> "GymIntegration":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    async def __aenter__(self) -> "GymIntegration":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.shutdown()


class RolloutCollectionHelper:
    """The seed's collection helper: ``run_examples`` returns awaitables giving results in completion order."""

    def __init__(self, collector_config: CollectorConfig | None = None):
        self.collector_config = collector_config
        self._tasks: set[asyncio.Task] = set()

    def run_examples(
        self,
        examples: Iterable[Mapping[str, Any]],
        head_server_config: BaseServerConfig | Mapping[str, Any] | str | None = None,
        repeats: int = 1,
    ) -> Iterator[Awaitable[dict]]:
        """Dispatch every example to its agent (agents found through the head server's config) and return
        ``len(examples) * repeats`` awaitables; awaiting the k-th gives the k-th record to finish."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise GymPluginError(
                "RolloutCollectionHelper.run_examples must be called from async code (inside asyncio.run); "
                "from plain code use GymIntegration.collect(examples)."
            ) from None
        head_url = _head_url(head_server_config)
        rows = list(examples)
        total = len(rows) * repeats
        queue: asyncio.Queue = asyncio.Queue()
        delivered = {"n": 0}

        async def drive() -> None:
            token = self.collector_config.auth_token if self.collector_config is not None else None
            transport = Transport(timeout_s=60.0, headers=bearer_headers(token))
            try:
                data = await fetch_head_config(head_url, transport)
                config = _collector_config(data, self.collector_config)
                # through each agent's environment server where the deployment has one (NeMo Gym 0.7.0 does)
                collector = RolloutCollector(agent_routes(data), config)
                async with collector:
                    async for record in collector.collect(rows, repeats=repeats):
                        delivered["n"] += 1
                        queue.put_nowait(record)
            except BaseException as e:
                for _ in range(total - delivered["n"]):
                    queue.put_nowait(e)
                if not isinstance(e, Exception):
                    raise
            finally:
                await transport.close()

        task = loop.create_task(drive())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        async def next_record() -> dict:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            return item

        return (next_record() for _ in range(total))


def _notice(message: str) -> None:
    print(f"[gym_plugin] {message}", file=sys.stderr, flush=True)


def _head_url(head: BaseServerConfig | Mapping[str, Any] | str | None) -> str:
    if head is None:
        return BaseServerConfig().url
    if isinstance(head, str):
        return head.rstrip("/")
    if isinstance(head, Mapping):
        return BaseServerConfig(host=head.get("host", "127.0.0.1"), port=int(head.get("port", 11000))).url
    return BaseServerConfig(host=head.host, port=head.port).url
