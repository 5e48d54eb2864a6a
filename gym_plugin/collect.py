"""The async rollout collector: example rows in, one record per row out, as rows finish.

`RolloutCollector.collect(rows)` sends each row to its agent's ``/run`` and yields the agent's reply as soon as
it arrives, tagged with the row's index (``_ng_task_index``) so order can be restored. Where the deployment puts an
environment server in front of an agent (NeMo Gym 0.7.0 does for every agent; see `gym_plugin.envservers`), the
row goes through it, as NeMo Gym's own collector sends it, and the record is stamped with
``_ng_environment_server`` / ``_ng_result_type`` as 0.7.0 stamps its records. Guarantees:

- every row ends as exactly one record: the agent's reply, or a failure record (``gym_plugin.protocol``) with
  the kind, reason, attempts and last error; nothing is dropped;
- bounded work in flight: at most ``concurrency`` rows are being processed at once, whatever the input size;
  rows are pulled lazily from the input iterable, so a 20,000-row file never becomes 20,000 tasks;
- one aiohttp session (``gym_plugin.http.Transport``), per-request timeout, bounded retries with backoff on
  connection errors, timeouts, 429 and 5xx;
- an error in the collector itself (not in a row) reaches the caller instead of hanging it;
- a watchdog logs a warning when no row has finished for ``stall_warning_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Mapping

from gym_plugin import schema
from gym_plugin.errors import (
    ConfigError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    GymPluginError,
    MalformedResponseError,
    ProtocolError,
    UnknownAgentError,
    truncate,
)
from gym_plugin.http import HTTPStatusError, RetryPolicy, Transport, bearer_headers, post_with_retries
from gym_plugin.protocol import (
    AGENT_REF_KEY,
    ENVIRONMENT_SERVER_KEY,
    RESULT_TYPE_KEY,
    ROLLOUT_INDEX_KEY,
    TASK_INDEX_KEY,
    agent_name,
    failure_record,
    is_failure,
    is_reward,
)
from gym_plugin.rows import unknown_agent_message, validate_example

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentRoute:
    """Where the collector posts an agent's rows."""

    url: str
    """Base URL that ``/run`` is posted to: the environment server's when there is one, else the agent's."""
    environment_server: str | None = None
    """Instance name of the environment server in front of the agent (None: posted to the agent directly)."""
    environment_server_type: str | None = None
    """Its implementation (e.g. 'legacy_agent'), stamped on records as ``_ng_result_type``."""


@dataclass
class CollectorConfig:
    """How the collector talks to agents."""

    concurrency: int = 256
    """Rows in flight at once (bounded whatever the input size)."""
    timeout_s: float = 600.0
    """Total timeout of one /run request (a whole multi-turn rollout), seconds."""
    max_attempts: int = 3
    """Attempts per row on connection errors, timeouts, 429 and 5xx (>= 1)."""
    backoff_s: float = 0.5
    """Delay before the second attempt; doubles per attempt (with jitter)."""
    connector_limit: int = 65536
    """aiohttp total connection limit (the seed's global_aiohttp_connector_limit)."""
    connector_limit_per_host: int = 16384
    """aiohttp per-host connection limit (the seed's global_aiohttp_connector_limit_per_host)."""
    invalid_rows: str = "raise"
    """'raise': a malformed row raises ProtocolError; 'record': it becomes a failure record of kind invalid_row."""
    stall_warning_s: float = 300.0
    """Log a warning when no row finished for this long while rows are in flight (0 = off)."""
    auth_token: str | None = None
    """Bearer token sent to the agents (servers started with auth_token require it)."""

    def check(self) -> list[str]:
        """Problems with the values (gym_plugin.schema; the collector refuses to start with any)."""
        problems = []
        if self.concurrency < 1:
            problems.append(f"concurrency={self.concurrency}: must be >= 1 (e.g. 256)")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.max_attempts < 1:
            problems.append(f"max_attempts={self.max_attempts}: must be >= 1")
        if self.invalid_rows not in ("raise", "record"):
            problems.append(f"invalid_rows={self.invalid_rows!r}: must be 'raise' or 'record'")
        return problems


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, EndpointTimeoutError):
        return "timeout"
    if isinstance(exc, EndpointUnreachableError):
        return "connection"
    if isinstance(exc, HTTPStatusError):
        # The agent marks a failed /verify (servers/agent.py VERIFIER_ERROR_PREFIX, error type verifier_error);
        # nothing looser, or an agent named e.g. 'verifier_agent' would file every HTTP error as a verifier one.
        return "verifier" if "VerifierError:" in exc.body or '"verifier_error"' in exc.body else "http_status"
    if isinstance(exc, MalformedResponseError):
        return "malformed_response"
    return "agent"


