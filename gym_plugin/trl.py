"""TRL's ``GRPOTrainer`` on any Gym environment: a ``rollout_func`` and the reward function that goes with it.

    from trl import GRPOConfig, GRPOTrainer
    from gym_plugin.trl import GymRollouts, gym_dataset, gym_reward

    rollouts = GymRollouts("conf/gym/calculator.yaml")     # the policy: the trainer's own model, in this process
    trainer = GRPOTrainer(model, reward_funcs=[gym_reward], args=GRPOConfig(...),
                          train_dataset=gym_dataset(rows), rollout_func=rollouts)
    trainer.train(); rollouts.close()

Rows are Gym example rows (``responses_create_params``, ``agent_ref``, the verifier's keys). TRL hands
``rollout_func`` only the dataset's ``prompt`` column, so `gym_dataset` stores each whole row there as JSON (TRL's
own former NeMo Gym example did the same); `GymRollouts` parses it back, fills the sampling keys the row leaves
unset from the trainer's ``GRPOConfig`` (``temperature``, ``top_p``, ``max_completion_length`` ->
``max_output_tokens``), collects one rollout per prompt TRL passes (TRL repeats each prompt ``num_generations``
times; under ``accelerate launch`` each rank gets its own slice and collects it with its own servers) and returns:

- ``prompt_ids``: the first model call's prompt (the row rendered by the chat template);
- ``completion_ids``: everything after it: generations, tool results, template scaffolding, later generations;
- ``env_mask``: 1 exactly where ``process_rollouts`` puts ``loss_mask`` 1 (its `select_rollouts` and `build_rows`
  build the row, so drift and constrained calls are handled the same way), 0 on environment tokens;
- ``logprobs``: the sampler's log-prob on model tokens; 0.0 on environment tokens (what TRL's own tool loop writes
  there; TRL reads these only where ``env_mask`` is 1: its vLLM importance-sampling ratio and the off-policy mask
  multiply by the mask);
- ``gym_reward``: the verifier's reward (forwarded by TRL to reward functions; `gym_reward` returns it).

Multi-turn drift (a later call's prompt does not extend the earlier tokens): TRL takes one completion per rollout,
so ``process_rollouts``' ``"split"`` is not available; ``drift_policy="last_turn"`` (default) trains on the last
model call only (its prompt is then TRL's prompt), ``"drop"`` gives the rollout no signal. A drifted splice is never
trained. Constrained calls (sampled under a grammar) stay context with mask 0 (``constrained_policy="mask"``).

A rollout that gives no training signal (a failure record, a verifier ``mask_sample``, no usable token ids, dropped
for drift or constraint) still fills its slot, since TRL needs ``num_generations`` completions per prompt: one
eos token as prompt and completion, ``env_mask`` [0] and reward None. TRL turns a None from every reward function
into NaN, leaves it out of the group mean and std (``nanmean`` / ``nanstd``) and zeroes its advantage, and its
all-zero mask adds no token to the loss: the group's baseline is computed over the rollouts that worked, never
shifted by a made-up 0.

Logged with TRL's metrics (summed over ranks, every rank's collection): ``gym/num_rollouts``, ``gym/num_failed``
(failure records), ``gym/num_no_signal`` (every rollout given the placeholder), ``gym/num_masked``,
``gym/num_missing_tokens``, ``gym/drift_count``, ``gym/num_constrained_calls``, and as means over successful
rollouts ``gym/turns_mean`` (model calls), ``gym/tool_calls_mean`` (function calls), ``gym/reward/<agent>``;
``gym/collect_s`` is the slowest rank's collection time.

The policy, either way:

- ``base_urls=None`` (default): the trainer's own model (``accelerator.unwrap_model(trainer.model)``) is served in
  this process by gym_plugin's embedded engine, sharing its parameters: no copy and no weight sync; each
  collection samples from the weights the optimizer just updated (the module is put in eval mode while it
  samples and back in train mode after). Works on CPU and on one GPU.
- ``base_urls=[...]``: OpenAI-compatible endpoints (vLLM, an embedded server elsewhere); add
  `WeightSyncCallback` to the trainer so the endpoints get the new weights after every optimizer step.

TRL is an optional peer (``pip install -e ".[trl]"``, tested with 1.16.0). This module never imports ``trl``: it talks
to the trainer through the ``rollout_func`` contract, ``transformers.TrainerCallback``, ``datasets`` (`gym_dataset`)
and ``accelerate`` (metrics gathered over ranks).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gym_plugin.config import ConfigSource
from gym_plugin.errors import ConfigError, GymPluginError, ProtocolError, did_you_mean, truncate
from gym_plugin.integration import GymIntegration
from gym_plugin.process import CONSTRAINED_POLICIES, Selection, build_rows, select_rollouts
from gym_plugin.protocol import Rollout, agent_name, parse_rollout
from gym_plugin.rows import validate_example

__all__ = ["GymRollouts", "WeightSyncCallback", "gym_dataset", "gym_reward", "rollouts_to_trl", "TRL_DRIFT_POLICIES",
           "REWARD_KEY"]

TRL_DRIFT_POLICIES = ("last_turn", "drop")
"""``drift_policy`` values a TRL completion allows (one completion per rollout, so no ``"split"``)."""

REWARD_KEY = "gym_reward"
"""The extra key of the rollout_func output that carries the verifier's reward (None: no signal)."""

