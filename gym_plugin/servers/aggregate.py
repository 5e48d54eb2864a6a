"""``POST /aggregate_metrics``: NeMo Gym 0.7.0's run summary, served by our agents and resource servers.

After the rows, NeMo Gym's collector posts ``{"verify_responses": [record, ...]}`` (records without ``response``
other than ``response.usage`` / ``response.incomplete_details``) to the environment server of each agent, which
forwards it to the agent, and writes the reply to ``<output>_aggregate_metrics.json``. A 404 there makes
``ng_collect_rollouts`` exit 1. The reply (NeMo Gym's ``AggregateMetrics``):

- ``agent_metrics``: ``mean/ max/ min/ median/ std/<field>`` over every scored rollout, for every numeric field of
  a record (top-level keys not starting with ``_``, bools as 0/1, plus the numbers in ``response.usage``), and
  ``num_repeats`` (distinct ``_ng_rollout_index``); std is the sample std (n - 1), 0 when every group has one row;
- ``key_metrics``: the ``mean/*`` entries;
- ``group_level_metrics``: the same statistics per task (``_ng_task_index``), with ``num_rollouts``,
  ``expected_num_rollouts``, ``missing_num_rollouts``, ``reward_profile_completion_pct`` and ``rollout_infos``;
- ``repeat_level_metrics`` (only with more than one rollout index): per rollout index ``sample_count``,
  ``missing_count`` and ``mean/ median/ std/ sem/ min/ max/ p25/ p75/<field>``, summarised across repeats in
  ``agent_metrics`` as ``mean_across_repeats/ median_across_repeats/ std_across_repeats/ min_across_repeats/
  max_across_repeats/ se_across_repeats/mean/<field>``.

With more than one value, per-repeat entries and across-repeat summaries also carry a 95 % Student-t interval
(``ci_low_95/`` / ``ci_high_95/``, ``ci_low_95_across_repeats/`` / ``ci_high_95_across_repeats/``).
Rows with a true ``mask_sample`` are left out of the quality statistics and counted in ``coverage/*`` keys (also
in ``key_metrics``), as NeMo Gym does. Not computed: W&B histograms (NeMo Gym drops them from the reply too) and
the ``perf_summary`` of NeMo Gym's observability records (our servers write none). The values agree with NeMo Gym's
``compute_aggregate_metrics`` on the same records (tests/peers/test_nemo_gym_client.py checks it).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from gym_plugin.errors import ProtocolError, truncate
from gym_plugin.protocol import MASK_SAMPLE_KEY, ROLLOUT_INDEX_KEY, TASK_INDEX_KEY
_STATS = ("mean", "max", "min", "median", "std")


def _numeric_fields(record: Mapping[str, Any]) -> dict[str, float]:
    """Numbers of one record that NeMo Gym's reward profiler counts (usage numbers override same-named keys)."""
    usage = (record.get("response") or {}).get("usage") if isinstance(record.get("response"), Mapping) else None
    merged = dict(record)
    if isinstance(usage, Mapping):
        merged.update(usage)
    out = {}
    for key, value in merged.items():
        if key.startswith("_") or key in ("response", MASK_SAMPLE_KEY):
            continue
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def _describe(x: np.ndarray, columns: Sequence[str], fill_std: bool) -> dict[str, float]:
    """mean/max/min/median/std of each column of ``x`` [rows, columns] (NaN = absent), NaN results dropped.
    ``fill_std``: a std that is NaN in every column becomes 0 where the column has no gap (pandas describe rule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: their NaN results are dropped below
        present = np.sum(~np.isnan(x), axis=0)  # [columns]
        stats = {
            "mean": np.nanmean(x, axis=0),
            "max": np.nanmax(x, axis=0),
            "min": np.nanmin(x, axis=0),
            "median": np.nanmedian(x, axis=0),
            "std": np.where(present > 1, np.nanstd(x, axis=0, ddof=1) if x.shape[0] > 1 else np.nan, np.nan),
        }
    if fill_std and np.isnan(stats["std"]).all():
        stats["std"] = np.where(present == x.shape[0], 0.0, np.nan)
    out = {}
    for stat in _STATS:
        for col, value in zip(columns, stats[stat]):
            if not np.isnan(value):
                out[f"{stat}/{col}"] = float(value)
    return out


def _sample_stats(values: np.ndarray) -> tuple[float, float]:
    """(sample std with n - 1, 0 for one value; standard error)."""
    n = len(values)
    std = float(np.std(values, ddof=1)) if n > 1 else 0.0
    return std, std / n ** 0.5


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile for p in (0.5, 1): the t with P(T <= t) = p (bisection on the CDF, ~1e-12 absolute).
    E.g. t_quantile(0.975, 1) = 12.7062..., t_quantile(0.975, 4) = 2.7764..."""
    def cdf(t: float) -> float:
        return 1.0 - 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _ci95(mean: float, se: float, n: int) -> tuple[float, float] | None:
    """95 % Student-t interval mean +- t(0.975, n - 1) * se; None for one value."""
    if n <= 1:
        return None
    half = t_quantile(0.975, n - 1) * se
    return mean - half, mean + half


