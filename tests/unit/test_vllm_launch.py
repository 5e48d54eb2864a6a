"""`gym-plugin vllm-args` and VLLMServerSpec: the vLLM command line, its environment, the chat template file."""

from __future__ import annotations

import copy
import json
import shlex

import pytest

from gym_plugin.cli import main as cli_main
from gym_plugin.errors import ConfigError
from gym_plugin.models.tiny import build_tiny_tokenizer
from gym_plugin.models.toolcalls import chatml_tools_template
from gym_plugin.vllm.launch import VLLMServerSpec

PLAIN_CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                "You are Smol.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_spec_flags_per_weight_sync():
    reload = VLLMServerSpec(model="/m", served_model_names=["a", "b"], port=8123, chat_template="/t.jinja",
                            dtype="float32", cpu=True)
    argv = reload.argv("py")
    assert argv[:5] == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    joined = " ".join(argv)
    for flags in ("--served-model-name a b", "--port 8123", "--dtype float32", "--enforce-eager",
                  "--enable-auto-tool-choice --tool-call-parser hermes", "--chat-template /t.jinja",
                  "--worker-extension-cls gym_plugin.vllm.worker.GymPluginWorkerExtension"):
        assert flags in joined
    assert reload.env() == {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    nccl = VLLMServerSpec(model="/m", weight_sync="vllm_nccl")
    assert nccl.argv("py")[-2:] == ["--weight-transfer-config", '{"backend": "nccl"}']
    assert "--worker-extension-cls" not in nccl.argv("py") and "--enforce-eager" not in nccl.argv("py")
    assert nccl.env() == {"VLLM_SERVER_DEV_MODE": "1"}
    assert VLLMServerSpec(model="/m", weight_sync="none").env() == {}
    # the shell line round-trips through a shell's word splitting
    assert shlex.split(nccl.shell("py"))[1:] == nccl.argv("py")
    with pytest.raises(ConfigError, match="Did you mean 'vllm_reload'"):
        VLLMServerSpec(model="/m", weight_sync="vllm_relaod")


def test_vllm_args_writes_the_tools_template_when_the_model_ignores_tools(tmp_path, capsys):
    tok = copy.deepcopy(build_tiny_tokenizer())
    tok.chat_template = PLAIN_CHATML  # like SmolLM2's: ChatML with a default system turn, no tools
    folder = tmp_path / "plain-model"
    tok.save_pretrained(folder)
    out = tmp_path / "t.jinja"
    rc = cli_main(["vllm-args", "--model", str(folder), "--cpu", "--port", "8011", "--template-out", str(out),
                   "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert out.read_text() == chatml_tools_template(default_system="You are Smol.", always_system=True)
    assert printed["chat_template"] == str(out.resolve())
    assert printed["argv"][printed["argv"].index("--chat-template") + 1] == str(out.resolve())
    assert printed["argv"][printed["argv"].index("--served-model-name") + 1] == "plain-model"
    assert printed["env"] == {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_vllm_args_needs_no_template_for_a_tools_aware_model(tmp_path, capsys):
    folder = tmp_path / "tools-model"
    build_tiny_tokenizer().save_pretrained(folder)  # its ChatML+Hermes template renders tools
    assert cli_main(["vllm-args", "--model", str(folder), "--template-out", str(tmp_path / "t.jinja")]) == 0
    captured = capsys.readouterr()
    assert "--chat-template" not in captured.out and not (tmp_path / "t.jinja").exists()
    assert "renders tools: no --chat-template needed" in captured.err
    assert captured.out.startswith("VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server")


def test_vllm_args_bad_model_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["vllm-args", "--model", str(tmp_path / "missing")]) == 2
    assert "--model=" in capsys.readouterr().err


def test_start_server_stops_what_it_started_when_the_wait_fails(tmp_path):
    """A 'server' that never answers /health: start_server gives up after timeout_s, stops the whole process
    group (the child it spawned included) and says why, with the end of the log."""
    import os
    import time

    from gym_plugin.errors import EndpointUnreachableError
    from gym_plugin.vllm.launch import start_server

    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho starting up\nsleep 60 &\necho $! > \"$CHILD_PID\"\nwait\n")
    fake.chmod(0o755)
    child_file = tmp_path / "child.pid"
    spec = VLLMServerSpec(model="/m", port=9, weight_sync="none")
    with pytest.raises(EndpointUnreachableError, match=r"(?s)was not healthy after 2 s.*starting up"):
        start_server(spec, tmp_path / "log.txt", timeout_s=2, env={"CHILD_PID": str(child_file)}, python=str(fake))
    child = int(child_file.read_text())
    for _ in range(50):  # SIGTERM to the group reaches the grandchild too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the server's child {child} still runs")

    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'ImportError: no vllm' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(EndpointUnreachableError, match=r"(?s)exited with code 3.*ImportError: no vllm"):
        start_server(spec, tmp_path / "log2.txt", timeout_s=30, python=str(broken))
