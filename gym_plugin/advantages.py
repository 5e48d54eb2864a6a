"""Group-relative advantages: each rollout is scored against the other rollouts of the same prompt.

Modes (``r`` a reward, ``g`` its group of ``n`` valid members with mean ``m`` and std ``s``):
- ``"grpo"`` (DeepSeekMath): ``(r - m) / (s + eps)`` with the unbiased std (n - 1), as TRL and verl do.
- ``"dr_grpo"`` (Dr. GRPO, Liu et al. 2025): ``r - m``; no std division, which biases towards easy/hard groups.
- ``"rloo"`` (leave-one-out, Ahmadian et al. 2024): ``r - (sum_g - r) / (n - 1)`` = ``n / (n - 1) * (r - m)``.

A group with one valid member has no baseline: its advantage is 0 in every mode. Invalid members (``valid``
False, e.g. failed rollouts kept for bookkeeping) neither count in their group's statistics nor get an
advantage (0). Everything is vectorized with ``index_add_`` / ``scatter_reduce`` over compacted group ids.
"""

from __future__ import annotations

import torch

from gym_plugin.errors import ConfigError, did_you_mean

ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo")


def _check(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None, mode: str) -> None:
    if mode not in ADVANTAGE_MODES:
        raise ConfigError(f"advantage mode {mode!r} is not one of {list(ADVANTAGE_MODES)}.{did_you_mean(mode, ADVANTAGE_MODES)}")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape or (valid is not None and valid.shape != rewards.shape):
        raise ConfigError(
            f"compute_advantages needs 1-D rewards, group_ids and valid of the same length; got shapes "
            f"{tuple(rewards.shape)}, {tuple(group_ids.shape)}, {None if valid is None else tuple(valid.shape)}."
        )


def zero_variance_members(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B] bool: True for valid members of groups whose valid rewards are all equal (no learning signal)."""
    valid_b = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    _, inv = torch.unique(group_ids, return_inverse=True)  # [B] in 0..G-1
    num_groups = int(inv.max().item()) + 1 if inv.numel() else 0
    r = rewards.to(torch.float64)
    big = torch.finfo(torch.float64).max
    high = torch.full((num_groups,), -big, dtype=torch.float64).scatter_reduce(
        0, inv, torch.where(valid_b, r, torch.full_like(r, -big)), reduce="amax"
    )  # [G]
    low = torch.full((num_groups,), big, dtype=torch.float64).scatter_reduce(
        0, inv, torch.where(valid_b, r, torch.full_like(r, big)), reduce="amin"
    )  # [G]
    return valid_b & (high[inv] == low[inv])


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    mode: str = "grpo",
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group-relative advantages.

    Args:
        rewards: [B] float rewards.
        group_ids: [B] int group of each rollout (any values; equal = same prompt).
        mode: ``"grpo"``, ``"dr_grpo"`` or ``"rloo"`` (see the module docstring).
        eps: added to the std in ``"grpo"``.
        valid: [B] bool, members that count (default all).

    Returns:
        advantages [B] (float32; 0 for invalid members and single-member groups) and ``advantage/...``
        metrics: number of groups, zero-variance groups and their fraction, advantage mean/std/abs-max.
    """
    _check(rewards, group_ids, valid, mode)
    valid_b = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.to(torch.bool)  # [B]
    _, inv = torch.unique(group_ids, return_inverse=True)  # [B]
    num_groups = int(inv.max().item()) + 1 if inv.numel() else 0
    w = valid_b.to(torch.float64)  # [B]
    r = rewards.to(torch.float64) * w  # [B] invalid rewards zeroed so they cannot leak into sums
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inv, w)  # [G]
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inv, r)  # [G]
    mean = total / count.clamp(min=1.0)  # [G]
    centered = (r - mean[inv]) * w  # [B]
    # Two-pass variance (sum of squared deviations) instead of E[x^2] - E[x]^2, which cancels badly.
    sq_dev = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inv, centered * centered)  # [G]
    n = count[inv]  # [B] valid members of each row's group
    has_baseline = valid_b & (n > 1)  # [B]
    if mode == "grpo":
        std = torch.sqrt(sq_dev / (count - 1.0).clamp(min=1.0))  # [G] unbiased
        adv = centered / (std[inv] + eps)
    elif mode == "dr_grpo":
        adv = centered
    else:  # rloo
        adv = r - (total[inv] - r) / (n - 1.0).clamp(min=1.0)
    adv = torch.where(has_baseline, adv, torch.zeros_like(adv)).to(torch.float32)  # [B]

    zero_var = zero_variance_members(rewards, group_ids, valid_b)  # [B]
    group_has_valid = count > 0  # [G]
    zero_var_groups = torch.zeros(num_groups, dtype=torch.bool)
    zero_var_groups[inv[zero_var]] = True
    num_valid_groups = int(group_has_valid.sum().item())
    picked = adv[valid_b]
    metrics = {
        "advantage/num_groups": float(num_valid_groups),
        "advantage/num_zero_variance_groups": float(zero_var_groups.sum().item()),
        "advantage/zero_variance_frac": float(zero_var_groups.sum().item()) / max(num_valid_groups, 1),
        "advantage/mean": float(picked.mean().item()) if picked.numel() else 0.0,
        "advantage/std": float(picked.std(unbiased=False).item()) if picked.numel() else 0.0,
        "advantage/abs_max": float(picked.abs().max().item()) if picked.numel() else 0.0,
    }
    return adv, metrics
