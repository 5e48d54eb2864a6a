"""GymEnvironment (NeMo-RL's classic step() path) driven the way NeMo-RL drives an environment, against real Gym
servers on 127.0.0.1: NeMo-RL's calculate_rewards passes the batch's message logs (stripped to role/content) and
the rows' ``extra_env_info``, then unpacks the EnvironmentReturn by position. Whole Gym rollouts (NeMo-RL's Gym
path) are tests/integration/test_nemo_rl_gym.py; NeMo-RL's own code on both paths is tests/peers/nemo_rl/.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gym_plugin.testing.masking  # noqa: F401 (registers resources_servers/exact_match_masking)
from gym_plugin.errors import ConfigError, GymPluginError, ProtocolError, VerifierError
from gym_plugin.nemo_rl.env import EnvironmentReturn, GymEnvironment, register_with_nemo_rl

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
GYM_CONFIGS = [str(ROOT / "conf/gym" / f) for f in ("exact_match.yaml", "math.yaml", "calculator.yaml")]

QA_AGENT = {  # exact match that flags rows with flag_mask_sample (gym_plugin.testing.masking)
    "qa": {"resources_servers": {"exact_match_masking": {}}},
    "qa_agent": {"responses_api_agents": {"simple_agent": {
        "resources_server": {"type": "resources_servers", "name": "qa"},
        "model_server": {"type": "responses_api_models", "name": "policy_model"}, "max_turns": 1}}},
}


@pytest.fixture(scope="module")
def env():
    e = GymEnvironment({"config_paths": GYM_CONFIGS, "gym_config": QA_AGENT})
    yield e
    e.shutdown()


@pytest.fixture
def masking(env):
    """The env with on_failure: mask for one test."""
    cfg = env.cfg
    env.cfg = dataclasses.replace(cfg, on_failure="mask")
    yield env
    env.cfg = cfg


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


def test_step_verifier_failure_raises_by_default_naming_the_row(env):
    # NeMo-RL's classic path cannot leave a row out of the loss (tests/peers/nemo_rl shows it): a verification
    # that failed must not come back as a reward at all.
    logs = [[msg("user", "2+2?"), msg("assistant", "\\boxed{4}")]] * 2
    meta = [{"ground_truth": "4", "agent_ref": {"name": "math_agent"}},
            {"agent_ref": {"name": "math_agent"}}]  # no expected answer: the verifier cannot judge it
    with pytest.raises(VerifierError) as info:
        env.step(logs, meta)
    text = str(info.value)
    assert text.startswith("1 of 2 rows cannot be trained on as their reward") and "row 1: " in text
    assert "expected_answer" in text and "on_failure: mask" in text and "Gym path" in text


def test_step_flagged_verdict_raises_by_default(env):
    logs = [[msg("user", "Capital of France?"), msg("assistant", "Paris")]]
    meta = [{"expected_answer": "Paris", "agent_ref": {"name": "qa_agent"}, "flag_mask_sample": True}]
    with pytest.raises(VerifierError, match=r"row 0: the verifier at .* judged it \(reward 1\) but flagged it"):
        env.step(logs, meta)


def test_step_on_failure_mask_flags_rows_for_trainers_that_read_it(masking, caplog):
    logs = [[msg("user", "2+2?"), msg("assistant", "\\boxed{4}")]] * 3
    meta = [{"agent_ref": {"name": "math_agent"}},  # no expected answer: the verifier cannot judge it
            {"ground_truth": "4", "agent_ref": {"name": "math_agent"}},
            {"expected_answer": "4", "agent_ref": {"name": "qa_agent"}, "flag_mask_sample": True}]
    with caplog.at_level(logging.WARNING, logger="gym_plugin.nemo_rl.env"):
        ret = nemo_rl_step(masking, logs, meta)
    assert "2 of 3 rows carry mask_sample" in caplog.text and "NeMo-RL's classic path ignores" in caplog.text
    assert ret.rewards.tolist() == [0.0, 1.0, 1.0]  # row 0's 0.0 is a placeholder, flagged below
    assert ret.metadata[0]["mask_sample"] is True and ret.metadata[0]["reward"] is None
    assert ret.metadata[0]["failure"]["kind"] == "verifier"
    assert "expected_answer" in ret.metadata[0]["failure"]["reason"]
    assert ret.observations[0]["content"] == "Environment: verification failed" and ret.answers[0] is None
    assert ret.metadata[2]["mask_sample"] is True and ret.metadata[2]["reward"] == 1.0  # judged, flagged

    batch = {"rewards": ret.rewards, "extra_env_info": ret.metadata, "loss_multiplier": torch.ones(3),
             "generation_lengths": torch.tensor([100, 12, 30]), "prompt_lengths": torch.tensor([50, 8, 20])}
    batch, metrics = masking.global_post_process_and_metrics(batch)
    # lengths over the unmasked row 1 only: response 12 - 8 = 4, prompt 8
    assert metrics["rollout/generation_length_mean"] == 4.0 and metrics["rollout/prompt_length_mean"] == 8.0
    assert batch["mask_sample"].tolist() == [True, False, True]
    assert batch["loss_multiplier"].tolist() == [0.0, 1.0, 0.0]  # a trainer that calls this drops rows 0, 2
    # metrics over unmasked rows only: reward 1 / 1, accuracy 1 / 1; 2 masked of 3
    assert metrics["rollout/reward_mean"] == 1.0 and metrics["rollout/accuracy"] == 1.0
    assert metrics["rollout/num_masked"] == 2 and metrics["rollout/num_samples"] == 3


def test_step_user_errors_are_typed(env):
    good = [msg("user", "q"), msg("assistant", "\\boxed{4}")]
    with pytest.raises(ProtocolError, match="extra_env_info"):
        env.step([good], [None])
    with pytest.raises(ProtocolError, match="no assistant message"):
        env.step([[msg("user", "q")]], [{"expected_answer": "4", "agent_ref": {"name": "math_agent"}}])
    with pytest.raises(ProtocolError, match="2 message logs but 1 metadata"):
        env.step([good, good], [{"expected_answer": "4"}])
    # four resource servers and no agent_ref / env.verifier: which one verifies is ambiguous
    with pytest.raises(ConfigError, match=r"\['calculator', 'exact_match', 'math', 'qa'\]"):
        env.step([good], [{"expected_answer": "4"}])
    with pytest.raises(ProtocolError, match="Did you mean 'math_agent'"):
        env.step([good], [{"expected_answer": "4", "agent_ref": {"name": "math_agnet"}}])
    with pytest.raises(GymPluginError, match="'rewards'"):
        env.global_post_process_and_metrics({"is_end": torch.ones(1)})


def test_config_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        GymEnvironment({"config_path": ["x.yaml"], "on_failure": "ignore", "verify_max_attempts": 0,
                        "verify_concurrency": 0, "base_urls": ["http://127.0.0.1:8000/v1"]})
    problems = info.value.problems
    assert len(problems) == 6
    assert any(p.startswith("env.base_urls: whole Gym rollouts against a policy endpoint are NeMo-RL's Gym path")
               for p in problems)
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
    with pytest.raises(ConfigError, match="Did you mean 'exact_match'"):
        GymEnvironment({"config_paths": [GYM_CONFIGS[0]], "verifier": "exact_matc"})


# ---- no hard dependency on ray / nemo_rl ---------------------------------------------------------------------------
def test_import_needs_neither_ray_nor_nemo_rl():
    code = ("import sys, gym_plugin.nemo_rl.env, gym_plugin.nemo_rl.gym; "
            "print('ray' in sys.modules, 'nemo_rl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_ray_actor_is_lazy_and_resolves_as_nemo_rl_resolves_it():
    # NeMo-RL's create_env resolves the registered FQN with hydra.utils.get_object, then calls .options().remote()
    from hydra.utils import get_object

    assert get_object("gym_plugin.nemo_rl.env.GymEnvironment") is GymEnvironment
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(GymPluginError, match="needs ray"):
            get_object("gym_plugin.nemo_rl.env.GymEnvironmentActor")
    else:
        assert hasattr(get_object("gym_plugin.nemo_rl.env.GymEnvironmentActor"), "options")


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
        assert fqn == "gym_plugin.nemo_rl.env.GymEnvironmentActor"
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
    cfg = env.cfg
    env.cfg = dataclasses.replace(cfg, on_failure="mask")
    try:
        failed = env.step([log], [{"agent_ref": {"name": "math_agent"}}])
    finally:
        env.cfg = cfg
    assert failed.metadata[0]["mask_sample"] is True
    fixed = env.step([log2], [{**failed.metadata[0], "expected_answer": "4"}])
    assert fixed.rewards.tolist() == [1.0] and "mask_sample" not in fixed.metadata[0]
    assert "failure" not in fixed.metadata[0]


