"""NeMo-RL's own Gym path (snapshot 7ea279a) on gym_plugin's NemoGym drop-in, under a local Ray on CPU.

NeMo-RL's functions run unchanged: ``spinup_nemo_gym_actor`` (what GRPO's setup calls) and ``create_env`` build
the actor after `use_in_nemo_rl`; ``run_nemo_gym_rollout_sync`` (GRPO's sync loop) and
``run_async_nemo_gym_rollout`` (async GRPO, validation) stream its rows; ``classify_rollout_failure`` is its retry
policy. The policy is the scripted fake OpenAI endpoint on its own loop, reached over HTTP (like vLLM); the
"generation" object handed to NeMo-RL only carries the vLLM config NeMo-RL reads (``cfg.vllm_cfg.max_model_len``).

Token ids follow the fake's documented rules (gym_plugin/testing/fake_openai.py; the helpers that spell them are
tests/integration/test_nemo_rl_gym.py's), vocabulary 600: a message is
``[1, role] + crc32(word) % 600 + 16 per word + [2]``, the generation prompt ``[1, 5]``, a generation its words
+ ``[2]``, log-prob of generated id t = -0.1 * (t % 7 + 1).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from gym_plugin.servers.resources.calculator import calculator_row
from gym_plugin.testing.background import BackgroundServer
from gym_plugin.testing.fake_openai import Behaviour, FakeOpenAIServer, ToolCall, Turn
from gym_plugin.models.tiny import build_tiny_tokenizer
from gym_plugin.net import free_port
from tests.integration.test_nemo_rl_gym import GEN_PROMPT, IM_END, IM_START, TOOL, USER, VOCAB, logprob, wid, words
from tests.peers.nemo_rl.conftest import ROOT

pytestmark = [pytest.mark.nemo_rl, pytest.mark.timeout(300)]

SCRIPT = [
    ("Compute", Behaviour(turns=[
        Turn(tool_calls=[ToolCall("multiply", {"a": 3, "b": 4})]),
        Turn(tool_calls=[ToolCall("add", {"a": 12, "b": 5})]),
        "The answer is \\boxed{17}.",
    ])),
    ("SLOW", Behaviour(turns=["\\boxed{4}"], delay_s=3.0)),  # a 3-second rollout
    ("LONG", Behaviour(context_length_error=True)),  # vLLM's 400: no token ids -> a data failure
    ("DOWN", Behaviour(fail_status=503, fail_times=99)),  # the endpoint keeps failing -> an infra failure
]
GEN_CONFIG = {"max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "top_k": None,
              "stop_strings": None, "stop_token_ids": None}


class VllmConfigOnly:
    """The generation interface as NeMo-RL's Gym path uses it: only ``cfg`` (the HTTP servers do the work)."""

    cfg = {"vllm_cfg": {"max_model_len": 4096}}


def env_configs(**options) -> dict:
    """``master_config.env`` of a NeMo-RL Gym run on gym_plugin: env.nemo_gym is gym_plugin's Gym config."""
    return {"should_use_nemo_gym": True, "nemo_gym": {
        "config_paths": [str(ROOT / "conf/gym/calculator.yaml")],
        "gym_plugin": {"import_modules": ["gym_plugin.testing.masking"], "policy_wait_s": 60, **options},
        "qa": {"resources_servers": {"exact_match_masking": {}}},
        "qa_agent": {"responses_api_agents": {"simple_agent": {
            "resources_server": {"type": "resources_servers", "name": "qa"},
            "model_server": {"type": "responses_api_models", "name": "policy_model"}, "max_turns": 1}}},
        "collector": {"max_attempts": 1},
        "num_gpu_nodes": 0,
        "invalid_tool_call_patterns": ["<tool_call>"],  # NeMo-RL's detection knobs: moved to NemoGymConfig
    }}


def qa(text: str, expected: str = "4", **extra) -> dict:
    return {"responses_create_params": {"input": [{"role": "user", "content": text}]}, "expected_answer": expected,
            "agent_ref": {"name": "qa_agent"}, **extra}


