"""GRPO over Gym environments: sample prompts -> collect G rollouts per prompt -> process_rollouts -> grpo_step
-> sync weights to the policy -> log -> checkpoint.

    python recipes/grpo.py                                   # CPU: embedded SmolLM2 + the capital-city task
    python recipes/grpo.py model=tiny env=letters train.steps=2
    python recipes/grpo.py env=reasoning_gym env.dataset=chain_sum env.dataset_config='{max_terms: 3}'
    torchrun --nproc_per_node 2 recipes/grpo.py model=tiny env=letters
    python recipes/grpo.py policy=vllm policy.base_urls=[http://h:8000/v1] weight_sync=vllm_nccl model=...

How it departs from the GRPO paper: one optimizer step per batch by default (step.num_iterations and
step.mini_batches reuse a batch PPO-style, with old log-probs computed once; with one step the ratio is 1 and
clipping only matters with train.overlap), no KL term by default (loss.kl_coef=0), token-level truncated
importance sampling against the sampler's own log-probs (loss.tis_level=token), which also corrects the
one-version-old rollouts of train.overlap=true. Rollouts come from HTTP environments (agents, verifiers) started
in this process by GymIntegration; the policy is either the trained model served in process (policy=embedded)
or OpenAI-compatible endpoints such as vLLM (policy=vllm).

Under torchrun each rank collects whole prompt groups (its share of the step's prompts) from its own environment
servers, all ranks sample from one policy (rank 0's embedded server, or the endpoints), DDP averages gradients,
the loss is normalized by the global trained-token count, and only rank 0 syncs weights and writes files. A rank
whose collection or processing fails makes every rank stop with one RankFailedError at the end of that
collection (distributed.timeout_s bounds every wait).

Memory: with policy=embedded the server samples from the trainer's own module (collection and training take
turns; the step holds the weights), so there is one copy of the model, not two; train.overlap=true or FSDP need a
second copy for the server. No reference model unless loss.kl_coef > 0. AdamW runs fused (no temporary copies);
train.optimizer=adafactor and train.optimizer_in_backward=true shrink the step's memory (gym_plugin/optim.py).

Start vs end on the same prompts: eval.at_start / eval.every / eval.at_end sample eval.samples rollouts of the
task's first eval.num_prompts prompts with the current policy (no update) into eval.jsonl and the PNG; with
env.task=reasoning_gym they are eval.num_prompts held-out rows instead (no train question among them).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a fresh clone runs without `pip install -e .`
if __name__ == "__main__":
    from gym_plugin.allocator import use_jemalloc
    from gym_plugin.errors import exit_on_user_error

    # jemalloc where installed (GYM_PLUGIN_ALLOCATOR=auto|jemalloc|system): re-executes this process with it
    # preloaded before torch is imported; training steps run ~1.3x faster (gym_plugin/allocator.py)
    exit_on_user_error(use_jemalloc)

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gym_plugin import distributed as dist_utils  # noqa: E402
from gym_plugin.allocator import loaded_allocator  # noqa: E402
from gym_plugin.checkpoint import last_checkpoint, load_optimizer_state, read_trainer_state, save_checkpoint  # noqa: E402,E501
from gym_plugin.datasets import load_rows as read_rows  # noqa: E402
from gym_plugin.errors import ConfigError, GymPluginError, debug_enabled, exit_on_user_error, format_user_error  # noqa: E402,E501
from gym_plugin.grpo_config import GRPOConfig, check_overrides, parse_grpo_config  # noqa: E402
from gym_plugin.integration import GymIntegration  # noqa: E402
from gym_plugin.memory import peak_rss_mb, return_freed_memory_to_os  # noqa: E402
from gym_plugin.models import load_policy_model, quiet_hf_progress  # noqa: E402
from gym_plugin.net import free_port  # noqa: E402
from gym_plugin.optim import build_optimizer  # noqa: E402
from gym_plugin.plotting import plot_reward_curve  # noqa: E402
from gym_plugin.process import process_rollouts, reward_metrics  # noqa: E402
from gym_plugin.reasoning_tasks import generate_rows  # noqa: E402
from gym_plugin.protocol import ROLLOUT_INDEX_KEY, TASK_INDEX_KEY, parse_rollouts  # noqa: E402
from gym_plugin.redact import redact  # noqa: E402
from gym_plugin.run_logging import RunLogger, read_metrics, run_summary  # noqa: E402
from gym_plugin.step import grpo_step  # noqa: E402
from gym_plugin.tasks import prompt_batches, task_rows  # noqa: E402
from gym_plugin.threads import in_fresh_thread  # noqa: E402
from gym_plugin.trackers import Trackers  # noqa: E402
from gym_plugin.weight_sync import open_weight_sync  # noqa: E402


def load_rows(cfg: GRPOConfig, split: str = "train") -> list[dict]:
    """The task's example rows, routed to ``env.agent_name`` and carrying the policy's sampling params. ``split``
    "eval": reasoning-gym's held-out rows (eval.num_prompts of them, no train question among them)."""
    e = cfg.env
    if e.data_path:  # every row checked as `gym-plugin prepare` checks it: one error naming each bad line
        path = Path(e.data_path)
        rows = read_rows(path if path.is_absolute() or path.exists() else ROOT / path, agent=e.agent_name,
                         fix=f"Fix these rows of env.data_path={e.data_path} (`gym-plugin prepare --input "
                             "FILE` checks a file, and --drop-invalid writes the usable rows).")
    elif e.task == "reasoning_gym":
        rows = generate_rows(e.dataset, dataset_config=e.dataset_config, seed=e.seed, split=split,
                             size=e.size if split == "train" else cfg.eval.num_prompts, train_size=e.size,
                             answer_format=e.answer_format, instruction=e.instruction, agent_name=e.agent_name)
    else:
        rows = task_rows(cfg.env.task, cfg.env.agent_name)
    sampling = {"temperature": cfg.policy.temperature, "top_p": cfg.policy.top_p,
                "max_output_tokens": cfg.policy.max_output_tokens}
    for row in rows:
        row["responses_create_params"] = {**sampling, **row["responses_create_params"]}
    return rows


