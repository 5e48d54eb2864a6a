"""compute_token_logprobs and grpo_step on a tiny random LlamaForCausalLM (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gym_plugin.errors import ConfigError
from gym_plugin.process import process_rollouts
from gym_plugin.step import accumulate_gradients, compute_token_logprobs, grpo_step

VOCAB = 97


def tiny_model(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).to(dtype)


def naive_logprobs(model, ids):
    """Reference: full log-softmax over [B, T, V] of an unpadded batch."""
    logits = model(input_ids=ids).logits.float()  # [B, T, V]
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], dim=1)


def test_logprobs_match_naive_for_both_paths_and_chunk_sizes():
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    expected = naive_logprobs(model, ids)
    for path in ("hidden", "logits"):
        for chunk in (3, 512):
            lp, ent = compute_token_logprobs(model, ids, torch.ones_like(ids), chunk_size=chunk, logprob_path=path, compute_entropy=True)
            torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)
            assert ent.shape == ids.shape and ent[:, 0].abs().sum() == 0 and (ent[:, 1:] > 0).all()
    # entropy of a random 97-way distribution is near log(97) = 4.57
    assert 4.0 < ent[:, 1:].mean() < 4.6


def test_left_and_right_padding_give_the_same_logprobs():
    model = tiny_model()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    rollouts = [
        {"response": {"output": [{"prompt_token_ids": s[:2], "generation_token_ids": s[2:], "generation_log_probs": [0.0] * (len(s) - 2)}]},
         "reward": 1.0, "_ng_task_index": 0}
        for s in seqs
    ]
    right = process_rollouts(rollouts, pad_token_id=0)
    left = process_rollouts(rollouts, pad_token_id=0, padding_side="left")
    lp_r, _ = compute_token_logprobs(model, right.input_ids, right.attention_mask)
    lp_l, _ = compute_token_logprobs(model, left.input_ids, left.attention_mask)
    # Short row: right-padded at columns 0..2, left-padded at 3..5.
    torch.testing.assert_close(lp_r[1, :3], lp_l[1, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_r[0], lp_l[0])
    assert lp_r[1, 3:].abs().sum() == 0 and lp_l[1, :4].abs().sum() == 0  # padding and first real token
    torch.testing.assert_close(lp_r[1, :3], naive_logprobs(model, torch.tensor([seqs[1]]))[0], atol=1e-5, rtol=1e-5)


def random_batch(num_rows: int = 8, seed: int = 0):
    """Rollouts of 2 groups with varied prompt/generation lengths and rewards, as a RolloutBatch."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for i in range(num_rows):
        p_len, g_len = 3 + i % 3, 2 + (i * 5) % 7
        toks = torch.randint(3, VOCAB, (p_len + g_len,), generator=g).tolist()
        lps = (-torch.rand(g_len, generator=g)).tolist()
        rollouts.append({
            "response": {"output": [{"prompt_token_ids": toks[:p_len], "generation_token_ids": toks[p_len:], "generation_log_probs": lps}]},
            "reward": float(i % 2 == 0) + 0.1 * i, "_ng_task_index": i % 2,
        })
    return process_rollouts(rollouts, pad_token_id=0)


