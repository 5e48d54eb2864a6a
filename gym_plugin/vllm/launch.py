"""The vLLM server command gym_plugin needs (what ``gym-plugin vllm-args`` prints, gym_plugin.cli, and the tests
start).

A vLLM server that serves a policy for training needs, beyond the model:

- ``--enable-auto-tool-choice --tool-call-parser hermes`` (otherwise vLLM answers 400 to ``tool_choice: auto``),
- ``--chat-template FILE`` when the model's own template ignores ``tools`` (SmolLM2's does: the model would
  never see the tools); the file is ``chat_template.served_chat_template`` of the model's tokenizer,
- dev mode (``VLLM_SERVER_DEV_MODE=1``) for the weight-update routes (``/collective_rpc``,
  ``/update_weight_version``, ``/init_weight_transfer_engine``, ...),
- ``--worker-extension-cls gym_plugin.vllm.worker.GymPluginWorkerExtension`` for ``weight_sync=vllm_reload``
  (gym_plugin must be importable by the server's Python), or ``--weight-transfer-config '{"backend": "nccl"}'``
  for ``weight_sync=vllm_nccl`` (GPU only).

The console script ``vllm`` of the CPU wheel is broken (``PackageNotFoundError: vllm``), so the command is
``python -m vllm.entrypoints.openai.api_server``, which works with every build.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gym_plugin.errors import did_you_mean
from gym_plugin.schema import Checked
from gym_plugin.vllm.worker import EXTENSION_QUALNAME

WEIGHT_SYNCS = ("vllm_reload", "vllm_nccl", "none")


@dataclass
class VLLMServerSpec(Checked):
    """What goes into the command line (field = flag)."""

    model: str
    """Hugging Face folder (or hub id) the server loads (``--model``)."""
    served_model_names: list[str] = field(default_factory=list)
    """Names requests may use (``--served-model-name``); empty = vLLM's default (the model path)."""
    host: str = "127.0.0.1"
    port: int = 8000
    chat_template: str | None = None
    """Path of the chat template file (``--chat-template``); None = the model's own."""
    max_model_len: int | None = 2048
    dtype: str = "auto"
    """``float32`` on CPUs without AVX512 (bfloat16 is 4x slower there), ``auto`` on GPUs."""
    enforce_eager: bool = False
    weight_sync: str = "vllm_reload"
    """Which gym_plugin weight sync the server must support: 'vllm_reload' | 'vllm_nccl' | 'none'."""
    cpu: bool = False
    """vLLM's CPU build: sets ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) and eager mode."""
    kv_cache_gib: int = 1
    """CPU build only: KV cache size in GiB."""
    extra_args: list[str] = field(default_factory=list)

    def check(self) -> list[str]:
        if self.weight_sync not in WEIGHT_SYNCS:
            return [f"weight_sync={self.weight_sync!r} is not one of {list(WEIGHT_SYNCS)}."
                    f"{did_you_mean(self.weight_sync, WEIGHT_SYNCS)}"]
        return []

    def argv(self, python: str | None = None) -> list[str]:
        """The command (a list for subprocess)."""
        args = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        if self.served_model_names:
            args += ["--served-model-name", *self.served_model_names]
        args += ["--host", self.host, "--port", str(self.port)]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.dtype != "auto":
            args += ["--dtype", self.dtype]
        if self.enforce_eager or self.cpu:
            args.append("--enforce-eager")
        args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        if self.chat_template:
            args += ["--chat-template", self.chat_template]
        if self.weight_sync == "vllm_reload":
            args += ["--worker-extension-cls", EXTENSION_QUALNAME]
        elif self.weight_sync == "vllm_nccl":
            args += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
        return args + list(self.extra_args)

    def env(self) -> dict[str, str]:
        """Environment variables the server needs (added to the caller's environment)."""
        env = {}
        if self.weight_sync != "none":
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.cpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        return env

    def shell(self, python: str = "python") -> str:
        """The command as one shell line (``VAR=1 python -m ...``)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items())
        cmd = " ".join(shlex.quote(a) for a in self.argv(python))
        return f"{env} {cmd}" if env else cmd


def write_served_chat_template(model: str, out: str | Path) -> Path | None:
    """Write the chat template vLLM must use for ``model`` to ``out``; None (nothing written) when the model's
    own template already renders tools and no file is needed."""
    from gym_plugin.models.chat_template import load_tokenizer, tools_fallback_template

    tokenizer = load_tokenizer(model, key="--model")
    template = tools_fallback_template(tokenizer)
    if template is None:
        return None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(template)
    return out


def start_server(spec: VLLMServerSpec, log_path: str | Path, *, timeout_s: float = 600.0,
                 env: dict[str, str] | None = None, python: str | None = None):
    """Spawn the server of ``spec`` in a process group of its own, its output in ``log_path``, and wait for
    ``GET /health`` (bounded). Returns ``(process, seconds to healthy)``; the caller stops it with
    ``stop_server``. Raises ``EndpointUnreachableError`` with the log's tail when it exits or times out first."""
    import os
    import subprocess
    import time
    import urllib.request

    from gym_plugin.errors import EndpointUnreachableError

    root = f"http://{spec.host}:{spec.port}"
    full_env = {**os.environ, **(env or {}), **spec.env()}
    log = open(log_path, "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(spec.argv(python), env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()  # the child has its own handle
    try:
        while True:
            try:
                with urllib.request.urlopen(root + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return proc, time.monotonic() - t0
            except OSError:
                pass
            failed = proc.poll() is not None
            if failed or time.monotonic() - t0 > timeout_s:
                tail = "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-60:])
                what = f"exited with code {proc.returncode}" if failed else f"was not healthy after {timeout_s:g} s"
                raise EndpointUnreachableError(f"the vLLM server ({spec.shell()}) {what}; the end of its log "
                                               f"({log_path}):\n{tail}", url=root)
            time.sleep(1.0)
    except BaseException:
        stop_server(proc)  # never leave it running: a timeout, Ctrl-C or a test timeout interrupts the wait
        raise


def stop_server(proc, grace_s: float = 30.0) -> None:
    """SIGTERM to the server's process group (API server, engine core, workers), SIGKILL after ``grace_s``."""
    import os
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
