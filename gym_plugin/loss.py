"""The policy loss: PPO/GRPO clipped ratio with DAPO clip-higher, dual clip, KL to a reference model and
truncated importance sampling against the sampler's log-probs; three aggregations.

Per token (``A`` the advantage, ``r = exp(logp - old_logp)`` the ratio):

    pg   = max(-A * r, -A * clip(r, 1 - clip_eps_low, 1 + clip_eps_high))
    pg   = min(pg, -A * dual_clip_c)                    where A < 0, if dual_clip_c (Ye et al. 2020)
    pg   = pg * min(exp(old_logp - rollout_logp), cap)  if tis_level (Yao et al. 2025; weight detached)
    loss = pg + kl_coef * kl(logp, ref_logp)            k1 = logp - ref;  k3 = exp(ref - logp) - (ref - logp) - 1

``old_logp`` is the trainer's log-prob before the update (equal to ``logp`` detached when there is one update
per batch, so the ratio is 1); ``rollout_logp`` is what the sampler (vLLM, the embedded server) reported. The
two differ by numerics, which is what TIS corrects.

Aggregations over the trained tokens ``m`` (``loss_mask * sample_mask``):
- ``"token-mean"``: ``sum(loss * m) / N`` with ``N`` trained tokens (DAPO; long answers weigh more).
- ``"seq-mean-token-mean"``: mean over sequences of each sequence's token mean (the GRPO paper).
- ``"seq-mean-token-sum-norm"``: ``sum(loss * m) / (S * token_sum_norm)`` with ``S`` sequences and a constant
  length ``token_sum_norm`` (Dr. GRPO: no length bias).
When ``global_token_count`` / ``global_seq_count`` are given, ``N`` / ``S`` are those (the whole batch over
every micro-batch and rank), so summing the micro-batch losses gives exactly the full-batch loss.
"""

from __future__ import annotations

import dataclasses

import torch

from gym_plugin import schema
from gym_plugin.errors import ConfigError, did_you_mean

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k3")
TIS_LEVELS = ("token", "sequence")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps a wild ratio finite; clipping makes its exact value irrelevant


