"""process_rollouts: masks, drift, padding, truncation, failures, groups. Expected tensors worked out by hand."""

from __future__ import annotations

import pytest
import torch

from gym_plugin.errors import ConfigError, ProtocolError
from gym_plugin.process import process_rollouts


def call_item(prompt, gen, lps, kind="function_call"):
    """The last output item of one model call, carrying the three token fields."""
    item = {"type": kind, "prompt_token_ids": list(prompt), "generation_token_ids": list(gen), "generation_log_probs": list(lps)}
    if kind == "function_call":
        item.update(call_id="c", name="calc", arguments="{}")
    else:
        item.update(role="assistant", content=[{"type": "output_text", "text": "x"}])
    return item


def rollout(calls, reward=1.0, task=0, extra_items=True, **keys):
    """A success record whose output holds one token-carrying item per (prompt, gen, lps) call, with a
    reasoning item (no tokens) before each call and a function_call_output (no tokens) after each but the last."""
    output = []
    for k, (prompt, gen, lps) in enumerate(calls):
        if extra_items:
            output.append({"type": "reasoning", "summary": []})
        last = k == len(calls) - 1
        output.append(call_item(prompt, gen, lps, kind="message" if last else "function_call"))
        if extra_items and not last:
            output.append({"type": "function_call_output", "call_id": "c", "output": "4"})
    return {"response": {"output": output}, "reward": reward, "_ng_task_index": task, "_ng_rollout_index": 0, **keys}


# A 3-turn tool rollout: prompt 10 11 12 -> gen 20 21; tool output 30 31; gen 22 23 24; scaffolding 32; gen 25.
P0, G0, L0 = [10, 11, 12], [20, 21], [-0.1, -0.2]
P1, G1, L1 = P0 + G0 + [30, 31], [22, 23, 24], [-0.3, -0.4, -0.5]
P2, G2, L2 = P1 + G1 + [32], [25], [-0.6]
THREE_TURN = [(P0, G0, L0), (P1, G1, L1), (P2, G2, L2)]
ROW = [10, 11, 12, 20, 21, 30, 31, 22, 23, 24, 32, 25]
MASK = [0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]
LPS = [0, 0, 0, -0.1, -0.2, 0, 0, -0.3, -0.4, -0.5, 0, -0.6]


def test_three_turn_tool_rollout_masks():
    record = rollout(THREE_TURN, reward=1.0)
    record["response"]["incomplete_details"] = {"reason": "max_output_tokens"}
    batch = process_rollouts([record], pad_token_id=0, advantage_mode=None)
    assert batch.input_ids.tolist() == [ROW]
    assert batch.attention_mask.tolist() == [[1] * 12]
    assert batch.loss_mask.tolist() == [MASK]
    torch.testing.assert_close(batch.rollout_logprobs, torch.tensor([LPS]))
    assert batch.num_trained_tokens == 6  # 2 + 3 + 1 generated tokens
    assert batch.rewards.tolist() == [1.0] and batch.advantages.tolist() == [1.0]  # mode None: raw reward
    assert batch.sample_mask.tolist() == [1.0]
    assert batch.metrics["rollout/drift_count"] == 0
    assert batch.metrics["rollout/gen_len_mean"] == 6
    assert batch.metrics["rollout/num_incomplete"] == 1  # counted, still trained on


def test_right_vs_left_padding_and_multiple_of():
    short = rollout([([5, 6], [7], [-1.0])], reward=0.0)  # 3 tokens
    rows = [rollout(THREE_TURN, reward=1.0), short]
    right = process_rollouts(rows, pad_token_id=99, pad_to_multiple_of=8, advantage_mode=None)
    # T = 12 rounded up to 16; the short row: 5 6 7 then 13 pads.
    assert right.input_ids.shape == (2, 16)
    assert right.input_ids[1].tolist() == [5, 6, 7] + [99] * 13
    assert right.attention_mask[1].tolist() == [1, 1, 1] + [0] * 13
    assert right.loss_mask[1].tolist() == [0, 0, 1] + [0] * 13
    assert right.rollout_logprobs[1].tolist() == [0, 0, -1.0] + [0] * 13
    assert right.input_ids[0].tolist() == ROW + [99] * 4

    left = process_rollouts(rows, pad_token_id=99, padding_side="left", advantage_mode=None)
    # T = 12; the short row is shifted right by 9.
    assert left.input_ids[1].tolist() == [99] * 9 + [5, 6, 7]
    assert left.attention_mask[1].tolist() == [0] * 9 + [1, 1, 1]
    assert left.loss_mask[1].tolist() == [0] * 9 + [0, 0, 1]
    assert left.rollout_logprobs[1].tolist() == [0] * 9 + [0, 0, -1.0]
    assert left.input_ids[0].tolist() == ROW


