"""NeMo-RL's own classic environment path (snapshot 7ea279a) on gym_plugin's GymEnvironment, under a local Ray.

``register_with_nemo_rl`` + NeMo-RL's ``create_env`` build the actor; NeMo-RL's ``run_multi_turn_rollout``
generates each turn and calls its ``calculate_rewards``, which calls ``step`` on the actor. The policy is a
scripted generation backend in NeMo-RL's GenerationInterface shape (the reply is picked by a marker in the
decoded prompt and tokenized with the tiny tokenizer), so rewards are known in advance.

What this path can and cannot do: NeMo-RL keeps step's metadata only for rows that continue, and the batch's
``loss_multiplier`` / ``mask_sample`` never come from the environment, so a verification that failed cannot be
masked here. gym_plugin therefore raises by default; the last test pins the limitation that makes that
necessary (with on_failure: mask, NeMo-RL trains the placeholder 0.0 with loss multiplier 1).
"""

from __future__ import annotations

import pytest
import torch

from gym_plugin.models.tiny import build_tiny_tokenizer
from tests.peers.nemo_rl.conftest import ROOT

pytestmark = [pytest.mark.nemo_rl, pytest.mark.timeout(300)]

ENV_NAME = "gym_plugin_verify"
SCRIPT = [("France", "Paris"), ("Italy", "Milan")]  # marker in the prompt -> the scripted answer


class ScriptedGeneration:
    """NeMo-RL's ``GenerationInterface.generate`` for a scripted policy: right-padded ``output_ids`` = prompt +
    reply ids + eos, ``logprobs`` -0.5 on generated tokens, lengths, no truncation."""

    cfg = {"backend": "scripted"}

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, data, greedy: bool = False):
        from nemo_rl.distributed.batched_data_dict import BatchedDataDict

        ids, lengths = data["input_ids"], data["input_lengths"]  # [B, S], [B]
        rows, gen_lens = [], []
        for i in range(ids.shape[0]):
            prompt = ids[i, : int(lengths[i])].tolist()
            text = self.tok.decode(prompt)
            reply = next((answer for marker, answer in SCRIPT if marker in text), "I do not know")
            gen = self.tok.encode(reply, add_special_tokens=False) + [self.tok.eos_token_id]
            rows.append(prompt + gen)
            gen_lens.append(len(gen))
        width = max(map(len, rows))
        out = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)  # [B, T]
        logprobs = torch.zeros(len(rows), width)  # [B, T]
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
            logprobs[i, len(row) - gen_lens[i] : len(row)] = -0.5
        return BatchedDataDict({
            "output_ids": out, "logprobs": logprobs, "generation_lengths": torch.tensor(gen_lens),
            "unpadded_sequence_lengths": torch.tensor([len(r) for r in rows]),
            "truncated": torch.zeros(len(rows), dtype=torch.bool),
        })


def input_batch(tokenizer, prompts: list[str], metadata: list[dict]):
    from nemo_rl.distributed.batched_data_dict import BatchedDataDict

    logs = [[{"role": "user", "content": p, "token_ids": torch.tensor(tokenizer.encode(p, add_special_tokens=False))}]
            for p in prompts]
    return BatchedDataDict({
        "message_log": logs, "extra_env_info": metadata, "task_name": [ENV_NAME] * len(prompts),
        "loss_multiplier": torch.ones(len(prompts)), "stop_strings": [None] * len(prompts),
    })


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def make_env(ray_local):
    import ray
    from nemo_rl.environments.utils import create_env

    from gym_plugin.nemo_rl.env import register_with_nemo_rl

    register_with_nemo_rl(ENV_NAME)
    actors = []

    def make(**cfg):
        actor = create_env(ENV_NAME, {"config_paths": [str(ROOT / "conf/gym/exact_match.yaml")], **cfg})
        actors.append(actor)
        return actor

    yield make
    for actor in actors:
        ray.get(actor.shutdown.remote(), timeout=30)
        ray.kill(actor)