def _coverage(all_records: list, scored: list, masked: list) -> dict[str, int]:
    if not masked:
        return {}
    tasks_all = {r.get(TASK_INDEX_KEY, 0) for r in all_records}
    tasks_measured = {r.get(TASK_INDEX_KEY, 0) for r in scored}
    return {"coverage/measured_rollouts": len(scored), "coverage/masked_rollouts": len(masked),
            "coverage/measured_tasks": len(tasks_measured), "coverage/fully_masked_tasks": len(tasks_all - tasks_measured)}


def aggregate_metrics(body: Any) -> dict:
    """The ``/aggregate_metrics`` reply for a request body ``{"verify_responses": [...]}`` (see module doc)."""
    records = body.get("verify_responses") if isinstance(body, Mapping) else None
    if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
        raise ProtocolError(f"/aggregate_metrics expects {{'verify_responses': [record objects]}}, got "
                            f"{truncate(body, 200)}")
    empty: dict = {"group_level_metrics": [], "agent_metrics": {}, "key_metrics": {}, "repeat_level_metrics": []}
    if not records:
        return empty
    scored = [r for r in records if not r.get(MASK_SAMPLE_KEY)]
    masked = [r for r in records if r.get(MASK_SAMPLE_KEY)]
    coverage = _coverage(records, scored, masked)
    if not scored:
        return {**empty, "agent_metrics": dict(coverage), "key_metrics": dict(coverage)}

    fields = [_numeric_fields(r) for r in scored]
    columns = list(dict.fromkeys(k for f in fields for k in f))
    x = np.full((len(scored), len(columns)), np.nan)  # [rollouts, columns]
    col_of = {c: j for j, c in enumerate(columns)}
    for i, f in enumerate(fields):
        for k, v in f.items():
            x[i, col_of[k]] = v
    tasks = np.array([r.get(TASK_INDEX_KEY, 0) for r in scored])  # [rollouts]
    repeats = np.array([r.get(ROLLOUT_INDEX_KEY, 0) for r in scored])  # [rollouts]

    groups = []
    for task in sorted(set(tasks.tolist())):
        rows = np.flatnonzero(tasks == task)
        infos = sorted((_rollout_info(scored[i]) for i in rows), key=lambda d: d[ROLLOUT_INDEX_KEY])
        group = _describe(x[rows], columns, fill_std=True)
        group.update({"num_rollouts": len(rows), "expected_num_rollouts": len(rows), "missing_num_rollouts": 0,
                      "reward_profile_completion_pct": 100.0, "rollout_infos": infos, TASK_INDEX_KEY: task})
        groups.append(group)

    agent = _describe(x, columns, fill_std=True)
    agent.update(coverage)
    agent["num_repeats"] = len({r.get(ROLLOUT_INDEX_KEY, 0) for r in records})
    repeat_level = _repeat_level(x, columns, tasks, repeats)
    agent.update(_across_repeats(repeat_level))
    key = {k: v for k, v in agent.items() if k.startswith("mean/")}
    key.update(coverage)
    return {"group_level_metrics": groups, "agent_metrics": agent, "key_metrics": key,
            "repeat_level_metrics": repeat_level}