def test_attention_mask_is_not_derived_from_pad_id():
    # Token 0 is also the pad id: a real 0 inside the row must keep attention 1.
    batch = process_rollouts([rollout([([0, 0], [0], [-0.5])]), rollout([([1], [2], [-0.5])])], pad_token_id=0)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_pad_id_from_tokenizer():
    class Tok:
        pad_token_id = 7

    batch = process_rollouts([rollout([([1, 2], [3], [-0.5])]), rollout([([1], [2], [-0.5])])], Tok())
    assert batch.input_ids[1].tolist() == [1, 2, 7]


def test_truncation_keeps_masks_consistent_and_masks_the_sample():
    short = rollout([([5, 6], [7], [-1.0])], reward=0.0)
    batch = process_rollouts([rollout(THREE_TURN), short], pad_token_id=0, max_seq_len=9, advantage_mode=None)
    # Row 0 cut after 9 tokens: 10 11 12 20 21 30 31 22 23 | dropped: 24 32 25.
    assert batch.input_ids.shape == (2, 9)
    assert batch.input_ids[0].tolist() == ROW[:9]
    assert batch.loss_mask[0].tolist() == MASK[:9]
    torch.testing.assert_close(batch.rollout_logprobs[0], torch.tensor(LPS[:9]))
    assert batch.sample_mask.tolist() == [0.0, 1.0]  # the truncated row is not trained on
    assert batch.num_trained_tokens == 1  # only the short row's one generated token
    assert batch.metrics["rollout/num_truncated"] == 1
    kept = process_rollouts([rollout(THREE_TURN), short], pad_token_id=0, max_seq_len=9, train_on_truncated=True)
    assert kept.sample_mask.tolist() == [1.0, 1.0] and kept.num_trained_tokens == 4 + 1  # 20 21 22 23 + 7


# Drift: turn 1's prompt re-renders turn 0 differently (template dropped turn 0's reasoning tokens 21).
D1 = ([10, 11, 12, 20, 30, 31], [22, 23], [-0.3, -0.4])  # does not start with 10 11 12 20 21
D2 = (D1[0] + D1[1] + [32], [25], [-0.6])  # extends D1


def test_drift_split_rows():
    batch = process_rollouts([rollout([(P0, G0, L0), D1, D2], reward=1.0, task=3)], pad_token_id=0, advantage_mode=None)
    # Segment A = call 0: 10 11 12 20 21 (mask 0 0 0 1 1).
    # Segment B = calls 1-2: 10 11 12 20 30 31 22 23 32 25 (mask 0 0 0 0 0 0 1 1 0 1).
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21] + [0] * 5, [10, 11, 12, 20, 30, 31, 22, 23, 32, 25]]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1] + [0] * 5, [0, 0, 0, 0, 0, 0, 1, 1, 0, 1]]
    torch.testing.assert_close(
        batch.rollout_logprobs,
        torch.tensor([[0, 0, 0, -0.1, -0.2] + [0] * 5, [0, 0, 0, 0, 0, 0, -0.3, -0.4, 0, -0.6]]),
    )
    assert batch.rewards.tolist() == [1.0, 1.0] and batch.group_ids.tolist() == [0, 0]
    assert batch.rollout_index.tolist() == [0, 0]
    assert batch.metrics["rollout/drift_count"] == 1 and batch.metrics["rollout/num_rows"] == 2


