"""TRL 1.16's real GRPOTrainer driven by gym_plugin.trl.GymRollouts, on the tiny model (CPU, seconds each).

- single turn (letters env, the trainer's own module served in process): real optimizer steps, shared weights (the
  second collection samples from the updated module: its log-probs equal a teacher-forced pass of the weights the
  first step produced), gym/* metrics in TRL's logs;
- multi-turn (calculator env, the scripted fake as the endpoint, ids inside the tiny vocabulary): ``env_mask``,
  ``prompt_ids + completion_ids`` and ``logprobs`` checked token by token against process_rollouts of the same
  records, then TRL trains on them;
- a failed rollout: it keeps its slot with mask 0 and a NaN reward, TRL's group baseline is the other three's;
- way (b): a separate embedded server as the endpoint, WeightSyncCallback(CheckpointWeightSync) after each step.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

from trl import GRPOConfig, GRPOTrainer

from gym_plugin.models.tiny import build_tiny_model, build_tiny_tokenizer
from gym_plugin.process import process_rollouts
from gym_plugin.servers.embedded import EmbeddedPolicyServer
from gym_plugin.servers.resources.calculator import calculator_row
from gym_plugin.tasks import letter_rows
from gym_plugin.testing.background import BackgroundServer
from gym_plugin.testing.fake_openai import WORD_ID_BASE, Behaviour, FakeOpenAIServer
from gym_plugin.testing.scripted_tasks import calculator_uses_tools, task_script
from gym_plugin.trl import GymRollouts, WeightSyncCallback, gym_dataset, gym_reward
from gym_plugin.weight_sync import CheckpointWeightSync

pytestmark = [pytest.mark.trl, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[3]
LETTERS = ROOT / "examples/letters_env.yaml"
CALCULATOR = ROOT / "conf/gym/calculator.yaml"


def grpo_args(tmp_path: Path, **overrides) -> GRPOConfig:
    """8 completions per step = 2 prompts x 4 generations, one optimizer step per batch, no KL, CPU, float32 (TRL's
    default bf16=True autocasts the module's forward, which the shared-weights sampler then runs too)."""
    kw = dict(output_dir=str(tmp_path / "trl_out"), use_cpu=True, bf16=False, per_device_train_batch_size=8, num_generations=4,
              max_completion_length=16, max_steps=2, logging_steps=1, save_strategy="no", report_to=[],
              learning_rate=1e-2, lr_scheduler_type="constant", gradient_checkpointing=False, seed=0, beta=0.0,
              temperature=1.0, shuffle_dataset=False)
    kw.update(overrides)
    return GRPOConfig(**kw)


class Recorded(GRPOTrainer):
    """GRPOTrainer keeping what each generation batch became (TRL's own output dict), to check advantages."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches: list[dict] = []

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.batches.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()})
        return out


class Snapshots:
    """A rollout_func wrapper that keeps, per call, the module's weights at call time and the output."""

    def __init__(self, inner: GymRollouts, module: torch.nn.Module):
        self.inner, self.module = inner, module
        self.calls: list[tuple[dict, dict]] = []

    def __call__(self, prompts, trainer):
        weights = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        out = self.inner(prompts, trainer)
        self.calls.append((weights, out))
        return out


def teacher_forced_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[C] log p(completion[t] | prompt + completion[:t]) under ``model`` (raw, temperature 1)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]  # [C, V]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def assert_matches_process_rollouts(records: list[dict], out: dict, tok) -> None:
    """Token by token: process_rollouts of the same records gives one row per rollout (no drift) whose ids are
    ``prompt_ids + completion_ids``, whose loss mask is ``[0] * len(prompt_ids) + env_mask`` and whose rollout
    log-probs are ``logprobs`` (0 off the model's tokens in both)."""
    batch = process_rollouts(records, tok)
    assert batch.rollout_index.tolist() == list(range(len(records)))
    for i, record in enumerate(records):
        p, c, m, lp = out["prompt_ids"][i], out["completion_ids"][i], out["env_mask"][i], out["logprobs"][i]
        n = int(batch.attention_mask[i].sum())
        assert batch.input_ids[i, :n].tolist() == p + c
        assert batch.loss_mask[i, :n].tolist() == [0.0] * len(p) + [float(x) for x in m]
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float32), batch.rollout_logprobs[i, len(p):n])
        calls = [it for it in record["response"]["output"] if "generation_token_ids" in it]
        assert p == calls[0]["prompt_token_ids"]  # TRL's prompt = the first call's prompt
        assert sum(m) == sum(len(it["generation_token_ids"]) for it in calls)
        if len(calls) > 1:  # environment tokens (tool results + scaffolding) sit between the generations: mask 0
            assert 0 in m[: len(m) - len(calls[-1]["generation_token_ids"])]


