"""compute_token_logprobs and grpo_step on a tiny random LlamaForCausalLM (CPU, seconds)."""

from __future__ import annotations

import functools
import math

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
    for path in ("prefix", "none"):
        for chunk in (3, 512):
            lp, ent = compute_token_logprobs(model, ids, torch.ones_like(ids), chunk_size=chunk, packing=path, compute_entropy=True)
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
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the (clipped) gradient
    metrics = grpo_step(model, optimizer, batch, ref_model=ref, kl_coef=0.1, max_grad_norm=1e-3)
    assert metrics["loss/kl"] > 0  # two different random models
    total = torch.sqrt(sum(((a - p.detach()) ** 2).sum() for a, p in zip(before, model.parameters())))
    assert metrics["perf/grad_norm"] > 1e-3 and total.item() == pytest.approx(1e-3, rel=1e-3)  # clipped
    assert all(p.grad is None for p in model.parameters())  # freed after the step
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


# ---- the packed step against a plain full-logits reference ------------------------------------------------------

SYSTEM = [7, 8, 9, 10, 11]
"""A prefix every row starts with (a chat template's system prompt)."""


def grouped_rollouts(seed: int = 0, groups: int = 3, group_size: int = 4) -> list[dict]:
    """Rollouts as a GRPO batch has them: G samples per prompt, all prompts after the same system prefix, some
    samples starting alike, one sample a duplicate of another; rewards give mixed and zero-variance groups."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for k in range(groups):
        prompt = SYSTEM + torch.randint(3, VOCAB, (2 + k,), generator=g).tolist()
        first = torch.randint(3, VOCAB, (2,), generator=g).tolist()
        gens = []
        for i in range(group_size):
            gen = (first if i % 2 else []) + torch.randint(3, VOCAB, (1 + (i * 3 + k) % 5,), generator=g).tolist()
            gens.append(gen)
        gens[-1] = list(gens[0])  # an identical sample
        for i, gen in enumerate(gens):
            reward = 0.5 if k == 2 else float((i + k) % 3 == 0)  # group 2: all equal -> advantage 0
            rollouts.append({
                "response": {"output": [{"prompt_token_ids": prompt, "generation_token_ids": gen,
                                         "generation_log_probs": (-torch.rand(len(gen), generator=g)).tolist()}]},
                "reward": reward, "_ng_task_index": k,
            })
    return rollouts


def reference_grads(model, batch, ref_model=None, **loss_kw):
    """Row by row, unpadded, full [T, V] logits, one policy_loss over the whole batch: the plain computation."""
    from gym_plugin.loss import policy_loss

    model.zero_grad(set_to_none=True)
    lps, refs = [], []
    for b in range(len(batch)):
        real = batch.attention_mask[b].bool()
        ids = batch.input_ids[b][real][None]  # [1, n]
        full = torch.zeros(batch.input_ids.shape[1])
        lp = naive_logprobs(model, ids)[0]  # [n]
        idx = torch.nonzero(real).squeeze(1)
        lps.append(full.index_put((idx,), lp))
        if ref_model is not None:
            with torch.no_grad():
                refs.append(full.index_put((idx,), naive_logprobs(ref_model, ids)[0]))
    logprobs = torch.stack(lps)  # [B, T]
    rollout_lp = torch.where(batch.retokenized[:, None], logprobs.detach(), batch.rollout_logprobs)
    loss, _ = policy_loss(logprobs, logprobs.detach(), batch.advantages, batch.train_mask(),
                          rollout_logprobs=rollout_lp, ref_logprobs=torch.stack(refs) if refs else None, **loss_kw)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], float(loss.detach())


@pytest.mark.parametrize("packing", ["prefix", "none"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("loss_kw", [
    {"aggregation": "token-mean", "tis_level": "token"},
    {"aggregation": "seq-mean-token-mean", "tis_level": "sequence", "clip_eps_high": 0.28},
    {"aggregation": "seq-mean-token-sum-norm", "dual_clip_c": 3.0},
])
def test_gradient_equals_plain_full_logits_reference(packing, padding_side, loss_kw):
    model = tiny_model()
    batch = process_rollouts(grouped_rollouts(), pad_token_id=0, padding_side=padding_side)
    assert (batch.advantages == 0).sum() == 4  # the zero-variance group: its rows are not run
    want, want_loss = reference_grads(model, batch, **loss_kw)
    for mbs in (3, 12):
        got, m = grads_for(model, batch, micro_batch_size=mbs, packing=packing, **loss_kw)
        assert m["loss/total"] == pytest.approx(want_loss, abs=1e-6)
        assert m["perf/num_skipped_rows"] == 4
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if packing == "prefix":
        # 12 rows of 7-15 tokens; run: the 8 rows with a non-zero advantage, packed into their prefix tree
        # (system prefix once, each prompt once, the shared first tokens and the duplicate sample once)
        assert m["perf/num_forward_tokens"] < 0.6 * int(batch.attention_mask[batch.advantages != 0].sum())


def test_gradient_with_kl_runs_every_trained_row_and_matches_reference():
    model, ref = tiny_model(0), tiny_model(1)
    batch = process_rollouts(grouped_rollouts(seed=3), pad_token_id=0)
    want, _ = reference_grads(model, batch, ref_model=ref, kl_coef=0.1, kl_type="k3")
    got, m = grads_for(model, batch, micro_batch_size=5, ref_model=ref, kl_coef=0.1)
    assert m["perf/num_skipped_rows"] == 0  # the KL term gives zero-advantage rows a gradient
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logprobs_at_asked_positions_only():
    model = tiny_model()
    batch = process_rollouts(grouped_rollouts(), pad_token_id=0, padding_side="left")
    positions = batch.loss_mask > 0
    for packing in ("prefix", "none"):
        lp, _ = compute_token_logprobs(model, batch.input_ids, batch.attention_mask, positions=positions,
                                       packing=packing)
        full, _ = compute_token_logprobs(model, batch.input_ids, batch.attention_mask, packing="none")
        torch.testing.assert_close(lp, torch.where(positions, full, torch.zeros_like(full)), atol=1e-5, rtol=1e-5)


def test_packing_prefix_on_a_model_that_cannot_pack_is_a_config_error():
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"  # flash attention takes no custom 4D mask
    batch = random_batch(num_rows=2)
    with pytest.raises(ConfigError, match="packing='prefix' needs"):
        grads_for(model, batch, packing="prefix")
    grads_for(model, batch, packing="auto")  # auto falls back to padded rows


# ---- PPO-style reuse: num_iterations and mini-batches ----------------------------------------------------------

class Bigram(torch.nn.Module):
    """logits[t] = W[input_ids[t]]: each predecessor token owns one row of parameters, so hand-working an SGD
    step is a one-line formula."""

    def __init__(self, vocab: int = 8):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.weight[input_ids])  # [B, T, V]


def bigram_batch(prev_tokens: list[int], advantages: list[float], target: int = 1):
    rollouts = [{"response": {"output": [{"prompt_token_ids": [p], "generation_token_ids": [target],
                                          "generation_log_probs": [0.0]}]},
                 "reward": 0.0, "_ng_task_index": i} for i, p in enumerate(prev_tokens)]
    batch = process_rollouts(rollouts, pad_token_id=0, advantage_mode=None)
    batch.advantages = torch.tensor(advantages)
    return batch


def test_num_iterations_2_clip_fractions_match_the_hand_worked_example():
    # V = 8, W = 0: every log-prob is log(1/8). Token-mean over N = 4 tokens, SGD lr 4: row r's update is
    # W[prev_r] += 4 * A_r / 4 * (onehot(target) - 1/8), so the target's logit leads the others by c = A_r, and
    # the ratio in the second pass is 8 / (1 + 7 e^-c):
    #   A = +1   -> 2.238 > 1.2  clipped (high)      A = +0.1 -> 1.091  not clipped
    #   A = -1   -> 0.399 < 0.8  clipped (low)       A = -0.1 -> 0.916  not clipped
    model = Bigram()
    batch = bigram_batch([2, 3, 4, 5], [1.0, 0.1, -1.0, -0.1])
    optimizer = torch.optim.SGD(model.parameters(), lr=4.0)
    m = grpo_step(model, optimizer, batch, num_iterations=2, max_grad_norm=None, compute_entropy=False)
    ratios = [8 / (1 + 7 * math.exp(-a)) for a in (1.0, 0.1, -1.0, -0.1)]
    assert m["loss/iter1/clip_frac"] == 0 and m["loss/iter1/ratio_mean"] == pytest.approx(1.0)
    assert m["loss/iter2/clip_frac"] == pytest.approx(0.5)
    assert m["loss/iter2/ratio_mean"] == pytest.approx(sum(ratios) / 4, rel=1e-5)
    assert m["loss/clip_frac"] == pytest.approx(0.25)  # 0 and 2 of 4 tokens over the two passes
    assert m["loss/clip_frac_high"] == pytest.approx(0.125) and m["loss/clip_frac_low"] == pytest.approx(0.125)
    assert m["perf/num_updates"] == 2 and m["perf/num_micro_batches"] == 2


def test_mini_batches_use_old_logprobs_from_before_the_first_update():
    # Two rows with the same predecessor and target, A = +1, in two mini-batches of 1 token each (SGD lr 1):
    # mini-batch 1 moves W[2] so the target leads by c = 1; mini-batch 2's ratio against the log-probs from
    # before any update is 8 / (1 + 7 e^-1) = 2.238 -> clipped. (Recomputed after the first update it would be 1.)
    model = Bigram()
    batch = bigram_batch([2, 2], [1.0, 1.0])
    m = grpo_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, mini_batches=2, max_grad_norm=None,
                  compute_entropy=False)
    assert m["perf/num_updates"] == 2
    assert m["loss/clip_frac"] == pytest.approx(0.5)  # 0 in mini-batch 1, 1 in mini-batch 2
    assert m["loss/ratio_mean"] == pytest.approx((1 + 8 / (1 + 7 * math.exp(-1))) / 2, rel=1e-5)


def test_on_progress_is_called_before_and_after_every_micro_batch():
    from gym_plugin.step import StepProgress

    model = tiny_model()
    batch = random_batch()
    seen: list[StepProgress] = []
    grpo_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, micro_batch_size=3, num_iterations=2,
              on_progress=seen.append)
    # 8 rows, all with a non-zero advantage -> 3 micro-batches of <= 3 rows, twice; first a report with nothing
    # done yet, so a progress line knows the total before a long first micro-batch
    assert [(p.micro_batches_done, p.micro_batches_total, p.iteration) for p in seen] == \
        [(0, 6, 1), (1, 6, 1), (2, 6, 1), (3, 6, 1), (4, 6, 2), (5, 6, 2), (6, 6, 2)]
    assert seen[0].tokens_done == 0
    assert seen[3].tokens_done == batch.num_trained_tokens and seen[-1].tokens_done == 2 * batch.num_trained_tokens
    assert all(p.num_iterations == 2 for p in seen) and seen[-1].elapsed_s >= seen[1].elapsed_s > 0


def test_step_restores_eval_mode_and_checkpointing_gives_the_same_gradient():
    model = tiny_model().eval()
    batch = random_batch()
    plain, _ = grads_for(model, batch)
    model.train()
    model.eval()
    ckpt, _ = grads_for(model, batch, activation_checkpointing=True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    grpo_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, activation_checkpointing=True)
    assert not model.training and not model.is_gradient_checkpointing


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_lm_head_gives_the_reference_gradient_and_entropy(tied):
    """step.chunked_lm_head: the head runs on hidden states in chunks of 3 positions; same gradient as the plain
    full-logits reference, same entropy as the model's own logits."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=tied,
    ))
    batch = process_rollouts(grouped_rollouts(), pad_token_id=0)
    kw = {"aggregation": "token-mean", "tis_level": "token"}
    want, want_loss = reference_grads(model, batch, **kw)
    got, m = grads_for(model, batch, micro_batch_size=12, packing="prefix", chunked_lm_head=True,
                       logprob_chunk_size=3, **kw)
    assert m["loss/total"] == pytest.approx(want_loss, abs=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ids, mask = batch.input_ids, batch.attention_mask
    lp_c, ent_c = compute_token_logprobs(model, ids, mask, packing="prefix", chunked_head=True, chunk_size=3,
                                         compute_entropy=True)
    lp, ent = compute_token_logprobs(model, ids, mask, packing="prefix", compute_entropy=True)
    torch.testing.assert_close(lp_c, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_c, ent, atol=1e-5, rtol=1e-5)


def test_chunked_lm_head_refuses_a_model_whose_logits_are_not_its_head():
    model = tiny_model()
    batch = random_batch()
    original = model.forward

    @functools.wraps(original)  # same signature: the model still packs
    def scaled(*args, **kwargs):  # e.g. a model that scales its logits after the head
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled
    with pytest.raises(ConfigError, match="logits are not its LM head applied to its last hidden state"):
        compute_token_logprobs(model, batch.input_ids, batch.attention_mask, packing="prefix", chunked_head=True)
