"""A drop-in environment for NeMo-RL-style trainers: Gym verifiers and agents behind NeMo-RL's environment API.

NeMo-RL drives an environment through two methods (``nemo_rl.environments.interfaces.EnvironmentInterface``):

- ``step(message_log_batch, metadata) -> EnvironmentReturn(observations, metadata, next_stop_strings, rewards,
  terminateds, answers)``: the trainer generated the assistant turns itself; the environment scores them.
  Here each row's last assistant message is sent, with the row's metadata (the Gym example row: e.g.
  ``expected_answer``), to a Gym resource server's ``/seed_session`` + ``/verify``, as NeMo Gym's agents do.
  A Gym environment runs its multi-turn logic inside its agent, so every episode ends at ``step``
  (``terminateds`` all 1) and the observation is an ``environment`` message saying correct / incorrect.
- ``global_post_process_and_metrics(batch) -> (batch, metrics)``: after a whole batch, namespaced metrics
  (``rollout/...``) and ``mask_sample`` for rows whose verifier failed (NeMo-RL zeroes their loss_multiplier).

plus, like NeMo-RL's NeMo Gym integration, ``run_rollouts(examples)``: whole agent rollouts (the agent calls
the policy endpoint, runs tools, verifies) collected through `GymIntegration`, each converted to a NeMo-RL
message log: alternating ``user`` (context: prompt, tool results, template scaffolding; never trained) and
``assistant`` (sampled tokens, with ``generation_logprobs``) messages whose ``token_ids`` concatenate to the
exact token sequence the policy saw and produced. No re-tokenization.

Neither nemo_rl nor ray is imported: `GymEnvironment` is a plain class. ``GymEnvironmentActor`` (a module
attribute created on first access) is ``ray.remote(GymEnvironment)`` for NeMo-RL's ``create_env``, which
calls ``actor_class.options(...).remote(env_config)``; `register_with_nemo_rl` registers it. docs/nemo_rl.md
shows the config.

Failures are never reward 0 in disguise: with ``on_failure: mask`` (default) a row whose verifier failed gets a
placeholder reward of 0.0 *and* ``mask_sample: true`` in its metadata (and a ``failure`` object), which
``global_post_process_and_metrics`` turns into ``batch["mask_sample"]`` / a zero ``loss_multiplier``; a
rollout that failed comes back with ``message_log: None`` and its failure. ``on_failure: raise`` raises the
typed error instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from gym_plugin.errors import (
    ConfigError,
    EndpointError,
    GymPluginError,
    MissingTokenIdsError,
    ProtocolError,
    VerifierError,
    did_you_mean,
    truncate,
)
from gym_plugin.http import HTTPStatusError, RetryPolicy, Transport, post_with_retries
from gym_plugin.protocol import ROLLOUT_INDEX_KEY, TASK_INDEX_KEY, agent_name, is_failure
from gym_plugin.responses import content_text, next_id

__all__ = [
    "EnvironmentReturn",
    "GymEnvConfig",
    "GymEnvironment",
    "rollout_to_message_log",
    "register_with_nemo_rl",
]

UNSET_POLICY_URL = "http://127.0.0.1:9/v1"
"""Written as the policy endpoint when ``base_urls`` is empty (step-only use): nothing listens on port 9
(discard), the endpoint is never probed, and `GymEnvironment.run_rollouts` refuses to run without real URLs."""

ENVIRONMENT_ROLE = "environment"
"""Role of the observation messages (as NeMo-RL's math environment)."""

_STEP_OUTPUT_KEYS = ("reward", "failure", "mask_sample")
"""Keys `step` writes into metadata; dropped from metadata handed back to a later step, so a verdict is never
stale (a row that failed once and verifies now is no longer masked)."""


class EnvironmentReturn(NamedTuple):
    """What ``step`` returns: the field names and order of NeMo-RL's ``EnvironmentReturn`` (unpacked by position
    in nemo_rl.experience.rollouts.calculate_rewards). All fields are batched, B = rows given to step."""

    observations: list[dict[str, str]]
    """B messages ``{"role": "environment", "content": "Environment: correct" | ...}``."""
    metadata: list[dict | None]
    """B metadata dicts: the input row plus ``reward``, verifier keys, and ``failure``/``mask_sample`` if any."""
    next_stop_strings: list[list[str] | None]
    """B stop-string lists for a next turn (the config's ``stop_strings``; None = the trainer's default)."""
    rewards: torch.Tensor
    """[B] float32 rewards from the verifier (0.0 placeholder on a masked failure)."""
    terminateds: torch.Tensor
    """[B] float32 ones: a Gym episode ends when its final answer is verified."""
    answers: list[str | None]
    """B extracted answers (the verifier's ``extracted_answer``; None when it gave none)."""


@dataclass
class GymEnvConfig:
    """The ``env.<name>`` section of a NeMo-RL config for this environment (also accepted as a plain dict)."""

    config_paths: list[str] = field(default_factory=list)
    """Gym environment YAML files (e.g. ``conf/gym/math.yaml``): agents, resource servers, settings."""
    gym_config: dict | None = None
    """The Gym config inline instead of (or on top of) files, as NeMo-RL's ``initial_global_config_dict``."""
    overrides: list[str] = field(default_factory=list)
    """Dotlist overrides of the Gym config (``math_agent.responses_api_agents.simple_agent.max_turns=4``)."""
    model_name: str = "policy"
    """Model name sent to the policy endpoint (``policy_model_name``)."""
    base_urls: list[str] = field(default_factory=list)
    """OpenAI-compatible policy endpoints (vLLM ``.../v1``) for run_rollouts; empty = step only."""
    api_key: str = "dummy_key"
    """API key for the policy endpoints."""
    verifier: str | None = None
    """Resource server instance that ``step`` verifies with. None: the row's ``agent_ref`` agent's resource
    server, else the only resource server of the config."""
    correct_threshold: float = 1.0
    """A reward >= this counts as correct (observation text, ``rollout/accuracy``)."""
    on_failure: str = "mask"
    """'mask': a failed verification / rollout is flagged ``mask_sample`` (kept out of the loss);
    'raise': it raises (VerifierError / EndpointError / ProtocolError)."""
    metadata_aliases: dict = field(default_factory=lambda: {"ground_truth": "expected_answer"})
    """Metadata key -> Gym row key, copied when the row lacks it (NeMo-RL math data says ``ground_truth``)."""
    stop_strings: list[str] | None = None
    """Returned as next_stop_strings for every row (None: the trainer's own)."""
    verify_timeout_s: float = 120.0
    """Timeout of one /seed_session or /verify call, seconds."""
    verify_max_attempts: int = 3
    """Attempts per verify call (retries on connection errors, timeouts, 5xx)."""
    verify_concurrency: int = 64
    """Rows verified at once by one step call (verifiers may run sandboxes or math checks: bounded)."""
    head_server_port: int = 0
    """Port of the Gym head server (0: any free port)."""
    check_endpoints: bool = True
    """Probe the policy endpoints once at start (only when base_urls is set)."""


_ON_FAILURE = ("mask", "raise")


def _config_from(cfg: GymEnvConfig | Mapping[str, Any], where: str = "env") -> GymEnvConfig:
    """A validated GymEnvConfig from a dict (NeMo-RL passes the env section as a dict); every problem at once."""
    if isinstance(cfg, GymEnvConfig):
        data = dataclasses.asdict(cfg)
    elif isinstance(cfg, Mapping):
        data = dict(cfg)
    else:
        raise ConfigError(f"{where}: expected a mapping of GymEnvConfig keys, got {type(cfg).__name__}")
    names = [f.name for f in dataclasses.fields(GymEnvConfig)]
    problems = []
    for key in data:
        if key not in names:
            problems.append(f"{where}.{key}: unknown key.{did_you_mean(key, names)} Known keys: {names}")
    for key in ("config_paths", "overrides", "base_urls"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]  # one path / URL written as a string
        if key in data and not isinstance(data[key], (list, tuple)):
            problems.append(f"{where}.{key}: {data[key]!r} must be a list of strings")
        elif key in data:
            data[key] = [str(v) for v in data[key]]
    if not data.get("config_paths") and not data.get("gym_config"):
        problems.append(f"{where}.config_paths: empty and no {where}.gym_config; name the Gym env YAML "
                        "(e.g. config_paths: [conf/gym/math.yaml]) or give the Gym config inline")
    if data.get("on_failure", "mask") not in _ON_FAILURE:
        problems.append(f"{where}.on_failure: {data['on_failure']!r} must be one of {list(_ON_FAILURE)}")
    if int(data.get("verify_max_attempts", 3)) < 1:
        problems.append(f"{where}.verify_max_attempts: {data['verify_max_attempts']!r} must be >= 1")
    if int(data.get("verify_concurrency", 1)) < 1:
        problems.append(f"{where}.verify_concurrency: {data['verify_concurrency']!r} must be >= 1")
    if float(data.get("verify_timeout_s", 1.0)) <= 0:
        problems.append(f"{where}.verify_timeout_s: {data['verify_timeout_s']!r} must be > 0")
    if problems:
        raise ConfigError(problems)
    return GymEnvConfig(**{k: v for k, v in data.items() if k in names})


# ---- rollout -> NeMo-RL message log -------------------------------------------------------------------------
def _call_text(items: Sequence[Mapping[str, Any]]) -> str:
    """What one model call said: its message text, then its tool calls as ``name(arguments)`` lines."""
    parts = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            parts.append(content_text(item.get("content")))
        elif kind == "function_call":
            parts.append(f"{item.get('name', '')}({item.get('arguments', '')})")
    return "\n".join(p for p in parts if p)


def _conversion_error(cls: type, kind: str, message: str) -> ProtocolError:
    """A conversion error carrying ``kind``: the failure kind run_rollouts reports when it masks the rollout."""
    err = cls(message)
    err.kind = kind  # type: ignore[attr-defined]
    return err


def _tensor(values: list, dtype: type) -> torch.Tensor:
    """A Python list -> a CPU tensor via np.fromiter (about 4x torch.tensor(list) on long id lists)."""
    return torch.from_numpy(np.fromiter(values, dtype=dtype, count=len(values)))


def rollout_to_message_log(record: Mapping[str, Any], tokenizer: Any = None) -> list[dict]:
    """A Gym rollout (agent reply: ``response.output`` items, the last item of each model call carrying
    ``prompt_token_ids`` / ``generation_token_ids`` / ``generation_log_probs``) -> a NeMo-RL message log.

    For model call k: a ``user`` message with the prompt tokens not seen before (``prompt_k[len(seen):]``:
    the initial prompt, then tool results and chat-template scaffolding) and an ``assistant`` message with
    ``token_ids`` = the generated ids and ``generation_logprobs`` = their log-probs. Concatenating every
    ``token_ids`` gives the last call's prompt + generation exactly. ``content``: the decoded tokens when a
    tokenizer is given; else '' for context and the call's text / tool calls for the assistant.

    Raises MissingTokenIdsError when no model call carries token ids, ProtocolError when a call's prompt does
    not extend the tokens seen so far (chat-template drift: a message log cannot represent it; use
    gym_plugin.process_rollouts, which has drift policies) or a log-prob is NaN. The error's ``kind``
    attribute names the case (missing_token_ids, token_drift, nan_log_probs, malformed_response).
    """
    where = f"rollout (row {record.get(TASK_INDEX_KEY)}, repeat {record.get(ROLLOUT_INDEX_KEY)})"
    response = record.get("response")
    output = response.get("output") if isinstance(response, Mapping) else None
    if not isinstance(output, list):
        raise _conversion_error(ProtocolError, "malformed_response",
                                f"{where} has no response.output list: {truncate(response, 200)}")
    log: list[dict] = []
    seen: list[int] = []
    call_items: list[Mapping[str, Any]] = []
    for item in output:
        call_items.append(item)
        gen = item.get("generation_token_ids")
        if not gen:  # not the end of a model call (or an empty generation: nothing to train, as NeMo-RL)
            continue
        prompt, logprobs = item.get("prompt_token_ids"), item.get("generation_log_probs")
        if not isinstance(prompt, list) or not isinstance(logprobs, list) or len(logprobs) != len(gen):
            raise _conversion_error(
                MissingTokenIdsError, "missing_token_ids",
                f"{where}: output item {item.get('id')!r} has generation_token_ids but prompt_token_ids "
                f"{truncate(prompt, 60)} / generation_log_probs of length "
                f"{len(logprobs) if isinstance(logprobs, list) else logprobs!r} (want {len(gen)})"
            )
        if prompt[: len(seen)] != seen:
            first = next(i for i, (a, b) in enumerate(zip(prompt, seen)) if a != b) if len(prompt) >= len(seen) \
                else len(prompt)
            raise _conversion_error(
                ProtocolError, "token_drift",
                f"{where}: model call {len(log) // 2 + 1}'s prompt does not start with the earlier prompt + "
                f"generation (first difference at token {first} of {len(seen)}): the chat template rewrote the "
                "history (e.g. dropped reasoning). A NeMo-RL message log cannot hold this rollout; use "
                "process_rollouts(drift_policy=...) or a template that keeps the history."
            )
        new_prompt = prompt[len(seen):]
        context_ids = _tensor(new_prompt, np.int64)  # [P_k]
        gen_ids = _tensor(gen, np.int64)  # [G_k]
        gen_lp = _tensor(logprobs, np.float32)  # [G_k]
        if bool(torch.isnan(gen_lp).any()):  # NeMo-RL refuses these too: a NaN poisons the whole batch's loss
            raise _conversion_error(
                ProtocolError, "nan_log_probs",
                f"{where}: model call {len(log) // 2 + 1} has NaN generation log-probs; check the policy endpoint "
                "(dtype overflow, a broken logits processor)")
        if tokenizer is not None:
            context_text, gen_text = tokenizer.decode(new_prompt), tokenizer.decode(gen)
        else:
            context_text, gen_text = "", _call_text(call_items)
        log.append({"role": "user", "content": context_text, "token_ids": context_ids})
        log.append({"role": "assistant", "content": gen_text, "token_ids": gen_ids, "generation_logprobs": gen_lp})
        seen = prompt + gen
        call_items = []
    if not log:
        raise _conversion_error(
            MissingTokenIdsError, "missing_token_ids",
            f"{where}: no model call carries token ids ({len(output)} output items of types "
            f"{[it.get('type') for it in output]}). The policy endpoint must return them (vLLM: "
            "return_tokens_as_token_ids / return_token_ids), or the first prompt exceeded max_model_len."
        )
    return log


# ---- the environment -----------------------------------------------------------------------------------------
class GymEnvironment:
    """NeMo-RL environment interface over Gym servers started in this process (see the module docstring).

    cfg: a `GymEnvConfig` or the equivalent dict (NeMo-RL passes ``env.<name>`` as a dict).
    extra_servers: servers to start first on the Gym loop (an embedded policy, a fake endpoint in tests).
    tokenizer: optional HF tokenizer, used only to fill message ``content`` with decoded text.
    """

    def __init__(self, cfg: GymEnvConfig | Mapping[str, Any], *, extra_servers: Sequence[Any] = (),
                 tokenizer: Any = None):
        from gym_plugin.integration import GymIntegration  # heavy (aiohttp servers); keep module import light

        self.cfg = _config_from(cfg)
        self.tokenizer = tokenizer
        self._transport: Transport | None = None
        self._retry = RetryPolicy(max_attempts=self.cfg.verify_max_attempts, backoff_s=0.05)
        paths = list(self.cfg.config_paths)
        self._inline_path: str | None = None
        if self.cfg.gym_config:
            from omegaconf import OmegaConf

            fd, self._inline_path = tempfile.mkstemp(prefix="gym_env_", suffix=".yaml")
            with os.fdopen(fd, "w") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.create(dict(self.cfg.gym_config))))
            paths.append(self._inline_path)
        base_urls = list(self.cfg.base_urls) or [UNSET_POLICY_URL]
        try:
            self.gym = GymIntegration(
                self.cfg.model_name, base_urls, paths, head_server_port=self.cfg.head_server_port,
                policy_api_key=self.cfg.api_key, overrides=self.cfg.overrides, extra_servers=extra_servers,
                # step-only (no base_urls): the placeholder endpoint is never called, so never probe it
                check_endpoints=self.cfg.check_endpoints and bool(self.cfg.base_urls),
            )
        except BaseException:
            self._remove_inline()
            raise
        self._resource_servers = self.gym.config.names_of("resources_servers")
        if self.cfg.verifier is not None and self.cfg.verifier not in self._resource_servers:
            self.shutdown()
            raise ConfigError(
                f"env.verifier: {self.cfg.verifier!r} is not a resource server of the Gym config. Resource "
                f"servers: {self._resource_servers}.{did_you_mean(self.cfg.verifier, self._resource_servers)}"
            )

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Install the tokenizer used to decode message contents (as NeMo-RL's NemoGym.set_tokenizer)."""
        self.tokenizer = tokenizer

    # ---- step ---------------------------------------------------------------------------------------------------
    def step(self, message_log_batch: list[list[Mapping[str, Any]]], metadata: list[Mapping[str, Any] | None],
             return_extracted_answer: bool = True) -> EnvironmentReturn:
        """Verify each row's last assistant message against its metadata (the Gym row) with /verify.

        message_log_batch: B message logs (dicts with ``role`` and ``content``; tensors ignored).
        metadata: B dicts, the Gym rows (``expected_answer`` or an alias such as ``ground_truth``, optional
        ``agent_ref`` choosing the verifier, any keys the verifier reads).
        return_extracted_answer: NeMo-RL's eval passes it positionally (``step(logs, infos, True)``); False
        returns ``answers=None`` as NeMo-RL's math environment does.
        """
        if len(message_log_batch) != len(metadata):
            raise ProtocolError(f"step: {len(message_log_batch)} message logs but {len(metadata)} metadata entries;"
                                " pass one metadata dict per message log")
        jobs = [self._verify_job(i, log, meta) for i, (log, meta) in enumerate(zip(message_log_batch, metadata))]
        replies = self.gym.run_on_servers_loop(self._verify_all(jobs))  # direct calls, no HTTP
        rewards, observations, out_meta, answers = [], [], [], []
        for (i, url, body), reply in zip(jobs, replies):
            meta = {k: v for k, v in metadata[i].items() if k not in _STEP_OUTPUT_KEYS}
            if isinstance(reply, BaseException):
                if self.cfg.on_failure == "raise":
                    raise reply
                reward = 0.0  # placeholder only: mask_sample keeps it out of the loss
                meta.update(mask_sample=True, reward=None,
                            failure={"kind": "verifier", "reason": str(reply), "url": url})
                observations.append({"role": ENVIRONMENT_ROLE, "content": "Environment: verification failed"})
                answers.append(None)
            else:
                reward = float(reply["reward"])
                # What the verifier added or changed (metadata from an earlier step may already hold old
                # 'reward' / 'extracted_answer' values: they are overwritten, the echoed row is not copied).
                meta.update({k: v for k, v in reply.items() if k != "response" and (k not in body or body[k] != v)})
                correct = reward >= self.cfg.correct_threshold
                observations.append({"role": ENVIRONMENT_ROLE,
                                     "content": "Environment: correct" if correct else "Environment: incorrect"})
                extracted = reply.get("extracted_answer")
                answers.append(None if extracted is None else str(extracted))
            rewards.append(reward)
            out_meta.append(meta)
        b = len(jobs)
        return EnvironmentReturn(
            observations=observations,
            metadata=out_meta,
            next_stop_strings=[list(self.cfg.stop_strings) if self.cfg.stop_strings else None] * b,
            rewards=torch.tensor(rewards, dtype=torch.float32),  # [B]
            terminateds=torch.ones(b, dtype=torch.float32),  # [B]
            answers=answers if return_extracted_answer else None,
        )

    def _resource_server_for(self, meta: Mapping[str, Any], i: int) -> str:
        if self.cfg.verifier is not None:
            return self.cfg.verifier
        if meta.get("agent_ref") is not None:
            agent = agent_name(meta, f"step metadata[{i}]")
            spec = self.gym.config.servers.get(agent)
            ref = (spec.params.get("resources_server") or {}) if spec is not None else {}
            if spec is None or spec.server_type != "responses_api_agents" or not ref.get("name"):
                agents = self.gym.config.agents
                raise ProtocolError(
                    f"step metadata[{i}]: agent_ref {agent!r} is not an agent with a resource server in the Gym "
                    f"config. Agents: {agents}.{did_you_mean(agent, agents)} Fix agent_ref or set env.verifier."
                )
            return str(ref["name"])
        if len(self._resource_servers) == 1:
            return self._resource_servers[0]
        raise ConfigError(
            f"step metadata[{i}] has no agent_ref and env.verifier is not set, but the Gym config has "
            f"{len(self._resource_servers)} resource servers {self._resource_servers}; set env.verifier to one "
            "of them or put agent_ref in every row's metadata"
        )

    def _verify_job(self, i: int, log: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None
                    ) -> tuple[int, str, dict]:
        """(row, /verify URL base, body): the row (aliases applied) + a Responses object holding the answer."""
        if not isinstance(meta, Mapping):
            raise ProtocolError(
                f"step metadata[{i}] is {truncate(meta, 100)}; each row needs a dict (the Gym row, e.g. "
                "{'expected_answer': '4'}): set extra_env_info in your NeMo-RL data processor"
            )
        last = None
        for k in range(len(log) - 1, -1, -1):
            if log[k].get("role") == "assistant":
                last = k
                break
        if last is None:
            raise ProtocolError(f"step message log {i} has no assistant message (roles: "
                                f"{[m.get('role') for m in log]}); step scores the last assistant turn")
        body = {k: v for k, v in meta.items() if k not in _STEP_OUTPUT_KEYS}
        for src, dst in self.cfg.metadata_aliases.items():
            if src in body and dst not in body:
                body[dst] = body[src]
        if "responses_create_params" not in body:
            # The conversation before the answer, for verifiers that read the prompt (content as text).
            body["responses_create_params"] = {"input": [
                {"role": m.get("role", "user"), "content": content_text(m.get("content"))} for m in log[:last]
            ]}
        text = content_text(log[last].get("content"))
        body["response"] = {
            "id": next_id("resp"),
            "object": "response",
            "output": [{"id": next_id("msg"), "type": "message", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        }
        name = self._resource_server_for(meta, i)
        return i, self.gym.servers.directory.url(name), body

    async def _verify_all(self, jobs: list[tuple[int, str, dict]]) -> list[Any]:
        if self._transport is None:
            self._transport = Transport(timeout_s=self.cfg.verify_timeout_s)
        gate = asyncio.Semaphore(self.cfg.verify_concurrency)

        async def bounded(url: str, body: dict) -> dict:
            async with gate:
                return await self._verify_one(url, body)

        return await asyncio.gather(*(bounded(url, body) for _, url, body in jobs), return_exceptions=True)

    async def _verify_one(self, url: str, body: dict) -> dict:
        assert self._transport is not None
        try:
            seeded, _ = await post_with_retries(self._transport, f"{url}/seed_session", body, self._retry)
            reply, _ = await post_with_retries(self._transport, f"{url}/verify", body, self._retry,
                                               session_id=seeded.session_id)
        except EndpointError as e:
            detail = e.body if isinstance(e, HTTPStatusError) and e.body else str(e)
            raise VerifierError(
                f"resource server at {url} could not verify the answer: {truncate(detail, 400)}. The row is a "
                "failure, not reward 0; fix the row's metadata or the verifier."
            ) from e
        data = reply.data
        if not isinstance(data, Mapping) or isinstance(data.get("reward"), bool) \
                or not isinstance(data.get("reward"), (int, float)):
            raise VerifierError(f"{url}/verify answered without a numeric 'reward': {truncate(data, 300)}")
        return dict(data)

    # ---- metrics ------------------------------------------------------------------------------------------------
    def global_post_process_and_metrics(self, batch: Any) -> tuple[Any, dict]:
        """Metrics over a finished batch, and ``mask_sample`` for rows whose verifier failed.

        batch: a dict-like (NeMo-RL BatchedDataDict) with ``rewards`` [B] and optionally ``is_end`` [B],
        ``generation_lengths`` [B], ``prompt_lengths`` [B], ``text`` (B prompts, to group samples of one
        prompt), ``extra_env_info`` (B metadata dicts from step), ``loss_multiplier`` [B].
        Returns the batch (``mask_sample`` [B] bool set, ``loss_multiplier`` zeroed on masked rows) and
        metrics: ``rollout/reward_mean``, ``rollout/accuracy`` (correct and properly ended, over unmasked
        rows), ``rollout/pass_at_samples_per_prompt``, ``rollout/fraction_properly_ended``,
        ``rollout/num_samples``, ``rollout/num_masked``, length means (unmasked rows).
        """
        if "rewards" not in batch:
            raise ProtocolError(f"global_post_process_and_metrics: the batch has no 'rewards' (keys: "
                                f"{sorted(batch.keys())}); pass the rollout batch with its rewards")
        rewards = torch.as_tensor(batch["rewards"]).float().reshape(-1).cpu()  # [B]
        b = rewards.shape[0]
        infos = batch.get("extra_env_info") if hasattr(batch, "get") else None
        mask = torch.tensor([bool(isinstance(m, Mapping) and m.get("mask_sample")) for m in infos],
                            dtype=torch.bool) if infos is not None else torch.zeros(b, dtype=torch.bool)  # [B]
        if "mask_sample" in batch:
            mask = mask | torch.as_tensor(batch["mask_sample"]).bool().reshape(-1).cpu()
        batch["mask_sample"] = mask
        if "loss_multiplier" in batch:
            lm = torch.as_tensor(batch["loss_multiplier"])
            batch["loss_multiplier"] = lm * (~mask).to(lm.dtype if lm.is_floating_point() else torch.float32)
        is_end = torch.as_tensor(batch["is_end"]).float().reshape(-1).cpu() if "is_end" in batch \
            else torch.ones(b)  # [B]
        keep = ~mask  # [B]
        n_keep = int(keep.sum())
        correct = (rewards >= self.cfg.correct_threshold).float() * is_end  # [B]
        metrics: dict[str, float | int] = {
            "rollout/num_samples": b,
            "rollout/num_masked": b - n_keep,
            "rollout/reward_mean": float(rewards[keep].mean()) if n_keep else 0.0,
            "rollout/accuracy": float(correct[keep].mean()) if n_keep else 0.0,
            "rollout/fraction_properly_ended": float(is_end.mean()) if b else 0.0,
        }
        gen_len = batch["generation_lengths"] if "generation_lengths" in batch else None
        prompt_len = batch["prompt_lengths"] if "prompt_lengths" in batch else None
        if gen_len is not None:
            gen_len = torch.as_tensor(gen_len).float().reshape(-1).cpu()  # [B]
            if prompt_len is not None:
                # NeMo-RL's generation_lengths count the whole sequence; the response is the difference.
                gen_len = gen_len - torch.as_tensor(prompt_len).float().reshape(-1).cpu()
            metrics["rollout/generation_length_mean"] = float(gen_len[keep].mean()) if n_keep else 0.0
            ok = (correct > 0) & keep
            metrics["rollout/correct_generation_length_mean"] = float(gen_len[ok].mean()) if ok.any() else 0.0
        if prompt_len is not None:
            prompt_len = torch.as_tensor(prompt_len).float().reshape(-1).cpu()  # [B]
            metrics["rollout/prompt_length_mean"] = float(prompt_len[keep].mean()) if n_keep else 0.0
        if "text" in batch and b:
            metrics["rollout/pass_at_samples_per_prompt"] = _pass_rate_per_prompt(batch["text"], correct, keep)
        return batch, metrics

    # ---- whole rollouts -----------------------------------------------------------------------------------------
    def run_rollouts(self, examples: Iterable[Mapping[str, Any]], repeats: int = 1) -> list[dict]:
        """Run each example (a Gym row with ``responses_create_params`` + ``agent_ref``) ``repeats`` times through
        its agent, and return one result per rollout, sorted by (row, repeat):

        ``{"message_log": [...], "input_message_log": message_log[:1], "full_result": <Gym record>,
        "reward": float, "mask_sample": bool, "failure": None, "task_index": i, "rollout_index": r}``.
        A failed rollout has ``message_log: None``, ``reward: None``, ``mask_sample: True`` and ``failure: {kind,
        reason, ...}``: the collector's failure records (kinds timeout, connection, http_status, verifier, ...)
        and rollouts that cannot become a message log (missing_token_ids, token_drift, nan_log_probs,
        malformed_response). With ``on_failure: raise`` it raises instead.
        """
        if not self.cfg.base_urls:
            raise ConfigError("env.base_urls: empty, so there is no policy endpoint for run_rollouts. Set it to "
                              "the OpenAI-compatible server(s) of the policy, e.g. ['http://127.0.0.1:8000/v1']")
        records = self.gym.collect(examples, repeats=repeats)
        return [self._to_result(record) for record in records]

    async def stream_rollouts(self, examples: Iterable[Mapping[str, Any]], repeats: int = 1
                              ) -> AsyncIterator[dict]:
        """`run_rollouts` for async callers (a Ray async actor, an overlapping trainer): yields each result as its
        rollout finishes (completion order; ``task_index`` / ``rollout_index`` say which)."""
        if not self.cfg.base_urls:
            raise ConfigError("env.base_urls: empty, so there is no policy endpoint for stream_rollouts. Set it to "
                              "the OpenAI-compatible server(s) of the policy, e.g. ['http://127.0.0.1:8000/v1']")
        async for record in self.gym.collect_rollouts(examples, repeats=repeats):
            yield self._to_result(record)

    def _to_result(self, record: dict) -> dict:
        out = {"full_result": record, "task_index": record.get(TASK_INDEX_KEY),
               "rollout_index": record.get(ROLLOUT_INDEX_KEY)}
        failure = record.get("failure") if is_failure(record) else None
        log = None
        if failure is None:
            try:
                log = rollout_to_message_log(record, self.tokenizer)
            except ProtocolError as e:  # no token ids, or template drift
                if self.cfg.on_failure == "raise":
                    raise
                failure = {"kind": getattr(e, "kind", "malformed_response"), "reason": str(e)}
        elif self.cfg.on_failure == "raise":
            raise GymPluginError(
                f"rollout of row {out['task_index']} (repeat {out['rollout_index']}) failed: "
                f"{failure.get('kind')}: {failure.get('reason')} (attempts {failure.get('attempts')}, url "
                f"{failure.get('url')}). Set env.on_failure=mask to keep going with the row masked."
            )
        if failure is not None:
            out.update(message_log=None, input_message_log=None, reward=None, mask_sample=True, failure=failure)
            return out
        out.update(message_log=log, input_message_log=log[:1], reward=float(record["reward"]),
                   mask_sample=bool(record.get("mask_sample", False)), failure=None)
        return out

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the Gym servers (NeMo-RL calls this at the end of training). Safe to call twice."""
        gym = getattr(self, "gym", None)
        if gym is not None and not gym.closed:
            if self._transport is not None:
                gym.run_on_servers_loop(self._transport.close())
                self._transport = None
            gym.shutdown()
        self._remove_inline()

    def _remove_inline(self) -> None:
        if self._inline_path is not None:
            try:
                os.unlink(self._inline_path)
            except OSError:
                pass
            self._inline_path = None

    def __enter__(self) -> "GymEnvironment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _pass_rate_per_prompt(text: Any, correct: torch.Tensor, keep: torch.Tensor) -> float:
    """Fraction of distinct prompts (unmasked rows) with at least one correct sample.

    text: B prompt strings, or a [B, S] tensor of prompt token ids. correct, keep: [B]."""
    if isinstance(text, torch.Tensor):
        _, group = torch.unique(text.reshape(text.shape[0], -1), dim=0, return_inverse=True)  # [B]
    else:
        ids: dict[Any, int] = {}
        group = torch.tensor([ids.setdefault(t, len(ids)) for t in text], dtype=torch.long)  # [B]
    group, hit = group[keep], (correct[keep] > 0).float()  # [K]
    if group.numel() == 0:
        return 0.0
    n = int(group.max()) + 1
    best = torch.zeros(n).scatter_reduce(0, group, hit, reduce="amax")  # [n] 1 if any sample correct
    present = torch.zeros(n).scatter_reduce(0, group, torch.ones_like(hit), reduce="amax")  # [n]
    return float(best.sum() / present.sum())


# ---- NeMo-RL registration (lazy: ray / nemo_rl only imported when asked) ---------------------------------------
_ACTOR_CLASS: Any = None
ACTOR_FQN = "gym_plugin.nemo_rl_env.GymEnvironmentActor"
"""What NeMo-RL's registries name: ``ray.remote(GymEnvironment)``, created on first access."""


def __getattr__(name: str) -> Any:
    if name == "GymEnvironmentActor":
        global _ACTOR_CLASS
        if _ACTOR_CLASS is None:
            try:
                import ray
            except ImportError as e:
                raise GymPluginError(
                    "gym_plugin.nemo_rl_env.GymEnvironmentActor needs ray (NeMo-RL's actor framework), which is not "
                    "installed. Install NeMo-RL (it brings ray), or use GymEnvironment directly without actors."
                ) from e
            # max_concurrency: step and run_rollouts block on the Gym loop thread; let calls overlap as NeMo-RL's
            # own environments do.
            _ACTOR_CLASS = ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=64)(GymEnvironment)
        return _ACTOR_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_with_nemo_rl(env_name: str = "gym") -> str:
    """Register ``GymEnvironmentActor`` with NeMo-RL under ``env_name`` (``ENV_REGISTRY``, and its actor
    Python environment as the system one, since this package runs in the driver's environment). Then a data
    config with ``env_name: <env_name>`` and ``env: {<env_name>: {...GymEnvConfig keys}}`` uses it.
    Returns the actor class FQN. Idempotent for this class; a name taken by another class raises ConfigError."""
    try:
        from nemo_rl.distributed.ray_actor_environment_registry import ACTOR_ENVIRONMENT_REGISTRY
        from nemo_rl.distributed.virtual_cluster import PY_EXECUTABLES
        from nemo_rl.environments.utils import ENV_REGISTRY, register_env
    except ImportError as e:
        raise GymPluginError(
            f"register_with_nemo_rl needs nemo_rl importable ({e}). Run it inside NeMo-RL's environment, before "
            "setup_response_data / create_env."
        ) from e
    ACTOR_ENVIRONMENT_REGISTRY.setdefault(ACTOR_FQN, PY_EXECUTABLES.SYSTEM)
    entry = ENV_REGISTRY.get(env_name)
    if entry is None:
        register_env(env_name, ACTOR_FQN)
    elif entry.get("actor_class_fqn") != ACTOR_FQN:
        raise ConfigError(
            f"NeMo-RL env name {env_name!r} is already registered to {entry.get('actor_class_fqn')!r}; pick "
            f"another name (register_with_nemo_rl(env_name=...)) and use it as the data config's env_name"
        )
    return ACTOR_FQN