def start_environment(cfg: GRPOConfig, policy_server, base_urls: list[str]) -> GymIntegration:
    """Start the env's servers (agents, verifiers, the policy model server; plus the embedded policy on rank 0)."""
    sources = [p if Path(p).is_absolute() else str(ROOT / p) for p in cfg.env.config_paths]
    sources += [cfg.env.gym] if cfg.env.gym else []
    return GymIntegration(
        cfg.policy.model_name or cfg.model.name, base_urls, sources, head_server_port=0,
        policy_api_key=cfg.policy.api_key, extra_servers=[policy_server] if policy_server is not None else [],
        overrides=[f"policy_model.responses_api_models.vllm_model.{k}={v}" for k, v in policy_server_options(cfg)],
    )


def policy_server_options(cfg: GRPOConfig) -> list[tuple[str, str]]:
    """policy.token_mode / policy.tokenizer for the policy model server (the tokenizer defaults to the model's)."""
    return [("token_mode", cfg.policy.token_mode), ("tokenizer", cfg.policy.tokenizer or cfg.model.spec)]


async def collect(gym: GymIntegration, rows: list[dict], repeats: int, log: RunLogger, desc: str,
                  tokens_sampled=None) -> list[dict]:
    """Every record of ``rows`` x ``repeats`` (failures included), sorted by (row, repeat). ``tokens_sampled``:
    a counter of the embedded policy's sampled tokens, shown live (a batch finishes all its rollouts at once)."""
    records = []
    async with log.rollout_bar(len(rows) * repeats, desc, tokens_sampled) as bar:
        async for record in gym.collect_rollouts(rows, repeats=repeats):
            records.append(record)
            bar.update(1)
    records.sort(key=lambda r: (r[TASK_INDEX_KEY], r[ROLLOUT_INDEX_KEY]))
    return records


class RunState:
    """What ``main`` needs to know when ``train`` stops early: where it wrote, how far it got, and whether the
    folder holds earlier work (a resumed run, or a run_dir that existed before)."""

    def __init__(self, keep_run_dir: bool):
        self.run_dir: Path | None = None
        self.steps_done = 0
        self.keep_run_dir = keep_run_dir