def test_drift_last_turn_and_drop():
    rows = [rollout([(P0, G0, L0), D1, D2], task=0), rollout(THREE_TURN, task=1)]
    last = process_rollouts(rows, pad_token_id=0, advantage_mode=None)
    assert last.input_ids.shape[0] == 3  # default split: 2 rows + 1
    last = process_rollouts(rows, pad_token_id=0, drift_policy="last_turn", advantage_mode=None)
    # Last call only: its 9-token prompt as context, 25 trained.
    assert last.input_ids[0].tolist() == [10, 11, 12, 20, 30, 31, 22, 23, 32, 25] + [0, 0]
    assert last.loss_mask[0].tolist() == [0] * 9 + [1] + [0, 0]
    assert last.input_ids[1].tolist() == ROW
    assert last.metrics["rollout/drift_count"] == 1
    drop = process_rollouts(rows, pad_token_id=0, drift_policy="drop", advantage_mode=None)
    assert drop.input_ids.tolist() == [ROW] and drop.rollout_index.tolist() == [1]
    assert drop.metrics["rollout/drift_count"] == 1 and drop.metrics["rollout/num_drift_dropped"] == 1


def test_generation_mismatch_is_drift_too():
    # The prompt keeps the earlier prompt but not the sampled tokens (e.g. re-tokenized output): 20 99 != 20 21.
    bad = ([10, 11, 12, 20, 99, 30], [22], [-0.3])
    with pytest.raises(ProtocolError, match="1 dropped for chat-template drift"):
        process_rollouts([rollout([(P0, G0, L0), bad])], pad_token_id=0, drift_policy="drop")
    split = process_rollouts([rollout([(P0, G0, L0), bad])], pad_token_id=0)
    assert split.loss_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1]]


def test_failures_masked_and_missing_tokens_are_excluded_and_counted():
    good_a = rollout([([1, 2], [3, 4], [-0.1, -0.2])], reward=1.0, task=0)
    good_b = rollout([([1, 2], [5], [-0.3])], reward=0.0, task=0)
    failure = {"_ng_task_index": 0, "_ng_rollout_index": 2, "reward": None,
               "failure": {"kind": "timeout", "reason": "t", "attempts": 3, "last_error": "e", "url": None}}
    masked = rollout([([1, 2], [6], [-0.3])], reward=1.0, task=0, mask_sample=True)
    no_tokens = {"response": {"output": [{"type": "message", "role": "assistant", "content": []}]}, "reward": 1.0, "_ng_task_index": 0}
    partial = rollout([([1, 2], [6], [-0.3])], reward=1.0, task=0)
    del partial["response"]["output"][1]["generation_log_probs"]
    batch = process_rollouts([good_a, failure, masked, no_tokens, good_b, partial], pad_token_id=0, advantage_mode="dr_grpo")
    assert batch.rollout_index.tolist() == [0, 4]
    m = batch.metrics
    assert (m["rollout/num_failed"], m["rollout/num_masked"], m["rollout/num_missing_tokens"], m["rollout/num_malformed"]) == (1, 1, 1, 1)
    # Advantages over the 2 valid members only: mean 0.5 -> +0.5, -0.5 (the masked reward 1.0 does not count).
    assert batch.advantages.tolist() == [0.5, -0.5]


def test_group_advantages_broadcast_and_zero_variance_filter():
    rows = [
        rollout([([1], [2], [-0.1])], reward=1.0, task=7),
        rollout([([1], [3], [-0.1])], reward=0.0, task=7),
        rollout([([4], [5], [-0.1])], reward=1.0, task=9),
        rollout([([4], [6], [-0.1])], reward=1.0, task=9),
    ]
    batch = process_rollouts(rows, pad_token_id=0, advantage_mode="grpo", filter_zero_variance=True)
    # Group 7: mean 0.5, unbiased std sqrt(0.5) = 0.7071 -> +-0.5/0.7071 = +-0.7071; group 9: zero variance -> 0.
    torch.testing.assert_close(batch.advantages, torch.tensor([0.70710576, -0.70710576, 0.0, 0.0]))
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    assert batch.sample_mask.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert batch.num_trained_tokens == 2
    assert batch.metrics["advantage/num_zero_variance_groups"] == 1
    unfiltered = process_rollouts(rows, pad_token_id=0)
    assert unfiltered.sample_mask.tolist() == [1.0] * 4


def test_explicit_group_ids_and_missing_group_key():
    rows = [rollout([([1], [2], [-0.1])], reward=r) for r in (1.0, 0.0, 3.0)]
    for r in rows:
        del r["_ng_task_index"]
    with pytest.raises(ProtocolError, match="group_ids="):
        process_rollouts(rows, pad_token_id=0)
    batch = process_rollouts(rows, pad_token_id=0, group_ids=["a", "b", "a"], advantage_mode="rloo")
    # Group a: rewards 1, 3 -> RLOO: 1 - 3 = -2, 3 - 1 = +2; group b alone -> 0.
    assert batch.advantages.tolist() == [-2.0, 0.0, 2.0]


