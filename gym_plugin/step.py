"""The one place that touches model and optimizer: token log-probs and the GRPO update.

``compute_token_logprobs`` runs a causal LM and returns, at position ``t``, ``log p(input_ids[t] | input_ids[<t])``
(position 0 and positions after padding hold 0). It never holds the [B, T, V] log-softmax in float32 at once:
for Hugging Face causal LMs it runs the decoder, then the LM head chunk by chunk along T under activation
checkpointing, so only one [B, chunk, V] block of logits exists at a time, in the forward and in the backward.
Other modules (and HF models whose head scales or soft-caps logits) take the ``"logits"`` path: the model's own
logits, cast to float32 chunk by chunk, also checkpointed.

``grpo_step`` = zero grads, ``accumulate_gradients`` over micro-batches, clip, optimizer step. Every micro-batch
loss is normalized by the trained-token (and sequence) count of the whole batch summed over all ranks, so the
gradient is the same whatever the micro-batch size and the number of ranks (DDP averages gradients over ranks,
which the step undoes by scaling each loss by the world size).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from gym_plugin.errors import ConfigError, did_you_mean
from gym_plugin.loss import LossConfig, policy_loss
from gym_plugin.process import RolloutBatch

LOGPROB_PATHS = ("auto", "hidden", "logits")
# Config attributes of HF models whose logits are not just lm_head(hidden): such models need the logits path.
_LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


@dataclasses.dataclass
class StepConfig:
    """Update settings (YAML keys of the recipe's ``step`` group = these field names)."""

    micro_batch_size: int = 8
    """Rows per forward/backward; gradients accumulate over the micro-batches of one batch."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping (the norm is still reported)."""
    logprob_chunk_size: int = 512
    """Positions per chunk when computing log-probs (bounds the float32 logits block to [mb, chunk, V])."""
    trim_padding: bool = True
    """Cut each micro-batch to the columns its rows use (fewer FLOPs; the loss does not change)."""
    compute_entropy: bool = True
    """Report the policy's mean token entropy (``loss/entropy``); costs one extra pass over each logits chunk."""
    logprob_path: str = "auto"
    """``"hidden"`` (decoder + chunked LM head), ``"logits"`` (the model's logits) or ``"auto"`` (hidden when
    the model is an HF causal LM whose head does not transform logits)."""

    def validate(self) -> None:
        """Raise ConfigError listing every invalid field."""
        problems = []
        if not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1:
            problems.append(f"step.micro_batch_size={self.micro_batch_size!r} must be a positive int.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(f"step.max_grad_norm={self.max_grad_norm} must be > 0 or None (no clipping).")
        if not isinstance(self.logprob_chunk_size, int) or self.logprob_chunk_size < 1:
            problems.append(f"step.logprob_chunk_size={self.logprob_chunk_size!r} must be a positive int.")
        if self.logprob_path not in LOGPROB_PATHS:
            problems.append(
                f"step.logprob_path={self.logprob_path!r} is not one of {list(LOGPROB_PATHS)}."
                f"{did_you_mean(str(self.logprob_path), LOGPROB_PATHS)}"
            )
        if problems:
            raise ConfigError(problems)


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, lm_head) of an HF causal LM whose logits are exactly ``lm_head(hidden)``, else None."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, attr, None) not in (None, 1, 1.0) for attr in _LOGIT_TRANSFORM_ATTRS):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def _chunk_logprobs(
    x: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module | None, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` [B, C] from hidden states (``head`` given) or logits ``x`` [B, C, H or V]."""
    logits = head(x) if head is not None else x  # [B, C, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 (float64 stays float64)
    lse = torch.logsumexp(logits, dim=-1)  # [B, C]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, C]
    if want_entropy:
        with torch.no_grad():  # reported only; no gradient through the entropy
            probs = torch.exp(logits - lse.unsqueeze(-1))  # [B, C, V]
            entropy = lse - (probs * logits).sum(dim=-1)  # [B, C]
    else:
        entropy = torch.zeros_like(lse)
    return picked - lse, entropy


def compute_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    chunk_size: int = 512,
    compute_entropy: bool = False,
    logprob_path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of ``input_ids`` under ``model``.

    Args:
        model: a causal LM; called as ``model(input_ids=, attention_mask=[, position_ids=])`` returning
            ``.logits`` (or its decoder/LM head, see the module docstring).
        input_ids: [B, T] int64; left or right padded.
        attention_mask: [B, T] 1 on real tokens.
        chunk_size: positions per chunk of logits.
        compute_entropy: also return the per-position entropy of the predicting distribution.
        logprob_path: ``"auto"``, ``"hidden"`` or ``"logits"`` (see ``StepConfig.logprob_path``).

    Returns:
        logprobs [B, T] (``[:, t]`` = log p(input_ids[:, t] | <t); 0 at t = 0, on padding and on the first
        token after left padding, which has no real context) and entropy [B, T] of the distribution that
        predicted token t (same zeros), or None.
    """
    attention_mask = attention_mask.to(input_ids.device)
    # Positions count real tokens only, so that left padding does not shift the rotary positions.
    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # [B, T]
    split = _decoder_and_head(model) if logprob_path in ("auto", "hidden") else None
    if logprob_path == "hidden" and split is None:
        raise ConfigError(
            f"logprob_path='hidden' needs an HF causal LM with get_decoder()/get_output_embeddings() and no logit "
            f"scaling; {type(model).__name__} has none. Use logprob_path='auto' or 'logits'."
        )
    body, head = split if split is not None else (model, None)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts(body.forward, "position_ids"):
        kwargs["position_ids"] = position_ids
    out = body(**kwargs)
    if head is not None:
        x = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, T, H]
    else:
        x = out.logits if hasattr(out, "logits") else out  # [B, T, V]
    x = x[:, :-1]  # [B, T-1, *] position t predicts token t+1
    targets = input_ids[:, 1:]  # [B, T-1]
    use_checkpoint = torch.is_grad_enabled() and x.requires_grad
    lp_chunks, ent_chunks = [], []
    for start in range(0, x.shape[1], chunk_size):
        piece, tgt = x[:, start : start + chunk_size], targets[:, start : start + chunk_size]
        if use_checkpoint:  # recompute the chunk's logits in backward instead of keeping them all
            lp, ent = checkpoint(_chunk_logprobs, piece, tgt, head, compute_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(piece, tgt, head, compute_entropy)
        lp_chunks.append(lp)
        ent_chunks.append(ent)
    batch = input_ids.shape[0]
    zeros = torch.zeros(batch, 1, dtype=lp_chunks[0].dtype if lp_chunks else torch.float32, device=input_ids.device)
    logprobs = torch.cat([zeros] + lp_chunks, dim=1)  # [B, T]
    entropy = torch.cat([zeros] + ent_chunks, dim=1) if compute_entropy else None  # [B, T]
    real = attention_mask.bool()
    valid = torch.zeros_like(real)
    valid[:, 1:] = real[:, 1:] & real[:, :-1]  # [B, T] token and its predecessor are real
    # where, not multiply: a padded position may hold inf/nan, and nan * 0 is nan.
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    if entropy is not None:
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


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


def _global_counts(train_mask: torch.Tensor) -> tuple[float, float, int, int]:
    """(trained tokens, trained sequences, padded length T) summed / maxed over ranks, and the world size."""
    tokens = train_mask.sum(dtype=torch.float64)
    seqs = (train_mask.sum(dim=1) > 0).sum().to(torch.float64)
    length = torch.tensor(float(train_mask.shape[1]), dtype=torch.float64)
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        sums = torch.stack([tokens, seqs]).to(device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        length = length.to(device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        tokens, seqs = sums[0].cpu(), sums[1].cpu()
        length = length.cpu()
    return float(tokens), float(seqs), int(length), world


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
    """Backward the policy loss of ``batch`` into ``model``'s ``.grad`` (added to what is there), micro-batch by
    micro-batch, normalized by the global counts. Returns ``loss/...`` and ``perf/...`` metrics.

    ``old_logprobs`` [B, T] (aligned like ``batch.input_ids``) defaults to the current log-probs detached (one
    update per batch: ratio 1). ``overrides`` are StepConfig/LossConfig fields by name.
    """
    step_cfg, loss_cfg = _split_kwargs(overrides, step_config, loss_config)
    if loss_cfg.kl_coef > 0 and ref_model is None:
        raise ConfigError(f"loss.kl_coef={loss_cfg.kl_coef} needs a reference model: pass ref_model=... or set kl_coef=0.")
    device = next(model.parameters()).device
    train_mask = batch.train_mask()  # [B, T]
    global_tokens, global_seqs, global_len, world = _global_counts(train_mask)
    metrics: dict[str, float] = {"perf/num_trained_tokens": global_tokens, "perf/num_trained_seqs": global_seqs}
    if global_tokens == 0:
        metrics["perf/skipped"] = 1.0
        return metrics
    token_sum_norm = loss_cfg.token_sum_norm or global_len
    # Rows without trained tokens change nothing (their loss terms are 0): skip their forward entirely.
    rows = torch.nonzero(train_mask.sum(dim=1) > 0).squeeze(1)  # [B']
    chunks = list(torch.split(rows, step_cfg.micro_batch_size))
    loss_kwargs = {f.name: getattr(loss_cfg, f.name) for f in dataclasses.fields(LossConfig) if f.name != "token_sum_norm"}
    weighted: dict[str, float] = {}
    total_loss = 0.0
    for i, idx in enumerate(chunks):
        attn = batch.attention_mask[idx]  # [mb, T]
        cols = slice(None)
        if step_cfg.trim_padding:
            used = torch.nonzero(attn.sum(dim=0) > 0).squeeze(1)
            cols = slice(int(used[0]), int(used[-1]) + 1)
        ids = batch.input_ids[idx][:, cols].to(device)  # [mb, t]
        attn = attn[:, cols].to(device)
        mask = train_mask[idx][:, cols].to(device)
        logprobs, entropy = compute_token_logprobs(
            model, ids, attn, chunk_size=step_cfg.logprob_chunk_size,
            compute_entropy=step_cfg.compute_entropy, logprob_path=step_cfg.logprob_path,
        )
        old = old_logprobs[idx][:, cols].to(device) if old_logprobs is not None else logprobs.detach()
        ref = None
        if ref_model is not None and loss_cfg.kl_coef > 0:
            with torch.no_grad():
                ref, _ = compute_token_logprobs(ref_model, ids, attn, chunk_size=step_cfg.logprob_chunk_size)
        advantages = batch.advantages[idx]  # [mb] or [mb, T]
        if advantages.dim() == 2:
            advantages = advantages[:, cols]
        rollout_lp = batch.rollout_logprobs[idx][:, cols].to(device).to(logprobs.dtype)  # [mb, t]
        # Re-tokenized rows have no sampler log-probs: use the trainer's (TIS weight 1, no mismatch).
        rollout_lp = torch.where(batch.retokenized[idx].to(device)[:, None], old.to(logprobs.dtype), rollout_lp)
        loss, m = policy_loss(
            logprobs, old.to(logprobs.dtype), advantages.to(device), mask,
            rollout_logprobs=rollout_lp,
            ref_logprobs=ref, entropy=entropy, token_sum_norm=token_sum_norm,
            global_token_count=global_tokens, global_seq_count=global_seqs, **loss_kwargs,
        )
        # DDP averages gradients over ranks; the loss is already a share of the global sum, so undo the mean.
        scaled = loss * world if world > 1 else loss
        sync_off = getattr(model, "no_sync", None) if i < len(chunks) - 1 else None
        if callable(sync_off):
            with sync_off():
                scaled.backward()
        else:
            scaled.backward()
        total_loss += float(loss.detach())
        weight = m.pop("loss/num_tokens")
        for key, value in m.items():
            weighted[key] = weighted.get(key, 0.0) + value * weight
    local_tokens = float(train_mask.sum())
    metrics.update({key: value / local_tokens for key, value in weighted.items()})  # token-weighted means
    metrics["loss/total"] = total_loss
    metrics["perf/num_micro_batches"] = float(len(chunks))
    return metrics


def grpo_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    *,
    step_config: StepConfig | None = None,
    loss_config: LossConfig | None = None,
    ref_model: torch.nn.Module | None = None,
    old_logprobs: torch.Tensor | None = None,
    **overrides: Any,
) -> dict[str, float]:
    """One policy update on ``batch``: zero grads, accumulate over micro-batches, clip, ``optimizer.step()``.

    ``overrides`` are StepConfig/LossConfig fields by name (``micro_batch_size=2, clip_eps_high=0.28``).
    Returns ``loss/...`` metrics (token-weighted over the batch), ``perf/grad_norm`` (before clipping),
    ``perf/num_trained_tokens``, ``perf/step_time_s``, ``perf/tokens_per_s``. A batch without trained tokens
    makes no update (``perf/skipped`` = 1).
    """
    step_cfg, loss_cfg = _split_kwargs(overrides, step_config, loss_config)
    started = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(
        model, batch, step_config=step_cfg, loss_config=loss_cfg, ref_model=ref_model, old_logprobs=old_logprobs
    )
    if metrics.get("perf/skipped"):
        return metrics
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = step_cfg.max_grad_norm if step_cfg.max_grad_norm is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    elapsed = time.perf_counter() - started
    metrics["perf/grad_norm"] = float(grad_norm)
    metrics["perf/step_time_s"] = elapsed
    metrics["perf/tokens_per_s"] = float(batch.attention_mask.sum()) / max(elapsed, 1e-9)
    return metrics
