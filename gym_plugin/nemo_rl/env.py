"""NeMo-RL's classic environment path over Gym verifiers: ``GymEnvironment`` behind NeMo-RL's ``EnvironmentInterface``.

NeMo-RL has two ways to train on an environment; this module serves the classic one (NeMo-RL generates every
turn itself, the environment scores it). The Gym path (NeMo Gym runs whole agent rollouts against the policy's
HTTP server) is `gym_plugin.nemo_rl.gym`, a drop-in for NeMo-RL's ``NemoGym`` actor. docs/nemo_rl.md.

- ``step(message_log_batch, metadata) -> EnvironmentReturn(observations, metadata, next_stop_strings, rewards,
  terminateds, answers)`` (``calculate_rewards`` in nemo_rl/experience/rollouts.py): each row's last assistant
  message is sent, with the row's metadata (the Gym example row: e.g. ``expected_answer``), to a Gym resource
  server's ``/seed_session`` + ``/verify``, as NeMo Gym's agents do. A Gym environment runs its multi-turn logic
  inside its agent, so every episode ends at ``step`` (``terminateds`` all 1) and the observation is an
  ``environment`` message saying correct / incorrect.
- ``global_post_process_and_metrics(batch) -> (batch, metrics)``: namespaced metrics (``rollout/...``) and
  ``mask_sample`` for rows whose verifier failed, for trainers that call it (NeMo-RL 7ea279a does not).

A failed verification is never reward 0 in disguise. NeMo-RL's classic path has no way to keep a row out of
the loss (``run_multi_turn_rollout`` keeps step metadata only for rows that continue, and the batch's
``loss_multiplier`` and ``mask_sample`` never come from the environment), so ``on_failure: raise`` (the default)
raises the typed VerifierError out of ``step``: NeMo-RL stops with the row, the server and the fix named.
``on_failure: mask`` instead puts a placeholder reward 0.0 with ``mask_sample: true`` and a ``failure`` object
in the row's metadata, for trainers that honour that flag (``global_post_process_and_metrics``, gym_plugin's own
loop); under NeMo-RL's classic path that placeholder would be trained as a real 0, and step logs a warning.

Neither nemo_rl nor ray is imported: `GymEnvironment` is a plain class. ``GymEnvironmentActor`` (a module
attribute created on first access) is ``ray.remote(GymEnvironment)`` for NeMo-RL's ``create_env``, which
calls ``actor_class.options(...).remote(env_config)``; `register_with_nemo_rl` registers it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from gym_plugin import schema
from gym_plugin.errors import (
    ConfigError,
    EndpointError,
    GymPluginError,
    ProtocolError,
    VerifierError,
    did_you_mean,
    truncate,
)
from gym_plugin.http import HTTPStatusError, RetryPolicy, Transport, post_with_retries
from gym_plugin.nemo_rl.actors import ray_actor_class
from gym_plugin.protocol import MASK_SAMPLE_KEY, agent_name, is_reward
from gym_plugin.responses import content_text, next_id

logger = logging.getLogger(__name__)

__all__ = [
    "EnvironmentReturn",
    "GymEnvConfig",
    "GymEnvironment",
    "register_with_nemo_rl",
]

_ON_FAILURE = ("mask", "raise")

UNSET_POLICY_URL = "http://127.0.0.1:9/v1"
"""Written as the policy endpoint of the Gym config (step only verifies; NeMo-RL generates): nothing listens on
port 9 (discard) and the endpoint is never probed."""

MOVED_TO_GYM_PATH = ("base_urls", "model_name", "api_key", "check_endpoints")
"""Keys of the former ``run_rollouts`` (whole agent rollouts): that is NeMo-RL's Gym path now."""

ENVIRONMENT_ROLE = "environment"
"""Role of the observation messages (as NeMo-RL's math environment)."""

