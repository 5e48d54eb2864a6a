"""A drop-in for NeMo-RL's ``NemoGym`` actor: NeMo-RL's Gym path runs gym_plugin's Gym servers.

How NeMo-RL (snapshot 7ea279a) drives NeMo Gym, and what this class answers:

- ``spinup_nemo_gym_actor`` (``nemo_rl/environments/nemo_gym.py``, called from GRPO/PPO/distillation setup while
  vLLM is still loading) builds ``NemoGym.options(...).remote(NemoGymConfig)``, then ``ray.get(_spinup())`` and
  ``ray.get(set_tokenizer(tokenizer))``. `use_in_nemo_rl` rebinds that ``NemoGym`` name to `NemoGymActor` (and
  registers the system Python for it), so NeMo-RL's own code builds this class instead; docs/nemo_rl.md.
- ``run_async_nemo_gym_rollout`` / ``run_nemo_gym_rollout_sync`` / the SingleController's ``_stream_rows`` call
  ``run_rollouts.options(num_returns="streaming").remote(rows, timer_prefix[, deduplicate_multimodal_data])``
  and read ``(row["_rowidx"], result, timing_metrics)`` per row, in completion order; ``timing_metrics`` is
  None except on the batch's last row. ``result = {"message_log", "input_message_log", "full_result"}``.
- ``health_check()`` (SingleController, bounded) raises when a server died; ``shutdown()`` at the end.

A result's message log alternates ``user`` (context: prompt, tool output, template scaffolding; never trained)
and ``assistant`` (one model call: ``token_ids``, ``generation_logprobs``, ``is_invalid_tool_call``,
``has_malformed_thinking``; ``content`` is '' as NeMo-RL's own) messages whose ``token_ids`` concatenate to
the last call's prompt + generation (the splice is `gym_plugin.protocol.splice_offsets`). ``full_result`` is
the Gym record, its trainable output items carrying ``prompt_str`` / ``generation_str`` instead of token ids,
and ``instance_config.mask_sample`` for a rollout the verifier flagged (where NeMo-RL reads the flag: it drops
the row from the loss, keeps its reward in the group baseline).

Failures follow NeMo-RL's contract: a rollout that failed is never yielded (NeMo-RL would need a reward and a
token sequence for it); after every good row of the batch has been yielded, ``run_rollouts`` raises NeMo-RL's
typed failure: ``GymTransportError`` (infrastructure: timeouts, connections, HTTP 5xx/408/429, policy endpoint
never up; the SingleController re-dispatches only the missing rows) or ``RolloutDataFailure`` (this row fails
the same way again: HTTP 4xx, verifier errors, no token ids, chat-template drift, NaN log-probs; retried then
skipped). Both take one string, so they cross Ray's actor boundary intact.

Nothing here imports ray or nemo_rl at module import; `NemoGymActor` is built on first access.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
import torch

from gym_plugin import schema
from gym_plugin.errors import (
    ConfigError,
    EndpointError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    GymPluginError,
    MissingTokenIdsError,
    ProtocolError,
    truncate,
)
from gym_plugin.nemo_rl.actors import ray_actor_class
from gym_plugin.net import url_problems
from gym_plugin.protocol import (
    DRIFT,
    MASK_SAMPLE_KEY,
    ROLLOUT_INDEX_KEY,
    TASK_INDEX_KEY,
    agent_name,
    first_difference,
    is_failure,
    parse_rollout,
    splice_offsets,
    strip_token_fields,
)

__all__ = [
    "NEMO_GYM_FQN",
    "DropInOptions",
    "NemoGymDropIn",
    "nemo_rl_result",
    "turn_flags",
    "use_in_nemo_rl",
]

NEMO_GYM_FQN = "nemo_rl.environments.nemo_gym.NemoGym"
"""The actor NeMo-RL builds for its Gym path; `use_in_nemo_rl` points this name at `NemoGymActor`."""

DEFAULT_INVALID_TOOL_CALL_PATTERNS = ("<tool_call>", "</tool_call>", "<function_call>", "</function_call>")
"""Text in a final answer that means a tool call the agent never executed (NeMo-RL's defaults)."""
DEFAULT_THINKING_TAGS = ("<think>", "</think>")
"""Tags that must not appear in an answer, nor twice in a reasoning summary (NeMo-RL's defaults)."""

NEMO_RL_KEYS = frozenset({
    "num_gpu_nodes", "uv_cache_dir", "uv_venv_dir", "effort_levels", "pad_dynamic_image_shapes",
    "is_trajectory_collection", "invalid_tool_call_patterns", "thinking_tags", "tokenizer_config",
    "port_range_low", "port_range_high", "ray_head_node_address", "default_host",
})
"""Keys of ``env.nemo_gym`` that NeMo-RL or NeMo Gym's launcher reads: not part of the Gym servers' config."""
OPTIONS_KEY = "gym_plugin"
"""``env.nemo_gym.gym_plugin``: this class's own options (`DropInOptions`)."""

_INFRA_KINDS = frozenset({"timeout", "connection"})
_RETRIABLE_STATUSES = frozenset({408, 429})
_HTTP_STATUS = re.compile(r"answered HTTP (\d{3})")


@dataclasses.dataclass
class DropInOptions(schema.Checked):
    """``env.nemo_gym.gym_plugin``: options of the drop-in (everything else in ``env.nemo_gym`` is the Gym config)."""

    policy_wait_s: float = 600.0
    """How long the first ``run_rollouts`` waits for the policy's HTTP servers (vLLM starts them after this
    actor), probing ``GET {base_url}/models`` about once a second; then it raises ``GymTransportError``."""
    import_modules: list = dataclasses.field(default_factory=list)
    """Modules imported in the actor before the servers start, e.g. ones that add your own resource servers to
    ``gym_plugin.servers.registry`` (``@register``)."""

    def check(self) -> list[str]:
        if not isinstance(self.policy_wait_s, (int, float)) or self.policy_wait_s <= 0:
            return [f"policy_wait_s: {self.policy_wait_s!r} must be > 0 seconds"]
        return []


class RolloutInfraError(GymPluginError):
    """Stands for NeMo-RL's ``GymTransportError`` when nemo_rl is not importable (this class used on its own)."""


class RolloutDataError(GymPluginError):
    """Stands for NeMo-RL's ``RolloutDataFailure`` when nemo_rl is not importable."""


def failure_classes() -> tuple[type[Exception], type[Exception]]:
    """(infrastructure, data) failure classes: NeMo-RL's own, which its retry policy classifies by type."""
    try:
        from nemo_rl.experience.failures import GymTransportError, RolloutDataFailure
    except ImportError:
        return RolloutInfraError, RolloutDataError
    return GymTransportError, RolloutDataFailure


def is_infra_failure(failure: Mapping[str, Any]) -> bool:
    """Whether a collector failure (``record["failure"]``) is the fleet's fault rather than the row's: timeouts,
    broken connections, HTTP 5xx / 408 / 429 (NeMo-RL's ``http_status_is_infra``). Everything else (HTTP 4xx, a
    verifier that cannot judge the row, a malformed reply, an agent error) fails the same way on a retry."""
    kind = failure.get("kind")
    if kind in _INFRA_KINDS:
        return True
    if kind == "http_status":
        m = _HTTP_STATUS.search(str(failure.get("last_error") or ""))
        return m is not None and (int(m[1]) >= 500 or int(m[1]) in _RETRIABLE_STATUSES)
    return False


# ---- one Gym record -> one NeMo-RL result --------------------------------------------------------------------
def _tensor(values: Sequence, dtype: type) -> torch.Tensor:
    """A Python list -> a CPU tensor via np.fromiter (about 4x torch.tensor(list) on long id lists)."""
    return torch.from_numpy(np.fromiter(values, dtype=dtype, count=len(values)))


def _first_text(parts: Any) -> str | None:
    if isinstance(parts, list) and parts and isinstance(parts[0], Mapping) and isinstance(parts[0].get("text"), str):
        return parts[0]["text"]
    return None


def turn_flags(item: Mapping[str, Any], invalid_tool_call_patterns: Sequence[str] | None = None,
               thinking_tags: Sequence[str] | None = None) -> tuple[bool, bool]:
    """(is_invalid_tool_call, has_malformed_thinking) of a model call, from its last output item (the one with
    the token ids), as NeMo-RL flags its assistant messages: an answer text holding a tool-call pattern is a
    tool call nobody executed; a thinking tag in an answer, or a tag twice in a reasoning summary, is malformed
    thinking. A tool-call item has no text: (False, False)."""
    patterns = invalid_tool_call_patterns or DEFAULT_INVALID_TOOL_CALL_PATTERNS
    tags = thinking_tags or DEFAULT_THINKING_TAGS
    answer = _first_text(item.get("content"))
    if answer is not None:
        return any(p in answer for p in patterns), any(t in answer for t in tags)
    summary = _first_text(item.get("summary")) if item.get("type") == "reasoning" else None
    if summary is not None:
        return any(p in summary for p in patterns), any(summary.count(t) > 1 for t in tags)
    return False, False


def nemo_rl_result(record: dict, tokenizer: Any, *, invalid_tool_call_patterns: Sequence[str] | None = None,
                   thinking_tags: Sequence[str] | None = None, where: str = "rollout") -> dict:
    """A successful Gym record -> NeMo-RL's ``{"message_log", "input_message_log", "full_result"}`` (see the
    module docstring). ``record`` becomes ``full_result`` (changed in place). No re-tokenization: the tokenizer
    only decodes ``prompt_str`` / ``generation_str`` (NeMo-RL's reward penalties read the latter).

    Raises MissingTokenIdsError (no model call carries token ids, e.g. the first prompt exceeded
    max_model_len; or a call with ids lacks its prompt / log-probs) and ProtocolError (a later prompt does not
    extend the tokens before it: chat-template drift; NaN log-probs; no response.output). ``where`` names the
    rollout in those messages."""
    rollout = parse_rollout(record)
    if not rollout.output_is_list:
        raise ProtocolError(f"{where} has no response.output list: {truncate(record.get('response'), 200)}")
    # Model calls: the calls with a non-empty generation (an empty one has nothing to train, as in NeMo-RL).
    bad = [p for p in rollout.problems if p.has_generation]
    if bad:
        raise MissingTokenIdsError(f"{where}: {bad[0].message}")
    calls = [call for call in rollout.calls if call.generation]
    if not calls:
        types = rollout.output_types()
        raise MissingTokenIdsError(
            f"{where}: no model call carries token ids ({len(types)} output items of types {types}). The first "
            "prompt may exceed the policy's max_model_len (vLLM then generates nothing), or the endpoint does not "
            "return token ids.")
    offsets = splice_offsets(calls)
    log: list[dict] = []
    for k, (call, offset) in enumerate(zip(calls, offsets)):
        if offset == DRIFT:
            prev = calls[k - 1]
            raise ProtocolError(
                f"{where}: model call {k + 1}'s prompt does not start with call {k}'s prompt + generation (first "
                f"difference at token {first_difference(call.prompt, prev.prompt, prev.generation)} of "
                f"{len(prev.prompt) + len(prev.generation)}): the chat template rewrote the history (e.g. dropped "
                "reasoning). A NeMo-RL message log cannot hold this rollout; use a template that keeps the history.")
        logprobs = _tensor(call.logprobs, np.float32)  # [G_k]
        if bool(torch.isnan(logprobs).any()):  # a NaN poisons the whole batch's loss; NeMo-RL refuses it too
            raise ProtocolError(f"{where}: model call {k + 1} has NaN generation log-probs; check the policy "
                                "endpoint (dtype overflow, a broken logits processor)")
        invalid, malformed = turn_flags(call.item, invalid_tool_call_patterns, thinking_tags)
        log.append({"role": "user", "content": "", "token_ids": _tensor(call.prompt[offset:], np.int64)})  # [P_k]
        log.append({"role": "assistant", "content": "", "token_ids": _tensor(call.generation, np.int64),  # [G_k]
                    "generation_logprobs": logprobs, "is_invalid_tool_call": invalid,
                    "has_malformed_thinking": malformed})
    prompt_strs = tokenizer.batch_decode([c.prompt for c in calls])
    generation_strs = tokenizer.batch_decode([c.generation for c in calls])
    for call, prompt_str, generation_str in zip(calls, prompt_strs, generation_strs):
        strip_token_fields(call)  # the tensors above hold them; keep logged results small
        call.item["prompt_str"], call.item["generation_str"] = prompt_str, generation_str
    if rollout.masked:  # our verifiers' flag, where NeMo-RL reads it
        record["instance_config"] = {**(record.get("instance_config") or {}), MASK_SAMPLE_KEY: True}
    return {"message_log": log, "input_message_log": log[:1], "full_result": record}


# ---- config -----------------------------------------------------------------------------------------------------
def _options(raw: Any, problems: list[str]) -> DropInOptions:
    """``env.nemo_gym.gym_plugin`` as `DropInOptions` (gym_plugin.schema); its problems appended to ``problems``."""
    if raw is None:
        return DropInOptions()
    if isinstance(raw, Mapping) and isinstance(raw.get("import_modules"), str):
        raw = {**raw, "import_modules": [raw["import_modules"]]}  # one module written as a string
    return schema.build(DropInOptions, raw, f"env.nemo_gym.{OPTIONS_KEY}", problems, noun="option") or DropInOptions()


def _config_paths(raw: Any) -> list[str]:
    """``config_paths`` as absolute paths: relative to the working directory, else to gym_plugin's checkout
    (so ``conf/gym/math.yaml`` works from anywhere with an editable install)."""
    paths = [raw] if isinstance(raw, str) else list(raw or [])
    repo = Path(__file__).resolve().parents[2]  # gym_plugin/nemo_rl/gym.py -> the checkout
    out = []
    for p in paths:
        path = Path(str(p))
        if not path.is_absolute() and not path.exists() and (repo / path).exists():
            path = repo / path
        out.append(str(path))
    return out


def _check_nemo_gym_config(cfg: Mapping[str, Any]) -> list[str]:
    """Every problem of a NemoGymConfig this class cannot serve (dotted key, value, fix)."""
    problems = []
    if not isinstance(cfg.get("model_name"), str) or not cfg.get("model_name"):
        problems.append(f"NemoGymConfig.model_name: {cfg.get('model_name')!r} must be the served model name")
    urls = cfg.get("base_urls")
    if not isinstance(urls, (list, tuple)) or url_problems(urls, "NemoGymConfig.base_urls"):
        problems.append(f"NemoGymConfig.base_urls: {truncate(urls, 100)} must be a non-empty list of the policy's "
                        "OpenAI-compatible http(s) URLs (NeMo-RL passes dp_openai_server_base_urls)")
    if not isinstance(cfg.get("initial_global_config_dict") or {}, Mapping):
        problems.append("NemoGymConfig.initial_global_config_dict: must be the env.nemo_gym mapping")
    if cfg.get("require_routed_experts"):
        problems.append("policy.router_replay.enabled: true needs routed_experts on every output item (R3); "
                        "gym_plugin's policy server does not return them. Disable router replay.")
    if cfg.get("tokenizer_config") or cfg.get("pad_dynamic_image_shapes"):
        problems.append("multimodal NeMo Gym rollouts (policy.is_vlm / pad_dynamic_image_shapes) are not supported "
                        "by gym_plugin's drop-in; use NeMo-RL's own NemoGym for VLMs")
    return problems


# ---- the actor --------------------------------------------------------------------------------------------------
class NemoGymDropIn:
    """What NeMo-RL's Gym path calls on its ``NemoGym`` actor, over gym_plugin's servers (module docstring).

    cfg: NeMo-RL's ``NemoGymConfig`` as is: ``model_name``, ``base_urls`` (one per vLLM data-parallel rank),
    ``initial_global_config_dict`` (``env.nemo_gym``: the Gym config, i.e. ``config_paths`` to gym_plugin YAML
    files and/or server sections inline, plus NeMo-RL's own keys, ignored, and ``gym_plugin:`` options, see
    `DropInOptions`), optionally ``invalid_tool_call_patterns`` / ``thinking_tags``. Construction does nothing
    else (NeMo-RL schedules the actor cheaply, then calls ``_spinup``)."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.gym: Any = None
        self._tokenizer: Any = None
        self._options = DropInOptions()
        self._policy_ready = False
        self._shut_down = False
        self._policy_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def _spinup(self) -> None:
        """Start the Gym servers (agents, resource servers, policy model server, head) in this actor. The policy
        endpoints are not probed here: NeMo-RL spins this actor up while vLLM is still loading; the first
        ``run_rollouts`` waits for them (``gym_plugin.policy_wait_s``). Idempotent."""
        if self.gym is not None:
            return
        self._shut_down = False
        problems = _check_nemo_gym_config(self.cfg)
        gym_config = dict(self.cfg.get("initial_global_config_dict") or {})
        self._options = _options(gym_config.pop(OPTIONS_KEY, None), problems)
        if problems:
            raise ConfigError(problems)
        for module in self._options.import_modules:
            __import__(str(module))
        paths = _config_paths(gym_config.pop("config_paths", None))
        inline = {k: v for k, v in gym_config.items() if k not in NEMO_RL_KEYS}
        self.gym = await asyncio.to_thread(self._start_gym, paths, inline)

    def _start_gym(self, paths: list[str], inline: dict) -> Any:
        from gym_plugin.integration import GymIntegration  # heavy (aiohttp servers): not at module import

        sources = [*paths, *([inline] if inline else [])]
        if not sources:
            raise ConfigError("env.nemo_gym: no Gym config: name gym_plugin YAML files in config_paths (e.g. "
                              "[conf/gym/math.yaml]) or write the server sections inline")
        return GymIntegration(
            self.cfg["model_name"], list(self.cfg["base_urls"]), sources, head_server_port=0,
            check_endpoints=False,  # vLLM may still be loading: run_rollouts waits for it
        )

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Install the tokenizer ``run_rollouts`` decodes ``prompt_str`` / ``generation_str`` with (once, at
        spinup, as NeMo-RL does; never re-tokenizes anything)."""
        self._tokenizer = tokenizer

    def _require_spinup(self) -> None:
        if self.gym is None and self._shut_down:
            raise GymPluginError("gym_plugin's NemoGym drop-in was shut down (shutdown()); its _spinup servers are "
                                 "gone. Build a new actor.")
        if self.gym is None:
            raise GymPluginError(
                "gym_plugin's NemoGym drop-in has no running servers: _spinup() was never called on this actor "
                "(NeMo-RL's spinup_nemo_gym_actor calls it; a Ray-restarted actor comes back without it)."
            )

    async def health_check(self) -> None:
        """Raise NeMo-RL's ``GymTransportError`` naming every Gym server that does not answer ``GET /health``
        over HTTP within 10 s (a dead server would otherwise show up as rollout timeouts)."""
        self._require_spinup()
        from gym_plugin.http import Transport

        infra, _ = failure_classes()
        if self.gym.closed:
            raise infra("gym_plugin's Gym servers are shut down; spin the actor up again")
        transport = Transport(timeout_s=10.0, allow_local=False)
        dead = []
        try:
            for server in list(self.gym.servers.servers):
                try:
                    await transport.get(f"{server.url}/health")
                except EndpointError as e:
                    dead.append(f"{server.name} ({server.url}): {e}")
        finally:
            await transport.close()
        if dead:
            raise infra(f"{len(dead)} gym_plugin server(s) do not answer GET /health: {'; '.join(dead)}")

    async def shutdown(self) -> None:
        """Stop the Gym servers. Safe to call twice, and on an actor that was never spun up."""
        gym, self.gym = self.gym, None
        if gym is not None:
            self._shut_down = True
            await asyncio.to_thread(gym.shutdown)

    # ---- the policy endpoints -----------------------------------------------------------------------------------
    async def _wait_for_policy(self) -> None:
        """Return once every policy endpoint answers ``GET /models``; raise ``GymTransportError`` after
        ``policy_wait_s``. Concurrent callers share one wait; once up, never probed again."""
        if self._policy_ready:
            return
        loop = asyncio.get_running_loop()
        if self._policy_lock is None or self._policy_lock[0] is not loop:  # one Ray actor loop; tests: several
            self._policy_lock = (loop, asyncio.Lock())
        async with self._policy_lock[1]:
            if self._policy_ready:
                return
            from gym_plugin.launch import check_policy_endpoints

            wait_s = float(self._options.policy_wait_s)
            deadline = loop.time() + wait_s
            probes, last = 0, None
            while True:
                probes += 1
                remaining = deadline - loop.time()
                try:
                    await check_policy_endpoints(self.gym.servers.config, timeout_s=max(min(10.0, remaining), 0.5))
                    self._policy_ready = True
                    return
                except (EndpointUnreachableError, EndpointTimeoutError) as e:
                    last = e
                remaining = deadline - loop.time()
                if remaining <= 0:
                    infra, _ = failure_classes()
                    raise infra(
                        f"the policy's HTTP server(s) {list(self.cfg['base_urls'])} did not answer GET /models within "
                        f"{wait_s:g} s ({probes} probes; last: {last}). NeMo-RL starts them while this actor spins "
                        "up; if they are still loading, raise env.nemo_gym.gym_plugin.policy_wait_s, else check "
                        "policy.generation.vllm_cfg.expose_http_server and the URLs."
                    )
                await asyncio.sleep(min(1.0, remaining))

    # ---- rollouts -----------------------------------------------------------------------------------------------
    async def run_rollouts(self, nemo_gym_examples: list[dict], timer_prefix: str,
                           deduplicate_multimodal_data: bool = False
                           ) -> AsyncIterator[tuple[int, dict, dict | None]]:
        """Run each row (a Gym example with ``responses_create_params``, ``agent_ref`` and NeMo-RL's ``_rowidx``)
        through its agent and yield ``(row["_rowidx"], result, timing_metrics)`` as each rollout finishes.

        Calls overlap: this is an asyncio actor and every wait here is an await. ``timing_metrics`` (None until
        the batch's last row) holds ``{timer_prefix}/await_results``, ``/postprocess_results`` (seconds) and
        ``/postprocess_results_pct``. Failed rollouts are not yielded: once the stream of good rows is done, one
        typed failure (module docstring) names every failed row."""
        self._require_spinup()
        if not nemo_gym_examples:
            raise ProtocolError("NeMo-Gym rollout batch must not be empty (run_rollouts got no rows)")
        if self._tokenizer is None:
            raise GymPluginError("set_tokenizer(tokenizer) must be called before run_rollouts (NeMo-RL's "
                                 "spinup_nemo_gym_actor does it)")
        rows = list(nemo_gym_examples)
        bad = [i for i, r in enumerate(rows) if not isinstance(r, Mapping) or not isinstance(r.get("_rowidx"), int)]
        if bad:
            raise ProtocolError(f"run_rollouts: rows at positions {bad[:10]} have no integer '_rowidx' (NeMo-RL's "
                                "row index, set by _prepare_nemo_gym_rows); they cannot be streamed back")
        await self._wait_for_policy()
        infra, data = failure_classes()
        patterns, tags = self.cfg.get("invalid_tool_call_patterns"), self.cfg.get("thinking_tags")
        started = time.perf_counter()
        await_s = post_s = 0.0
        done = 0
        failed: list[tuple[int, bool, str]] = []  # (_rowidx, infrastructure?, what happened)
        stream = self.gym.collect_rollouts(rows).__aiter__()
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    record = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except GymPluginError as e:  # a row the collector refuses (shape, unknown agent_ref)
                    raise data(f"gym_plugin could not run the NeMo-Gym batch: {type(e).__name__}: {e}") from None
                t1 = time.perf_counter()
                await_s += t1 - t0
                row = rows[record[TASK_INDEX_KEY]]
                for key in (TASK_INDEX_KEY, ROLLOUT_INDEX_KEY):  # the row's own values, as NeMo Gym returns them
                    if key in row:
                        record[key] = row[key]
                    else:
                        record.pop(key, None)
                try:
                    agent = agent_name(row)
                except ProtocolError:  # collector.invalid_rows: record turns a bad row into a failure record
                    agent = truncate(row.get("agent_ref"), 60)
                if is_failure(record):
                    f = record["failure"]
                    failed.append((row["_rowidx"], is_infra_failure(f),
                                   f"_rowidx {row['_rowidx']} (agent {agent}): {f.get('kind')}: {f.get('reason')} "
                                   f"(attempts {f.get('attempts')}; last error: {truncate(f.get('last_error'), 300)})"))
                    continue
                try:
                    result = nemo_rl_result(record, self._tokenizer, invalid_tool_call_patterns=patterns,
                                            thinking_tags=tags, where=f"_rowidx {row['_rowidx']} (agent {agent})")
                except ProtocolError as e:
                    failed.append((row["_rowidx"], False, str(e)))
                    continue
                if deduplicate_multimodal_data:
                    result["_initial_multimodal_data_omitted"] = False  # text only: nothing omitted
                post_s += time.perf_counter() - t1
                done += 1
                timing = None
                if done == len(rows):
                    total = time.perf_counter() - started
                    timing = {f"{timer_prefix}/await_results": await_s,
                              f"{timer_prefix}/postprocess_results": post_s,
                              f"{timer_prefix}/postprocess_results_pct": 100 * post_s / total if total > 0 else 0.0}
                yield row["_rowidx"], result, timing
        finally:
            await stream.aclose()
        if failed:
            cls = infra if all(is_infra for _, is_infra, _ in failed) else data
            shown = "; ".join(text for _, _, text in failed[:5])
            more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
            raise cls(
                f"{len(failed)} of {len(rows)} NeMo-Gym rollouts failed (_rowidx {[i for i, _, _ in failed][:20]}); "
                f"the other {done} were streamed. {shown}{more}"
            )

    # ---- EnvironmentInterface methods NeMo-RL never calls on its Gym actor --------------------------------------
    def step(self, message_log_batch: Any, metadata: Any) -> Any:
        raise ProtocolError("the NemoGym drop-in runs whole rollouts (run_rollouts); for NeMo-RL's classic "
                            "step() path use gym_plugin.nemo_rl.env.GymEnvironment (docs/nemo_rl.md)")

    def global_post_process_and_metrics(self, batch: Any) -> Any:
        raise ProtocolError("the NemoGym drop-in runs whole rollouts (run_rollouts); NeMo-RL does not call "
                            "global_post_process_and_metrics on its Gym actor")


# ---- NeMo-RL wiring (lazy: ray / nemo_rl only imported when asked) ----------------------------------------------
_ORIGINAL: Any = None


def __getattr__(name: str) -> Any:
    if name == "NemoGymActor":
        # Same restart policy as NeMo-RL's NemoGym. Async methods make it an asyncio actor: calls overlap.
        return ray_actor_class(NemoGymDropIn, "gym_plugin.nemo_rl.gym.NemoGymActor", "use NemoGymDropIn directly",
                               max_restarts=-1, max_task_retries=-1)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_in_nemo_rl() -> Any:
    """Make NeMo-RL's Gym path build this class: rebind ``nemo_rl.environments.nemo_gym.NemoGym`` (and that name
    in every nemo_rl module that imported it, e.g. distillation) to `NemoGymActor`, and run it in the driver's
    Python (``ACTOR_ENVIRONMENT_REGISTRY[NEMO_GYM_FQN] = PY_EXECUTABLES.SYSTEM``; NeMo-RL's default builds a uv
    venv with NeMo Gym). Call it in your launch script before ``setup(...)``. Idempotent; returns the actor
    class. NeMo-RL's files are not changed."""
    global _ORIGINAL
    try:
        import nemo_rl.environments.nemo_gym as nemo_gym
        from nemo_rl.distributed.ray_actor_environment_registry import ACTOR_ENVIRONMENT_REGISTRY
        from nemo_rl.distributed.virtual_cluster import PY_EXECUTABLES
    except ImportError as e:
        raise GymPluginError(f"use_in_nemo_rl needs nemo_rl importable ({e}); call it in NeMo-RL's environment") from e
    actor = __getattr__("NemoGymActor")
    if _ORIGINAL is None:
        _ORIGINAL = nemo_gym.NemoGym
    for name, module in list(sys.modules.items()):
        if (name == "nemo_rl" or name.startswith("nemo_rl.")) and getattr(module, "NemoGym", None) is _ORIGINAL:
            setattr(module, "NemoGym", actor)
    ACTOR_ENVIRONMENT_REGISTRY[NEMO_GYM_FQN] = PY_EXECUTABLES.SYSTEM
    return actor