def _rollout_info(record: Mapping[str, Any]) -> dict:
    """One rollout's entry of ``rollout_infos``: its ids, reward and numbers (types kept, bools as 0/1)."""
    t, r = record.get(TASK_INDEX_KEY, 0), record.get(ROLLOUT_INDEX_KEY, 0)
    info: dict[str, Any] = {"rollout_id": f"{t}:{r}", TASK_INDEX_KEY: t, ROLLOUT_INDEX_KEY: r}
    if "reward" in record:
        info["reward"] = record.get("reward")
    usage = record.get("response", {}).get("usage") if isinstance(record.get("response"), Mapping) else None
    pairs = [*(usage.items() if isinstance(usage, Mapping) else ()),
             *((k, v) for k, v in record.items() if not k.startswith("_") and k not in ("reward", "response", MASK_SAMPLE_KEY))]
    for k, v in pairs:
        if isinstance(v, bool):
            info[k] = int(v)
        elif isinstance(v, (int, float)):
            info[k] = v
    return info


def _repeat_level(x: np.ndarray, columns: list[str], tasks: np.ndarray, repeats: np.ndarray) -> list[dict]:
    """Per rollout index (only when there are several): sample/missing counts and statistics of each column."""
    indices = sorted(set(repeats.tolist()))
    if len(indices) < 2:
        return []
    total_tasks = len(set(tasks.tolist()))
    out = []
    for r in indices:
        rows = repeats == r
        entry: dict[str, Any] = {ROLLOUT_INDEX_KEY: r, "sample_count": len(set(tasks[rows].tolist())),
                                 "missing_count": total_tasks - len(set(tasks[rows].tolist()))}
        for j, col in enumerate(columns):
            values = x[rows, j]
            values = values[~np.isnan(values)]
            if not len(values):
                continue
            std, sem = _sample_stats(values)
            mean = float(values.mean())
            entry.update({f"mean/{col}": mean, f"median/{col}": float(np.median(values)),
                          f"std/{col}": std, f"sem/{col}": sem, f"min/{col}": float(values.min()),
                          f"max/{col}": float(values.max()), f"p25/{col}": float(np.quantile(values, 0.25)),
                          f"p75/{col}": float(np.quantile(values, 0.75))})
            ci = _ci95(mean, sem, len(values))
            if ci is not None:
                entry[f"ci_low_95/{col}"], entry[f"ci_high_95/{col}"] = ci
        out.append(entry)
    return out


def _across_repeats(repeat_level: list[dict]) -> dict[str, float]:
    """Each per-repeat ``mean/<field>`` summarised across the repeats (one observation per repeat)."""
    out: dict[str, float] = {}
    if not repeat_level:
        return out
    names = list(dict.fromkeys(k for e in repeat_level for k in e if k.startswith("mean/")))
    for name in names:
        values = np.array([e[name] for e in repeat_level if name in e], dtype=float)
        std, se = _sample_stats(values)
        ci = _ci95(float(values.mean()), se, len(values))
        if ci is not None:
            out[f"ci_low_95_across_repeats/{name}"], out[f"ci_high_95_across_repeats/{name}"] = ci
        out.update({f"mean_across_repeats/{name}": float(values.mean()),
                    f"median_across_repeats/{name}": float(np.median(values)),
                    f"std_across_repeats/{name}": std, f"min_across_repeats/{name}": float(values.min()),
                    f"max_across_repeats/{name}": float(values.max()), f"se_across_repeats/{name}": se})
    return out