def test_bad_options_raise_config_errors():
    rows = [rollout([([1], [2], [-0.1])])]
    with pytest.raises(ConfigError, match="drift_policy='splt'.*Did you mean 'split'"):
        process_rollouts(rows, pad_token_id=0, drift_policy="splt")
    with pytest.raises(ConfigError, match="pad id"):
        process_rollouts(rows)
    with pytest.raises(ConfigError, match="padding_side"):
        process_rollouts(rows, pad_token_id=0, padding_side="middle")


def test_to_dict_objects_accepted():
    class Rec:
        def to_dict(self):
            return rollout([([1], [2], [-0.1])])

    assert process_rollouts([Rec()], pad_token_id=0).input_ids.tolist() == [[1, 2]]


def test_retokenize_missing_tokens():
    tiny = pytest.importorskip("gym_plugin.models.tiny", reason="gym_plugin.models.tiny not available yet")
    tok = tiny.build_tiny_tokenizer()
    record = {
        "responses_create_params": {"input": [{"role": "user", "content": "What is 2 + 3?"}]},
        "response": {"output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "5"}]}]},
        "reward": 1.0,
        "_ng_task_index": 0,
    }
    excluded = {"response": {"output": []}, "reward": 1.0, "_ng_task_index": 0}
    good = rollout([([1, 2], [3], [-0.1])], reward=0.0)
    batch = process_rollouts([record, good, excluded], tok, missing_tokens_policy="retokenize")
    user = {"role": "user", "content": "What is 2 + 3?"}
    prompt = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template([user, {"role": "assistant", "content": "5"}], tokenize=True, return_dict=False)
    prompt, full = list(prompt), list(full)
    assert full[: len(prompt)] == prompt
    n = len(full)
    assert batch.input_ids[0, :n].tolist() == full
    assert batch.loss_mask[0, :n].tolist() == [0] * len(prompt) + [1] * (n - len(prompt))
    assert batch.rollout_logprobs[0].abs().sum() == 0  # no sampler log-probs for re-tokenized rows
    assert batch.retokenized.tolist() == [True, False]
    assert batch.metrics["rollout/num_retokenized"] == 1 and batch.metrics["rollout/num_missing_tokens"] == 2


def test_constrained_calls_are_context_not_policy_samples_by_default():
    record = rollout(THREE_TURN, reward=1.0)
    # the middle call was sampled under tool_choice="required": its 3 tokens (22 23 24) stay in the row
    calls = [it for it in record["response"]["output"] if "generation_token_ids" in it]
    calls[1]["constrained"] = True
    other = rollout([([5, 6], [7], [-1.0])], reward=0.0, task=0)
    batch = process_rollouts([record, other], pad_token_id=0, advantage_mode=None)
    assert batch.input_ids[0].tolist() == ROW
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert batch.rollout_logprobs[0].tolist() == pytest.approx([0, 0, 0, -0.1, -0.2, 0, 0, 0, 0, 0, 0, -0.6])
    assert batch.num_trained_tokens == 3 + 1  # 2 + 1 from the first row, 1 from the other
    assert batch.metrics["rollout/num_constrained_calls"] == 1
    assert batch.metrics["rollout/num_constrained_rollouts"] == 1
    assert batch.metrics["rollout/gen_len_mean"] == (3 + 1) / 2

    trained = process_rollouts([record, other], pad_token_id=0, advantage_mode=None, constrained_policy="train")
    assert trained.loss_mask[0].tolist() == MASK and trained.num_trained_tokens == 6 + 1
    assert trained.metrics["rollout/num_constrained_calls"] == 1

    dropped = process_rollouts([record, other], pad_token_id=0, advantage_mode=None, constrained_policy="drop")
    assert dropped.input_ids.tolist() == [[5, 6, 7]]
    assert dropped.metrics["rollout/num_constrained_dropped"] == 1 and dropped.metrics["rollout/num_kept"] == 1

    with pytest.raises(ConfigError, match="constrained_policy='skip' is not one of"):
        process_rollouts([record], pad_token_id=0, constrained_policy="skip")
