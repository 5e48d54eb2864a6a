"""NeMo Gym 0.7.0's own client drives ``gym-plugin serve``: ``ng_collect_rollouts`` (exit 0, its rollout health
check, its aggregate metrics from our /aggregate_metrics) and ``RolloutCollectionHelper.run_examples``, on exact
match, math, the multi-turn calculator tool task and reasoning-gym rows (resources_servers / reasoning_gym)."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest

from tests.peers.nemo_gym_peer import (
    NG_ENV,
    ROOT,
    VENV,
    expected_reward,
    model_call_items,
    ng_aggregate_rollouts,
    ng_collect_rollouts,
    our_collect,
    our_rows,
    read_jsonl,
    write_jsonl,
)
from tests.peers.nemo_gym_peer import fake_endpoint, gym_plugin_deployment, nemo_gym_venv  # noqa: F401 (fixtures)
from gym_plugin.testing.nemo_gym_peer import start_gym_plugin, stop

pytestmark = [pytest.mark.nemo_gym, pytest.mark.timeout(900)]

HERE = Path(__file__).resolve().parent
ENV_SERVER = {"exact_match_agent": "exact_match_environment_server", "math_agent": "math_environment_server",
              "calculator_agent": "calculator_environment_server"}


@pytest.fixture(scope="module")
def ng_run(gym_plugin_deployment, tmp_path_factory):
    """One ``ng_collect_rollouts`` over the 200 rows against our servers: (rows, process, output path)."""
    work = tmp_path_factory.mktemp("ng_collect")
    rows = our_rows()
    out = work / "rollouts.jsonl"
    proc = ng_collect_rollouts(gym_plugin_deployment, write_jsonl(work / "rows.jsonl", rows), out)
    return rows, proc, out


def test_ng_collect_rollouts_exits_0_with_reward_and_token_ids_on_every_row(ng_run):
    rows, proc, out = ng_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = {r["_ng_task_index"]: r for r in read_jsonl(out)}
    assert sorted(records) == list(range(200))
    assert not out.with_name("rollouts_failures.jsonl").exists() or not out.with_name(
        "rollouts_failures.jsonl").read_text().strip()
    for i, row in enumerate(rows):
        record = records[i]
        assert record["reward"] == expected_reward(row), (i, row, record.get("extracted_answer"))
        calls = model_call_items(record)
        assert calls, f"row {i}: no output item carries token ids"
        for item in calls:
            assert item["prompt_token_ids"] and len(item["generation_token_ids"]) == len(
                item["generation_log_probs"]) > 0
        agent = row["agent_ref"]["name"]
        assert record["agent_ref"] == {"name": agent}
        # NeMo Gym's collector routed the row through the environment server entry our head server serves.
        assert (record["_ng_environment_server"], record["_ng_result_type"]) == (ENV_SERVER[agent], "legacy_agent")
        if agent == "calculator_agent" and record["reward"] == 1.0:
            assert len(calls) == 3 and record["tools_used"] == ["multiply", "add"]  # multiply, add, answer
            # multi-turn token continuity: each call's prompt starts with the previous prompt + generation
            for prev, nxt in zip(calls, calls[1:]):
                seen = prev["prompt_token_ids"] + prev["generation_token_ids"]
                assert nxt["prompt_token_ids"][: len(seen)] == seen


def test_nemo_gym_health_check_reports_no_unhealthy_rollout(ng_run):
    _rows, proc, out = ng_run
    assert proc.returncode == 0
    summary = json.loads(out.with_name("quality_summary.json").read_text())
    assert summary["run"]["artifacts"]["records"] == 200
    assert summary["run"]["verdicts"]["unhealthy"] == 0, summary["run"]["issues"]
    assert "Rollout health: 200 checked" in proc.stdout and ", 0 unhealthy," in proc.stdout


def test_aggregate_metrics_come_from_our_servers_and_equal_nemo_gyms(ng_run, tmp_path):
    rows, proc, out = ng_run
    assert proc.returncode == 0
    served = {m["_ng_environment_server"]: m for m in json.loads(out.with_name("rollouts_aggregate_metrics.json").read_text())}
    want = defaultdict(list)
    for row in rows:
        want[ENV_SERVER[row["agent_ref"]["name"]]].append(expected_reward(row))
    assert {k: m["key_metrics"]["mean/reward"] for k, m in served.items()} == pytest.approx(
        {k: sum(v) / len(v) for k, v in want.items()})
    # NeMo Gym's own compute_aggregate_metrics over the same records gives what our /aggregate_metrics gave.
    theirs_path = tmp_path / "theirs.json"
    run = subprocess.run([str(VENV / "bin" / "python"), str(HERE / "nemo_gym_aggregate.py"), str(out), str(theirs_path)],
                         env=NG_ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(theirs_path.read_text())
    assert sorted(theirs) == sorted(served)
    for name, metrics in theirs.items():
        ours = served[name]
        assert ours["key_metrics"] == pytest.approx(metrics["key_metrics"])
        assert ours["agent_metrics"] == pytest.approx(metrics["agent_metrics"])
        groups = [{k: v for k, v in g.items() if k != "sample"} for g in metrics["group_level_metrics"]]
        assert_close(ours["group_level_metrics"], groups)


def assert_close(a, b, where: str = "") -> None:
    """Equal structure, floats equal to 1e-9 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9), where
    else:
        assert a == b, where