def batch(rows: list[dict]):
    from nemo_rl.distributed.batched_data_dict import BatchedDataDict

    return BatchedDataDict({"extra_env_info": rows, "loss_multiplier": torch.ones(len(rows))})


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def drop_in(ray_local):
    from gym_plugin.nemo_rl.gym import NemoGymActor, use_in_nemo_rl

    assert use_in_nemo_rl() is NemoGymActor
    return NemoGymActor


@pytest.fixture(scope="module")
def gym_actor(drop_in, tokenizer):
    """Built by NeMo-RL's spinup_nemo_gym_actor (GRPO setup) while the policy endpoint is not up yet."""
    import ray
    from nemo_rl.environments.nemo_gym import spinup_nemo_gym_actor

    port = free_port()
    actor = spinup_nemo_gym_actor(env_configs(), [f"http://127.0.0.1:{port}/v1"], "fake-model", tokenizer=tokenizer,
                                  enable_router_replay=False, routed_experts_dtype="int16", use_fastokens=False)
    with BackgroundServer(FakeOpenAIServer("vllm", SCRIPT, port=port, vocab_size=VOCAB, default="\\boxed{4}")):
        yield actor
    ray.get(actor.shutdown.remote(), timeout=30)
    ray.kill(actor)


def test_nemo_rl_builds_the_drop_in(drop_in, gym_actor):
    import ray
    from nemo_rl.distributed.ray_actor_environment_registry import get_actor_python_env
    from nemo_rl.environments import nemo_gym

    assert nemo_gym.NemoGym is drop_in  # what spinup_nemo_gym_actor / create_env("nemo_gym") build now
    assert get_actor_python_env("nemo_rl.environments.nemo_gym.NemoGym") == __import__("sys").executable
    ray.get(gym_actor.health_check.remote(), timeout=30)  # every Gym server answers over HTTP


def test_sync_rollout_good_and_masked_rows(gym_actor, tokenizer):
    from nemo_rl.experience.rollouts import run_nemo_gym_rollout_sync

    rows = [calculator_row(3, 4, 5), qa("What is 2+2?"), qa("What is 2+2? again", flag_mask_sample=True)]
    res = run_nemo_gym_rollout_sync(VllmConfigOnly(), batch(rows), tokenizer, {"nemo_gym": gym_actor}, GEN_CONFIG,
                                    log_full_result_tables=False)
    fb = res.final_batch
    # rewards from the verifiers: 3 * 4 + 5 = 17 with both tools; \boxed{4} == 4 twice
    assert fb["total_reward"].tolist() == [1.0, 1.0, 1.0]
    # the flagged row: NeMo-RL reads full_result.instance_config.mask_sample; GRPO zeroes its loss_multiplier
    assert fb["mask_sample"].tolist() == [False, False, True]
    assert fb["loss_multiplier"].tolist() == [1.0, 1.0, 1.0] and fb["truncated"].tolist() == [False] * 3
    assert [a["name"] for a in fb["agent_ref"]] == ["calculator_agent", "qa_agent", "qa_agent"]

    calc, plain, _ = fb["message_log"]
    assert [m["role"] for m in calc] == ["user", "assistant"] * 3
    gens = [words('<tool_call> multiply {"a":3,"b":4} </tool_call>') + [IM_END],
            words('<tool_call> add {"a":12,"b":5} </tool_call>') + [IM_END],
            words("The answer is \\boxed{17}.") + [IM_END]]
    for k, gen in zip((1, 3, 5), gens):  # the rollout's own ids and log-probs, as the endpoint returned them
        assert calc[k]["token_ids"].tolist() == gen
        assert calc[k]["generation_logprobs"].tolist() == pytest.approx([logprob(t) for t in gen])
    # the executed tool calls' results, between the model calls
    assert calc[2]["token_ids"].tolist() == [IM_START, TOOL, wid('{"result":'), wid("12}"), IM_END, *GEN_PROMPT]
    assert calc[4]["token_ids"].tolist() == [IM_START, TOOL, wid('{"result":'), wid("17}"), IM_END, *GEN_PROMPT]
    # NeMo-RL's penalty flag: the configured pattern '<tool_call>' in a textual answer; tool calls are items
    assert [calc[k]["is_invalid_tool_call"] for k in (1, 3, 5)] == [False, False, False]
    prompt = [IM_START, USER, *words("What is 2+2?"), IM_END, *GEN_PROMPT]
    assert plain[0]["token_ids"].tolist() == prompt
    assert plain[1]["token_ids"].tolist() == [wid("\\boxed{4}"), IM_END]
    # NeMo-RL's prompt tensor: each row's first message, padded with the tokenizer's pad id
    assert res.input_ids.shape == (3, len(calc[0]["token_ids"]))
    assert res.input_ids[1, : len(prompt)].tolist() == prompt and fb["length"][1].item() == len(prompt)
    assert res.rollout_metrics["total_reward/mean"] == 1.0
    assert "timing/rollout/postprocess_results" in res.rollout_metrics  # the actor's timing, from the last row


