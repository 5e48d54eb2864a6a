"""GymEnvironment driven the way NeMo-RL drives an environment, against real Gym servers on 127.0.0.1.

- ``step``: NeMo-RL's calculate_rewards passes the batch's message logs (stripped to role/content) and the
  rows' ``extra_env_info``, then unpacks the EnvironmentReturn by position; then
  ``global_post_process_and_metrics`` gets the finished batch.
- ``run_rollouts``: whole agent rollouts through the policy model server and the scripted `FakeOpenAIServer`,
  whose tokenization is documented (gym_plugin/testing/fake_openai.py): a message is
  ``[IM_START=1, role id] + one id per whitespace-separated word + [IM_END=2]`` (user 4, assistant 5, tool 6,
  tools 8), a word's id is ``crc32(word) % 50000 + 16``, the generation prompt is ``[1, 5]``, a generation is
  its words + ``[2]`` (a tool call renders as ``<tool_call> name {json} </tool_call>``), and the log-prob of
  a generated id t is ``LOG_PROBS[t % 7]`` = -0.1 .. -0.7. Expected ids below are built from those rules.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from gym_plugin.errors import ConfigError, GymPluginError, MissingTokenIdsError, ProtocolError, VerifierError
from gym_plugin.nemo_rl_env import EnvironmentReturn, GymEnvironment, register_with_nemo_rl
from gym_plugin.servers.resources.calculator import calculator_row
from gym_plugin.testing.fake_openai import Behaviour, FakeOpenAIServer, ToolCall, Turn

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
GYM_CONFIGS = [str(ROOT / "conf/gym" / f) for f in ("exact_match.yaml", "math.yaml", "calculator.yaml")]

IM_START, IM_END, USER, ASSISTANT, TOOL, TOOLS = 1, 2, 4, 5, 6, 8
GEN_PROMPT = [IM_START, ASSISTANT]


def wid(word: str) -> int:
    """The fake's id of one word (its documented rule)."""
    return zlib.crc32(word.encode()) % 50000 + 16


def words(text: str) -> list[int]:
    return [wid(w) for w in text.split()]


def logprob(t: int) -> float:
    """The fake's log-prob of generated id t: -0.1 * (t % 7 + 1)."""
    return -0.1 * (t % 7 + 1)