@dataclass
class CollectionStats:
    """Counters of one collect() call."""

    rows: int = 0
    """Rows taken from the input."""
    succeeded: int = 0
    """Records that are rollouts (the agent replied with a response and a reward)."""
    failed: int = 0
    """Failure records."""
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    """Failure records per kind."""
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.started_at
        rate = self.done / elapsed if elapsed > 0 else 0.0
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.failures_by_kind.items())) or "none"
        return (
            f"{self.done}/{self.rows} rows: {self.succeeded} rollouts, {self.failed} failures ({kinds}) "
            f"in {elapsed:.1f}s ({rate:.1f} rollouts/s)"
        )


class RolloutCollector:
    """Sends example rows to agent servers and yields one record per row as rows finish.

    ``agent_urls`` maps agent instance names (the rows' ``agent_ref``) to base URLs, or to `AgentRoute`s (from
    `gym_plugin.launch.agent_routes`) for deployments with environment servers. Use as an async context manager,
    or call ``close()``.
    """

    def __init__(
        self,
        agent_urls: Mapping[str, str | AgentRoute],
        config: CollectorConfig | None = None,
        transport: Transport | None = None,
    ):
        self.config = config or CollectorConfig()
        schema.require(self.config, "collector")
        self.routes = {k: AgentRoute(v.rstrip("/")) if isinstance(v, str) else AgentRoute(
            v.url.rstrip("/"), v.environment_server, v.environment_server_type) for k, v in agent_urls.items()}
        self.agent_urls = {k: r.url for k, r in self.routes.items()}
        """Agent -> the base URL its rows are posted to (an environment server's where one fronts the agent)."""
        headers = bearer_headers(self.config.auth_token)
        if transport is not None and headers and "Authorization" not in transport.headers:
            if transport._session is not None:  # noqa: SLF001 (headers are fixed when the session is made)
                raise ConfigError(
                    "collector.auth_token is set but the Transport passed to RolloutCollector already has a "
                    "session without an Authorization header; pass Transport(headers={'Authorization': "
                    "'Bearer <token>'}) or let the collector build its transport."
                )
            transport.headers = {**transport.headers, **headers}
        self.transport = transport or Transport(
            limit=self.config.connector_limit,
            limit_per_host=self.config.connector_limit_per_host,
            timeout_s=self.config.timeout_s,
            headers=headers,
        )
        self.retry = RetryPolicy(max_attempts=self.config.max_attempts, backoff_s=self.config.backoff_s)
        self.last_stats: CollectionStats | None = None

    async def __aenter__(self) -> "RolloutCollector":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    # ---- routing -----------------------------------------------------------------------------------------
    def agent_url(self, name: str) -> str:
        return self.route(name).url

    def route(self, name: str) -> AgentRoute:
        try:
            return self.routes[name]
        except KeyError:
            raise UnknownAgentError(unknown_agent_message(name, self.agent_urls)) from None

    def check_rows(self, rows: Iterable[Any]) -> None:
        """Validate every row up front (shape and agent_ref): fail before any compute is spent."""
        for i, row in enumerate(rows):
            validate_example(row, i)
            self.agent_url(agent_name(row))

    # ---- one row -----------------------------------------------------------------------------------------
    async def run_row(self, row: Mapping[str, Any], index: int, rollout_index: int = 0) -> dict:
        """One row -> one record (never raises for the row's own failures)."""
        try:
            validate_example(row, index)
            name = agent_name(row)
            route = self.route(name)
            url = route.url + "/run"
        except (ProtocolError, UnknownAgentError) as e:
            if self.config.invalid_rows == "raise":
                raise
            return failure_record(row, kind="invalid_row", reason=str(e), task_index=index,
                                  rollout_index=rollout_index)
        body = dict(row)
        body["agent_ref"] = {"name": name}
        body[TASK_INDEX_KEY] = index
        body[ROLLOUT_INDEX_KEY] = rollout_index
        try:
            reply, attempts = await post_with_retries(self.transport, url, body, self.retry)
        except GymPluginError as e:
            return _stamped(failure_record(
                row,
                kind=_failure_kind(e),
                reason=f"POST {url} failed: {type(e).__name__}",
                attempts=getattr(e, "attempts", 1),
                last_error=truncate(str(e), 1000),
                url=url,
                task_index=index,
                rollout_index=rollout_index,
            ), name, route)
        data = reply.data
        if not isinstance(data, dict) or not isinstance(data.get("response"), dict) or not is_reward(data.get("reward")):
            return _stamped(failure_record(
                row,
                kind="malformed_response",
                reason=f"POST {url} replied without a 'response' object and a numeric 'reward'",
                attempts=attempts,
                last_error=truncate(data, 500),
                url=url,
                task_index=index,
                rollout_index=rollout_index,
            ), name, route)
        data[TASK_INDEX_KEY] = index
        data[ROLLOUT_INDEX_KEY] = rollout_index
        return _stamped(data, name, route)

    # ---- many rows -------------------------------------------------------------------------------------
    async def collect(
        self,
        rows: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        *,
        repeats: int = 1,
        start_index: int = 0,
        skip: Callable[[int, int], bool] | None = None,
    ) -> AsyncIterator[dict]:
        """Yield one record per (row, repeat) as they finish.

        rows: an iterable or async iterable of example rows (pulled lazily; a list is validated up front).
        repeats: rollouts per row (GRPO group size); records carry ``_ng_rollout_index`` 0..repeats-1.
        start_index: ``_ng_task_index`` of the first row.
        skip: ``skip(task_index, rollout_index) -> True`` to leave a unit out (used by --resume).
        """
        if repeats < 1:
            raise ValueError(f"repeats={repeats}: must be >= 1")
        if isinstance(rows, (list, tuple)) and self.config.invalid_rows == "raise":
            self.check_rows(rows)
        stats = CollectionStats()
        self.last_stats = stats
        # Bounded: a slow consumer stops the workers instead of letting finished records pile up.
        out: asyncio.Queue = asyncio.Queue(maxsize=self.config.concurrency)
        units = _units(rows, repeats, start_index, skip, stats)
        n_workers = self.config.concurrency
        state = {"alive": n_workers, "last_progress": time.monotonic()}
        _END = object()

        lock = asyncio.Lock()  # async generators cannot be advanced by two workers at once

        async def worker() -> None:
            cancelled = False
            try:
                while True:
                    async with lock:
                        try:
                            index, rollout_index, row = await units.__anext__()
                        except StopAsyncIteration:
                            return
                    record = await self.run_row(row, index, rollout_index)
                    await out.put(record)
            except asyncio.CancelledError:
                # The caller stopped reading (break, error, cancelled trainer): nobody drains `out`, so
                # awaiting a put here would hang the cleanup below.
                cancelled = True
                raise
            except BaseException as e:  # a collector bug or a raise-mode row error: reaches the caller
                await out.put(e)
                raise
            finally:
                state["alive"] -= 1
                if state["alive"] == 0 and not cancelled:
                    await out.put(_END)

        tasks = [asyncio.ensure_future(worker()) for _ in range(n_workers)]
        try:
            while True:
                try:
                    item = await asyncio.wait_for(out.get(), self.config.stall_warning_s or None)
                except asyncio.TimeoutError:
                    logger.warning(
                        "collector: no row finished for %.0fs (%d of %d rows done); check the agent and policy "
                        "servers", self.config.stall_warning_s, stats.done, stats.rows,
                    )
                    continue
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if is_failure(item):
                    stats.failed += 1
                    kind = item["failure"]["kind"]
                    stats.failures_by_kind[kind] = stats.failures_by_kind.get(kind, 0) + 1
                else:
                    stats.succeeded += 1
                yield item
        finally:
            for t in tasks:
                t.cancel()
            gathering = asyncio.gather(*tasks, return_exceptions=True)
            while not gathering.done():  # drain, so that no worker can stay blocked on a full queue
                while not out.empty():
                    out.get_nowait()
                await asyncio.wait([gathering], timeout=0.05)


def _stamped(record: dict, agent: str, route: AgentRoute) -> dict:
    """The keys NeMo Gym 0.7.0's collector writes on every record: ``agent_ref``, and the environment server the
    row went through with its implementation (only when it went through one)."""
    record[AGENT_REF_KEY] = {"name": agent}
    if route.environment_server is not None:
        record[ENVIRONMENT_SERVER_KEY] = route.environment_server
        record[RESULT_TYPE_KEY] = route.environment_server_type
    return record


async def _units(rows, repeats: int, start_index: int, skip, stats: CollectionStats):
    """(task_index, rollout_index, row) for every unit of work, pulled lazily."""
    index = start_index
    if isinstance(rows, AsyncIterable):
        async for row in rows:
            for r in range(repeats):
                if skip is None or not skip(index, r):
                    stats.rows += 1
                    yield index, r, row
            index += 1
    else:
        for row in rows:
            for r in range(repeats):
                if skip is None or not skip(index, r):
                    stats.rows += 1
                    yield index, r, row
            index += 1