async def train(cfg: GRPOConfig, info: dist_utils.DistInfo, state: RunState) -> None:
    # ---- build ---------------------------------------------------------------------------------------------
    if cfg.train.optimizer_in_backward and info.world_size > 1:  # before anything is loaded, on every rank
        raise ConfigError(f"train.optimizer_in_backward=true with {info.world_size} ranks: DDP/FSDP reduce the "
                          "gradients after the in-backward step would have used them; set "
                          "train.optimizer_in_backward=false (train.optimizer=adafactor still saves its state).")
    rows = load_rows(cfg)  # a bad data file stops the run before anything loads
    run_dir = Path(dist_utils.broadcast_object(cfg.run_dir))  # ${now:...} may differ by a second across ranks
    run_dir.mkdir(parents=True, exist_ok=True)
    state.run_dir = run_dir
    started = time.perf_counter()
    ckpt = last_checkpoint(run_dir)
    start_step, start_version = 0, 0
    if cfg.resume:
        resumed = read_trainer_state(ckpt)
        start_step, start_version = resumed.step, resumed.policy_version
    # trackers on rank 0 (logging.backends): a missing package or a bad URI stops here, before any model loads
    trackers, failure = None, None
    if info.is_main:
        try:
            trackers = open_trackers(cfg, run_dir, info.world_size, resumed.trackers if cfg.resume else None,
                                     start_step)
        except Exception as e:
            failure = e
    dist_utils.raise_if_any_rank_failed(failure, "opening the trackers in logging.backends")
    torch.manual_seed(cfg.train.seed)
    with quiet_hf_progress():
        model, tokenizer = load_policy_model(str(ckpt) if cfg.resume else cfg.model.spec, cfg.model.dtype)
    model.to(info.device)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.loss.kl_coef > 0 else None
    policy_server = None
    # The embedded server samples from the trainer's module itself when collection and training take turns
    # (the step holds the weights, weight sync only advances the version); collecting while training
    # (train.overlap) or sharding the trainer (FSDP) needs a copy of its own.
    share_weights = not cfg.train.overlap and cfg.distributed.strategy != "fsdp"
    sharded = info.enabled and cfg.distributed.strategy == "fsdp"
    if cfg.policy.kind == "embedded" and info.is_main:
        from gym_plugin.servers.embedded import EmbeddedPolicyConfig, EmbeddedPolicyServer

        policy_server = EmbeddedPolicyServer(
            EmbeddedPolicyConfig(model=cfg.model.spec, served_model_name=cfg.policy.model_name or cfg.model.name,
                                 port=free_port(), max_batch_size=cfg.policy.max_batch_size,
                                 batch_wait_ms=cfg.policy.batch_wait_ms, num_threads=cfg.policy.num_threads,
                                 scheduler=cfg.policy.scheduler, packed_weights=cfg.policy.packed_weights),
            model=model if share_weights else copy.deepcopy(model).eval(), tokenizer=tokenizer,
        )
        # the served weights are the checkpoint's: go on counting policy versions from there, so versions in
        # metrics and rollouts stay monotonic over a resume (set before the first request is generated)
        policy_server.policy_version = start_version
        base_urls = [f"http://127.0.0.1:{policy_server.config.port}/v1"]
    else:
        base_urls = list(cfg.policy.base_urls)
    # rank 0 starts first: its embedded policy must listen before the other ranks' environments look for it
    gym, failure = None, None
    if info.is_main:
        try:
            gym = start_environment(cfg, policy_server, base_urls)
        except Exception as e:  # the other ranks stop too instead of waiting for the URLs
            failure = e
    dist_utils.raise_if_any_rank_failed(failure, "starting rank 0's environment")
    base_urls = dist_utils.broadcast_object(base_urls)  # every rank samples from rank 0's embedded policy
    if gym is None:
        gym = start_environment(cfg, policy_server, base_urls)
    # FSDP shards the trainer's parameters: rank 0 keeps a whole copy (the server's, if embedded) that the
    # gathered weights are loaded into after each step, to sync and checkpoint from
    full_copy = (policy_server.model if policy_server is not None else copy.deepcopy(model)) \
        if sharded and info.is_main else None
    train_model = dist_utils.wrap_model(model, info, cfg.distributed.strategy)
    optimizer = build_optimizer(train_model, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay,
                                in_backward=cfg.train.optimizer_in_backward)
    resume_note = ""
    if cfg.resume and not load_optimizer_state(ckpt, optimizer, info.device):
        resume_note = " (no optimizer state in it: it starts fresh; train.save_optimizer=true keeps it)"
    # checks its routes on every replica now, not after the first step
    weight_sync = await open_weight_sync(cfg.weight_sync, server=policy_server, base_urls=base_urls,
                                         run_dir=run_dir) if info.is_main else None
    batches = prompt_batches(len(rows), cfg.train.prompts_per_step, cfg.train.seed)
    for _ in range(start_step):  # resume: the same prompt order as an uninterrupted run
        next(batches)
    log = RunLogger(run_dir, cfg.train.steps, enabled=info.is_main, start_step=start_step,
                    progress=cfg.logging.progress, trackers=trackers)
    log.info(f"run dir {run_dir} | {cfg.model.name} ({cfg.model.dtype}, {info.device}, {loaded_allocator()} malloc) | task {cfg.env.task or cfg.env.data_path} | "
             f"{cfg.train.prompts_per_step} prompts x {cfg.train.group_size} samples | ranks {info.world_size}"
             + (f" | resumed at step {start_step} from {ckpt} (params sha256 {dist_utils.params_digest(model)})"
                + resume_note if cfg.resume else ""))
    policy_version = policy_server.policy_version if policy_server is not None else start_version

    def next_rollouts(step: int):
        """Start collecting this rank's share of step ``step``'s prompt groups."""
        mine = dist_utils.shard_groups([rows[i] for i in next(batches)], info.rank, info.world_size)
        return asyncio.ensure_future(collect(gym, mine, cfg.train.group_size, log, f"rollouts step {step}",
                                             tokens_sampled))

    tokens_sampled = (lambda: policy_server.engine.stats.decoded_tokens) if policy_server is not None else None

    # the same prompts every time: held-out rows when the task has them (reasoning_gym), else the first train rows
    eval_rows = load_rows(cfg, "eval") if cfg.env.task == "reasoning_gym" and not cfg.env.data_path \
        else rows[: cfg.eval.num_prompts]

    def train_step(batch, step: int):
        """grpo_step with a live progress line; with shared weights the server generates nothing meanwhile (it
        waits for the weights)."""
        hold = policy_server.exclusive_weights() if policy_server is not None and share_weights \
            else contextlib.nullcontext()
        with hold, log.train_progress(step) as progress:
            return grpo_step(train_model, optimizer, batch, step_config=cfg.step, loss_config=cfg.loss,
                             ref_model=ref_model, on_progress=progress)

    async def evaluate(step: int) -> None:
        """Reward over the first eval.num_prompts rows (the same prompts every time), no update."""
        mine = dist_utils.shard_groups(eval_rows, info.rank, info.world_size)
        records = await collect(gym, mine, cfg.eval.samples, log, f"eval step {step}", tokens_sampled)
        merged = [r for part in dist_utils.all_gather_objects(records) for r in part]
        log.log_eval(step, {k.replace("rollout/", "eval/"): v for k, v in reward_metrics(merged).items()},
                     len(eval_rows))

    try:
        if cfg.eval.at_start and start_step == 0:
            await evaluate(0)
        pending = next_rollouts(start_step + 1) if start_step < cfg.train.steps else None
        for step in range(start_step + 1, cfg.train.steps + 1):
            t_iter = time.perf_counter()
            # ---- collect: G rollouts for each of this rank's prompts ------------------------------------------
            t0 = time.perf_counter()
            failure: Exception | None = None
            try:
                records = await pending
                # overlap: the next step's rollouts are generated (by the current policy) while this step trains
                pending = next_rollouts(step + 1) if cfg.train.overlap and step < cfg.train.steps else None
                rollouts = parse_rollouts(records)  # the one parse; process_rollouts reads the same objects
                versions = [r.policy_version for r in rollouts if r.policy_version is not None]
                staleness = policy_version - min(versions) if versions else 0
                fresh = [r for r in rollouts if (r.policy_version is None
                                                 or policy_version - r.policy_version <= cfg.train.max_staleness)]
                # ---- process: rollouts -> padded tensors + group advantages -----------------------------------
                batch = process_rollouts(
                    fresh, tokenizer, advantage_mode=cfg.advantage_mode, max_seq_len=cfg.process.max_seq_len,
                    filter_zero_variance=cfg.process.filter_zero_variance, drift_policy=cfg.process.drift_policy,
                    constrained_policy=cfg.process.constrained_policy,
                )
            except Exception as e:  # e.g. every rollout of this rank failed: tell the other ranks, not only this one
                failure = e
            collect_s = time.perf_counter() - t0
            rss_collect = peak_rss_mb()
            dist_utils.raise_if_any_rank_failed(failure, f"step {step}: collecting and processing rollouts")
            # ---- update: one GRPO step (DDP averages gradients; tokens normalized over all ranks) --------------
            metrics = await in_fresh_thread(train_step, batch.to(info.device), step, name="grpo-train-step")
            # ---- sync: the policy serves the new weights before the next collection starts ------------------
            if pending is not None:
                await pending  # (overlap) that collection used the old weights; wait before swapping them
            dist_utils.barrier()
            t0 = time.perf_counter()
            if sharded:
                gathered = dist_utils.full_state_dict(train_model)  # a collective; the whole dict on rank 0
                if full_copy is not None:
                    with policy_server.exclusive_weights() if policy_server is not None else contextlib.nullcontext():
                        full_copy.load_state_dict(gathered)
            if weight_sync is not None:
                policy_version = await weight_sync.sync(full_copy if sharded else train_model, policy_version + 1)
            policy_version = dist_utils.broadcast_object(policy_version)
            sync_s = time.perf_counter() - t0
            # ---- eval on the fixed prompts (the policy serves this step's weights; before the next collection
            # starts, so perf/collect_time_s stays the collection's own time) -----------------------------------
            t0 = time.perf_counter()
            if (cfg.eval.every and step % cfg.eval.every == 0) or (cfg.eval.at_end and step == cfg.train.steps):
                await evaluate(step)
            eval_s = time.perf_counter() - t0
            if pending is None and step < cfg.train.steps:
                pending = next_rollouts(step + 1)
            # ---- log: rank 0 sees every rank's rollouts --------------------------------------------------------
            all_records = [r for part in dist_utils.all_gather_objects(records) for r in part]
            # this rank's batch metrics, the step's, then the outcome metrics over every rank's rollouts (the
            # same function process_rollouts reports them with, so one rank logs the same values either way)
            metrics = {**batch.metrics, **metrics, **reward_metrics(all_records)}
            metrics.update({"perf/collect_time_s": collect_s, "perf/weight_sync_s": sync_s, "perf/eval_time_s": eval_s,
                            "perf/iteration_time_s": time.perf_counter() - t_iter, "policy/version": policy_version,
                            "policy/staleness": staleness, "policy/num_too_stale": len(records) - len(fresh),
                            # where the peak comes from: it grew during this step's collection or after it
                            "perf/peak_rss_after_collect_mb": rss_collect, "perf/peak_rss_mb": peak_rss_mb()})
            if info.device.type == "cuda":  # the peak since the run started (collection and training)
                metrics["perf/peak_gpu_mb"] = torch.cuda.max_memory_allocated(info.device) / 2**20
            log.log_step(step, metrics)
            log.log_rollouts(step, all_records)  # a few, to the trackers
            if cfg.logging.save_rollouts:
                log.write_rollouts(step, all_records)
            # ---- checkpoint ------------------------------------------------------------------------------------
            if info.is_main and (step == cfg.train.steps or (cfg.train.checkpoint_every
                                                             and step % cfg.train.checkpoint_every == 0)):
                save_checkpoint(full_copy if sharded else train_model, tokenizer, optimizer, step, policy_version,
                                run_dir, cfg.train.save_optimizer, trackers.ids() if trackers else None)
            if info.is_main and cfg.logging.plot:
                plot_curve(run_dir)
            state.steps_done = step
        # DDP keeps ranks identical; check it (a digest of every parameter) instead of assuming it
        digests = dist_utils.all_gather_objects(dist_utils.params_digest(train_model))
        if info.is_main:
            (run_dir / "param_digests.json").write_text(json.dumps(digests))
            if len(set(digests)) > 1:
                raise RuntimeError(f"ranks ended with different parameters: {digests}")
    finally:
        log.close()
        if weight_sync is not None:
            await weight_sync.close()
        gym.shutdown()
    if info.is_main:
        print(run_summary(run_dir, time.perf_counter() - started), file=sys.stderr, flush=True)