POLICY_MODEL_KEY = "policy_model.responses_api_models.vllm_model"
"""The policy model server's section in a Gym config (the default one GymIntegration adds)."""

DEFAULT_MODEL_NAME = "policy"
"""The served model name of the trainer's own model (``base_urls=None``)."""


# ---- dataset and reward ------------------------------------------------------------------------------------------
def gym_dataset(rows: Iterable[Mapping[str, Any]]):
    """A ``datasets.Dataset`` with one column, ``prompt``: each Gym example row as a JSON string (checked now:
    ``responses_create_params`` and ``agent_ref``). ``rows``: dicts, e.g. the lines of a Gym JSONL file."""
    checked = [validate_example(row, i) for i, row in enumerate(rows)]
    if not checked:
        raise ConfigError("gym_dataset got no rows; pass a list of Gym example rows (responses_create_params, "
                          "agent_ref, the verifier's keys).")
    from datasets import Dataset  # TRL's dependency (the 'trl' extra)

    return Dataset.from_dict({"prompt": [json.dumps(row) for row in checked]})


def gym_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """The TRL reward function of `GymRollouts`: the verifier's reward of each rollout (None where the rollout gave
    no signal, which TRL leaves out of the group statistics)."""
    rewards = kwargs.get(REWARD_KEY)
    if rewards is None:
        raise ConfigError(f"gym_reward found no {REWARD_KEY!r} among the reward function's inputs: it scores what "
                          "GymRollouts collected; pass rollout_func=GymRollouts(...) to the GRPOTrainer.")
    return [None if r is None else float(r) for r in rewards]


# ---- records -> TRL's rollout_func output ------------------------------------------------------------------------
def _tool_calls(record: Mapping[str, Any]) -> int:
    output = (record.get("response") or {}).get("output") or []
    return sum(1 for item in output if isinstance(item, Mapping) and item.get("type") == "function_call")