def test_run_examples_against_our_servers(gym_plugin_deployment, tmp_path):
    rows = our_rows()[::5]  # 40 rows, every kind
    out = tmp_path / "run_examples.jsonl"
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), str(HERE / "nemo_gym_run_examples.py"), "127.0.0.1", str(gym_plugin_deployment),
         str(write_jsonl(tmp_path / "rows.jsonl", rows)), str(out)],
        env=NG_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pairs = read_jsonl(out)
    assert len(pairs) == len(rows)
    got = sorted((json.dumps(p["row"]["responses_create_params"]), p["result"]["reward"]) for p in pairs)
    assert got == sorted((json.dumps(r["responses_create_params"]), expected_reward(r)) for r in rows)
    assert all(model_call_items(p["result"]) for p in pairs)


def test_our_collector_gives_nemo_gyms_rewards_on_our_servers(ng_run, gym_plugin_deployment, tmp_path):
    rows, proc, out = ng_run
    assert proc.returncode == 0
    ours_path = tmp_path / "ours.jsonl"
    ours = our_collect(gym_plugin_deployment, write_jsonl(tmp_path / "rows.jsonl", rows), ours_path)
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = {r["_ng_task_index"]: r for r in read_jsonl(out)}
    mine = {r["_ng_task_index"]: r for r in read_jsonl(ours_path)}
    assert sorted(mine) == sorted(theirs)
    for i in theirs:
        assert mine[i]["reward"] == theirs[i]["reward"], i
        for key in ("agent_ref", "_ng_environment_server", "_ng_result_type"):
            assert mine[i][key] == theirs[i][key], (i, key)
    # NeMo Gym's ng_aggregate_rollouts reads our collector's records (through our /aggregate_metrics) as its own.
    (tmp_path / "agg").mkdir()
    agg = ng_aggregate_rollouts(gym_plugin_deployment, ours_path, tmp_path / "agg" / "rollouts.jsonl")
    assert agg.returncode == 0, agg.stdout[-3000:] + agg.stderr[-3000:]
    metrics = json.loads((tmp_path / "agg" / "rollouts_aggregate_metrics.json").read_text())
    served = json.loads(out.with_name("rollouts_aggregate_metrics.json").read_text())
    assert {m["_ng_environment_server"]: m["key_metrics"] for m in metrics} == {
        m["_ng_environment_server"]: m["key_metrics"] for m in served}


# ---- reasoning-gym: NeMo Gym's ng_collect_rollouts drives our reasoning_gym resource server ---------------------
def reasoning_rows() -> list[dict]:
    """40 chain_sum rows of two 1-2 digit terms (reasoning-gym 0.1.25, seed 0): half 'A + B', half 'A - B'."""
    from gym_plugin.reasoning_tasks import generate_rows

    return generate_rows("chain_sum", dataset_config={"min_terms": 2, "max_terms": 2, "max_digits": 2}, size=40)


def reasoning_expected(row: dict) -> tuple[float, str | None]:
    """(reward, extracted answer) the scripted fake earns: on 'A + B' it answers <answer>add_answer(A, B)</answer>
    and the reward is chain_sum's own score_answer of that; on 'A - B' it says 'OK': 0, no answer."""
    import reasoning_gym

    from gym_plugin.testing.scripted_tasks import add_answer

    entry = row["reasoning_gym"]["entry"]
    a, op, b = entry["metadata"]["expression"].split()
    if op != "+":
        return 0.0, None
    answer = str(add_answer(int(a), int(b)))
    return reasoning_gym.create_dataset("chain_sum").score_answer(answer, entry), answer


@pytest.fixture(scope="module")
def reasoning_deployment(fake_endpoint, tmp_path_factory) -> Iterator[int]:
    """``gym-plugin serve`` with conf/gym/reasoning_gym.yaml (our venv: reasoning-gym is ours, not NeMo Gym's)."""
    pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed: pip install -e '.[reasoning]'")
    proc, port = start_gym_plugin(tmp_path_factory.mktemp("serve_reasoning"), fake_endpoint,
                                  [str(ROOT / "conf/gym/reasoning_gym.yaml")])
    try:
        yield port
    finally:
        stop(proc, 20)


def test_ng_collect_rollouts_drives_the_reasoning_gym_server(reasoning_deployment, tmp_path):
    rows = reasoning_rows()
    out = tmp_path / "rollouts.jsonl"
    proc = ng_collect_rollouts(reasoning_deployment, write_jsonl(tmp_path / "rows.jsonl", rows), out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = {r["_ng_task_index"]: r for r in read_jsonl(out)}
    assert sorted(records) == list(range(len(rows)))
    outcomes = []
    for i, row in enumerate(rows):
        reward, answer = reasoning_expected(row)
        record = records[i]
        assert (record["reward"], record["extracted_answer"]) == (pytest.approx(reward), answer), (i, row["expected_answer"])
        assert (record["score_reason"] is None) == (answer is not None)
        assert record["_ng_environment_server"] == "reasoning_gym_environment_server"
        assert model_call_items(record)
        outcomes.append((reward, answer))
    assert any(r == 1.0 for r, _ in outcomes)  # right sums
    assert any(a is not None and r < 1.0 for r, a in outcomes)  # wrong sums (add_answer's rule)
    assert any(a is None for _, a in outcomes)  # 'A - B' rows: no answer markup, 0 with the reason
