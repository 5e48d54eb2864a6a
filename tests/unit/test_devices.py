"""Device settings (``model.device`` of the recipe, ``device`` of the embedded server) and the random-init models of
real sizes: the option plumbing, on the CPU. What runs on a GPU is tests/cuda (bench/gpu_check.sh)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from gym_plugin.devices import check_device, resolve_device
from gym_plugin.distributed import init_distributed
from gym_plugin.errors import ConfigError, ModelLoadError
from gym_plugin.grpo_config import parse_grpo_config
from gym_plugin.models import load_policy_model
from gym_plugin.models.random_init import random_model_config, random_tokenizer
from gym_plugin.models.tiny import build_tiny_tokenizer
from tests.integration.test_user_errors import ENV, RECIPE, ROOT, TINY, assert_one_block

NO_CUDA = not torch.cuda.is_available()


def test_device_names_are_checked_without_torch_and_resolved():
    assert all(check_device(v) == [] for v in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"))
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", 0, None):
        (problem,) = check_device(bad, "model.device")
        assert f"model.device={bad!r} is not a device" in problem and "'cuda:<index>'" in problem
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cpu") if NO_CUDA else torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="is not a device"):
        resolve_device("gpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_asking_for_cuda_without_a_gpu_names_the_setting_and_the_fix():
    for value in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"model\.device={value} asks for a CUDA GPU, but torch sees none "
                                              r"\(torch\.cuda\.is_available\(\) is False.*Set model\.device=cpu"):
            resolve_device(value, key="model.device")


def test_init_distributed_follows_the_device_setting(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed(device="cpu").device == torch.device("cpu")
    assert init_distributed("gloo").device == torch.device("cpu")  # gloo with auto: the CPU, as before
    with pytest.raises(ConfigError, match="NCCL reduces CUDA tensors only" if not NO_CUDA else "needs CUDA GPUs"):
        init_distributed("nccl", device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"model\.device=cuda:0 under torchrun \(2 ranks\).*set model\.device=cuda"):
        init_distributed(device="cuda:0")


def test_recipe_config_checks_model_device():
    assert parse_grpo_config({"model": {"device": "cuda:1"}}).model.device == "cuda:1"
    assert parse_grpo_config({}).model.device == "auto"
    with pytest.raises(ConfigError, match=r"model\.device='gpu' is not a device"):
        parse_grpo_config({"model": {"device": "gpu"}})


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_recipe_with_model_device_cuda_on_a_cpu_machine_is_one_block(tmp_path):
    proc = subprocess.run(RECIPE + TINY + ["model.device=cuda", f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert_one_block(proc, r"model\.device=cuda asks for a CUDA GPU, but torch sees none")
    assert not (tmp_path / "run").exists()


def test_embedded_server_places_the_model_it_loads():
    from gym_plugin.servers.embedded import EmbeddedPolicyServer

    server = EmbeddedPolicyServer(model="tiny", device="cpu")
    assert next(server.model.parameters()).device == torch.device("cpu")
    with pytest.raises(ConfigError, match="is not a device"):
        EmbeddedPolicyServer(model="tiny", device="gpu")
    if NO_CUDA:
        with pytest.raises(ConfigError, match=r"device=cuda asks for a CUDA GPU"):
            EmbeddedPolicyServer(model="tiny", device="cuda")


def test_random_init_configs_have_the_real_parameter_counts():
    for name, params in (("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768)):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(random_model_config(name))
        # the published sizes: SmolLM2-135M 134.5M (30 layers, hidden 576, vocab 49152, tied), Qwen2.5-0.5B
        # 494.0M (24 layers, hidden 896, vocab 151936, tied, q/k/v biases)
        assert sum(p.numel() for p in model.parameters()) == params


def test_random_tokenizer_encodes_like_the_tiny_one_and_decodes_every_model_id():
    tok, tiny = random_tokenizer("random:smollm2-135m"), build_tiny_tokenizer()
    text = "What is the capital of France? <|im_end|> x700"
    assert len(tok) == 49152 and tok.encode(text) == tiny.encode(text)
    assert tok.decode([len(tiny), 49151]) == f" x{len(tiny)} x49151"  # ids past the tiny vocabulary
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tiny.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_load_policy_model_builds_random_models_and_names_the_known_ones():
    model, tok = load_policy_model("random:qwen2-tiny", "bfloat16")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.vocab_size == len(tok) == 1536 and not model.training
    again, _ = load_policy_model("random:qwen2-tiny", "bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded
    with pytest.raises(ModelLoadError, match=r"'smollm2-135' is not a random-init config\. Did you mean "
                                             r"'smollm2-135m'\?"):
        load_policy_model("random:smollm2-135")
