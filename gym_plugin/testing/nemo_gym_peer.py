"""Processes for runs against NeMo Gym 0.7.0 itself (the ``nemo_gym`` tests and bench/nemo_gym_both_ways.py).

NeMo Gym lives in a venv of its own: it requires Python >= 3.13.14, but its client and servers run on 3.11 when
installed with ``--ignore-requires-python`` plus the packages they import (.ci/run does, into ``.ci-nemo-gym``).
Its location: ``$GYM_PLUGIN_NEMO_GYM_VENV``, default ``<repo>/.ci-nemo-gym``.

- `start_fake`: ``gym-plugin fake-openai --tasks`` (`gym_plugin.testing.scripted_tasks`), a process of its own;
- `start_gym_plugin`: ``gym-plugin serve`` with the given environment configs;
- `start_ng_run`: NeMo Gym's ``ng_run`` with string_match and example_single_tool_call (each behind its
  simple_agent and a legacy_agent environment server) and its vllm_model policy server (token ids on), all pointed
  at an endpoint. Each NeMo Gym server runs from our NeMo Gym venv: ``uv_venv_dir`` holds a link to it per server
  folder and ``skip_venv_if_present`` makes ng_run install nothing. Ray runs on 127.0.0.1
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``).

Every server listens on 127.0.0.1. Each process starts a session of its own; `stop` ends it, its process group
and its descendants, by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gym_plugin.net import free_port

ROOT = Path(__file__).resolve().parents[2]
NG_SERVER_DIRS = ("responses_api_models/vllm_model", "responses_api_agents/simple_agent",
                  "environment_servers/legacy_agent", "resources_servers/string_match",
                  "resources_servers/example_single_tool_call")
"""NeMo Gym server folders `start_ng_run` starts; each gets our NeMo Gym venv as its venv."""
NG_CONFIGS = ("responses_api_models/vllm_model/configs/vllm_model.yaml",
              "resources_servers/string_match/configs/string_match.yaml",
              "resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml")


def nemo_gym_venv() -> Path:
    """Where NeMo Gym 0.7.0's venv is expected: $GYM_PLUGIN_NEMO_GYM_VENV, default <repo>/.ci-nemo-gym."""
    return Path(os.environ.get("GYM_PLUGIN_NEMO_GYM_VENV", ROOT / ".ci-nemo-gym")).absolute()


def ours_env() -> dict:
    """Environment for our programs: this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def ng_env(venv: Path) -> dict:
    """Environment for NeMo Gym's programs: its venv only, Ray on the loopback address, no usage reporting."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    return env


def nemo_gym_missing(venv: Path) -> str | None:
    """Why NeMo Gym 0.7.0 cannot be run from ``venv``, or None."""
    if not (venv / "bin" / "ng_collect_rollouts").exists():
        return (f"NeMo Gym 0.7.0 venv not found at {venv} (set GYM_PLUGIN_NEMO_GYM_VENV, or run the '(NeMo Gym)' "
                "install section of .ci/run)")
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import nemo_gym, importlib.metadata as m; "
                            "print(m.version('nemo-gym'))"], env=ng_env(venv), capture_output=True, text=True)
    if probe.returncode != 0:
        return f"NeMo Gym in {venv} does not import: {probe.stderr.strip()[-300:]}"
    if probe.stdout.strip() != "0.7.0":
        return f"NeMo Gym in {venv} is {probe.stdout.strip()}, not 0.7.0"
    return None


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


def served_config(head_port: int) -> dict:
    """A head server's merged config (NeMo Gym's wire form: a JSON string holding YAML)."""
    import yaml

    with urllib.request.urlopen(f"http://127.0.0.1:{head_port}/global_config_dict_yaml", timeout=10) as r:
        text = json.loads(r.read())
    return yaml.safe_load(text) if isinstance(text, str) else text


def server_ports(config: dict) -> list[int]:
    """Ports of every server instance of a served config (the head server's excluded)."""
    ports = []
    for name, section in config.items():
        if name == "head_server" or not isinstance(section, dict):
            continue
        for impls in section.values():
            for params in impls.values() if isinstance(impls, dict) else ():
                if isinstance(params, dict) and params.get("port"):
                    ports.append(int(params["port"]))
    return ports


def _popen(cmd: list, log: Path, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_fake(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """The scripted task fake in its own process: (process, base_url)."""
    port = port or free_port()
    proc = _popen([sys.executable, "-m", "gym_plugin.cli", "fake-openai", "--tasks", "--port", str(port)],
                  workdir / "fake.log", ours_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, time.monotonic() + 60, workdir / "fake.log")
    except BaseException:
        stop(proc, 10)
        raise
    return proc, f"http://127.0.0.1:{port}/v1"


def start_gym_plugin(workdir: Path, endpoint: str, configs: list[str], port: int | None = None,
                     serve_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """``gym-plugin serve [serve_args]`` with ``configs`` (paths) against ``endpoint`` (the scripted fake, which
    serves the model name 'fake-model' only): (process, head port)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "gym_plugin.cli", "serve", *serve_args, *sum((["--config", c] for c in configs), []),
           f"policy_base_url={endpoint}", "policy_model_name=fake-model", f"head_server.port={port}"]
    proc = _popen(cmd, workdir / "serve.log", ours_env())
    try:
        wait_http(f"http://127.0.0.1:{port}/global_config_dict_yaml", proc, time.monotonic() + 90,
                  workdir / "serve.log")
    except BaseException:
        stop(proc, 20)
        raise
    return proc, port


def start_ng_run(workdir: Path, venv: Path, endpoint: str, port: int | None = None, timeout_s: float = 240
                 ) -> tuple[subprocess.Popen, int]:
    """NeMo Gym's ``ng_run`` deployment (see the module doc) against ``endpoint``, every server answering:
    (process, head port)."""
    venvs = workdir / "venvs"
    for d in NG_SERVER_DIRS:
        (venvs / d).mkdir(parents=True, exist_ok=True)
        link = venvs / d / ".venv"
        if not link.exists():
            link.symlink_to(venv)
    (venv / ".nemo-gym-setup-complete").touch()  # what NeMo Gym's own setup leaves in a ready venv
    port = port or free_port()
    (workdir / "env.yaml").write_text(json.dumps({
        "policy_base_url": endpoint, "policy_api_key": "dummy_key", "policy_model_name": "fake-model",
        "skip_venv_if_present": True, "uv_venv_dir": str(venvs), "head_server": {"host": "127.0.0.1", "port": port},
    }))
    configs = [str(workdir / "env.yaml"), *NG_CONFIGS]
    log = workdir / "ng_run.log"
    proc = _popen([str(venv / "bin" / "ng_run"), f"+config_paths=[{','.join(configs)}]",
                   "+policy_model.responses_api_models.vllm_model.return_token_id_information=true"],
                  log, ng_env(venv), cwd=workdir)
    try:
        deadline = time.monotonic() + timeout_s
        wait_http(f"http://127.0.0.1:{port}/global_config_dict_yaml", proc, deadline, log)
        for server_port in server_ports(served_config(port)):
            wait_http(f"http://127.0.0.1:{server_port}/", proc, deadline, log)
    except BaseException:
        stop(proc, 60)
        raise
    return proc, port


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """End a process started here with a session of its own: SIGTERM to its group (ng_run stops its servers and
    Ray then), SIGKILL to what is left of the group, and its descendants that left the group (Ray's workers start
    sessions of their own), each by pid."""
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
        os.killpg(proc.pid, signal.SIGKILL)
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
