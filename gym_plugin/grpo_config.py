"""The schema of recipes/grpo.py's config (conf/grpo.yaml + groups): dataclasses, one docstring per field, and
``parse_grpo_config`` that reports every problem at once (unknown keys with "Did you mean", values of the wrong
type: gym_plugin.schema; bad values and combinations that cannot work, each with the fix). YAML key = field name = kwarg everywhere.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from gym_plugin import schema
from gym_plugin.devices import check_device
from gym_plugin.errors import ConfigError, did_you_mean
from gym_plugin.loss import LossConfig
from gym_plugin.servers.embedded.config import SCHEDULERS
from gym_plugin.optim import OPTIMIZERS
from gym_plugin.step import StepConfig
from gym_plugin.trackers import backend_problems
from gym_plugin.weight_sync import WEIGHT_SYNC_KINDS, WeightSyncConfig

POLICY_KINDS = ("embedded", "endpoints")


@dataclass
class TrainConfig:
    """``train``: the loop's budget and optimizer."""

    steps: int = 8
    """Number of GRPO steps (collect -> process -> update -> sync)."""
    prompts_per_step: int = 8
    """Prompts (groups) per step, over all ranks; each rank gets whole groups."""
    group_size: int = 4
    """Rollouts per prompt (G)."""
    lr: float = 1e-5
    """Learning rate (an absolute step size for both optimizers)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    optimizer: str = "adamw"
    """'adamw' (fused torch AdamW: two moments, 2x the model's size in state) | 'adafactor' (transformers'
    Adafactor with an absolute lr, no momentum and a factored second moment: state ~0.1% of the model's size,
    -1.03 GB for SmolLM2-135M fp32; updates clipped to RMS 1; not with distributed.strategy=fsdp)."""
    optimizer_in_backward: bool = False
    """Step each parameter inside backward as soon as its gradient is ready and free that gradient (one
    parameter's gradient alive at a time: -517 MB for SmolLM2-135M fp32). Needs step.max_grad_norm=null, one
    micro-batch per update (step.micro_batch_size >= rows per mini-batch) and a single rank."""
    overlap: bool = False
    """Collect step k+1 while step k trains (rollouts one policy version old, corrected by loss.tis_level). With
    policy=embedded this costs a second copy of the weights (the server cannot sample from the module being
    trained)."""
    max_staleness: int = 1
    """Rollouts more than this many policy versions behind the trainer are dropped (counted)."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end). Only the newest is kept (checkpoints/last)."""
    save_optimizer: bool = False
    """Also save the optimizer state with each checkpoint (AdamW's moments: twice the model's size, 1.08 GB for
    SmolLM2-135M; Adafactor's: ~1 MB), so ``resume=true`` continues them exactly; without it a resume restarts
    them."""
    seed: int = 0
    """Seed of the prompt order and of torch."""


@dataclass
class EnvConfig:
    """``env``: the Gym environment (servers) and its prompt rows."""

    task: str | None = "capitals"
    """A built-in task of gym_plugin.tasks (capitals | add_digits | letters), reasoning_gym (rows generated from
    ``dataset``), or None with ``data_path``."""
    data_path: str | None = None
    """A JSONL (or Parquet) file of example rows (used instead of ``task``), relative to the working directory or
    else to the repository root; checked as ``gym-plugin prepare`` checks it."""
    agent_name: str = "capitals_agent"
    """Agent the rows are routed to (their ``agent_ref`` is set to it)."""
    gym: dict = field(default_factory=dict)
    """Server sections in NeMo Gym's shape (agents, resource servers), merged after ``config_paths``."""
    config_paths: list = field(default_factory=list)
    """Gym config YAML files (e.g. conf/gym/math.yaml), relative to the repository root or absolute."""
    # task=reasoning_gym (conf/env/reasoning_gym.yaml): rows from gym_plugin.reasoning_tasks.generate_rows
    dataset: str | list | None = None
    """task=reasoning_gym: a reasoning-gym dataset name (chain_sum) or a weighted mix [{name, weight, config}]."""
    dataset_config: dict | None = None
    """task=reasoning_gym: the single dataset's generator keywords ({min_terms: 2, max_terms: 3})."""
    size: int = 256
    """task=reasoning_gym: train rows; the eval rows (eval.num_prompts) are held out from them."""
    seed: int = 0
    """task=reasoning_gym: the generator seed (train: seed, eval: seed + 10^9, minus every train question)."""
    answer_format: str = "answer_tag"
    """task=reasoning_gym: 'answer_tag' (<answer>...</answer>) | 'boxed' (\\boxed{...}): prompt and extraction."""
    instruction: str | None = None
    """task=reasoning_gym: the text after each question (None: the answer format's default instruction)."""


@dataclass
class PolicyConfig:
    """``policy``: where rollouts are generated and how they are sampled."""

    kind: str = "embedded"
    """'embedded' (the trainer's model served in this process) | 'endpoints' (OpenAI-compatible servers, e.g.
    vLLM, at ``base_urls``)."""
    base_urls: list = field(default_factory=list)
    """endpoints: OpenAI base URLs of the policy replicas ('http://host:8000/v1')."""
    model_name: str | None = None
    """endpoints: the model name the servers serve (None: the model config's name)."""
    api_key: str = "dummy_key"
    """endpoints: API key."""
    temperature: float = 1.0
    """Sampling temperature (GRPO needs diverse samples; 1.0 samples the policy itself)."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 = off; anything else biases the samples away from the trained policy)."""
    max_output_tokens: int = 32
    """Most tokens generated per model call."""
    max_batch_size: int = 64
    """embedded: rows generated together in one batch."""
    batch_wait_ms: float = 20.0
    """embedded: how long the engine gathers requests before starting a batch."""
    num_threads: int | None = None
    """embedded: torch threads of the generation engine (None: torch's default)."""
    scheduler: str = "continuous"
    """embedded: 'continuous' (rows join and leave at every decode step, prefix cache across requests) | 'batch'
    (requests that arrive together run as one batch to its end: the engine before continuous batching)."""
    packed_weights: bool = True
    """embedded, CPU fp32: while collecting, also hold the linear weights packed for MKL's GEMM (~10% more
    tokens/s, +the linear weights' size in memory while collecting; memory=low turns it off)."""
    token_mode: str = "auto"
    """How the policy model server calls the policy: 'auto' (token-in/token-out /completions for vLLM, chat
    otherwise) | 'completions' | 'chat' (see gym_plugin.servers.policy.server)."""
    tokenizer: str | None = None
    """completions mode: the tokenizer/chat template source (HF folder, hub id, 'smollm2'); None = model.spec."""


@dataclass
class ModelConfig:
    """``model``: the trained model (and the embedded policy's starting weights)."""

    spec: str = "smollm2"
    """'smollm2' | 'tiny' | 'random:<name>' (gym_plugin.models.random_init: random weights at a real model's size)
    | a local Hugging Face folder."""
    dtype: str = "float32"
    """Training dtype (float32 on CPU)."""
    device: str = "auto"
    """Where the trained model (and the embedded policy sampling from it) runs: 'auto' (a CUDA GPU when torch sees
    one, else the CPU; the CPU with distributed.backend=gloo) | 'cpu' | 'cuda' (cuda:<LOCAL_RANK> under
    torchrun) | 'cuda:N'. Asking for CUDA where there is none is an error, not a fall back to the CPU."""
    name: str = "SmolLM2-135M-Instruct"
    """Name shown in logs and sent as ``model`` to endpoints when policy.model_name is unset."""


@dataclass
class ProcessConfig:
    """``process``: keyword arguments of ``process_rollouts``."""

    max_seq_len: int | None = None
    """Rows longer than this are cut and not trained on (None: no limit)."""
    filter_zero_variance: bool = False
    """Do not train on groups whose rewards are all equal (their advantages are 0 anyway)."""
    drift_policy: str = "split"
    """Multi-turn rollouts whose turns do not extend each other: 'split' | 'last_turn' | 'drop'."""
    constrained_policy: str = "mask"
    """Model calls sampled under a grammar (tool_choice required, response formats): 'mask' (context, not
    trained on) | 'drop' (leave the rollout out) | 'train'."""


@dataclass
class DistributedConfig:
    """``distributed``: torchrun settings (ignored for a plain ``python`` launch)."""

    backend: str = "auto"
    """'auto' (nccl with GPUs, else gloo) | 'gloo' | 'nccl'."""
    strategy: str = "ddp"
    """'ddp' | 'fsdp' (FSDP2; GPUs with nccl or CPUs with gloo). FSDP gives the embedded server its own copy."""
    timeout_s: float = 1800.0
    """Longest wait in any collective: a rank that hangs or dies makes the others fail after this long."""


@dataclass
class EvalConfig:
    """``eval``: reward on a fixed prompt set (no training), to compare start and end on the same prompts."""

    at_start: bool = True
    """Evaluate before the first step (logged as step 0)."""
    at_end: bool = True
    """Evaluate after the last step."""
    every: int = 0
    """Also evaluate after every this-many steps (0: only at_start / at_end)."""
    num_prompts: int = 32
    """The first this-many rows of the task."""
    samples: int = 2
    """Rollouts per prompt."""


@dataclass
class LoggingConfig:
    """``logging``: what the run shows and writes."""

    progress: bool = True
    """Progress bars over steps and over the rollouts of a step."""
    plot: bool = True
    """Write reward_curve.png into the run directory after each step."""
    save_rollouts: bool = True
    """Write every step's records to rollouts/step_XXXXXX.jsonl."""
    backends: list[str] = field(default_factory=list)
    """Experiment trackers that also get the run (any of 'tensorboard', 'wandb', 'mlflow'; each needs its extra,
    e.g. pip install 'gym_plugin[tensorboard]'): metrics, eval reward, config, sampled rollouts, the reward
    curve, run facts (gym_plugin/trackers/). Only rank 0 logs."""
    tracker_rollouts: int = 4
    """Rollouts per step sent to the trackers (spread over the step's prompts); 0: none."""
    project: str = "gym_plugin"
    """The W&B project and the MLflow experiment."""
    run_name: str | None = None
    """The tracker runs' name (default: run_dir's folder name)."""
    wandb_entity: str | None = None
    """The W&B team or user (default: the key's default entity)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, file:/path); default $MLFLOW_TRACKING_URI,
    else the file store <run_dir>/mlruns."""


@dataclass
class GRPOConfig:
    """The whole recipe config."""

    run_dir: str = "runs/grpo"
    """Output folder: metrics.jsonl, rollouts/, reward_curve.png, checkpoints/last/."""
    resume: bool = False
    """Continue from ``run_dir``/checkpoints/last (model, optimizer, step)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage_mode: str = "grpo"
    """Group-relative advantage: 'grpo' | 'dr_grpo' | 'rloo' (set by the loss group)."""
    step: StepConfig = field(default_factory=StepConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def parse_grpo_config(data: Mapping[str, Any]) -> GRPOConfig:
    """Build and check the recipe config (a resolved plain dict, e.g. ``OmegaConf.to_container(cfg)``).
    Raises ConfigError listing every problem. Hydra's own ``hydra`` key is ignored."""
    problems: list[str] = []
    data = {k: v for k, v in data.items() if k != "hydra"}
    cfg: GRPOConfig = schema.build(GRPOConfig, data, "", problems) or GRPOConfig()
    t, p = cfg.train, cfg.policy
    for name in ("steps", "prompts_per_step", "group_size"):
        value = getattr(t, name)
        if not isinstance(value, int) or value < 1:
            problems.append(f"train.{name}={value!r} must be a positive integer.")
    if isinstance(t.group_size, int) and t.group_size == 1:
        problems.append("train.group_size=1 gives every rollout an advantage of 0 (nothing to compare it with); "
                        "set train.group_size >= 2.")
    if t.lr <= 0:
        problems.append(f"train.lr={t.lr} must be > 0.")
    if t.optimizer not in OPTIMIZERS:
        problems.append(f"train.optimizer={t.optimizer!r} is not one of {list(OPTIMIZERS)}."
                        f"{did_you_mean(str(t.optimizer), OPTIMIZERS)}")
    if t.optimizer_in_backward and cfg.step.max_grad_norm is not None:
        problems.append(f"train.optimizer_in_backward=true cannot clip the global gradient norm "
                        f"(step.max_grad_norm={cfg.step.max_grad_norm}): each parameter steps before the others' "
                        "gradients exist; set step.max_grad_norm=null (Adafactor clips each update to RMS 1).")
    if cfg.step.chunked_lm_head and cfg.distributed.strategy == "fsdp":
        problems.append("step.chunked_lm_head=true with distributed.strategy=fsdp is not supported: the LM head "
                        "runs outside the model's forward, where FSDP keeps its parameters sharded; set "
                        "step.chunked_lm_head=false or distributed.strategy=ddp.")
    if t.optimizer == "adafactor" and cfg.distributed.strategy == "fsdp":
        problems.append("train.optimizer=adafactor with distributed.strategy=fsdp is not supported: transformers' "
                        "Adafactor keeps its factored moments as plain tensors, which FSDP's sharded (DTensor) "
                        "parameters refuse; use train.optimizer=adamw with fsdp, or distributed.strategy=ddp.")
    if t.max_staleness < 0:
        problems.append(f"train.max_staleness={t.max_staleness} must be >= 0.")
    if t.overlap and cfg.loss.tis_level is None:
        problems.append("train.overlap=true trains on rollouts one policy version old; set loss.tis_level=token "
                        "(or sequence) so they are importance-corrected, or train.overlap=false.")
    if t.overlap and t.max_staleness < 1:
        problems.append("train.overlap=true makes every rollout one version old; set train.max_staleness >= 1.")
    if cfg.resume and cfg.distributed.strategy == "fsdp":
        problems.append("resume=true with distributed.strategy=fsdp is not supported: the optimizer state is sharded "
                        "over the ranks and the checkpoint holds rank 0's shard only. Resume with "
                        "distributed.strategy=ddp (the model checkpoint is whole), or start a new run.")
    problems.extend(check_device(cfg.model.device, "model.device"))
    if p.kind not in POLICY_KINDS:
        problems.append(f"policy.kind={p.kind!r} is not one of {list(POLICY_KINDS)}.{did_you_mean(p.kind, POLICY_KINDS)}")
    if p.kind == "endpoints" and not p.base_urls:
        problems.append("policy.kind=endpoints needs policy.base_urls=[http://host:8000/v1,...] (the vLLM servers).")
    if p.kind == "embedded" and p.base_urls:
        problems.append(f"policy.base_urls={p.base_urls} is set but policy.kind=embedded serves the model in this "
                        "process; use policy=vllm (kind=endpoints) to point at servers.")
    ws = cfg.weight_sync.kind
    if ws not in WEIGHT_SYNC_KINDS:
        problems.append(f"weight_sync.kind={ws!r} is not one of {list(WEIGHT_SYNC_KINDS)}."
                        f"{did_you_mean(str(ws), WEIGHT_SYNC_KINDS)}")
    elif p.kind == "embedded" and ws not in ("inprocess", "none"):
        problems.append(f"weight_sync={ws} syncs to servers at policy.base_urls, but policy.kind=embedded runs in "
                        "this process; use weight_sync=inprocess.")
    elif p.kind == "endpoints" and ws == "inprocess":
        problems.append("weight_sync=inprocess needs policy=embedded; for vLLM endpoints use weight_sync=vllm_reload "
                        "(or vllm_nccl on GPUs), for embedded servers in other processes weight_sync=checkpoint.")
    if p.scheduler not in SCHEDULERS:
        problems.append(f"policy.scheduler={p.scheduler!r} is not one of {list(SCHEDULERS)}."
                        f"{did_you_mean(str(p.scheduler), SCHEDULERS)}")
    if p.token_mode not in ("auto", "completions", "chat"):
        problems.append(f"policy.token_mode={p.token_mode!r} is not one of ['auto', 'completions', 'chat']."
                        f"{did_you_mean(str(p.token_mode), ('auto', 'completions', 'chat'))}")
    if not (0 < p.temperature):
        problems.append(f"policy.temperature={p.temperature} must be > 0 (GRPO needs sampled rollouts).")
    if not isinstance(p.max_output_tokens, int) or p.max_output_tokens < 1:
        problems.append(f"policy.max_output_tokens={p.max_output_tokens!r} must be a positive integer.")
    e = cfg.eval
    if not isinstance(e.every, int) or e.every < 0:
        problems.append(f"eval.every={e.every!r} must be an integer >= 0 (0: only eval.at_start / eval.at_end).")
    for name in ("num_prompts", "samples"):
        if not isinstance(getattr(e, name), int) or getattr(e, name) < 1:
            problems.append(f"eval.{name}={getattr(e, name)!r} must be a positive integer.")
    if cfg.env.task == "reasoning_gym" and not cfg.env.data_path and not cfg.env.dataset:
        problems.append("env.task=reasoning_gym needs env.dataset=<a reasoning-gym dataset, e.g. chain_sum> (or a "
                        "mix: env.dataset=[{name:chain_sum,weight:1},{name:leg_counting,weight:2}]).")
    if cfg.env.dataset and cfg.env.task != "reasoning_gym":
        problems.append(f"env.dataset={cfg.env.dataset!r} is only read by env.task=reasoning_gym (env.task is "
                        f"{cfg.env.task!r}); use env=reasoning_gym, or drop env.dataset.")
    if cfg.env.task is None and not cfg.env.data_path:
        problems.append("env.task is null and env.data_path is unset: set one (env.task=capitals or "
                        "env.data_path=rows.jsonl).")
    problems += backend_problems(cfg.logging.backends)
    if not isinstance(cfg.logging.tracker_rollouts, int) or cfg.logging.tracker_rollouts < 0:
        problems.append(f"logging.tracker_rollouts={cfg.logging.tracker_rollouts!r} must be an integer >= 0.")
    if cfg.advantage_mode not in ("grpo", "dr_grpo", "rloo"):
        problems.append(f"advantage_mode={cfg.advantage_mode!r} is not one of ['grpo', 'dr_grpo', 'rloo'].")
    if problems:
        raise ConfigError(problems)
    return cfg


def check_overrides(overrides: Sequence[str], conf_dir: str | Path) -> None:
    """Check command-line overrides (``train.steps=3``, ``model=tiny``) against the schema and the config groups
    in ``conf_dir`` before Hydra composes them, so a typo gets "Did you mean" and the known keys (Hydra would
    answer an unknown key with a hint to append it with ``+``). Raises ConfigError listing every problem.

    Not checked: Hydra's own flags and keys (``--...``, ``hydra.*``), appends and deletes (``+key``, ``~key``) and
    keys under free-form mappings (``env.gym.*``)."""
    conf_dir = Path(conf_dir)
    groups = {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in conf_dir.iterdir() if d.is_dir()}
    problems: list[str] = []
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key.startswith(("+", "~")) or key == "hydra" or key.startswith("hydra."):
            continue
        key = key.split("@", 1)[0]
        if key in groups:
            if value not in groups[key] and value != "null":
                problems.append(f"{key}={value}: {value!r} is not a {key} config.{did_you_mean(value, groups[key])} "
                                f"Known: {groups[key]} (files in {conf_dir / key}).")
            continue
        cls: Any = GRPOConfig
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(cls):
                break  # a free-form mapping or a scalar: Hydra and parse_grpo_config check the rest
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                known = sorted(names | (set(groups) if depth == 0 else set()))
                where = ".".join(parts[:depth]) or "the top level"
                problems.append(f"{arg}: unknown key {'.'.join(parts[:depth + 1])!r}.{did_you_mean(part, known)} "
                                f"Known keys at {where}: {known}.")
                break
            cls = typing.get_type_hints(cls).get(part)
    if problems:
        raise ConfigError(problems)