def rollouts_to_trl(records: Sequence[Any], *, placeholder_id: int, drift_policy: str = "last_turn",
                    constrained_policy: str = "mask") -> tuple[dict[str, list], dict[str, float]]:
    """Collector records (one per TRL prompt, in TRL's order) -> ``(output, stats)``: the rollout_func output
    (``prompt_ids``, ``completion_ids``, ``env_mask``, ``logprobs``, ``gym_reward``, one entry per record) and the
    collection's counts. Rows are built by process_rollouts' own `select_rollouts` + `build_rows`, so a token has
    ``env_mask`` 1 exactly when process_rollouts gives it ``loss_mask`` 1. ``placeholder_id``: the token of the
    no-signal placeholder (the tokenizer's eos)."""
    if drift_policy not in TRL_DRIFT_POLICIES:
        raise ConfigError(
            f"drift_policy={drift_policy!r}: with TRL a rollout is one completion, so it must be one of "
            f"{list(TRL_DRIFT_POLICIES)} ('last_turn' trains on the last model call of a drifted rollout, 'drop' "
            f"gives it no signal).{did_you_mean(str(drift_policy), TRL_DRIFT_POLICIES)}")
    if constrained_policy not in CONSTRAINED_POLICIES:
        raise ConfigError(f"constrained_policy={constrained_policy!r} is not one of {list(CONSTRAINED_POLICIES)}."
                          f"{did_you_mean(str(constrained_policy), CONSTRAINED_POLICIES)}")
    parsed: list[Rollout] = [parse_rollout(r, i) for i, r in enumerate(records)]
    selection: Selection = select_rollouts(parsed, drift_policy=drift_policy, constrained_policy=constrained_policy,
                                           group_ids=list(range(len(parsed))))
    n = len(parsed)
    out: dict[str, list] = {
        "prompt_ids": [[placeholder_id] for _ in range(n)],
        "completion_ids": [[placeholder_id] for _ in range(n)],
        "env_mask": [[0] for _ in range(n)],
        "logprobs": [[0.0] for _ in range(n)],
        REWARD_KEY: [None] * n,
    }
    if selection.kept:
        rows = build_rows(selection)
        starts = np.concatenate(([0], np.cumsum(rows.lengths)))  # [B + 1] row offsets into the flat arrays
        lp_starts = np.concatenate(([0], np.cumsum(np.add.reduceat(rows.sampled, starts[:-1], dtype=np.int64)
                                                   if len(rows.lengths) else [])))  # [B + 1] offsets into logprobs
        for b, k in enumerate(rows.kept.tolist()):
            sel = selection.kept[k]
            first_prompt = sel.calls[sel.segments[0][0]][0]  # one segment per rollout (drift_policy above)
            ids = rows.ids[starts[b]:starts[b + 1]]  # [L] the row: first prompt + the rest
            mask = rows.sampled[starts[b]:starts[b + 1]]  # [L] process_rollouts' loss mask before padding
            p = len(first_prompt)
            assert not mask[:p].any(), "the first call's prompt is context"
            comp_mask = mask[p:]  # [C]
            logprobs = np.zeros(comp_mask.shape[0], dtype=np.float64)  # [C] 0.0 on environment tokens
            logprobs[comp_mask.astype(bool)] = rows.logprobs[lp_starts[b]:lp_starts[b + 1]]
            i = sel.index
            out["prompt_ids"][i] = ids[:p].tolist()
            out["completion_ids"][i] = ids[p:].tolist()
            out["env_mask"][i] = comp_mask.astype(np.int64).tolist()
            out["logprobs"][i] = logprobs.tolist()
            out[REWARD_KEY][i] = float(sel.reward)
    counts = selection.counts
    stats: dict[str, float] = defaultdict(float)
    stats.update({
        "gym/num_rollouts": float(n),
        "gym/num_failed": float(counts["failed"]),
        "gym/num_no_signal": float(n - len(selection.kept)),
        "gym/num_masked": float(counts["masked"]),
        "gym/num_missing_tokens": float(counts["missing"] + counts["malformed"]),
        "gym/drift_count": float(counts["drift"]),
        "gym/num_constrained_calls": float(counts["constrained_calls"]),
    })
    for r in parsed:  # sums over successful rollouts; `_merge_stats` turns them into means
        if r.failed:
            continue
        stats["_ok"] += 1.0
        stats["_turns"] += float(len(r.calls))
        stats["_tool_calls"] += float(_tool_calls(r.record))
        try:
            agent = agent_name(r.record)
        except ProtocolError:
            agent = "unknown"
        stats[f"_reward/{agent}"] += float(r.reward)
        stats[f"_count/{agent}"] += 1.0
    return out, dict(stats)


