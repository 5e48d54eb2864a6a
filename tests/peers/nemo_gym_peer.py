"""Fixtures for the tests against NeMo Gym 0.7.0 itself (marker ``nemo_gym``; see real-peers in the docs).

NeMo Gym lives in a venv of its own (it wants Python >= 3.13.14; its client and servers run on 3.11 when installed
with ``--ignore-requires-python``, as .ci/run does). Its location: ``$GYM_PLUGIN_NEMO_GYM_VENV``, default
``<repo>/.ci-nemo-gym``. Without it the tests skip, saying so. Its programs (``ng_run``, ``ng_collect_rollouts``,
a ``run_examples`` driver) run as subprocesses; ours run from this venv. Every server listens on 127.0.0.1.

The fake policy is `gym_plugin.testing.scripted_tasks` (our fake OpenAI-compatible endpoint with a script that
solves arithmetic, calculator and weather tasks, deterministically wrong on some rows), in a process of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from gym_plugin.servers.resources.calculator import calculator_row
from gym_plugin.testing.scripted_tasks import (
    add_answer,
    add_row,
    calculator_uses_tools,
    weather_calls_tool,
    weather_row,
)

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("GYM_PLUGIN_NEMO_GYM_VENV", ROOT / ".ci-nemo-gym")).absolute()
OUR_ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
# NeMo Gym's processes: its own venv only, and Ray on the loopback address (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# makes Ray use 127.0.0.1 instead of the machine's address).
NG_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
NG_ENV.update({"PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
SERVER_DIRS = ("responses_api_models/vllm_model", "responses_api_agents/simple_agent",
               "environment_servers/legacy_agent", "resources_servers/string_match",
               "resources_servers/example_single_tool_call")
"""NeMo Gym server folders ng_run starts here; each gets our NeMo Gym venv as its venv."""


def nemo_gym_missing() -> str | None:
    """Why the NeMo Gym tests cannot run here, or None."""
    if not (VENV / "bin" / "ng_collect_rollouts").exists():
        return (f"NeMo Gym 0.7.0 venv not found at {VENV} (set GYM_PLUGIN_NEMO_GYM_VENV, or run the '(NeMo Gym)' "
                "install section of .ci/run)")
    probe = subprocess.run([str(VENV / "bin" / "python"), "-c", "import nemo_gym, importlib.metadata as m; "
                            "print(m.version('nemo-gym'))"], env=NG_ENV, capture_output=True, text=True)
    if probe.returncode != 0:
        return f"NeMo Gym in {VENV} does not import: {probe.stderr.strip()[-300:]}"
    if probe.stdout.strip() != "0.7.0":
        return f"NeMo Gym in {VENV} is {probe.stdout.strip()}, these tests are for 0.7.0"
    return None


@pytest.fixture(scope="module", autouse=True)
def nemo_gym_venv() -> Path:
    """Skips the module, saying why, when NeMo Gym 0.7.0's venv is not there (checked only when a test runs)."""
    reason = nemo_gym_missing()
    if reason:
        print(f"skipping the NeMo Gym tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return VENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http(url: str, proc: subprocess.Popen, deadline: float, log: Path | None = None) -> None:
    """Until ``url`` answers anything (an HTTP error status counts), the process dies, or time is up."""
    while True:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process {proc.args[:3]} exited ({proc.returncode}) before {url} answered\n{tail}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log and log.exists() else ""
                raise RuntimeError(f"{url} did not answer in time\n{tail}") from None
            time.sleep(0.5)


def stop_group(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop a process started with start_new_session=True, everything in its process group, and its descendants
    that left the group (Ray's worker processes start sessions of their own), each by its pid."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (the leader may be gone already)
    except ProcessLookupError:
        pass
    proc.wait(10)
    _gone, alive = psutil.wait_procs(descendants, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def served_config(head_port: int) -> dict:
    """A head server's config (NeMo Gym's wire form: a JSON string of YAML, or our equivalent)."""
    import yaml

    text = http_json(f"http://127.0.0.1:{head_port}/global_config_dict_yaml")
    return yaml.safe_load(text) if isinstance(text, str) else text


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
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "fake.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gym_plugin.testing.scripted_tasks", "--port", str(port)],
                                env=OUR_ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, time.monotonic() + 60, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_group(proc, 10)


@pytest.fixture(scope="module")
def gym_plugin_deployment(fake_endpoint, tmp_path_factory) -> Iterator[int]:
    """``gym-plugin serve`` with the exact-match, math and calculator environments; yields the head port."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "gym_plugin.cli", "serve", "--config", str(ROOT / "conf/gym/exact_match.yaml"),
           "--config", str(ROOT / "conf/gym/math.yaml"), "--config", str(ROOT / "conf/gym/calculator.yaml"),
           f"policy_base_url={fake_endpoint}", f"head_server.port={port}"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=OUR_ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/global_config_dict_yaml", proc, time.monotonic() + 90, log)
        yield port
    finally:
        stop_group(proc, 20)


@pytest.fixture(scope="module")
def nemo_gym_deployment(fake_endpoint, tmp_path_factory) -> Iterator[int]:
    """NeMo Gym's own servers started by its ``ng_run``: string_match and example_single_tool_call, each behind
    NeMo Gym's simple_agent and legacy_agent environment server, its vllm_model policy server (token ids on)
    pointed at the fake; yields the head port. Each server's venv is our NeMo Gym venv (``uv_venv_dir`` with
    ``skip_venv_if_present``: ng_run then installs nothing)."""
    work = tmp_path_factory.mktemp("ng_run")
    venvs = work / "venvs"
    for d in SERVER_DIRS:
        (venvs / d).mkdir(parents=True)
        (venvs / d / ".venv").symlink_to(VENV)
    (VENV / ".nemo-gym-setup-complete").touch()  # what NeMo Gym's setup leaves in a ready venv
    port = free_port()
    (work / "env.yaml").write_text(json.dumps({
        "policy_base_url": fake_endpoint, "policy_api_key": "dummy_key", "policy_model_name": "fake-model",
        "skip_venv_if_present": True, "uv_venv_dir": str(venvs), "head_server": {"host": "127.0.0.1", "port": port},
    }))
    configs = [str(work / "env.yaml"), "responses_api_models/vllm_model/configs/vllm_model.yaml",
               "resources_servers/string_match/configs/string_match.yaml",
               "resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml"]
    log = work / "ng_run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(VENV / "bin" / "ng_run"), f"+config_paths=[{','.join(configs)}]",
             "+policy_model.responses_api_models.vllm_model.return_token_id_information=true"],
            cwd=work, env=NG_ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        wait_http(f"http://127.0.0.1:{port}/global_config_dict_yaml", proc, deadline, log)
        config = served_config(port)
        for name, section in config.items():
            if not isinstance(section, dict):
                continue
            for impls in section.values():
                for params in impls.values() if isinstance(impls, dict) else ():
                    if isinstance(params, dict) and params.get("port") and name != "head_server":
                        wait_http(f"http://127.0.0.1:{params['port']}/", proc, deadline, log)
        yield port
    finally:
        stop_group(proc, 60)


def ng_collect_rollouts(head_port: int, rows: Path, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """NeMo Gym 0.7.0's collector CLI against a head server."""
    return subprocess.run(
        [str(VENV / "bin" / "ng_collect_rollouts"), f"+input_jsonl_fpath={rows}", f"+output_jsonl_fpath={out}",
         "+head_server.host=127.0.0.1", f"+head_server.port={head_port}"],
        cwd=out.parent, env=NG_ENV, capture_output=True, text=True, timeout=timeout)


def our_collect(head_port: int, rows: Path, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """gym_plugin's collector CLI against a head server (through its environment servers)."""
    return subprocess.run(
        [sys.executable, "-m", "gym_plugin.cli", "collect", "--head-url", f"http://127.0.0.1:{head_port}",
         "--input", str(rows), "--output", str(out), "--quiet", "--overwrite"],
        env=OUR_ENV, capture_output=True, text=True, timeout=timeout)