def test_rewards_through_run_multi_turn_rollout_and_calculate_rewards(make_env, tokenizer):
    from nemo_rl.experience.rollouts import calculate_rewards, run_multi_turn_rollout

    env = make_env()
    prompts = ["Capital of France?", "Capital of Italy?"]
    meta = [{"ground_truth": "Paris"}, {"ground_truth": "Rome"}]  # NeMo-RL math data's key, aliased
    batch, metrics = run_multi_turn_rollout(ScriptedGeneration(tokenizer), input_batch(tokenizer, prompts, meta),
                                            tokenizer, {ENV_NAME: env}, max_seq_len=256, max_rollout_turns=3)
    assert batch["total_reward"].tolist() == [1.0, 0.0]  # 'Paris' == Paris; 'Milan' != Rome
    assert batch["loss_multiplier"].tolist() == [1.0, 1.0]
    assert metrics["total_turns"] == 2 and metrics["natural_termination_rate"] == 1.0  # one turn each
    log = batch["message_log"][0]
    assert [m["role"] for m in log] == ["user", "assistant", "environment"]
    assert log[1]["token_ids"].tolist() == tokenizer.encode("Paris", add_special_tokens=False) + [
        tokenizer.eos_token_id]
    assert log[2]["content"] == "Environment: correct"
    assert batch["message_log"][1][2]["content"] == "Environment: incorrect"

    # calculate_rewards directly on the finished batch: the same verdicts, unpacked by position
    ret = calculate_rewards(batch, {ENV_NAME: env})
    assert ret.rewards.tolist() == [1.0, 0.0] and ret.terminateds.tolist() == [1.0, 1.0]
    assert ret.answers == ["Paris", "Milan"]


def test_failed_verification_stops_the_rollout_by_default(make_env, tokenizer):
    from nemo_rl.experience.rollouts import run_multi_turn_rollout

    from gym_plugin.errors import VerifierError

    env = make_env()
    prompts = ["Capital of France?", "Capital of Italy?"]
    meta = [{"ground_truth": "Paris"}, {"note": "no expected answer: the verifier cannot judge it"}]
    with pytest.raises(VerifierError) as info:  # the typed error crosses Ray and out of NeMo-RL's loop
        run_multi_turn_rollout(ScriptedGeneration(tokenizer), input_batch(tokenizer, prompts, meta), tokenizer,
                               {ENV_NAME: env}, max_seq_len=256, max_rollout_turns=3)
    assert "1 of 2 rows cannot be trained on as their reward" in str(info.value)
    assert "row 1: " in str(info.value) and "expected_answer" in str(info.value)


def test_nemo_rl_classic_path_cannot_mask_so_mask_mode_trains_a_zero(make_env, tokenizer):
    """Why on_failure defaults to raise: with mask, step flags the row, and NeMo-RL drops the flag."""
    from nemo_rl.experience.rollouts import calculate_rewards, run_multi_turn_rollout

    env = make_env(on_failure="mask")
    prompts = ["Capital of France?", "Capital of Italy?"]
    meta = [{"ground_truth": "Paris"}, {"note": "no expected answer"}]
    batch, _ = run_multi_turn_rollout(ScriptedGeneration(tokenizer), input_batch(tokenizer, prompts, meta),
                                      tokenizer, {ENV_NAME: env}, max_seq_len=256, max_rollout_turns=3)
    ret = calculate_rewards(batch, {ENV_NAME: env})
    assert ret.metadata[1]["mask_sample"] is True  # step did flag it ...
    assert batch["extra_env_info"][1] == {"note": "no expected answer"}  # ... NeMo-RL kept the old metadata
    assert "mask_sample" not in batch  # nothing in the batch masks the row
    assert batch["total_reward"].tolist() == [1.0, 0.0] and batch["loss_multiplier"].tolist() == [1.0, 1.0]