def _merge_stats(per_rank: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Every rank's `rollouts_to_trl` stats -> the logged metrics: counts summed, means over successful rollouts."""
    total: dict[str, float] = defaultdict(float)
    for stats in per_rank:
        for key, value in stats.items():
            total[key] += value
    metrics = {k: v for k, v in total.items() if not k.startswith("_")}
    ok = total.get("_ok", 0.0)
    if ok:
        metrics["gym/turns_mean"] = total["_turns"] / ok
        metrics["gym/tool_calls_mean"] = total["_tool_calls"] / ok
    for key, value in total.items():
        if key.startswith("_reward/"):
            agent = key[len("_reward/"):]
            metrics[f"gym/reward/{agent}"] = value / total[f"_count/{agent}"]
    return metrics


# ---- the rollout_func ----------------------------------------------------------------------------------------------
class GymRollouts:
    """TRL's ``rollout_func`` for Gym environments: ``GRPOTrainer(..., rollout_func=GymRollouts(config))``.

    config: the Gym config, as `GymIntegration` takes it (YAML path(s) or mappings, merged in order: agents,
    resource servers, settings). base_urls: None serves the trainer's own model in this process (shared weights);
    a list of OpenAI-compatible endpoints (``http://host:port/v1``) samples from them (add `WeightSyncCallback`).
    model_name: the served model name (with base_urls: one the endpoints serve). overrides: dotlist overrides of the
    Gym config. drift_policy / constrained_policy: see the module docstring. max_batch_size / batch_wait_ms: the
    embedded engine's batching (base_urls=None). head_server_port: the Gym head server's port (0: a free one, so
    several ranks on one host never collide). policy_api_key: the endpoints' key. token_mode: the policy model
    server's (``completions`` | ``chat`` | ``auto``); None = ``completions`` for the trainer's own model
    (token-in/token-out: each call's prompt extends the previous call's tokens, so multi-turn rollouts never drift;
    the trainer's tokenizer is saved to a temporary folder for the policy model server's renderer) and ``auto``
    with base_urls (``completions`` for vLLM).
    """

    def __init__(
        self,
        config: ConfigSource | Sequence[ConfigSource],
        *,
        base_urls: Sequence[str] | str | None = None,
        model_name: str | None = None,
        overrides: Sequence[str] = (),
        drift_policy: str = "last_turn",
        constrained_policy: str = "mask",
        max_batch_size: int = 64,
        batch_wait_ms: float = 20.0,
        head_server_port: int = 0,
        policy_api_key: str = "dummy_key",
        token_mode: str | None = None,
    ):
        if drift_policy not in TRL_DRIFT_POLICIES or constrained_policy not in CONSTRAINED_POLICIES:
            rollouts_to_trl([], placeholder_id=0, drift_policy=drift_policy, constrained_policy=constrained_policy)
        if base_urls is not None and not model_name:
            raise ConfigError("GymRollouts(base_urls=...) needs model_name=: the model name the endpoints serve "
                              "(vLLM's --served-model-name).")
        self.config = config
        self.base_urls = base_urls
        self.model_name = model_name or DEFAULT_MODEL_NAME
        self.overrides = [f"head_server.port={head_server_port}", *overrides]
        self.drift_policy = drift_policy
        self.constrained_policy = constrained_policy
        self.max_batch_size = max_batch_size
        self.batch_wait_ms = batch_wait_ms
        self.policy_api_key = policy_api_key
        self.token_mode = token_mode or ("completions" if base_urls is None else "auto")
        self._tokenizer_dir: str | None = None
        self.gym: GymIntegration | None = None
        self.policy_server = None
        """The embedded server of the trainer's own model (base_urls=None), once started."""
        self.last_records: list[dict] = []
        """The records of the last collection, in TRL's order (for inspection and tests)."""
        self.last_output: dict[str, list] = {}
        """What the last call returned to TRL."""

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def _start(self, trainer: Any) -> None:
        extra = []
        if self.base_urls is None:
            from gym_plugin.servers.embedded import EmbeddedPolicyConfig, EmbeddedPolicyServer
            from gym_plugin.weight_sync import unwrap_model

            module = unwrap_model(trainer.accelerator.unwrap_model(trainer.model))
            training = module.training
            # the engine puts the module in eval mode at construction; the trainer's own mode comes back below
            self.policy_server = EmbeddedPolicyServer(
                EmbeddedPolicyConfig(served_model_name=self.model_name, max_batch_size=self.max_batch_size,
                                     batch_wait_ms=self.batch_wait_ms),
                model=module, tokenizer=_tokenizer(trainer))
            module.train(training)
            extra = [self.policy_server]
        overrides = [f"{POLICY_MODEL_KEY}.token_mode={self.token_mode}"]
        if self.token_mode == "completions" and self.base_urls is None:
            # the policy model server renders prompts with the trainer's tokenizer (a module built in code has no
            # folder for GET /models to report)
            self._tokenizer_dir = tempfile.mkdtemp(prefix="gym_plugin_trl_tokenizer_")
            _tokenizer(trainer).save_pretrained(self._tokenizer_dir)
            overrides.append(f"{POLICY_MODEL_KEY}.tokenizer={self._tokenizer_dir}")
        self.gym = GymIntegration(self.model_name, self.base_urls, self.config, head_server_port=0,
                                  policy_api_key=self.policy_api_key, overrides=[*overrides, *self.overrides],
                                  extra_servers=extra)

    def close(self) -> None:
        """Stop the Gym servers (and the embedded policy). Safe to call twice."""
        if self.gym is not None:
            self.gym.shutdown()
            self.gym = None
            self.policy_server = None
        if self._tokenizer_dir is not None:
            shutil.rmtree(self._tokenizer_dir, ignore_errors=True)
            self._tokenizer_dir = None

    def __enter__(self) -> "GymRollouts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- one call per generation batch ------------------------------------------------------------------------
    def rows_for(self, prompts: Sequence[Any], trainer: Any) -> list[dict]:
        """The Gym rows of TRL's prompts (JSON strings from `gym_dataset`, or dicts), with the trainer's sampling
        settings filled in where the row sets none."""
        args = trainer.args
        sampling = {"temperature": args.temperature, "top_p": args.top_p}
        if getattr(args, "max_completion_length", None) is not None:
            sampling["max_output_tokens"] = args.max_completion_length
        rows = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                try:
                    row = json.loads(prompt)
                except json.JSONDecodeError:
                    raise ConfigError(
                        f"GymRollouts: prompt {i} is not a Gym row as JSON: {truncate(prompt, 120)}. Build the "
                        "dataset with gym_plugin.trl.gym_dataset(rows).") from None
            elif isinstance(prompt, Mapping):
                row = dict(prompt)
            else:
                raise ConfigError(f"GymRollouts: prompt {i} is a {type(prompt).__name__}; build the dataset with "
                                  "gym_plugin.trl.gym_dataset(rows) (each prompt a Gym row as JSON).")
            row = validate_example(row, i)
            row["responses_create_params"] = {**sampling, **row["responses_create_params"]}
            rows.append(row)
        return rows

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list]:
        rows = self.rows_for(prompts, trainer)
        if self.gym is None:
            self._start(trainer)
        assert self.gym is not None
        started = time.perf_counter()
        module = None
        if self.policy_server is not None:
            module = self.policy_server.model
            training = module.training
            module.eval()  # sample without dropout; the trainer is waiting for this call, nothing trains now
            # the trainer stepped the shared module since the last call: claiming the weights drops the engine's
            # prefix cache (KV of the old weights) before anything is sampled from the new ones
            with self.policy_server.exclusive_weights():
                self.policy_server.policy_version = int(trainer.state.global_step)
        try:
            records = self.gym.collect(rows)  # one per prompt, sorted by row = TRL's order
        finally:
            if module is not None:
                module.train(training)
        collect_s = time.perf_counter() - started
        tokenizer = _tokenizer(trainer)
        placeholder = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        output, stats = rollouts_to_trl(records, placeholder_id=int(placeholder), drift_policy=self.drift_policy,
                                        constrained_policy=self.constrained_policy)
        stats["gym/collect_s"] = collect_s
        self._log(trainer, stats)
        self.last_records, self.last_output = records, output
        return output

    def _log(self, trainer: Any, stats: Mapping[str, float]) -> None:
        """Every rank's stats merged into TRL's metrics of this mode (TRL averages them over its logging window)."""
        from accelerate.utils import gather_object

        per_rank = gather_object([dict(stats)]) if trainer.accelerator.num_processes > 1 else [dict(stats)]
        collect_s = max(s.get("gym/collect_s", 0.0) for s in per_rank)
        merged = _merge_stats([{k: v for k, v in s.items() if k != "gym/collect_s"} for s in per_rank])
        merged["gym/collect_s"] = collect_s
        mode = "train" if trainer.model.training else "eval"
        metrics = getattr(trainer, "_metrics", None)
        if metrics is None:  # a TRL without the metrics store this module was written against (1.16)
            raise GymPluginError("GymRollouts could not log its metrics: trainer._metrics is missing (tested with "
                                 "trl==1.16.0; pip install -e '.[trl]').")
        for key, value in merged.items():
            metrics[mode][key].append(value)


