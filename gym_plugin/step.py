"""The one place that touches model and optimizer: the GRPO/PPO update of one rollout batch.

What a step computes, and what it leaves out (the gradient equals that of a plain full-logits computation):
- rows that cannot change the gradient are not run: rows without trained tokens and, when there is no KL term,
  rows whose advantage is 0 on every trained token (each of their loss terms is exactly 0, e.g. a group whose
  rewards are all equal). They still count in the normalization.
- the rows of a micro-batch are packed into their prefix tree (``gym_plugin.packing``): a group's prompt, and
  the system prompt every row starts with, are computed once, without padding; the LM head and the float32
  log-softmax run only at positions whose next token is trained (``gym_plugin.logprobs``). Why packing and not
  a shared-prefix KV-cache forward: packing is one forward through the model's own ``forward`` (DDP and FSDP
  see exactly one forward per backward), it needs no cache with gradients, and it shares any common prefix
  (the system prompt across groups, identical samples), not just the prompt of a group.

PPO-style reuse (TRL's ``num_iterations``, verl's ``ppo_epochs`` and mini-batches): ``num_iterations`` passes
over the batch, each as ``mini_batches`` optimizer steps. The old log-probs are computed once, before the first
update: the first mini-batch takes them from its own first forward (detached, no extra pass), the others from
one no-grad pass. With one pass and one mini-batch the ratio is exactly 1 and the clip never binds.

Optimizer in backward (``gym_plugin.optim.InBackwardOptimizer``): each parameter is stepped as soon as its
gradient is complete and the gradient freed, so the gradients never coexist (-517 MB for SmolLM2 fp32); this
needs one micro-batch per update, no global clipping and one rank (checked, ConfigError with the fix). The
reported ``perf/grad_norm`` is then the norm of the gradients the parameters were stepped with.

Normalization: each loss is normalized by its mini-batch's trained-token (and sequence) count summed over all
ranks, so the gradient is the same whatever the micro-batch size and the number of ranks (DDP and FSDP average
gradients over ranks, which the step undoes by scaling each loss by the world size).

No rank left behind: the ranks agree (one collective per step) on each mini-batch's global counts and on the
largest number of micro-batches any rank has; a rank with fewer runs zero-contribution micro-batches (a
two-token dummy whose loss is exactly 0), so every rank takes part in every DDP/FSDP collective, a rank with
nothing to train on included. Metrics are reduced over ranks: every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from gym_plugin import schema
from gym_plugin.errors import ConfigError, did_you_mean
from gym_plugin.logprobs import PACKING_MODES, compute_token_logprobs, resolve_packing
from gym_plugin.loss import LossConfig, policy_loss
from gym_plugin.optim import InBackwardOptimizer
from gym_plugin.process import RolloutBatch

__all__ = ["StepConfig", "StepProgress", "accumulate_gradients", "compute_token_logprobs", "grpo_step"]


@dataclasses.dataclass
class StepConfig:
    """Update settings (YAML keys of the recipe's ``step`` group = these field names)."""

    micro_batch_size: int = 8
    """Rows per forward/backward; gradients accumulate over the micro-batches of one update."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping (the norm is still reported)."""
    logprob_chunk_size: int = 512
    """Positions per float32 log-softmax block (bounds it to [chunk, V])."""
    packing: str = "auto"
    """``"prefix"``: pack each micro-batch into its prefix tree (shared prompts computed once, no padding);
    ``"none"``: padded rows; ``"auto"``: prefix for Hugging Face models with SDPA/eager attention, else none."""
    trim_padding: bool = True
    """Padded rows only (``packing=none``): cut each micro-batch to the columns its rows use."""
    chunked_lm_head: bool = False
    """Packed rows only: run the LM head here, ``logprob_chunk_size`` positions at a time, recomputed in backward,
    instead of taking the model's [U, V] logits (no [U, V] logits or logits gradient at once). Not with FSDP;
    checked against the model's own logits on every call."""
    compute_entropy: bool = True
    """Report the policy's mean token entropy (``loss/entropy``); costs one extra pass over the kept logits."""
    num_iterations: int = 1
    """Passes over each rollout batch (PPO epochs; TRL's num_iterations). > 1 makes the clip bind."""
    mini_batches: int = 1
    """Optimizer steps per pass: the batch's rows are split into this many mini-batches (verl's ppo mini-batches)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward instead of keeping its activations (Hugging Face models):
    about a third more compute for a fraction of the activation memory; pays off for long or many rows."""

    def check(self) -> list[str]:
        """Problems with the values (gym_plugin.schema: relative to ``step``)."""
        problems = []
        for name in ("micro_batch_size", "logprob_chunk_size", "num_iterations", "mini_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be a positive int.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(f"max_grad_norm={self.max_grad_norm} must be > 0 or None (no clipping).")
        if self.packing not in PACKING_MODES:
            problems.append(
                f"packing={self.packing!r} is not one of {list(PACKING_MODES)}."
                f"{did_you_mean(str(self.packing), PACKING_MODES)}"
            )
        return problems

    def validate(self) -> None:
        """Raise ConfigError listing every invalid field (``step.<field>``)."""
        schema.require(self, "step")


@dataclasses.dataclass
class StepProgress:
    """Where a ``grpo_step`` is, passed to ``on_progress`` once before the first micro-batch (nothing done yet)
    and after every micro-batch backward."""

    micro_batches_done: int
    """Micro-batches finished in this step (over all iterations and mini-batches)."""
    micro_batches_total: int
    """Micro-batches this step will run."""
    tokens_done: int
    """Trained tokens of this rank processed so far (counted once per iteration)."""
    elapsed_s: float
    """Seconds since the step started."""
    iteration: int
    """Current pass over the batch, 1-based."""
    num_iterations: int
    """Passes this step makes (``StepConfig.num_iterations``)."""

def _split_kwargs(overrides: dict[str, Any], step: StepConfig | None, loss: LossConfig | None) -> tuple[StepConfig, LossConfig]:
    step = dataclasses.replace(step) if step is not None else StepConfig()
    loss = dataclasses.replace(loss) if loss is not None else LossConfig()
    step_fields = {f.name for f in dataclasses.fields(StepConfig)}
    loss_fields = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = []
    for key, value in overrides.items():
        if key in step_fields:
            setattr(step, key, value)
        elif key in loss_fields:
            setattr(loss, key, value)
        else:
            unknown.append(
                f"{key!r} is neither a StepConfig nor a LossConfig field.{did_you_mean(key, step_fields | loss_fields)}"
            )
    if unknown:
        raise ConfigError(unknown)
    step.validate()
    loss.validate()
    return step, loss


def _world() -> tuple[int, torch.device]:
    """(world size, device for this step's collectives)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return dist.get_world_size(), device


def _all_gather(values: torch.Tensor) -> torch.Tensor:
    """[world, *values.shape] float64: every rank's ``values`` (just ``values[None]`` for one process)."""
    world, device = _world()
    values = values.to(torch.float64)
    if world == 1:
        return values[None]
    parts = [torch.empty_like(values, device=device) for _ in range(world)]
    dist.all_gather(parts, values.to(device))
    return torch.stack(parts).cpu()


def _all_reduce_dict(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over ranks (one collective; the keys are the same on every rank by construction)."""
    world, device = _world()
    if world == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist()))


@dataclasses.dataclass
class _Update:
    """One optimizer step's share of the batch on this rank, with the counts every rank agreed on."""

    rows: torch.Tensor
    """[R] this rank's trained rows of the mini-batch (normalization)."""
    micro: list[torch.Tensor]
    """This rank's micro-batches (row indices), only rows that can change the gradient."""
    tokens: float
    """Trained tokens of the mini-batch over all ranks."""
    seqs: float
    """Trained sequences of the mini-batch over all ranks."""
    num_micro: int
    """Most micro-batches any rank has for this mini-batch (ranks with fewer run zero-contribution ones)."""


@dataclasses.dataclass
class _Plan:
    updates: list[_Update]
    global_len: int
    """Padded length T, max over ranks (``token_sum_norm`` default)."""
    world: int
    skipped_rows: float
    """Trained rows not run (zero advantage, no KL), over all ranks."""


def _needs_gradient(batch: RolloutBatch, train_mask: torch.Tensor, kl: bool) -> torch.Tensor:
    """[B] bool: rows whose loss terms are not all exactly 0 (a trained token with a non-zero advantage, or KL)."""
    trained = train_mask.sum(dim=1) > 0  # [B]
    if kl:
        return trained
    adv = batch.advantages
    nonzero = (adv != 0) if adv.dim() == 1 else ((adv != 0) & (train_mask > 0)).any(dim=1)  # [B]
    return trained & nonzero.to(trained.device)


def _lexicographic(batch: RolloutBatch, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` sorted by their real tokens: rows sharing a prefix become neighbours (and share a pack)."""
    ids, real = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()
    keys = {int(r): ids[int(r)][real[int(r)]].tolist() for r in rows}
    return torch.tensor(sorted(keys, key=keys.__getitem__), dtype=torch.long)


def _plan(batch: RolloutBatch, step_cfg: StepConfig, loss_cfg: LossConfig) -> _Plan:
    """Split this rank's rows into mini-batches and micro-batches; agree on the counts with the other ranks."""
    train_mask = batch.train_mask()  # [B, T]
    row_tokens = train_mask.sum(dim=1).cpu()  # [B]
    trained = torch.nonzero(row_tokens > 0).squeeze(1)  # [B']
    needs = _needs_gradient(batch, train_mask, loss_cfg.kl_coef > 0).cpu()  # [B]
    order = _lexicographic(batch, trained)  # [B']
    parts = [torch.as_tensor(p, dtype=torch.long) for p in np.array_split(order.numpy(), step_cfg.mini_batches)]
    micro_of, local = [], []
    for part in parts:
        run = part[needs[part]]  # rows of the mini-batch that can change the gradient, still in prefix order
        micro = list(torch.split(run, step_cfg.micro_batch_size)) if run.numel() else []
        micro_of.append(micro)
        local.append([float(row_tokens[part].sum()), float(part.numel()), float(len(micro)),
                      float(part.numel() - run.numel())])
    stats = torch.tensor(local, dtype=torch.float64)  # [M, 4]
    length = torch.tensor([float(train_mask.shape[1])], dtype=torch.float64)
    gathered = _all_gather(torch.cat([stats.flatten(), length]))  # [world, 4M + 1]
    world = gathered.shape[0]
    per_rank = gathered[:, :-1].reshape(world, -1, 4)  # [world, M, 4]
    sums, maxima = per_rank.sum(dim=0), per_rank.max(dim=0).values  # [M, 4]
    updates = [
        _Update(rows=parts[m], micro=micro_of[m], tokens=float(sums[m, 0]), seqs=float(sums[m, 1]),
                num_micro=int(maxima[m, 2]))
        for m in range(len(parts))
    ]
    return _Plan(updates=updates, global_len=int(gathered[:, -1].max()), world=world,
                 skipped_rows=float(sums[:, 3].sum()))


@dataclasses.dataclass
class _Micro:
    """The tensors of one micro-batch, [mb, T] (a dummy has mb = 1, T = 2 and no trained token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    train_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logprobs: torch.Tensor
    retokenized: torch.Tensor
    positions: torch.Tensor
    """[mb, T] bool, the tokens whose log-probs are computed."""
    rows: torch.Tensor | None
    """Batch rows (None for a dummy)."""


def _micro(batch: RolloutBatch, rows: torch.Tensor, train_mask: torch.Tensor, device: torch.device) -> _Micro:
    mask = train_mask[rows].to(device)  # [mb, T]
    return _Micro(
        input_ids=batch.input_ids[rows].to(device), attention_mask=batch.attention_mask[rows].to(device),
        train_mask=mask, advantages=batch.advantages[rows].to(device),
        rollout_logprobs=batch.rollout_logprobs[rows].to(device), retokenized=batch.retokenized[rows].to(device),
        positions=mask > 0, rows=rows,
    )


def _dummy(batch: RolloutBatch, device: torch.device) -> _Micro:
    """Two tokens, one log-prob asked, nothing trained: a forward/backward whose gradient is exactly 0 and that
    still uses every parameter (DDP and FSDP collectives see the same calls on every rank)."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    adv = torch.zeros(1, device=device) if batch.advantages.dim() == 1 else torch.zeros(1, 2, device=device)
    return _Micro(
        input_ids=ids, attention_mask=torch.ones_like(ids), train_mask=torch.zeros(1, 2, device=device),
        advantages=adv, rollout_logprobs=torch.zeros(1, 2, device=device),
        retokenized=torch.zeros(1, dtype=torch.bool, device=device),
        positions=torch.tensor([[False, True]], device=device), rows=None,
    )


def _micro_logprobs(model, mb: _Micro, step_cfg: StepConfig, entropy: bool, stats: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    return compute_token_logprobs(
        model, mb.input_ids, mb.attention_mask, positions=mb.positions, chunk_size=step_cfg.logprob_chunk_size,
        compute_entropy=entropy, packing=step_cfg.packing, trim_padding=step_cfg.trim_padding,
        chunked_head=step_cfg.chunked_lm_head, stats=stats,
    )


@contextlib.contextmanager
def _grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Let DDP (``no_sync``) / FSDP2 (``set_requires_gradient_sync``) skip the gradient reduction unless
    ``enabled`` (only the last micro-batch of an update reduces)."""
    no_sync = getattr(model, "no_sync", None)
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if enabled or not (callable(no_sync) or callable(set_sync)):
        yield
    elif callable(no_sync):
        with no_sync():
            yield
    else:
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)


class _Accumulator:
    """Token-weighted sums of micro-batch metrics, reduced over ranks once at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def add_loss_metrics(self, metrics: dict[str, float], prefix: str = "") -> None:
        weight = metrics["loss/num_tokens"]
        self.add(f"{prefix}weight", weight)
        for key, value in metrics.items():
            if key != "loss/num_tokens":
                self.add(prefix + key, value * weight)


def _run_update(
    model: torch.nn.Module,
    batch: RolloutBatch,
    update: _Update,
    plan: _Plan,
    step_cfg: StepConfig,
    loss_cfg: LossConfig,
    *,
    ref_model: torch.nn.Module | None,
    old_full: torch.Tensor | None,
    record_old: torch.Tensor | None,
    acc: _Accumulator,
    iter_prefix: str,
    progress: Callable[[int], None],
) -> None:
    """Backward every micro-batch of ``update`` (plus dummies up to the agreed count) into ``.grad``."""
    device = next(model.parameters()).device
    train_mask = batch.train_mask()
    token_sum_norm = loss_cfg.token_sum_norm or plan.global_len
    loss_kwargs = {f.name: getattr(loss_cfg, f.name) for f in dataclasses.fields(LossConfig) if f.name != "token_sum_norm"}
    for j in range(update.num_micro):
        mb = _micro(batch, update.micro[j], train_mask, device) if j < len(update.micro) else _dummy(batch, device)
        stats: dict[str, float] = {}
        logprobs, entropy = _micro_logprobs(model, mb, step_cfg, step_cfg.compute_entropy, stats)  # [mb, T]
        if old_full is not None and mb.rows is not None:
            old = old_full[mb.rows.to(old_full.device)].to(device=device, dtype=logprobs.dtype)  # [mb, T]
        else:
            old = logprobs.detach()
        if record_old is not None and mb.rows is not None:
            record_old[mb.rows.to(record_old.device)] = logprobs.detach().to(record_old.dtype)
        ref = None
        if ref_model is not None and loss_cfg.kl_coef > 0:
            with torch.no_grad():
                ref, _ = _micro_logprobs(ref_model, mb, step_cfg, False, {})
        # Re-tokenized rows have no sampler log-probs: use the trainer's (TIS weight 1, no mismatch).
        rollout_lp = torch.where(mb.retokenized[:, None], old, mb.rollout_logprobs.to(logprobs.dtype))  # [mb, T]
        loss, metrics = policy_loss(
            logprobs, old, mb.advantages, mb.train_mask, rollout_logprobs=rollout_lp, ref_logprobs=ref,
            entropy=entropy, token_sum_norm=token_sum_norm, global_token_count=update.tokens,
            global_seq_count=update.seqs, **loss_kwargs,
        )
        # DDP/FSDP average gradients over ranks; the loss is already a share of the global sum: undo the mean.
        scaled = loss * plan.world if plan.world > 1 else loss
        with _grad_sync(model, enabled=j == update.num_micro - 1):
            scaled.backward()
        acc.add("loss_total", float(loss.detach()))
        acc.add("forward_tokens", stats.get("forward_tokens", 0.0))
        acc.add_loss_metrics(metrics)
        if iter_prefix:
            acc.add_loss_metrics({k: metrics[k] for k in ("loss/num_tokens", "loss/clip_frac", "loss/approx_kl",
                                                           "loss/ratio_mean")}, prefix=iter_prefix)
        progress(int(mb.train_mask.sum()))
    if update.num_micro == 0:
        # tokens to normalize by but nothing that moves the gradient (all advantages 0): the step is a zero
        # gradient, as the full computation would give (the optimizer still steps: momentum, weight decay)
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


def _old_logprobs(model, batch: RolloutBatch, plan: _Plan, step_cfg: StepConfig) -> torch.Tensor:
    """[B, T] log-probs before any update, for the rows of mini-batches 2.. (the first records its own)."""
    device = next(model.parameters()).device
    train_mask = batch.train_mask()
    old = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=device)
    with torch.no_grad():
        for update in plan.updates[1:]:
            for j in range(update.num_micro):
                if j < len(update.micro):
                    mb = _micro(batch, update.micro[j], train_mask, device)
                    lp, _ = _micro_logprobs(model, mb, step_cfg, False, {})
                    old[mb.rows.to(device)] = lp.to(old.dtype)
                else:  # keep FSDP's all-gathers in step with the other ranks
                    _micro_logprobs(model, _dummy(batch, device), step_cfg, False, {})
    return old


def _finish_metrics(acc: _Accumulator, plan: _Plan, num_iterations: int) -> dict[str, float]:
    """Reduce over ranks and turn the sums into token-weighted means."""
    total = _all_reduce_dict(acc.sums)
    weight = total.pop("weight", 0.0)
    metrics = {}
    iter_weights = {k[: -len("weight")]: total.pop(k) for k in list(total) if k.startswith("iter") and k.endswith("weight")}
    for key, value in total.items():
        if key.startswith("loss/"):
            metrics[key] = value / weight if weight > 0 else 0.0
        elif key.startswith("iter"):
            prefix, name = key.split("loss/", 1)
            w = iter_weights.get(prefix, 0.0)
            metrics[f"loss/{prefix.rstrip('/')}/{name}"] = value / w if w > 0 else 0.0
    updates = sum(1 for u in plan.updates if u.tokens > 0) * num_iterations
    metrics["loss/total"] = total.get("loss_total", 0.0) / max(updates, 1)  # mean over updates of the global loss
    metrics["perf/num_forward_tokens"] = total.get("forward_tokens", 0.0)
    return metrics


@contextlib.contextmanager
def _training_mode(model: torch.nn.Module, activation_checkpointing: bool) -> Iterator[None]:
    """Train mode (and, if asked, Hugging Face gradient checkpointing) for the step; the previous state after.
    Restoring matters when the model is shared with a sampler (the embedded policy generates in eval mode)."""
    from gym_plugin.weight_sync import unwrap_model

    inner = unwrap_model(model)
    was_training = model.training
    was_checkpointing = bool(getattr(inner, "is_gradient_checkpointing", False))
    if activation_checkpointing and not was_checkpointing:
        if not callable(getattr(inner, "gradient_checkpointing_enable", None)):
            raise ConfigError(f"step.activation_checkpointing=true needs a Hugging Face model "
                              f"(gradient_checkpointing_enable); {type(inner).__name__} has none. Set it to false.")
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        if activation_checkpointing and not was_checkpointing:
            inner.gradient_checkpointing_disable()


def accumulate_gradients(
    model: torch.nn.Module,
    batch: RolloutBatch,
    *,
    step_config: StepConfig | None = None,
    loss_config: LossConfig | None = None,
    ref_model: torch.nn.Module | None = None,
    old_logprobs: torch.Tensor | None = None,
    **overrides: Any,
) -> dict[str, float]:
    """Backward the policy loss of the whole ``batch`` (one update: ``mini_batches`` and ``num_iterations`` are
    not used) into ``model``'s ``.grad`` (added to what is there), micro-batch by micro-batch, normalized by
    the global counts. Returns ``loss/...`` and ``perf/...`` metrics, equal on every rank.

    ``old_logprobs`` [B, T] (aligned like ``batch.input_ids``) defaults to the current log-probs detached (ratio
    1). ``overrides`` are StepConfig/LossConfig fields by name.
    """
    step_cfg, loss_cfg = _split_kwargs(overrides, step_config, loss_config)
    step_cfg.mini_batches = 1
    _check_kl(loss_cfg, ref_model)
    resolve_packing(model, step_cfg.packing)
    plan = _plan(batch, step_cfg, loss_cfg)
    update = plan.updates[0]
    metrics: dict[str, float] = {"perf/num_trained_tokens": update.tokens, "perf/num_trained_seqs": update.seqs}
    if update.tokens == 0:
        metrics["perf/skipped"] = 1.0
        return metrics
    acc = _Accumulator()
    _run_update(model, batch, update, plan, step_cfg, loss_cfg, ref_model=ref_model, old_full=old_logprobs,
                record_old=None, acc=acc, iter_prefix="", progress=lambda tokens: None)
    metrics.update(_finish_metrics(acc, plan, 1))
    metrics["perf/num_micro_batches"] = float(update.num_micro)
    metrics["perf/num_skipped_rows"] = plan.skipped_rows
    return metrics


def _check_kl(loss_cfg: LossConfig, ref_model: torch.nn.Module | None) -> None:
    if loss_cfg.kl_coef > 0 and ref_model is None:
        raise ConfigError(f"loss.kl_coef={loss_cfg.kl_coef} needs a reference model: pass ref_model=... or set kl_coef=0.")


def _check_in_backward(plan: _Plan, step_cfg: StepConfig) -> None:
    """An InBackwardOptimizer steps each parameter as soon as its gradient is ready: nothing may need the whole
    gradient afterwards (global clipping), a second micro-batch (accumulation) or another rank (reduction)."""
    problems = []
    if step_cfg.max_grad_norm is not None:
        problems.append(f"step.max_grad_norm={step_cfg.max_grad_norm} clips the global gradient norm, which an "
                        "optimizer stepped in backward never sees whole; set step.max_grad_norm=null (Adafactor "
                        "clips each update to RMS 1) or train.optimizer_in_backward=false.")
    if plan.world > 1:
        problems.append(f"{plan.world} ranks: DDP/FSDP reduce gradients after the in-backward step would have used "
                        "them; set train.optimizer_in_backward=false for distributed runs.")
    many = [u for u in plan.updates if u.num_micro > 1]
    if many:
        rows = max(int(u.rows.numel()) for u in many)
        problems.append(f"an update of {rows} rows needs {max(u.num_micro for u in many)} micro-batches of "
                        f"step.micro_batch_size={step_cfg.micro_batch_size}, and in-backward stepping cannot "
                        f"accumulate gradients over them; set step.micro_batch_size>={rows} (or more "
                        "step.mini_batches) or train.optimizer_in_backward=false.")
    if problems:
        raise ConfigError(problems)


def _grad_norm_value(norm: torch.Tensor) -> float:
    full = getattr(norm, "full_tensor", None)  # FSDP2 returns a replicated DTensor
    return float(full() if callable(full) else norm)


def grpo_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    *,
    step_config: StepConfig | None = None,
    loss_config: LossConfig | None = None,
    ref_model: torch.nn.Module | None = None,
    old_logprobs: torch.Tensor | None = None,
    on_progress: Callable[[StepProgress], None] | None = None,
    **overrides: Any,
) -> dict[str, float]:
    """The policy update of one rollout batch: ``num_iterations`` x ``mini_batches`` optimizer steps, each =
    zero grads, accumulate over micro-batches, clip, ``optimizer.step()`` (see the module docstring).

    ``overrides`` are StepConfig/LossConfig fields by name (``micro_batch_size=2, clip_eps_high=0.28``).
    ``old_logprobs`` [B, T] replaces the computed old log-probs (e.g. a caller's own). ``on_progress`` is called
    after every micro-batch backward with a ``StepProgress``. The model's train/eval mode is restored at the end
    and its gradients are freed (``.grad`` is None after the step).

    Returns (equal on every rank): ``loss/...`` token-weighted over all updates (and ``loss/iter{i}/clip_frac``,
    ``approx_kl``, ``ratio_mean`` per pass when ``num_iterations`` > 1), ``perf/grad_norm`` (mean over updates,
    before clipping), ``perf/num_trained_tokens``, ``perf/num_forward_tokens`` (tokens the model ran on, all
    ranks, all passes), ``perf/num_skipped_rows``, ``perf/num_updates``, ``perf/step_time_s``,
    ``perf/tokens_per_s``. A batch without trained tokens makes no update (``perf/skipped`` = 1).
    """
    step_cfg, loss_cfg = _split_kwargs(overrides, step_config, loss_config)
    _check_kl(loss_cfg, ref_model)
    resolve_packing(model, step_cfg.packing)
    started = time.perf_counter()
    with _training_mode(model, step_cfg.activation_checkpointing):
        plan = _plan(batch, step_cfg, loss_cfg)
        tokens = sum(u.tokens for u in plan.updates)
        metrics: dict[str, float] = {"perf/num_trained_tokens": tokens,
                                     "perf/num_trained_seqs": sum(u.seqs for u in plan.updates)}
        if tokens == 0:
            metrics["perf/skipped"] = 1.0
            return metrics
        in_backward = isinstance(optimizer, InBackwardOptimizer)
        if in_backward:
            _check_in_backward(plan, step_cfg)
        n_iter = step_cfg.num_iterations
        reuse = n_iter > 1 or len(plan.updates) > 1
        old_full, record_old = old_logprobs, None
        t0 = time.perf_counter()
        if old_full is None and reuse:
            old_full = _old_logprobs(model, batch, plan, step_cfg)
            record_old = old_full  # the first mini-batch fills in its rows during its first forward
        old_time = time.perf_counter() - t0
        total_micro = n_iter * sum(u.num_micro for u in plan.updates)
        done = {"micro": 0, "tokens": 0, "iteration": 1}

        def progress(trained_tokens: int) -> None:
            done["micro"] += 1
            done["tokens"] += trained_tokens
            if on_progress is not None:
                on_progress(StepProgress(done["micro"], total_micro, done["tokens"], time.perf_counter() - started,
                                         done["iteration"], n_iter))

        if on_progress is not None:  # the total before the first (possibly long) micro-batch
            on_progress(StepProgress(0, total_micro, 0, time.perf_counter() - started, 1, n_iter))
        acc = _Accumulator()
        norms = []
        for it in range(n_iter):
            done["iteration"] = it + 1
            for m, update in enumerate(plan.updates):
                if update.tokens == 0:  # global: every rank skips it
                    continue
                optimizer.zero_grad(set_to_none=True)
                first = it == 0 and m == 0
                with optimizer.stepping() if in_backward else contextlib.nullcontext():
                    _run_update(
                        model, batch, update, plan, step_cfg, loss_cfg, ref_model=ref_model,
                        old_full=None if (first and old_logprobs is None) else old_full,
                        record_old=record_old if first else None, acc=acc,
                        iter_prefix=f"iter{it + 1}/" if n_iter > 1 else "", progress=progress,
                    )
                if in_backward:  # every parameter stepped during backward; its gradient is already freed
                    norms.append(optimizer.grad_norm())
                    continue
                params = [p for p in model.parameters() if p.grad is not None]
                max_norm = step_cfg.max_grad_norm if step_cfg.max_grad_norm is not None else math.inf
                norms.append(_grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))
                optimizer.step()
        # the gradients are spent: free them now rather than at the next step, so sampling between steps (the
        # embedded server) does not run with a model-sized block of dead gradients resident
        optimizer.zero_grad(set_to_none=True)
        metrics.update(_finish_metrics(acc, plan, n_iter))
    elapsed = time.perf_counter() - started
    metrics.update({
        "perf/grad_norm": sum(norms) / len(norms),
        "perf/num_updates": float(len(norms)),
        "perf/num_micro_batches": float(total_micro),
        "perf/num_skipped_rows": plan.skipped_rows,
        "perf/old_logprob_time_s": old_time,
        "perf/step_time_s": elapsed,
        "perf/tokens_per_s": float(batch.attention_mask.sum()) / max(elapsed, 1e-9),
    })
    return metrics
