"""The packed step's gradient on the real default model (SmolLM2-135M fp32) matches the plain computation (each
row alone, full [T, V] logits, one loss) for one GRPO batch: 2 capital prompts x 4 answers in SmolLM2's chat
template (the system prompt shared by all rows, each prompt by its group, some answers sharing first tokens,
one group with equal rewards) as closely as the padded computation did (float32 summation order), also with the
LM head in chunks (step.chunked_lm_head). Slow:
``-m slow``."""

from __future__ import annotations

import pytest
import torch

from gym_plugin.process import process_rollouts
from gym_plugin.step import accumulate_gradients
from tests.unit.test_step import reference_grads

ANSWERS = {
    "France": (["Paris", "The capital of France is Paris.", "The capital is Lyon.", "Paris"], [1.0, 1.0, 0.0, 1.0]),
    "Japan": (["Tokyo", "Kyoto", "The capital of Japan is Tokyo.", "Osaka"], [1.0, 1.0, 1.0, 1.0]),
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_packed_gradient_equals_full_logits_reference():
    from gym_plugin.models import load_policy_model

    model, tokenizer = load_policy_model("smollm2")
    rollouts = []
    for task, (country, (answers, rewards)) in enumerate(ANSWERS.items()):
        messages = [{"role": "user", "content": f"What is the capital of {country}? Reply with only the city name."}]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        for answer, reward in zip(answers, rewards):
            gen = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
            rollouts.append({"response": {"output": [{"prompt_token_ids": prompt, "generation_token_ids": gen,
                                                      "generation_log_probs": [-0.5] * len(gen)}]},
                             "reward": reward, "_ng_task_index": task})
    batch = process_rollouts(rollouts, tokenizer)
    kw = {"aggregation": "token-mean", "tis_level": "token"}
    want, _ = reference_grads(model, batch, **kw)
    errors = {}
    for packing in ("prefix", "none", "prefix+chunked_head"):
        model.zero_grad(set_to_none=True)
        chunked = {"chunked_lm_head": True, "logprob_chunk_size": 16} if packing.endswith("chunked_head") else {}
        metrics = accumulate_gradients(model, batch, micro_batch_size=4, packing=packing.split("+")[0], **chunked,
                                       **kw)
        got = [p.grad for p in model.parameters()]
        # relative error over the whole gradient, and the worst tensor (largest difference / largest entry)
        errors[packing] = (
            float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(got, want)) / sum((b ** 2).sum() for b in want))),
            max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(got, want)),
        )
        assert metrics["perf/num_skipped_rows"] == 4  # Japan: equal rewards, advantage 0
        if packing.startswith("prefix"):
            # 4 France rows of ~45 prompt tokens: packed, the system prompt and the prompt are computed once
            assert metrics["perf/num_forward_tokens"] < 0.5 * float(batch.attention_mask[:4].sum())
    print(f"gradient vs the row-by-row reference (relative, worst tensor): {errors}")
    # float32 through 30 layers in another summation order: the padded rows (the computation before packing)
    # differ from the reference by ~5e-5 overall (worst tensor ~3e-4, a norm weight summed over all tokens);
    # the packed computation must be as close
    assert errors["prefix"][0] < 1e-4 and errors["prefix"][1] < 1e-3
    assert errors["prefix"][0] <= 1.5 * errors["none"][0] + 1e-7
    # the LM head in chunks of 16 positions on the hidden states (memory=low): the same gradient (SmolLM2 ties its
    # LM head to the embedding, so both uses meet in one gradient)
    assert errors["prefix+chunked_head"][0] <= 1.5 * errors["none"][0] + 1e-7 and errors["prefix+chunked_head"][1] < 1e-3
