"""Fixtures for the tests against NeMo Gym 0.7.0 itself (marker ``nemo_gym``).

NeMo Gym runs from a venv of its own (``$GYM_PLUGIN_NEMO_GYM_VENV``, default ``<repo>/.ci-nemo-gym``; see
`gym_plugin.testing.nemo_gym_peer`); without it the tests skip, saying so. Its programs (``ng_run``,
``ng_collect_rollouts``, a ``run_examples`` driver) run as subprocesses, ours from this venv, every server on
127.0.0.1, the policy being the scripted task fake (`gym_plugin.testing.scripted_tasks`) in a process of its own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from gym_plugin.servers.resources.calculator import calculator_row
from gym_plugin.testing import nemo_gym_peer as peer
from gym_plugin.testing.scripted_tasks import (
    add_answer,
    add_row,
    calculator_uses_tools,
    weather_calls_tool,
    weather_row,
)

ROOT = peer.ROOT
VENV = peer.nemo_gym_venv()
OUR_ENV = peer.ours_env()
NG_ENV = peer.ng_env(VENV)
served_config = peer.served_config


@pytest.fixture(scope="module", autouse=True)
def nemo_gym_venv() -> Path:
    """Skips the module, saying why, when NeMo Gym 0.7.0's venv is not there (checked only when a test runs)."""
    reason = peer.nemo_gym_missing(VENV)
    if reason:
        print(f"skipping the NeMo Gym tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return VENV


# ---- rows and the rewards the scripted fake earns on them ---------------------------------------------------
def _b(i: int) -> int:
    return (i * i + 3) % 17


def our_rows() -> list[dict]:
    """200 rows for gym_plugin's servers: 70 exact match, 70 math, 60 calculator (multi-turn tool use)."""
    rows = [add_row(i, _b(i), "exact_match_agent") for i in range(70)]
    rows += [add_row(100 + i, _b(i + 5), "math_agent") for i in range(70)]
    rows += [calculator_row(i % 9 + 2, i % 7 + 3, i) for i in range(60)]
    return rows


def nemo_gym_rows() -> list[dict]:
    """200 rows for NeMo Gym's servers: 120 string_match (boxed) and 80 example_single_tool_call (weather)."""
    rows = [add_row(i, _b(i), "string_match_simple_agent", extraction_mode="boxed") for i in range(120)]
    rows += [weather_row(i, "example_single_tool_call_simple_agent") for i in range(80)]
    return rows


def expected_reward(row: dict) -> float:
    """The reward the scripted fake earns on a row (derived from its script's rules, not from a run)."""
    text = row["responses_create_params"]["input"][-1]["content"]
    calc = re.search(r"Compute \((-?\d+) \* (-?\d+)\) \+ (-?\d+)", text)
    if calc:  # right answer either way, but without the tools the calculator verifier gives 0
        return 1.0 if calculator_uses_tools(*(int(g) for g in calc.groups())) else 0.0
    if "tools" in row["responses_create_params"]:  # weather: reward iff get_weather was called
        return 1.0 if weather_calls_tool(text) else 0.0
    a, b = (int(g) for g in re.search(r"What is (-?\d+) \+ (-?\d+)\?", text).groups())
    return 1.0 if add_answer(a, b) == a + b else 0.0


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def model_call_items(record: dict) -> list[dict]:
    """Output items that end a model call (they carry the token fields)."""
    return [it for it in record["response"]["output"] if "prompt_token_ids" in it or "generation_token_ids" in it]


# ---- processes ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_endpoint(nemo_gym_venv, tmp_path_factory) -> Iterator[str]:
    """The scripted fake policy in its own process; yields its base_url."""
    proc, url = peer.start_fake(tmp_path_factory.mktemp("fake"))
    try:
        yield url
    finally:
        peer.stop(proc, 10)


@pytest.fixture(scope="module")
def gym_plugin_deployment(fake_endpoint, tmp_path_factory) -> Iterator[int]:
    """``gym-plugin serve`` with the exact-match, math and calculator environments; yields the head port."""
    configs = [str(ROOT / f"conf/gym/{name}.yaml") for name in ("exact_match", "math", "calculator")]
    proc, port = peer.start_gym_plugin(tmp_path_factory.mktemp("serve"), fake_endpoint, configs)
    try:
        yield port
    finally:
        peer.stop(proc, 20)


@pytest.fixture(scope="module")
def nemo_gym_deployment(fake_endpoint, tmp_path_factory) -> Iterator[int]:
    """NeMo Gym's own servers started by its ``ng_run`` (string_match, example_single_tool_call; see
    `gym_plugin.testing.nemo_gym_peer.start_ng_run`) against the fake; yields the head port."""
    proc, port = peer.start_ng_run(tmp_path_factory.mktemp("ng_run"), VENV, fake_endpoint)
    try:
        yield port
    finally:
        peer.stop(proc, 60)


def ng_collect_rollouts(head_port: int, rows: Path, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """NeMo Gym 0.7.0's collector CLI against a head server."""
    return subprocess.run(
        [str(VENV / "bin" / "ng_collect_rollouts"), f"+input_jsonl_fpath={rows}", f"+output_jsonl_fpath={out}",
         "+head_server.host=127.0.0.1", f"+head_server.port={head_port}"],
        cwd=out.parent, env=NG_ENV, capture_output=True, text=True, timeout=timeout)


def ng_aggregate_rollouts(head_port: int, rollouts: Path, out: Path, timeout: float = 300
                          ) -> subprocess.CompletedProcess:
    """NeMo Gym 0.7.0's ``ng_aggregate_rollouts`` on a rollouts file: /aggregate_metrics on the environment server
    each record names (``_ng_environment_server``), then its rollout health check on the records."""
    return subprocess.run(
        [str(VENV / "bin" / "ng_aggregate_rollouts"), f"+input_glob={rollouts}", f"+output_jsonl_fpath={out}",
         "+head_server.host=127.0.0.1", f"+head_server.port={head_port}"],
        cwd=out.parent, env=NG_ENV, capture_output=True, text=True, timeout=timeout)


def our_collect(head_port: int, rows: Path, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """gym_plugin's collector CLI against a head server (through its environment servers)."""
    return subprocess.run(
        [sys.executable, "-m", "gym_plugin.cli", "collect", "--head-url", f"http://127.0.0.1:{head_port}",
         "--input", str(rows), "--output", str(out), "--quiet", "--overwrite"],
        env=OUR_ENV, capture_output=True, text=True, timeout=timeout)