_STEP_OUTPUT_KEYS = ("reward", "failure", MASK_SAMPLE_KEY)
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
class GymEnvConfig(schema.Checked):
    """The ``env.<name>`` section of a NeMo-RL config for this environment (also accepted as a plain dict)."""

    config_paths: list[str] = field(default_factory=list)
    """Gym environment YAML files (e.g. ``conf/gym/math.yaml``): agents, resource servers, settings."""
    gym_config: dict | None = None
    """The Gym config inline instead of (or on top of) files, as NeMo-RL's ``initial_global_config_dict``."""
    overrides: list[str] = field(default_factory=list)
    """Dotlist overrides of the Gym config (``math_agent.responses_api_agents.simple_agent.max_turns=4``)."""
    verifier: str | None = None
    """Resource server instance that ``step`` verifies with. None: the row's ``agent_ref`` agent's resource
    server, else the only resource server of the config."""
    correct_threshold: float = 1.0
    """A reward >= this counts as correct (observation text, ``rollout/accuracy``)."""
    on_failure: str = "raise"
    """What a verification that failed (the verifier could not judge the row) does. 'raise' (default): step
    raises the VerifierError; NeMo-RL's classic path has no way to mask a row. 'mask': reward 0.0 placeholder
    plus ``mask_sample: true`` in the row's metadata, only for trainers that honour it (under NeMo-RL's classic
    path the 0.0 would be trained)."""
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

    def check(self) -> list[str]:
        problems = []
        if not self.config_paths and not self.gym_config:
            problems.append("config_paths: empty and no gym_config; name the Gym env YAML (e.g. config_paths: "
                            "[conf/gym/math.yaml]) or give the Gym config inline")
        if self.on_failure not in _ON_FAILURE:
            problems.append(f"on_failure: {self.on_failure!r} must be one of {list(_ON_FAILURE)}."
                            f"{did_you_mean(str(self.on_failure), _ON_FAILURE)}")
        for name in ("verify_max_attempts", "verify_concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: {getattr(self, name)!r} must be >= 1")
        if self.verify_timeout_s <= 0:
            problems.append(f"verify_timeout_s: {self.verify_timeout_s!r} must be > 0")
        return problems


def _config_from(cfg: GymEnvConfig | Mapping[str, Any], where: str = "env") -> GymEnvConfig:
    """A validated GymEnvConfig from a dict (NeMo-RL passes the env section as a dict); every problem at once
    (gym_plugin.schema: keys, types, `GymEnvConfig.check`)."""
    if isinstance(cfg, GymEnvConfig):
        data = dataclasses.asdict(cfg)
    elif isinstance(cfg, Mapping):
        data = dict(cfg)
    else:
        raise ConfigError(f"{where}: expected a mapping of GymEnvConfig keys, got {type(cfg).__name__}")
    problems = []
    for key in MOVED_TO_GYM_PATH:
        if key in data:
            del data[key]
            problems.append(f"{where}.{key}: whole Gym rollouts against a policy endpoint are NeMo-RL's Gym path "
                            "(env.should_use_nemo_gym + gym_plugin.nemo_rl.gym.use_in_nemo_rl(), docs/nemo_rl.md); "
                            "this environment only verifies NeMo-RL's own generations. Remove the key.")
    for key in ("config_paths", "overrides"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]  # one path / override written as a string
        elif isinstance(data.get(key), (list, tuple)):
            data[key] = [str(v) for v in data[key]]
    built = schema.build(GymEnvConfig, data, where, problems)
    if problems:
        raise ConfigError(problems)
    return built