def open_trackers(cfg: GRPOConfig, run_dir: Path, ranks: int, resume_ids: dict | None, start_step: int) -> Trackers:
    """The trackers of logging.backends (none: an empty set), given the resolved config with its secrets
    redacted (as `gym-plugin serve --print-config` shows it) and the run's facts; on resume the same tracker runs."""
    lg = cfg.logging
    facts = {"model": cfg.model.name, "model_spec": cfg.model.spec, "task": cfg.env.task or cfg.env.data_path,
             "ranks": ranks, "policy": cfg.policy.kind, "start_step": start_step}
    return Trackers.open(lg.backends, run_dir, config=redact(dataclasses.asdict(cfg)), facts=facts,
                         project=lg.project, run_name=lg.run_name, mlflow_tracking_uri=lg.mlflow_tracking_uri,
                         wandb_entity=lg.wandb_entity, resume_ids=resume_ids,
                         resume_step=start_step if resume_ids is not None else None,
                         rollouts_per_step=lg.tracker_rollouts)


def plot_curve(run_dir: Path) -> None:
    """reward_curve.png from metrics.jsonl (training rollouts) and eval.jsonl (fixed prompts), when present."""
    eval_path = run_dir / "eval.jsonl"
    plot_reward_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "reward_curve.png",
                      eval_rows=read_metrics(eval_path) if eval_path.is_file() else ())