CALC_SCRIPT = Behaviour(turns=[
    Turn(tool_calls=[ToolCall("multiply", {"a": 3, "b": 4})]),  # 3 * 4 = 12
    Turn(tool_calls=[ToolCall("add", {"a": 12, "b": 5})]),  # 12 + 5 = 17
    "The answer is \\boxed{17}.",
])
SCRIPT = [
    ("Compute", CALC_SCRIPT),
    ("LONG", Behaviour(context_length_error=True)),  # vLLM's 400: the agent gets no model output, no token ids
    ("BROKEN", Behaviour(malformed=True)),  # a reply that is not JSON: the rollout fails
    ("2+2", "\\boxed{4}"),
    ("3+3", "\\boxed{7}"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env():
    port = free_port()
    fake = FakeOpenAIServer("fake", SCRIPT, port=port)
    e = GymEnvironment(
        {
            "config_paths": GYM_CONFIGS,
            "base_urls": [f"http://127.0.0.1:{port}/v1"],
            "model_name": "fake-model",
            # one attempt per rollout: a broken row fails at once instead of after backoffs
            "gym_config": {"collector": {"max_attempts": 1}},
        },
        extra_servers=[fake],
    )
    yield e
    e.shutdown()


def row(text: str, expected: str, agent: str = "math_agent") -> dict:
    return {"responses_create_params": {"input": [{"role": "user", "content": text}]},
            "expected_answer": expected, "agent_ref": {"name": agent}}


def nemo_rl_step(env: GymEnvironment, message_logs: list, extra_env_info: list) -> EnvironmentReturn:
    """As nemo_rl.experience.rollouts.calculate_rewards: role/content only, then unpack by position."""
    to_env = [[{k: m[k] for k in ("role", "content") if k in m} for m in log] for log in message_logs]
    ret = env.step(to_env, extra_env_info)
    observations, metadata, next_stop_strings, rewards, terminateds, answers = ret
    assert isinstance(rewards, torch.Tensor) and rewards.shape == (len(message_logs),)
    assert isinstance(terminateds, torch.Tensor) and terminateds.shape == (len(message_logs),)
    return ret


def msg(role: str, content: str) -> dict:
    # NeMo-RL message logs carry token_ids tensors too; the environment must not need them.
    return {"role": role, "content": content, "token_ids": torch.tensor([7, 8, 9])}


# ---- step + global_post_process_and_metrics ---------------------------------------------------------------------
def test_step_scores_last_assistant_turn_and_post_process_metrics(env):
    logs = [
        [msg("user", "Capital of France?"), msg("assistant", "Paris.")],
        [msg("user", "Capital of France?"), msg("assistant", "I think \\boxed{Lyon}")],
        [msg("user", "Half of one?"), msg("assistant", "so \\boxed{\\frac{1}{2}}")],
        [msg("user", "2+2?"), msg("assistant", "\\boxed{3}"), msg("environment", "Environment: incorrect"),
         msg("assistant", "sorry: \\boxed{4}")],
    ]
    meta = [
        {"ground_truth": "Paris", "agent_ref": {"name": "exact_match_agent"}},  # NeMo-RL's key, aliased
        {"expected_answer": "Paris", "agent_ref": {"name": "exact_match_agent"}},
        {"expected_answer": "0.5", "agent_ref": {"name": "math_agent"}},
        {"ground_truth": "4", "agent_ref": {"name": "math_agent"}},
    ]
    ret = nemo_rl_step(env, logs, meta)
    # row 0: exact match after normalisation ('Paris.' -> 'paris' == 'paris') -> 1
    # row 1: boxed 'Lyon' != 'Paris' -> 0
    # row 2: math: 1/2 == 0.5 -> 1 (exact match would say 0)
    # row 3: only the LAST assistant turn counts: \boxed{4} == 4 -> 1
    assert ret.rewards.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert ret.terminateds.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert [o["role"] for o in ret.observations] == ["environment"] * 4
    assert [o["content"] for o in ret.observations] == [
        "Environment: correct", "Environment: incorrect", "Environment: correct", "Environment: correct"]
    assert ret.answers[0] == "Paris." and ret.answers[1] == "Lyon" and ret.answers[3] == "4"
    assert ret.next_stop_strings == [None] * 4
    assert [m["reward"] for m in ret.metadata] == [1.0, 0.0, 1.0, 1.0]
    assert ret.metadata[0]["ground_truth"] == "Paris" and "mask_sample" not in ret.metadata[0]

    batch = {
        "rewards": ret.rewards,
        "is_end": torch.tensor([1, 1, 1, 0]),  # row 3 ran out of tokens
        "generation_lengths": torch.tensor([12, 10, 20, 30]),  # whole sequences
        "prompt_lengths": torch.tensor([8, 8, 10, 10]),
        "text": ["p0", "p0", "p1", "p2"],  # rows 0 and 1 are two samples of one prompt
        "extra_env_info": ret.metadata,
        "loss_multiplier": torch.ones(4),
    }
    batch, metrics = env.global_post_process_and_metrics(batch)
    assert metrics["rollout/num_samples"] == 4 and metrics["rollout/num_masked"] == 0
    assert metrics["rollout/reward_mean"] == pytest.approx(0.75)  # (1 + 0 + 1 + 1) / 4
    # correct = (reward >= 1) * is_end = [1, 0, 1, 0] -> 2 / 4
    assert metrics["rollout/accuracy"] == pytest.approx(0.5)
    assert metrics["rollout/fraction_properly_ended"] == pytest.approx(0.75)  # 3 / 4
    # responses: [12-8, 10-8, 20-10, 30-10] = [4, 2, 10, 20] -> 36 / 4 = 9; correct rows 0, 2 -> (4 + 10) / 2 = 7
    assert metrics["rollout/generation_length_mean"] == pytest.approx(9.0)
    assert metrics["rollout/correct_generation_length_mean"] == pytest.approx(7.0)
    assert metrics["rollout/prompt_length_mean"] == pytest.approx(9.0)  # (8 + 8 + 10 + 10) / 4
    # prompts p0 (row 0 correct), p1 (row 2 correct), p2 (row 3 not ended) -> 2 / 3
    assert metrics["rollout/pass_at_samples_per_prompt"] == pytest.approx(2 / 3)
    assert batch["mask_sample"].tolist() == [False] * 4 and batch["loss_multiplier"].tolist() == [1.0] * 4


def test_step_verifier_failure_is_masked_never_a_silent_zero(env):
    logs = [[msg("user", "2+2?"), msg("assistant", "\\boxed{4}")]] * 2
    meta = [{"agent_ref": {"name": "math_agent"}},  # no expected answer: the verifier cannot judge it
            {"ground_truth": "4", "agent_ref": {"name": "math_agent"}}]
    ret = nemo_rl_step(env, logs, meta)
    assert ret.rewards.tolist() == [0.0, 1.0]  # row 0's 0.0 is a placeholder, flagged below
    assert ret.metadata[0]["mask_sample"] is True and ret.metadata[0]["reward"] is None
    assert ret.metadata[0]["failure"]["kind"] == "verifier"
    assert "expected_answer" in ret.metadata[0]["failure"]["reason"]
    assert ret.observations[0]["content"] == "Environment: verification failed" and ret.answers[0] is None

    batch = {"rewards": ret.rewards, "extra_env_info": ret.metadata, "loss_multiplier": torch.ones(2),
             "generation_lengths": torch.tensor([100, 12]), "prompt_lengths": torch.tensor([50, 8])}
    batch, metrics = env.global_post_process_and_metrics(batch)
    # lengths over the unmasked row 1 only: response 12 - 8 = 4, prompt 8
    assert metrics["rollout/generation_length_mean"] == 4.0 and metrics["rollout/prompt_length_mean"] == 8.0
    assert batch["mask_sample"].tolist() == [True, False]
    assert batch["loss_multiplier"].tolist() == [0.0, 1.0]  # NeMo-RL drops row 0 from the loss
    # metrics over unmasked rows only: reward 1 / 1, accuracy 1 / 1; 1 masked of 2
    assert metrics["rollout/reward_mean"] == 1.0 and metrics["rollout/accuracy"] == 1.0
    assert metrics["rollout/num_masked"] == 1 and metrics["rollout/num_samples"] == 2

    cfg = env.cfg
    env.cfg = dataclasses.replace(cfg, on_failure="raise")
    try:
        with pytest.raises(VerifierError, match="expected_answer"):
            env.step(logs, meta)
    finally:
        env.cfg = cfg


def test_step_user_errors_are_typed(env):
    good = [msg("user", "q"), msg("assistant", "\\boxed{4}")]
    with pytest.raises(ProtocolError, match="extra_env_info"):
        env.step([good], [None])
    with pytest.raises(ProtocolError, match="no assistant message"):
        env.step([[msg("user", "q")]], [{"expected_answer": "4", "agent_ref": {"name": "math_agent"}}])
    with pytest.raises(ProtocolError, match="2 message logs but 1 metadata"):
        env.step([good, good], [{"expected_answer": "4"}])
    # three resource servers and no agent_ref / env.verifier: which one verifies is ambiguous
    with pytest.raises(ConfigError, match=r"\['calculator', 'exact_match', 'math'\]"):
        env.step([good], [{"expected_answer": "4"}])
    with pytest.raises(ProtocolError, match="Did you mean 'math_agent'"):
        env.step([good], [{"expected_answer": "4", "agent_ref": {"name": "math_agnet"}}])
    with pytest.raises(GymPluginError, match="'rewards'"):
        env.global_post_process_and_metrics({"is_end": torch.ones(1)})


def test_config_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        GymEnvironment({"config_path": ["x.yaml"], "on_failure": "ignore", "verify_max_attempts": 0,
                        "verify_concurrency": 0})
    problems = info.value.problems
    assert len(problems) == 5
    assert any("env.verify_concurrency: 0" in p for p in problems)
    assert any("env.config_path: unknown key. Did you mean 'config_paths'?" in p for p in problems)
    assert any("env.config_paths: empty" in p for p in problems)
    assert any("env.on_failure: 'ignore'" in p for p in problems)
    assert any("env.verify_max_attempts: 0" in p for p in problems)


def test_step_only_env_single_verifier_and_no_policy():
    # Step-only use (NeMo-RL generates, Gym verifies): no base_urls, one resource server, rows without agent_ref.
    with GymEnvironment({"config_paths": [GYM_CONFIGS[0]]}) as e:
        ret = e.step([[msg("user", "Capital?"), msg("assistant", "  the  ANSWER. ")]],
                     [{"expected_answer": "The answer"}])
        assert ret.rewards.tolist() == [1.0]  # 'the answer' == 'the answer' after normalisation
        with pytest.raises(ConfigError, match="env.base_urls"):
            e.run_rollouts([row("What is 2+2?", "4")])
    with pytest.raises(ConfigError, match="Did you mean 'exact_match'"):
        GymEnvironment({"config_paths": [GYM_CONFIGS[0]], "verifier": "exact_matc"})


# ---- run_rollouts -------------------------------------------------------------------------------------------------
def test_run_rollouts_single_turn_message_logs(env):
    results = env.run_rollouts([row("What is 2+2?", "4"), row("What is 3+3?", "6")], repeats=2)
    assert [(r["task_index"], r["rollout_index"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["reward"] for r in results] == [1.0, 1.0, 0.0, 0.0]  # \boxed{4} right, \boxed{7} != 6
    assert all(r["failure"] is None and r["mask_sample"] is False for r in results)

    log = results[0]["message_log"]
    assert [m["role"] for m in log] == ["user", "assistant"]
    # prompt: [1, user] + 'What' 'is' '2+2?' + [2] + generation prompt [1, 5]
    prompt = [IM_START, USER, wid("What"), wid("is"), wid("2+2?"), IM_END, *GEN_PROMPT]
    gen = [wid("\\boxed{4}"), IM_END]
    assert log[0]["token_ids"].tolist() == prompt and log[0]["token_ids"].dtype == torch.int64
    assert log[1]["token_ids"].tolist() == gen and log[1]["token_ids"].dtype == torch.int64
    assert log[1]["generation_logprobs"].dtype == torch.float32
    assert log[1]["generation_logprobs"].tolist() == pytest.approx([logprob(t) for t in gen])
    assert "generation_logprobs" not in log[0]
    assert log[1]["content"] == "\\boxed{4}" and log[0]["content"] == ""
    assert results[0]["input_message_log"] == log[:1]
    assert results[0]["full_result"]["expected_answer"] == "4"
    assert results[2]["message_log"][1]["token_ids"].tolist() == [wid("\\boxed{7}"), IM_END]


def test_run_rollouts_multi_turn_tool_message_log(env):
    (result,) = env.run_rollouts([calculator_row(3, 4, 5)])
    assert result["reward"] == 1.0 and result["failure"] is None  # (3 * 4) + 5 = 17 with both tools used
    log = result["message_log"]
    assert [m["role"] for m in log] == ["user", "assistant"] * 3
    call1 = ["<tool_call>", "multiply", '{"a":3,"b":4}', "</tool_call>"]
    call2 = ["<tool_call>", "add", '{"a":12,"b":5}', "</tool_call>"]
    gens = [[wid(w) for w in call1] + [IM_END], [wid(w) for w in call2] + [IM_END],
            words("The answer is \\boxed{17}.") + [IM_END]]
    assert [log[k]["token_ids"].tolist() for k in (1, 3, 5)] == gens
    for k in (1, 3, 5):
        ids = log[k]["token_ids"].tolist()
        assert log[k]["generation_logprobs"].tolist() == pytest.approx([logprob(t) for t in ids])
    # between model calls: the tool result message '{"result": 12}' (2 words), then the generation prompt
    assert log[2]["token_ids"].tolist() == [IM_START, TOOL, wid('{"result":'), wid("12}"), IM_END, *GEN_PROMPT]
    assert log[4]["token_ids"].tolist() == [IM_START, TOOL, wid('{"result":'), wid("17}"), IM_END, *GEN_PROMPT]
    # the first context: the tools block [1, 8, ...], then the user message, then the generation prompt
    prompt_text = calculator_row(3, 4, 5)["responses_create_params"]["input"][0]["content"]
    first = log[0]["token_ids"].tolist()
    user_part = [IM_START, USER, *words(prompt_text), IM_END, *GEN_PROMPT]
    assert first[:2] == [IM_START, TOOLS] and first[-len(user_part):] == user_part
    # the message log is exactly the last model call's prompt + generation
    last = [it for it in result["full_result"]["response"]["output"] if "generation_token_ids" in it][-1]
    flat = torch.cat([m["token_ids"] for m in log]).tolist()
    assert flat == last["prompt_token_ids"] + last["generation_token_ids"]
    assert log[1]["content"] == 'multiply({"a":3,"b":4})' and log[5]["content"] == "The answer is \\boxed{17}."


def test_run_rollouts_failures_masked_or_raised(env):
    rows = [row("LONG question", "4"), row("BROKEN question", "4"), row("What is 2+2?", "4")]
    results = env.run_rollouts(rows)
    assert [r["task_index"] for r in results] == [0, 1, 2]  # every row accounted for
    long_, broken, ok = results
    assert long_["failure"]["kind"] == "missing_token_ids" and long_["message_log"] is None
    assert broken["failure"]["kind"] == "http_status" and "not JSON" in broken["failure"]["last_error"]
    assert long_["mask_sample"] and broken["mask_sample"] and long_["reward"] is None and broken["reward"] is None
    assert ok["failure"] is None and ok["reward"] == 1.0

    cfg = env.cfg
    try:
        env.cfg = dataclasses.replace(cfg, on_failure="raise")
        with pytest.raises(MissingTokenIdsError, match="no model call carries token ids"):
            env.run_rollouts(rows[:1])
        with pytest.raises(GymPluginError, match="http_status"):
            env.run_rollouts(rows[1:2])
    finally:
        env.cfg = cfg


def test_tokenizer_fills_contents(env):
    class IdsAsText:
        """A tokenizer whose decode writes ids as text (enough to see what was decoded)."""

        def decode(self, ids):
            return " ".join(map(str, ids))

    env.set_tokenizer(IdsAsText())
    try:
        (result,) = env.run_rollouts([row("What is 2+2?", "4")])
    finally:
        env.set_tokenizer(None)
    log = result["message_log"]
    assert log[0]["content"] == " ".join(map(str, log[0]["token_ids"].tolist()))
    boxed4 = wid("\\boxed{4}")
    assert log[1]["content"] == f"{boxed4} {IM_END}"


# ---- no hard dependency on ray / nemo_rl ---------------------------------------------------------------------------
def test_import_needs_neither_ray_nor_nemo_rl():
    code = ("import sys, gym_plugin.nemo_rl_env as m; print('ray' in sys.modules, 'nemo_rl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_ray_actor_is_lazy_and_resolves_as_nemo_rl_resolves_it():
    # NeMo-RL's create_env resolves the registered FQN with hydra.utils.get_object, then calls .options().remote()
    from hydra.utils import get_object

    assert get_object("gym_plugin.nemo_rl_env.GymEnvironment") is GymEnvironment
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(GymPluginError, match="needs ray"):
            get_object("gym_plugin.nemo_rl_env.GymEnvironmentActor")
    else:
        assert hasattr(get_object("gym_plugin.nemo_rl_env.GymEnvironmentActor"), "options")


def test_register_with_nemo_rl(tmp_path, monkeypatch):
    # A stand-in for the three nemo_rl registry modules register_with_nemo_rl touches (nemo_rl itself needs ray
    # and GPUs); same names and the same duplicate rule as nemo_rl.environments.utils.register_env.
    pkg = tmp_path / "nemo_rl"
    for sub in ("", "distributed", "environments"):
        (pkg / sub).mkdir(exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "distributed/ray_actor_environment_registry.py").write_text("ACTOR_ENVIRONMENT_REGISTRY = {}\n")
    (pkg / "distributed/virtual_cluster.py").write_text("class PY_EXECUTABLES:\n    SYSTEM = 'python'\n")
    (pkg / "environments/utils.py").write_text(
        "ENV_REGISTRY = {'math': {'actor_class_fqn': 'nemo_rl.environments.math_environment.MathEnvironment'}}\n"
        "def register_env(name, fqn):\n"
        "    if name in ENV_REGISTRY:\n"
        "        raise ValueError(name)\n"
        "    ENV_REGISTRY[name] = {'actor_class_fqn': fqn}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "nemo_rl" or n.startswith("nemo_rl.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        fqn = register_with_nemo_rl("gym")
        assert fqn == "gym_plugin.nemo_rl_env.GymEnvironmentActor"
        assert register_with_nemo_rl("gym") == fqn  # idempotent
        from nemo_rl.distributed.ray_actor_environment_registry import ACTOR_ENVIRONMENT_REGISTRY
        from nemo_rl.environments.utils import ENV_REGISTRY

        assert ENV_REGISTRY["gym"] == {"actor_class_fqn": fqn} and ACTOR_ENVIRONMENT_REGISTRY[fqn] == "python"
        with pytest.raises(ConfigError, match="already registered"):
            register_with_nemo_rl("math")
    finally:
        for name in [n for n in sys.modules if n == "nemo_rl" or n.startswith("nemo_rl.")]:
            del sys.modules[name]


def test_step_again_with_returned_metadata_and_eval_call_shape(env):
    # A multi-turn NeMo-RL episode hands step's metadata back as the next extra_env_info; NeMo-RL's eval calls
    # step(logs, infos, True) positionally.
    log = [msg("user", "2+2?"), msg("assistant", "\\boxed{5}")]
    first = env.step([log], [{"ground_truth": "4", "agent_ref": {"name": "math_agent"}}], True)
    assert first.rewards.tolist() == [0.0] and first.metadata[0]["extracted_answer"] == "5"
    log2 = log + [msg("environment", first.observations[0]["content"]), msg("assistant", "\\boxed{4}")]
    second = env.step([log2], first.metadata, False)
    assert second.rewards.tolist() == [1.0]
    assert second.metadata[0]["extracted_answer"] == "4" and second.metadata[0]["reward"] == 1.0  # not stale
    assert second.answers is None  # return_extracted_answer=False, as NeMo-RL's math environment

    # a row that failed verification (masked) and then verifies is no longer masked
    failed = env.step([log], [{"agent_ref": {"name": "math_agent"}}])
    assert failed.metadata[0]["mask_sample"] is True
    fixed = env.step([log2], [{**failed.metadata[0], "expected_answer": "4"}])
    assert fixed.rewards.tolist() == [1.0] and "mask_sample" not in fixed.metadata[0]
    assert "failure" not in fixed.metadata[0]


def test_stream_rollouts_yields_every_rollout(env):
    import asyncio

    async def gather():
        return [r async for r in env.stream_rollouts([row("What is 2+2?", "4"), row("What is 3+3?", "6")],
                                                     repeats=2)]

    results = asyncio.run(gather())
    got = sorted((r["task_index"], r["rollout_index"], r["reward"]) for r in results)
    assert got == [(0, 0, 1.0), (0, 1, 1.0), (1, 0, 0.0), (1, 1, 0.0)]
    assert all(len(r["message_log"]) == 2 for r in results)


# ---- the conversion on hand-built records ------------------------------------------------------------------------
def _record(*calls) -> dict:
    output = []
    for prompt, gen, lps in calls:
        output.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}],
                       "prompt_token_ids": prompt, "generation_token_ids": gen, "generation_log_probs": lps})
    return {"_ng_task_index": 3, "_ng_rollout_index": 1, "reward": 1.0, "response": {"output": output}}


def test_conversion_rejects_drift_and_bad_token_fields():
    from gym_plugin.nemo_rl_env import rollout_to_message_log

    # call 2's prompt [10, 11, 99, ...] should start with call 1's prompt + generation [10, 11, 12, 13]
    drift = _record(([10, 11], [12, 13], [-0.1, -0.2]), ([10, 11, 99, 13, 14], [15], [-0.3]))
    with pytest.raises(ProtocolError, match="first difference at token 2 of 4") as info:
        rollout_to_message_log(drift)
    assert info.value.kind == "token_drift"
    with pytest.raises(MissingTokenIdsError, match=r"want 2"):
        rollout_to_message_log(_record(([10, 11], [12, 13], [-0.1])))
    with pytest.raises(ProtocolError, match="NaN generation log-probs") as info:
        rollout_to_message_log(_record(([10, 11], [12, 13], [-0.1, float("nan")])))
    assert info.value.kind == "nan_log_probs"
    # a call that extends exactly: context [14] between the calls, nothing re-tokenized
    ok = rollout_to_message_log(_record(([10, 11], [12, 13], [-0.1, -0.2]), ([10, 11, 12, 13, 14], [15], [-0.3])))
    assert [m["token_ids"].tolist() for m in ok] == [[10, 11], [12, 13], [14], [15]]
    assert ok[3]["generation_logprobs"].tolist() == pytest.approx([-0.3])


def test_dead_policy_endpoint_fails_at_start_naming_it():
    from gym_plugin.errors import EndpointUnreachableError

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(EndpointUnreachableError, match=url.replace(".", r"\.")):
        GymEnvironment({"config_paths": [GYM_CONFIGS[1]], "base_urls": [url]})


# ---- a real model: the message log is what NeMo-RL trains on ------------------------------------------------------
def test_message_log_logprobs_match_teacher_forcing_on_the_embedded_tiny_model():
    """NeMo-RL concatenates the message log's token_ids and trains on the assistant tokens against
    generation_logprobs: on a real (tiny, fp32) model served by the embedded policy, those log-probs must equal
    a teacher-forced forward pass over the concatenated ids at the assistant positions."""
    from gym_plugin.servers.embedded import EmbeddedPolicyServer
    from gym_plugin.testing.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    port = free_port()
    server = EmbeddedPolicyServer(model=model, tokenizer=tok, served_model_name="tiny", port=port)
    rows = [{"responses_create_params": {"input": [{"role": "user", "content": "What is 2 + 3?"}],
                                         "max_output_tokens": 12, "temperature": 1.0},
             "expected_answer": "5", "agent_ref": {"name": "exact_match_agent"}}]
    with GymEnvironment({"config_paths": [GYM_CONFIGS[0]], "base_urls": [f"http://127.0.0.1:{port}/v1"],
                         "model_name": "tiny"}, extra_servers=[server], tokenizer=tok) as e:
        results = e.run_rollouts(rows, repeats=2)
    assert [r["failure"] for r in results] == [None, None]
    for r in results:
        log = r["message_log"]
        assert [m["role"] for m in log] == ["user", "assistant"]
        ids = torch.cat([m["token_ids"] for m in log])  # [T]
        n_prompt, n_gen = len(log[0]["token_ids"]), len(log[1]["token_ids"])
        assert 0 < n_gen <= 12 and log[0]["content"] == tok.decode(log[0]["token_ids"].tolist())
        with torch.no_grad():
            logits = model(ids[None]).logits[0].float()  # [T, V]
        # token t is predicted by position t - 1: the generation's log-probs come from rows n_prompt-1 .. T-2
        lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]  # [T - 1]
        teacher = lp[n_prompt - 1:]  # [G]
        assert teacher.shape == (n_gen,)
        assert (teacher - log[1]["generation_logprobs"]).abs().max().item() < 1e-4
        assert r["reward"] in (0.0, 1.0)
