"""The reward-curve PNG of a run (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from gym_plugin.errors import ConfigError


def plot_reward_curve(rows: Sequence[Mapping[str, Any]], out_path: str | Path, title: str = "GRPO reward",
                      eval_rows: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Plot ``rollout/reward_mean`` per step (with a +-std band when ``rollout/reward_std`` is logged) and
    ``rollout/accuracy`` when present, from metrics.jsonl rows; ``eval_rows`` (eval.jsonl rows: ``step`` +
    ``eval/reward_mean``, the same fixed prompts each time) are drawn as separate square markers. Writes
    ``out_path`` and returns it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("Plotting the reward curve needs matplotlib: pip install 'gym_plugin[plot]' "
                          "(or set logging.plot=false).") from None
    points = [r for r in rows if r.get("rollout/reward_mean") is not None]
    steps = [r["step"] for r in points]
    mean = [r["rollout/reward_mean"] for r in points]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, mean, marker="o", label="reward mean")
    if points and all(r.get("rollout/reward_std") is not None for r in points):
        std = [r["rollout/reward_std"] for r in points]
        # Clipped to the rewards seen at that step: for 0/1 rewards mean +- std would leave [0, 1].
        low = [max(m - s, r.get("rollout/reward_min", -float("inf"))) for m, s, r in zip(mean, std, points)]
        high = [min(m + s, r.get("rollout/reward_max", float("inf"))) for m, s, r in zip(mean, std, points)]
        ax.fill_between(steps, low, high, alpha=0.2, label="+-1 std (within the rewards seen)")
    acc = [(r["step"], r["rollout/accuracy"]) for r in points if r.get("rollout/accuracy") is not None]
    # With 0/1 rewards accuracy equals the reward mean at every step: a second line would only hide the first.
    if acc and any(abs(r["rollout/accuracy"] - r["rollout/reward_mean"]) > 1e-9
                   for r in points if r.get("rollout/accuracy") is not None):
        ax.plot([s for s, _ in acc], [a for _, a in acc], marker=".", linestyle="--", label="accuracy")
    evals = [(r["step"], r["eval/reward_mean"]) for r in eval_rows if r.get("eval/reward_mean") is not None]
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], marker="s", linestyle=":", color="black",
                label="eval reward (fixed prompts)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