def test_failed_rows_are_typed_after_the_good_groups(gym_actor, tokenizer):
    from nemo_rl.experience.failures import (
        FailureClass,
        GymTransportError,
        RolloutDataFailure,
        classify_rollout_failure,
    )
    from nemo_rl.experience.rollouts import run_async_nemo_gym_rollout, run_nemo_gym_rollout_sync

    async def groups(rows):
        out = []
        try:
            async for group in run_async_nemo_gym_rollout(
                    VllmConfigOnly(), batch(rows), tokenizer, {"nemo_gym": gym_actor}, GEN_CONFIG,
                    num_generations=1, log_full_result_tables=False):
                out.append(group)
        except Exception as e:  # noqa: BLE001 (what NeMo-RL's caller receives)
            return out, e
        return out, None

    rows = [qa("What is 2+2?"), qa("LONG question"), qa("What is 2+2? too"), qa("DOWN now")]
    done, error = asyncio.run(groups(rows))
    # the two good prompt groups were delivered, complete; nothing for the failed rows (no reward 0 anywhere)
    assert sorted(len(g.final_batch["message_log"]) for g in done) == [1, 1]
    assert [g.final_batch["total_reward"].tolist() for g in done] == [[1.0], [1.0]]
    assert isinstance(error, RolloutDataFailure)  # a data failure among them; crossed Ray with its type
    assert classify_rollout_failure(error) is FailureClass.DATA
    assert "2 of 4 NeMo-Gym rollouts failed (_rowidx [" in str(error)
    assert "_rowidx 1 (agent qa_agent): no model call carries token ids" in str(error)
    assert "_rowidx 3 (agent qa_agent): http_status" in str(error)

    # only the endpoint failing: infrastructure, which NeMo-RL's SingleController re-dispatches
    with pytest.raises(GymTransportError) as info:
        run_nemo_gym_rollout_sync(VllmConfigOnly(), batch([qa("DOWN again"), qa("What is 2+2?")]), tokenizer,
                                  {"nemo_gym": gym_actor}, GEN_CONFIG, log_full_result_tables=False)
    assert classify_rollout_failure(info.value) is FailureClass.INFRA
    assert "1 of 2 NeMo-Gym rollouts failed (_rowidx [0])" in str(info.value)


def test_two_concurrent_3_second_rollouts_take_3_seconds(gym_actor, tokenizer):
    from nemo_rl.experience.rollouts import run_async_nemo_gym_rollout

    async def one(text):
        return [g async for g in run_async_nemo_gym_rollout(
            VllmConfigOnly(), batch([qa(text)]), tokenizer, {"nemo_gym": gym_actor}, GEN_CONFIG,
            num_generations=1, log_full_result_tables=False)]

    async def both():
        started = time.perf_counter()
        a, b = await asyncio.gather(one("SLOW first"), one("SLOW second"))
        return time.perf_counter() - started, a, b

    wall, a, b = asyncio.run(both())
    assert [g.final_batch["total_reward"].tolist() for g in a + b] == [[1.0], [1.0]]
    assert 3.0 <= wall < 4.5, f"two concurrent 3-second rollouts took {wall:.2f} s (6 s would mean one at a time)"