RUN_DIR_PREEXISTED = False
"""Whether the run_dir given on the command line existed before this run (then it is never removed)."""


def _remove_unfinished_run_dir(cfg_run_dir: str | None, state: RunState) -> None:
    """A run that stopped before its first step leaves nothing behind (unless it resumed or reused a folder)."""
    run_dir = state.run_dir or (Path(cfg_run_dir) if cfg_run_dir else None)
    if run_dir is None or state.keep_run_dir or state.steps_done > 0 or not run_dir.is_dir():
        return
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"removed {run_dir}: the run stopped before its first step", file=sys.stderr, flush=True)


@hydra.main(config_path="../conf", config_name="grpo", version_base="1.3")
def main(raw: DictConfig) -> None:
    state = RunState(keep_run_dir=RUN_DIR_PREEXISTED or bool(raw.get("resume")))
    run_dir = raw.get("run_dir")
    try:
        cfg = parse_grpo_config(OmegaConf.to_container(raw, resolve=True))
        return_freed_memory_to_os()  # glibc only (a no-op under jemalloc): freed activations leave the process
        info = dist_utils.init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s, cfg.model.device)
        try:
            asyncio.run(train(cfg, info, state))
        finally:
            dist_utils.shutdown_distributed()
    except GymPluginError as exc:
        # A mistake the user can fix: one block naming it, exit 2; Hydra's handler would bury it in a traceback.
        _remove_unfinished_run_dir(run_dir, state)
        if debug_enabled():
            raise
        print(format_user_error(exc), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except BaseException:
        _remove_unfinished_run_dir(run_dir, state)
        raise


if __name__ == "__main__":
    # Overrides are checked against the schema first: `train.step=3` gets our "did you mean 'steps'" instead of
    # Hydra's "use +train.step" hint.
    exit_on_user_error(lambda: check_overrides(sys.argv[1:], ROOT / "conf"))
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("run_dir=")]
    RUN_DIR_PREEXISTED = bool(given) and Path(given[-1]).exists()
    main()