def _tokenizer(trainer: Any):
    """The trainer's text tokenizer (a processor's tokenizer for multimodal models)."""
    proc = trainer.processing_class
    return getattr(proc, "tokenizer", None) or proc


# ---- policy way (b): weight sync after each optimizer step -------------------------------------------------------
def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # transformers is a dependency; this only guards odd installs
        raise GymPluginError(f"WeightSyncCallback needs transformers' TrainerCallback: {e}") from e
    return TrainerCallback


class WeightSyncCallback(_callback_base()):
    """Push the trainer's weights to the policy endpoints after every optimizer step (policy way (b)).

    ``weight_sync``: a `gym_plugin.weight_sync` object (``CheckpointWeightSync`` for embedded servers elsewhere,
    ``VLLMReloadWeightSync`` / ``VLLMNCCLWeightSync`` for vLLM) or a ``WeightSyncConfig`` with ``base_urls`` and
    ``directory``. Its routes are checked on every replica when training begins; only the main process syncs,
    and every rank waits for it (a barrier) so that no rank collects from stale weights.
    """

    def __init__(self, weight_sync: Any, *, base_urls: Sequence[str] = (), directory: str | Path | None = None):
        from gym_plugin.weight_sync import WeightSyncConfig, build_weight_sync

        if isinstance(weight_sync, WeightSyncConfig):
            if weight_sync.kind == "inprocess":
                raise ConfigError("WeightSyncCallback with weight_sync kind 'inprocess': GymRollouts(base_urls=None) "
                                  "already shares the trainer's weights; the callback is for endpoints elsewhere "
                                  "(kind checkpoint, vllm_reload or vllm_nccl).")
            weight_sync = build_weight_sync(weight_sync, base_urls=base_urls, run_dir=directory)
        if not callable(getattr(weight_sync, "sync", None)):
            raise ConfigError(f"WeightSyncCallback needs a gym_plugin weight sync (with sync()); got "
                              f"{type(weight_sync).__name__}. Build one with gym_plugin.weight_sync.build_weight_sync.")
        self.weight_sync = weight_sync
        self.version = 0
        """The policy version the endpoints serve (the trainer's global step after each sync)."""
        self.last_sync_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def _run(self, coro):
        if self._loop is None or self._loop.is_closed():  # one loop per train() (the sync's client lives on it)
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._run(self.weight_sync.check())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            started = time.perf_counter()
            self.version = int(self._run(self.weight_sync.sync(model, int(state.global_step))))
            self.last_sync_s = time.perf_counter() - started
        _barrier()

    def on_train_end(self, args, state, control, **kwargs):
        self._run(self.weight_sync.close())
        self._loop.close()  # type: ignore[union-attr]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