@dataclasses.dataclass
class LossConfig:
    """Policy-loss settings (YAML keys of the recipe's ``loss`` group = these field names)."""

    clip_eps_low: float = 0.2
    """Lower clip range: the ratio is clipped at ``1 - clip_eps_low``."""
    clip_eps_high: float = 0.2
    """Upper clip range: ``1 + clip_eps_high``; DAPO's clip-higher uses 0.28."""
    dual_clip_c: float | None = None
    """Dual-clip bound (> 1, typically 3) on the loss of negative-advantage tokens; None disables it."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference model; 0 disables it (and needs no reference model)."""
    kl_type: str = "k3"
    """KL estimator: ``"k1"`` (log ratio) or ``"k3"`` (Schulman's unbiased, non-negative estimator)."""
    tis_level: str | None = None
    """Truncated importance sampling against the sampler's log-probs: ``"token"``, ``"sequence"`` or None."""
    tis_cap: float = 2.0
    """Upper bound of the TIS weight."""
    aggregation: str = "token-mean"
    """``"token-mean"``, ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum-norm"``."""
    token_sum_norm: int | None = None
    """Constant length for ``"seq-mean-token-sum-norm"``; None = the batch's padded length ``T``."""

    def check(self) -> list[str]:
        """Problems with the values (gym_plugin.schema: relative to ``loss``)."""
        problems = []
        if self.aggregation not in AGGREGATIONS:
            problems.append(
                f"aggregation={self.aggregation!r} is not one of {list(AGGREGATIONS)}."
                f"{did_you_mean(str(self.aggregation), AGGREGATIONS)}"
            )
        if self.kl_type not in KL_TYPES:
            problems.append(f"kl_type={self.kl_type!r} is not one of {list(KL_TYPES)}.")
        if self.tis_level is not None and self.tis_level not in TIS_LEVELS:
            problems.append(f"tis_level={self.tis_level!r} is not one of {list(TIS_LEVELS)} or None.")
        if not 0 <= self.clip_eps_low < 1:
            problems.append(f"clip_eps_low={self.clip_eps_low} must be in [0, 1) (the ratio floor is 1 - it).")
        if self.clip_eps_high < 0:
            problems.append(f"clip_eps_high={self.clip_eps_high} must be >= 0.")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            problems.append(f"dual_clip_c={self.dual_clip_c} must be > 1 (typically 3) or None.")
        if self.kl_coef < 0:
            problems.append(f"kl_coef={self.kl_coef} must be >= 0.")
        if self.tis_cap <= 0:
            problems.append(f"tis_cap={self.tis_cap} must be > 0.")
        if self.token_sum_norm is not None and self.token_sum_norm < 1:
            problems.append(f"token_sum_norm={self.token_sum_norm} must be a positive int or None.")
        return problems

    def validate(self) -> None:
        """Raise ConfigError listing every invalid field (``loss.<field>``)."""
        schema.require(self, "loss")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || ref) estimate from samples of the policy. [B, T] -> [B, T]."""
    log_ratio = ref_logprobs - logprobs  # [B, T] log(ref / policy)
    if kl_type == "k1":
        return -log_ratio
    if kl_type == "k3":
        log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ConfigError(f"kl_type={kl_type!r} is not one of {list(KL_TYPES)}.")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    tis_level: str | None = None,
    tis_cap: float = 2.0,
    aggregation: str = "token-mean",
    token_sum_norm: int | None = None,
    global_token_count: float | None = None,
    global_seq_count: float | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of a (micro-)batch.

    Args:
        logprobs: [B, T] log-probs of the taken tokens under the policy being trained (with grad).
        old_logprobs: [B, T] the same before this update (no grad).
        advantages: [B] per sequence or [B, T] per token.
        loss_mask: [B, T] 1 on tokens to train on (already multiplied by the per-sample mask).
        rollout_logprobs: [B, T] the sampler's log-probs; needed for ``tis_level`` and for mismatch metrics.
        ref_logprobs: [B, T] the reference model's log-probs; needed when ``kl_coef`` > 0.
        entropy: [B, T] per-token policy entropy, only reported (``loss/entropy``).
        Others: see ``LossConfig``; ``global_token_count`` / ``global_seq_count`` replace the local counts
        in the normalization (see the module docstring).

    Returns:
        The scalar loss (this micro-batch's share when global counts are given) and ``loss/...`` metrics
        (token means over ``loss_mask`` of this call; ``loss/num_tokens`` is the local token count to
        weight them when combining micro-batches).
    """
    LossConfig(
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c, kl_coef=kl_coef,
        kl_type=kl_type, tis_level=tis_level, tis_cap=tis_cap, aggregation=aggregation, token_sum_norm=token_sum_norm,
    ).validate()
    if tis_level is not None and rollout_logprobs is None:
        raise ConfigError(f"tis_level={tis_level!r} needs rollout_logprobs (the sampler's log-probs); pass them or set tis_level=None.")
    if kl_coef > 0 and ref_logprobs is None:
        raise ConfigError(f"kl_coef={kl_coef} needs ref_logprobs from a reference model; pass them (grpo_step: ref_model=...) or set kl_coef=0.")

    mask = loss_mask.to(logprobs.dtype)  # [B, T]
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    adv = adv.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    pg_unclipped = -adv * ratio  # [B, T]
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # [B, T]
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [B, T] pessimistic bound
    clipped = (pg_clipped > pg_unclipped).to(mask.dtype)  # [B, T] the clip is what the gradient sees (0 grad)
    dual_clipped = torch.zeros_like(mask)
    if dual_clip_c is not None:
        bound = -adv * dual_clip_c  # [B, T] (positive where A < 0)
        negative = (adv < 0).expand_as(pg)
        dual_clipped = (negative & (pg > bound)).to(mask.dtype)
        pg = torch.where(negative, torch.minimum(pg, bound), pg)

    metrics: dict[str, float] = {}
    if rollout_logprobs is not None:
        with torch.no_grad():
            train_vs_rollout = (old_logprobs - rollout_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)  # [B, T]
            metrics["loss/rollout_logprob_abs_diff"] = _masked_mean(train_vs_rollout.abs(), mask)
            # k3 estimate of KL(rollout || train) from the sampler's samples: r - 1 - log r, r = train/rollout
            metrics["loss/rollout_kl"] = _masked_mean(torch.exp(train_vs_rollout) - 1.0 - train_vs_rollout, mask)
    if tis_level is not None:
        with torch.no_grad():
            if tis_level == "token":
                raw_weight = torch.exp(train_vs_rollout)  # [B, T]
            else:
                seq_log_w = (train_vs_rollout * mask).sum(dim=1, keepdim=True).clamp(max=_MAX_LOG_RATIO)  # [B, 1]
                raw_weight = torch.exp(seq_log_w).expand_as(pg)  # [B, T]
            weight = raw_weight.clamp(max=tis_cap)
        pg = pg * weight
        metrics["loss/tis_weight_mean"] = _masked_mean(weight, mask)
        metrics["loss/tis_capped_frac"] = _masked_mean((raw_weight > tis_cap).to(mask.dtype), mask)

    per_token = pg  # [B, T]
    if kl_coef > 0:
        kl = kl_penalty(logprobs, ref_logprobs, kl_type)  # [B, T]
        per_token = per_token + kl_coef * kl
        metrics["loss/kl"] = _masked_mean(kl.detach(), mask)

    tokens_per_seq = mask.sum(dim=1)  # [B]
    local_tokens = tokens_per_seq.sum()
    if aggregation == "token-mean":
        denom = global_token_count if global_token_count is not None else local_tokens.clamp(min=1.0)
        loss = (per_token * mask).sum() / denom
    else:
        seqs = global_seq_count if global_seq_count is not None else (tokens_per_seq > 0).sum().clamp(min=1)
        if aggregation == "seq-mean-token-mean":
            seq_means = (per_token * mask).sum(dim=1) / tokens_per_seq.clamp(min=1.0)  # [B]
            loss = seq_means.sum() / seqs
        else:  # seq-mean-token-sum-norm
            norm = token_sum_norm if token_sum_norm is not None else mask.shape[1]
            loss = (per_token * mask).sum() / (seqs * norm)

    with torch.no_grad():
        metrics.update({
            "loss/num_tokens": float(local_tokens),
            "loss/policy": _masked_mean(pg.detach(), mask),
            "loss/clip_frac": _masked_mean(clipped, mask),
            "loss/clip_frac_low": _masked_mean((clipped.bool() & (adv < 0)).to(mask.dtype), mask),
            "loss/clip_frac_high": _masked_mean((clipped.bool() & (adv > 0)).to(mask.dtype), mask),
            # k3 estimate of KL(old || new) from the old policy's samples: r - 1 - log r
            "loss/approx_kl": _masked_mean(ratio.detach() - 1.0 - log_ratio.detach(), mask),
            "loss/ratio_mean": _masked_mean(ratio.detach(), mask),
        })
        if dual_clip_c is not None:
            metrics["loss/dual_clip_frac"] = _masked_mean(dual_clipped, mask)
        if entropy is not None:
            metrics["loss/entropy"] = _masked_mean(entropy.detach().to(mask.dtype), mask)
    return loss, metrics
