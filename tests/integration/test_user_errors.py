"""Mistakes a newcomer makes, through the real commands: each one prints one block that names the thing, the value
and the fix, exits non-zero, shows no traceback (unless asked for) and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gym_plugin import GymIntegration
from gym_plugin.testing.fake_openai import Behaviour, FakeOpenAIServer

from tests.integration.test_seed_api import EXACT, fake_endpoint, sum_row

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
for _name in ("GYM_PLUGIN_DEBUG", "HYDRA_FULL_ERROR"):
    ENV.pop(_name, None)
RECIPE = [sys.executable, str(ROOT / "recipes/grpo.py")]
CLI = [sys.executable, "-m", "gym_plugin.cli"]
TINY = ["model=tiny", "env=letters", "train.steps=1", "train.prompts_per_step=2", "train.group_size=2"]


def run(cmd: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def assert_one_block(proc: subprocess.CompletedProcess, *patterns: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "GYM_PLUGIN_DEBUG=1" in out  # how to see the traceback
    for pattern in patterns:
        assert re.search(pattern, out), (pattern, out[-3000:])
    return out


def test_recipe_override_typo_gets_did_you_mean_before_hydra(tmp_path):
    started = time.monotonic()
    proc = run(RECIPE + ["train.step=3", f"run_dir={tmp_path / 'run'}"])
    out = assert_one_block(proc, r"train\.step=3: unknown key 'train\.step'\. Did you mean 'steps'\?",
                           r"Known keys at train: \[.*'steps'")
    assert "+train.step" not in out  # Hydra's append hint never shows
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - started < 60  # checked before any model loads


def test_recipe_config_error_is_one_block_and_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(RECIPE + TINY + ["policy.kind=endpont", f"run_dir={run_dir}"])
    assert_one_block(proc, r"ConfigError: 1 problem\(s\)", r"policy\.kind='endpont' is not one of "
                     r"\['embedded', 'endpoints'\]\. Did you mean 'endpoints'\?")
    assert not run_dir.exists()  # Hydra had created it (and .hydra/ in it): removed again


def test_recipe_unreachable_endpoint_names_the_url_and_leaves_no_run_dir(tmp_path):
    run_dir, port = tmp_path / "run", closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = run(RECIPE + TINY + ["policy=vllm", f"policy.base_urls=[{url}]", "weight_sync=none", f"run_dir={run_dir}"])
    out = assert_one_block(proc, rf"EndpointUnreachableError: policy endpoint {re.escape(url)} .* is unreachable",
                           r"Start your OpenAI-compatible server")
    assert "removed" in out and not run_dir.exists()


def test_optimizer_in_backward_under_torchrun_is_refused_before_loading(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
           f"--master_port={closed_port()}", str(ROOT / "recipes/grpo.py"), *TINY, "train.optimizer_in_backward=true",
           "step.max_grad_norm=null", f"run_dir={run_dir}"]
    proc = run(cmd)
    out = proc.stdout + proc.stderr
    # torchrun itself ends with its own ChildFailedError traceback; the ranks print none
    assert proc.returncode != 0 and "ChildFailedError" in out and "exitcode  : 2" in out, out[-3000:]
    traceback = out[out.find("Traceback"):] if "Traceback" in out else ""
    assert 'grpo.py", line' not in traceback and "/gym_plugin/" not in traceback, out[-3000:]
    # each rank prints the block (torchrun shows both ranks' output)
    assert out.count("train.optimizer_in_backward=true with 2 ranks") == 2, out[-3000:]
    assert "set train.optimizer_in_backward=false" in out
    assert not run_dir.exists()


def test_recipe_traceback_when_asked_for(tmp_path):
    proc = run(RECIPE + TINY + ["policy.kind=endpont", f"run_dir={tmp_path / 'run'}"],
               env={**ENV, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_existing_run_dir_is_never_removed(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    proc = run(RECIPE + TINY + ["policy.kind=endpont", f"run_dir={run_dir}"])
    assert proc.returncode == 2 and (run_dir / "notes.txt").read_text() == "keep me"


def test_embedded_on_a_busy_port_fails_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        proc = run(CLI + ["embedded", "--model", "tiny", "--port", str(port)], timeout=60)
        elapsed = time.monotonic() - started
    out = assert_one_block(proc, rf"cannot listen on 127\.0\.0\.1:{port} \(Address already in use\)",
                           rf"--port {port + 1}, or --port 0")
    assert "loaded" not in out and "serving" not in out  # the model was never built
    assert elapsed < 30


def test_seed_example_with_a_wrong_model_name_says_which_names_are_served():
    with fake_endpoint(default="4", model="smollm2") as fake:
        env = {**ENV, "POLICY_BASE_URL": fake.base_url, "HEAD_SERVER_PORT": "0", "POLICY_MODEL_NAME": "smolm2"}
        proc = run([sys.executable, str(ROOT / "examples/connect_gym_to_training.py")], env=env, timeout=90)
    out = assert_one_block(proc, rf"policy endpoint {re.escape(fake.base_url)} serves \['smollm2'\] but the config "
                           r"asks for model 'smolm2'", r"Did you mean 'smollm2'\?", r"--served-model-name smolm2")
    assert "Collected rollout" not in out


def test_seed_example_shows_why_a_rollout_failed():
    # 2+2 is answered; every other prompt gets HTTP 503 on every attempt: 7 failure records, each explained.
    script = [("2 + 2", "4"), ("+", Behaviour(fail_status=503, fail_times=100))]
    with fake_endpoint(script) as fake:
        env = {**ENV, "POLICY_BASE_URL": fake.base_url, "HEAD_SERVER_PORT": "0"}
        proc = run([sys.executable, str(ROOT / "examples/connect_gym_to_training.py")], env=env, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Collected rollout with reward: None") == 7
    assert proc.stdout.count("Collected rollout with reward: 1.0") == 1
    reasons = re.findall(r"\[gym_plugin\] row (\d) \(repeat 0\) failed: (\w+) after (\d) attempts: (.*)", proc.stderr)
    assert sorted(int(r[0]) for r in reasons) == [1, 2, 3, 4, 5, 6, 7]  # row 0 (2 + 2) succeeded
    assert all(kind == "http_status" and attempts == "3" and "503" in reason for _, kind, attempts, reason in reasons)


def test_collect_rollouts_prints_progress_while_it_waits(capsys):
    fake = FakeOpenAIServer("slow", Behaviour(turns=("4",), delay_s=1.2))

    async def main() -> list[dict]:
        return [r async for r in gym.collect_rollouts([sum_row("2 + 2", "4")] * 2)]

    with GymIntegration("m", None, EXACT, head_server_port=0, extra_servers=[fake], progress_every_s=0.5) as gym:
        records = asyncio.run(main())
    assert [r["reward"] for r in records] == [1.0, 1.0]
    err = capsys.readouterr().err
    assert re.search(r"\[gym_plugin\] 0/2 rollouts done, 2 in flight \(\d+ s elapsed\)", err), err


def test_collect_without_policy_base_url_names_the_key(tmp_path):
    cfg = tmp_path / "env.yaml"
    cfg.write_text(EXACT.read_text().replace("policy_model_name:", "# policy_model_name:"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(sum_row("2 + 2", "4")) + "\n")
    proc = run(CLI + ["collect", "--config", str(cfg), "--input", str(rows), "--output", str(tmp_path / "o.jsonl")])
    assert_one_block(proc, r"'policy_model' is the policy model server that is added when policy_base_url is set, "
                     r"and policy_base_url is not set\. Set it", r"policy_base_url=http://127\.0\.0\.1:8000/v1")