def grads_for(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(model, batch, **kw)
    return [p.grad.clone() for p in model.parameters()], metrics


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_is_identical_for_micro_batch_sizes_1_2_4(aggregation):
    model = tiny_model()
    batch = random_batch()
    kw = {"aggregation": aggregation, "tis_level": "token", "clip_eps_high": 0.28}
    reference, m_ref = grads_for(model, batch, micro_batch_size=8, **kw)
    assert any(g.abs().sum() > 0 for g in reference)
    for mbs in (1, 2, 4):
        grads, m = grads_for(model, batch, micro_batch_size=mbs, **kw)
        assert m["perf/num_micro_batches"] == 8 / mbs
        assert m["loss/total"] == pytest.approx(m_ref["loss/total"], abs=1e-6)
        for got, want in zip(grads, reference):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def sequence_logprob(model, batch):
    with torch.no_grad():
        lp, _ = compute_token_logprobs(model, batch.input_ids, batch.attention_mask)
    return (lp * batch.loss_mask).sum(dim=1)  # [B]


def test_one_step_raises_logprob_of_positive_advantage_sequences():
    model = tiny_model()
    batch = random_batch()
    before = sequence_logprob(model, batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    metrics = grpo_step(model, optimizer, batch, micro_batch_size=2, max_grad_norm=1.0)
    after = sequence_logprob(model, batch)
    positive, negative = batch.advantages > 0, batch.advantages < 0
    assert positive.sum() == 4 and negative.sum() == 4
    assert (after[positive] > before[positive]).all()
    assert (after - before)[positive].mean() > 0 > (after - before)[negative].mean()
    assert metrics["loss/ratio_mean"] == pytest.approx(1.0)  # one update per batch: old = current
    assert metrics["loss/clip_frac"] == 0
    assert metrics["perf/num_trained_tokens"] == batch.num_trained_tokens
    assert metrics["perf/grad_norm"] > 0 and 0 < metrics["loss/entropy"] < 4.6
    assert metrics["loss/rollout_logprob_abs_diff"] > 0  # the fake sampler log-probs differ from the model's


def test_kl_with_reference_model_and_grad_clipping():
    model, ref = tiny_model(0), tiny_model(1)
    batch = random_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = grpo_step(model, optimizer, batch, ref_model=ref, kl_coef=0.1, max_grad_norm=1e-3)
    assert metrics["loss/kl"] > 0  # two different random models
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert metrics["perf/grad_norm"] > 1e-3 and total.item() == pytest.approx(1e-3, rel=1e-3)  # clipped
    with pytest.raises(ConfigError, match="reference model"):
        grpo_step(model, optimizer, batch, kl_coef=0.1)


def test_batch_without_trained_tokens_is_skipped_and_bad_kwargs_raise():
    model = tiny_model()
    batch = random_batch()
    batch.sample_mask.zero_()
    before = [p.clone() for p in model.parameters()]
    metrics = grpo_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch)
    assert metrics["perf/skipped"] == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ConfigError, match="Did you mean 'micro_batch_size'"):
        grpo_step(model, torch.optim.SGD(model.parameters(), lr=1.0), random_batch(), micro_batchsize=2)


def test_token_level_advantages_and_retokenized_rows_get_tis_weight_one():
    model = tiny_model()
    batch = random_batch(num_rows=4)
    # [B, T] advantages equal to the broadcast [B] ones give the same gradient.
    per_row, _ = grads_for(model, batch, micro_batch_size=2)
    batch_t = batch.select(slice(None))
    batch_t.advantages = batch.advantages[:, None].expand_as(batch.loss_mask).clone()
    per_token, _ = grads_for(model, batch_t, micro_batch_size=2)
    for a, b in zip(per_row, per_token):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # A re-tokenized row has rollout log-probs 0: without the guard its TIS weight would be exp(old - 0) < 1.
    # Marking every row re-tokenized must give exactly the gradient without TIS.
    batch.retokenized[:] = True
    with_tis, m = grads_for(model, batch, micro_batch_size=2, tis_level="token", tis_cap=2.0)
    without, _ = grads_for(model, batch, micro_batch_size=2)
    for a, b in zip(with_tis, without):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    assert m["loss/tis_weight_mean"] == pytest.approx(1.0) and m["loss/rollout_logprob_abs_diff"] == 0


def test_select_recounts_trained_tokens():
    batch = random_batch(num_rows=4)
    sub = batch.select(torch.tensor([0, 2]))
    assert len(sub) == 2 and sub.input_ids.shape[1] == batch.input_ids.shape[1]
    assert sub.num_trained_tokens == int(batch.train_mask()[[0, 2]].sum())