# ---- the environment -----------------------------------------------------------------------------------------
class GymEnvironment:
    """NeMo-RL environment interface over Gym servers started in this process (see the module docstring).

    cfg: a `GymEnvConfig` or the equivalent dict (NeMo-RL passes ``env.<name>`` as a dict).
    extra_servers: servers to start first on the Gym loop.
    """

    def __init__(self, cfg: GymEnvConfig | Mapping[str, Any], *, extra_servers: Sequence[Any] = ()):
        from gym_plugin.integration import GymIntegration  # heavy (aiohttp servers); keep module import light

        self.cfg = _config_from(cfg)
        self._transport: Transport | None = None
        self._retry = RetryPolicy(max_attempts=self.cfg.verify_max_attempts, backoff_s=0.05)
        sources = [*self.cfg.config_paths, *([dict(self.cfg.gym_config)] if self.cfg.gym_config else [])]
        self.gym = GymIntegration(
            "policy", [UNSET_POLICY_URL], sources, head_server_port=self.cfg.head_server_port,
            overrides=self.cfg.overrides, extra_servers=extra_servers,
            check_endpoints=False,  # the placeholder endpoint is never called
        )
        self._resource_servers = self.gym.config.names_of("resources_servers")
        if self.cfg.verifier is not None and self.cfg.verifier not in self._resource_servers:
            self.shutdown()
            raise ConfigError(
                f"env.verifier: {self.cfg.verifier!r} is not a resource server of the Gym config. Resource "
                f"servers: {self._resource_servers}.{did_you_mean(self.cfg.verifier, self._resource_servers)}"
            )

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
        unusable: list[str] = []  # rows that must not be trained as their reward: failed, or flagged mask_sample
        for (i, url, body), reply in zip(jobs, replies):
            meta = {k: v for k, v in metadata[i].items() if k not in _STEP_OUTPUT_KEYS}
            if isinstance(reply, BaseException):
                unusable.append(f"row {i}: {reply}")
                reward = 0.0  # placeholder only: mask_sample keeps it out of the loss (on_failure: mask)
                meta.update(mask_sample=True, reward=None,
                            failure={"kind": "verifier", "reason": str(reply), "url": url})
                observations.append({"role": ENVIRONMENT_ROLE, "content": "Environment: verification failed"})
                answers.append(None)
            else:
                reward = float(reply["reward"])
                if reply.get(MASK_SAMPLE_KEY):
                    unusable.append(f"row {i}: the verifier at {url} judged it (reward {reward:g}) but flagged it "
                                    "mask_sample: true (not to be trained on)")
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
        if unusable and self.cfg.on_failure == "raise":
            raise VerifierError(
                f"{len(unusable)} of {len(jobs)} rows cannot be trained on as their reward, and NeMo-RL's classic "
                f"step() path has no way to leave a row out of the loss: {'; '.join(unusable[:5])}"
                f"{f'; and {len(unusable) - 5} more' if len(unusable) > 5 else ''}. Fix the rows or the verifier, "
                "use NeMo-RL's Gym path (it masks), or set on_failure: mask with a trainer that honours mask_sample."
            )
        if unusable:
            logger.warning(
                "step: %d of %d rows carry mask_sample (failed or flagged verification; reward placeholder 0.0 on "
                "failures). NeMo-RL's classic path ignores that flag and trains these rewards; only a trainer that "
                "reads mask_sample (global_post_process_and_metrics) keeps them out of the loss.",
                len(unusable), len(jobs))
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
        if not isinstance(data, Mapping) or not is_reward(data.get("reward")):
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

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the Gym servers (NeMo-RL calls this at the end of training). Safe to call twice."""
        gym = getattr(self, "gym", None)
        if gym is not None and not gym.closed:
            if self._transport is not None:
                gym.run_on_servers_loop(self._transport.close())
                self._transport = None
            gym.shutdown()

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
ACTOR_FQN = "gym_plugin.nemo_rl.env.GymEnvironmentActor"
"""What NeMo-RL's registries name: ``ray.remote(GymEnvironment)``, created on first access."""


def __getattr__(name: str) -> Any:
    if name == "GymEnvironmentActor":
        # max_concurrency: step and run_rollouts block on the Gym loop thread; let calls overlap as NeMo-RL's
        # own environments do.
        return ray_actor_class(GymEnvironment, ACTOR_FQN, "use GymEnvironment directly without actors",
                               max_restarts=-1, max_task_retries=-1, max_concurrency=64)
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