def test_single_turn_trains_the_served_module_itself(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    rollouts = GymRollouts(LETTERS)
    recorder = Snapshots(rollouts, model)
    # 6 new tokens: the random replies contain the letter about half the time, so groups have mixed rewards (a
    # batch whose groups all agree has zero advantages and leaves the weights as they were)
    trainer = Recorded(model=model, reward_funcs=[gym_reward], args=grpo_args(tmp_path, max_steps=3,
                                                                               max_completion_length=6),
                       train_dataset=gym_dataset(letter_rows()), processing_class=tok, rollout_func=recorder)
    try:
        trainer.train()
        served = rollouts.policy_server.model
    finally:
        rollouts.close()
    # the embedded engine served the trainer's module itself: no copy
    assert served is model
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(served.parameters(), model.parameters()))
    # three real optimizer steps moved the weights
    assert trainer.state.global_step == 3
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    # every collection sampled from the module as it was then: its reported log-probs are a teacher-forced pass of
    # those weights on every model token
    check = build_tiny_model(tok)
    for weights, out in recorder.calls:
        check.load_state_dict(weights)
        for p, c, m, lp in zip(out["prompt_ids"], out["completion_ids"], out["env_mask"], out["logprobs"]):
            assert m == [1] * len(c)  # single turn: every completion token is the model's
            torch.testing.assert_close(torch.tensor(lp), teacher_forced_logprobs(check, p, c), atol=1e-4, rtol=0)
    # ... and after a step that changed the weights, not the ones before it (no stale copy anywhere)
    changed = [k for k in range(1, 3) if any(not torch.equal(recorder.calls[k - 1][0][n], recorder.calls[k][0][n])
                                             for n in recorder.calls[k][0])]
    assert changed, "no step changed the weights (every group had equal rewards)"
    before, (_, after) = recorder.calls[changed[0] - 1][0], recorder.calls[changed[0]]
    check.load_state_dict(before)
    p, c = after["prompt_ids"][0], after["completion_ids"][0]
    assert (torch.tensor(after["logprobs"][0]) - teacher_forced_logprobs(check, p, c)).abs().max() > 1e-3
    # the rollouts' policy_version is the trainer's global step at collection (the 3rd collection: 2)
    assert {it["policy_version"] for r in rollouts.last_records for it in r["response"]["output"]
            if "policy_version" in it} == {2}
    # Gym metrics in TRL's logs, per step: 2 prompts x 4 = 8 rollouts, one model call each, none failed
    logs = [h for h in trainer.state.log_history if "gym/num_rollouts" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["gym/num_rollouts"] == 8 and h["gym/num_failed"] == 0 and h["gym/turns_mean"] == 1
        assert h["gym/tool_calls_mean"] == 0 and 0 <= h["gym/reward/letters_agent"] <= 1
        assert h["gym/reward/letters_agent"] == pytest.approx(h["rewards/gym_reward/mean"])


def test_calculator_multi_turn_env_mask_matches_process_rollouts(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    # The scripted fake solves calculator rows with multiply -> add -> \boxed{} (or skips the tools when
    # (a + b + c) % 5 == 0); its word ids are kept inside the tiny vocabulary so TRL's model can score them.
    fake = FakeOpenAIServer("fake", task_script, vocab_size=len(tok) - WORD_ID_BASE)
    rows = [calculator_row(3, 4, 5), calculator_row(2, 6, 2)]  # tools: 3+4+5=12 -> yes; 2+6+2=10 -> no
    assert calculator_uses_tools(3, 4, 5) and not calculator_uses_tools(2, 6, 2)
    with BackgroundServer(fake):
        rollouts = GymRollouts(CALCULATOR, base_urls=[fake.base_url], model_name="fake-model")
        trainer = Recorded(model=model, reward_funcs=[gym_reward], args=grpo_args(tmp_path, max_steps=1),
                           train_dataset=gym_dataset(rows), processing_class=tok, rollout_func=rollouts)
        try:
            trainer.train()
        finally:
            rollouts.close()
    records, out = rollouts.last_records, rollouts.last_output
    assert len(records) == 8 and all(r["reward"] is not None for r in records)
    turns = sorted(len([it for it in r["response"]["output"] if "generation_token_ids" in it]) for r in records)
    assert turns == [1, 1, 1, 1, 3, 3, 3, 3]  # the tool-using row: 3 model calls, 2 tool results between
    assert_matches_process_rollouts(records, out, tok)
    # TRL saw the multi-turn completions: its token count is the model's tokens only (env_mask sums)
    h = next(h for h in trainer.state.log_history if "gym/num_rollouts" in h)
    assert h["completions/mean_length"] == pytest.approx(sum(map(sum, out["env_mask"])) / 8)
    assert h["gym/turns_mean"] == 2.0 and h["gym/tool_calls_mean"] == 1.0  # (4 x 3 + 4 x 1) / 8; (4 x 2) / 8
    assert trainer.batches[0]["tool_mask"].shape == trainer.batches[0]["completion_ids"].shape


def test_failed_rollout_keeps_its_slot_and_leaves_the_group_baseline_alone(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    rows = letter_rows()[:1]  # "Write a word that contains the letter e."
    replies = itertools.count()

    def script(messages, body):
        # 1st request: a 400 the policy model server does not retry (the rollout fails); then "yes", "no", "see":
        # rewards 1, 0, 1 for the letter e (substring match), in whatever order the 3 others arrive
        k = next(replies)
        return Behaviour(fail_status=400, fail_times=1) if k == 0 else ["yes", "no", "see"][(k - 1) % 3]

    fake = FakeOpenAIServer("fake", script, vocab_size=len(tok) - WORD_ID_BASE)
    with BackgroundServer(fake):
        rollouts = GymRollouts(LETTERS, base_urls=[fake.base_url], model_name="fake-model")
        trainer = Recorded(model=model, reward_funcs=[gym_reward],
                           args=grpo_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                           train_dataset=gym_dataset(rows), processing_class=tok, rollout_func=rollouts)
        try:
            trainer.train()
        finally:
            rollouts.close()
    records, out = rollouts.last_records, rollouts.last_output
    failed = [i for i, r in enumerate(records) if r.get("failure") is not None]
    assert len(failed) == 1
    f = failed[0]
    # the placeholder: one eos token, mask 0, reward None (TRL: NaN)
    assert out["prompt_ids"][f] == [tok.eos_token_id] and out["completion_ids"][f] == [tok.eos_token_id]
    assert out["env_mask"][f] == [0] and out["gym_reward"][f] is None
    ok = [i for i in range(4) if i != f]
    assert sorted(out["gym_reward"][i] for i in ok) == [0.0, 1.0, 1.0]
    # TRL's advantages: the failed slot 0; the others against the mean/std of the three that worked, by hand:
    # mean 2/3, unbiased std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3) = 0.57735 -> +0.57735 / -1.15470
    # (a reward 0 in the failed slot would give mean 0.5 and +-0.866 instead)
    adv = trainer.batches[0]["advantages"]
    assert adv[f].item() == 0.0
    for i in ok:
        expected = (out["gym_reward"][i] - 2 / 3) / (math.sqrt(1 / 3) + 1e-4)
        assert adv[i].item() == pytest.approx(expected, abs=1e-5)
    h = next(h for h in trainer.state.log_history if "gym/num_rollouts" in h)
    assert h["gym/num_failed"] == 1 and h["gym/num_no_signal"] == 1 and h["gym/num_rollouts"] == 4
    assert h["reward"] == pytest.approx(2 / 3)  # TRL's logged reward leaves the NaN out


def test_external_endpoint_gets_the_weights_after_every_step(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    # the endpoint: an embedded server with a copy of its own, reached over HTTP like a vLLM replica would be
    served = EmbeddedPolicyServer(model=copy.deepcopy(model), tokenizer=tok, served_model_name="tiny-remote")
    with BackgroundServer(served):
        sync = CheckpointWeightSync([served.base_url], tmp_path / "weights")
        rollouts = GymRollouts(LETTERS, base_urls=[served.base_url], model_name="tiny-remote")
        callback = WeightSyncCallback(sync)
        trainer = Recorded(model=model, reward_funcs=[gym_reward], args=grpo_args(tmp_path),
                           train_dataset=gym_dataset(letter_rows()), processing_class=tok, rollout_func=rollouts,
                           callbacks=[callback])
        try:
            trainer.train()
        finally:
            rollouts.close()
        versions = {it["policy_version"] for r in rollouts.last_records for it in r["response"]["output"]
                    if "policy_version" in it}
        remote = served.model.state_dict()
    # collection 2 was sampled after the first sync (version 1); the endpoint now holds the weights of step 2
    assert versions == {1} and callback.version == 2 and served.policy_version == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(remote[k], v, atol=0, rtol=0)


def test_vllm_reload_callback_talks_vllms_control_plane(tmp_path):
    # Sampling from the scripted fake; the weight updates go to a fake of vLLM 0.32's dev-mode control routes
    # (gym_plugin/testing/fake_vllm_control.py: it refuses what vLLM refuses and records every call).
    from gym_plugin.testing.fake_vllm_control import FakeVLLMControlServer
    from gym_plugin.weight_sync import WeightSyncConfig

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    fake = FakeOpenAIServer("fake", "yes", vocab_size=len(tok) - WORD_ID_BASE)
    control = FakeVLLMControlServer("vllm")
    with BackgroundServer(fake), BackgroundServer(control):
        callback = WeightSyncCallback(WeightSyncConfig(kind="vllm_reload"), base_urls=[control.url],
                                      directory=tmp_path)
        rollouts = GymRollouts(LETTERS, base_urls=[fake.base_url], model_name="fake-model")
        trainer = Recorded(model=model, reward_funcs=[gym_reward], args=grpo_args(tmp_path), callbacks=[callback],
                           train_dataset=gym_dataset(letter_rows()), processing_class=tok, rollout_func=rollouts)
        try:
            trainer.train()
        finally:
            rollouts.close()
    # one reload per optimizer step, each version announced after the reload; the reload read every weight
    rpcs = [c.body["method"] for c in control.calls if c.route == "/collective_rpc"]
    assert rpcs.count("gym_plugin_reload_weights") == 2
    assert [c.body["new_version"] for c in control.calls if c.route == "/update_weight_version"] == ["1", "2"]
    assert control.weight_version == "2" and callback.version == 2
    assert set(control.received_names) == set(model.state_dict())
    assert all(h["gym/num_failed"] == 0 for h in trainer.state.log_history if "gym/num_failed" in h)


CALC_TARGETS = ['<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>',
                '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 5}}\n</tool_call>',
                "The answer is \\boxed{17}."]
"""What a model solving calculator_row(3, 4, 5) says on its 3 turns."""


def teach_calculator(model, tok, row: dict) -> None:
    """Make the random tiny model solve ``row`` with the tools: collect a greedy rollout through the real servers
    (embedded engine, token-in/token-out), fit the first wrong turn's real prompt ids to its target reply, repeat
    until the rollout is multiply -> add -> \\boxed{17} (4 rounds here, ~40 s on 2 loaded cores)."""
    import tempfile

    from gym_plugin import GymIntegration

    key = "policy_model.responses_api_models.vllm_model"
    folder = tempfile.mkdtemp(prefix="tiny_tok_")
    tok.save_pretrained(folder)
    server = EmbeddedPolicyServer(model=model, tokenizer=tok, served_model_name="policy")
    greedy = {**row, "responses_create_params": {**row["responses_create_params"], "temperature": 0.0,
                                                 "max_output_tokens": 48}}
    pairs: dict[int, tuple[list[int], list[int]]] = {}
    with GymIntegration("policy", None, CALCULATOR, extra_servers=[server], overrides=[
            "head_server.port=0", f"{key}.token_mode=completions", f"{key}.tokenizer={folder}"]) as gym:
        for _ in range(8):
            (record,) = gym.collect([greedy])
            calls = [it for it in record["response"]["output"] if "generation_token_ids" in it]
            if record["reward"] == 1.0 and len(calls) == 3:
                return
            for k, c in enumerate(calls[:3]):
                want = tok.encode(CALC_TARGETS[k], add_special_tokens=False) + [tok.eos_token_id]
                if list(c["generation_token_ids"]) != want:
                    pairs[k] = (list(c["prompt_token_ids"]), want)
                    break
            model.train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            with server.exclusive_weights():  # the served module changes in place: the engine's KV cache goes
                for _ in range(150):
                    optimizer.zero_grad()
                    loss = sum(torch.nn.functional.cross_entropy(
                        model(input_ids=torch.tensor([p + t])).logits[0, len(p) - 1:-1], torch.tensor(t))
                        for p, t in pairs.values())
                    loss.backward()
                    optimizer.step()
            model.eval()
    raise AssertionError(f"the tiny model did not learn the calculator script: {pairs}")


def test_calculator_multi_turn_with_the_trainers_own_module(tmp_path):
    # Way (a) on a multi-turn env: the trainer's module (taught to call the tools) samples every turn in process,
    # token-in/token-out, so the rollouts never drift and env_mask equals process_rollouts' loss mask.
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    row = calculator_row(3, 4, 5)
    teach_calculator(model, tok, row)
    rollouts = GymRollouts(CALCULATOR)
    trainer = Recorded(model=model, reward_funcs=[gym_reward],
                       args=grpo_args(tmp_path, max_steps=1, per_device_train_batch_size=4, max_completion_length=48,
                                      learning_rate=1e-4),
                       train_dataset=gym_dataset([row]), processing_class=tok, rollout_func=rollouts)
    try:
        trainer.train()
    finally:
        rollouts.close()
    records, out = rollouts.last_records, rollouts.last_output
    turns = [len([it for it in r["response"]["output"] if "generation_token_ids" in it]) for r in records]
    assert max(turns) == 3, turns  # temperature 1 on a peaked model: (nearly) always the 3-turn script
    assert_matches_process_rollouts(records, out, tok)
    h = next(h for h in trainer.state.log_history if "gym/num_rollouts" in h)
    assert h["gym/drift_count"] == 0 and h["gym/num_failed"] == 0
    assert h["gym/turns_mean"] == pytest.approx(sum(turns) / 4)