def test_create_env_path_waits_for_a_policy_server_that_starts_later(drop_in, tokenizer):
    """NeMo-RL's older launch script builds the actor with create_env("nemo_gym", NemoGymConfig(...)); vLLM's
    HTTP server comes up 2 s after the actor asked for rollouts: run_rollouts waits instead of failing."""
    import ray
    from nemo_rl.environments.nemo_gym import NemoGymConfig
    from nemo_rl.environments.utils import create_env
    from nemo_rl.experience.rollouts import run_nemo_gym_rollout_sync

    port = free_port()
    cfg = NemoGymConfig(model_name="fake-model", base_urls=[f"http://127.0.0.1:{port}/v1"],
                        initial_global_config_dict=env_configs()["nemo_gym"])
    actor = create_env(env_name="nemo_gym", env_config=cfg)
    ray.get(actor._spinup.remote(), timeout=120)
    ray.get(actor.set_tokenizer.remote(tokenizer), timeout=60)
    late = BackgroundServer(FakeOpenAIServer("vllm_late", SCRIPT, port=port, vocab_size=VOCAB, default="\\boxed{4}"))
    timer = threading.Timer(2.0, late.start)
    started = time.perf_counter()
    timer.start()
    try:
        res = run_nemo_gym_rollout_sync(VllmConfigOnly(), batch([qa("What is 2+2?")]), tokenizer,
                                        {"nemo_gym": actor}, GEN_CONFIG, log_full_result_tables=False)
        assert res.final_batch["total_reward"].tolist() == [1.0]
        assert time.perf_counter() - started >= 2.0
    finally:
        timer.join()
        ray.get(actor.shutdown.remote(), timeout=30)
        late.stop()
    with pytest.raises(Exception, match="was shut down"):  # NeMo-RL's health probe reports it
        ray.get(actor.health_check.remote(), timeout=30)
    ray.kill(actor)


def test_policy_server_that_never_comes_is_a_clear_infra_failure(drop_in, tokenizer):
    import ray
    from nemo_rl.environments.nemo_gym import spinup_nemo_gym_actor
    from nemo_rl.experience.failures import FailureClass, GymTransportError, classify_rollout_failure
    from nemo_rl.experience.rollouts import run_nemo_gym_rollout_sync

    dead = f"http://127.0.0.1:{free_port()}/v1"
    actor = spinup_nemo_gym_actor(env_configs(policy_wait_s=2), [dead], "fake-model", tokenizer=tokenizer,
                                  enable_router_replay=False, routed_experts_dtype="int16", use_fastokens=False)
    try:
        with pytest.raises(GymTransportError, match="did not answer GET /models within 2 s") as info:
            run_nemo_gym_rollout_sync(VllmConfigOnly(), batch([qa("What is 2+2?")]), tokenizer,
                                      {"nemo_gym": actor}, GEN_CONFIG, log_full_result_tables=False)
        assert dead in str(info.value) and classify_rollout_failure(info.value) is FailureClass.INFRA
    finally:
        ray.get(actor.shutdown.remote(), timeout=30)
        ray.kill(actor)


def test_launcher_plugs_gym_plugin_into_an_unchanged_launch_script(nemo_rl_snapshot, tmp_path):
    """``python -m gym_plugin.nemo_rl.launch SCRIPT ARGS``: the script runs as __main__ with its own argv, and
    NeMo-RL's names already point at gym_plugin (what docs/nemo_rl.md tells NeMo-RL users to run)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run_grpo_like.py"
    script.write_text(
        "import sys\n"
        "import gym_plugin.nemo_rl.gym as g\n"
        "from nemo_rl.environments import nemo_gym\n"
        "from nemo_rl.environments.utils import ENV_REGISTRY\n"
        "from nemo_rl.distributed.ray_actor_environment_registry import get_actor_python_env\n"
        "assert __name__ == '__main__'\n"
        "print(nemo_gym.NemoGym is g.NemoGymActor, sys.argv[1:], ENV_REGISTRY['verify']['actor_class_fqn'],\n"
        "      get_actor_python_env('nemo_rl.environments.nemo_gym.NemoGym') == sys.executable)\n")
    out = subprocess.run(
        [sys.executable, "-m", "gym_plugin.nemo_rl.launch", "--env-name", "verify", str(script), "--config", "x.yaml"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "True ['--config', 'x.yaml'] gym_plugin.nemo_rl.env.GymEnvironmentActor True")
