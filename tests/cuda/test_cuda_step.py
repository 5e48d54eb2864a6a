"""The GRPO step on the GPU: float32 against the CPU's plain full-logits reference, bfloat16 against float32 on the
same weights, packed against padded rows, the chunked LM head, the optimizer stepped in backward.

Each check takes one model (3 layers, hidden 64, grouped-query attention, vocabulary 97), rounds its weights to
bfloat16 once (so float32 and bfloat16 runs compute the same function) and compares whole gradients by their
relative error ||got - want|| / ||want||. Tolerances: float32 on the GPU (no TF32: torch's default for matmuls)
is a few 1e-7 from the CPU; bfloat16 operands lose ~3 significant digits (2^-8 = 4e-3 per rounding), which
accumulate through 3 layers and the backward pass to about 7e-3 (measured on the CPU: see BF16_GRAD_TOL).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gym_plugin.optim import build_optimizer
from gym_plugin.process import process_rollouts
from gym_plugin.step import accumulate_gradients, compute_token_logprobs, grpo_step
from tests.unit.test_step import VOCAB, grouped_rollouts, random_batch, reference_grads

pytestmark = pytest.mark.cuda

FP32_GRAD_TOL = 1e-4
"""float32 on the device vs the CPU reference: the same arithmetic in another summation order (~1e-7 seen)."""
BF16_GRAD_TOL = 3e-2
"""bfloat16 vs float32, whole-gradient relative error. Measured on the CPU (torch 2.13): 5.8e-3 to 6.8e-3 over the
packing and chunked-head variants; the tolerance leaves ~4x for the GPU's other kernels (cuBLAS split-K,
flash/efficient attention). A wrong mask or position (the bugs this guards against) gives errors of order 1."""
BF16_LOGPROB_TOL = 1e-2
"""bfloat16 vs float32 token log-probs, mean absolute difference in nats (measured on the CPU: 0.7e-3 to 1.0e-3)."""

LOSS = {"aggregation": "token-mean", "tis_level": "token"}


def model_pair(device: torch.device, tied: bool = False, seed: int = 0):
    """(float32, bfloat16) copies on ``device`` of one random model whose weights are bfloat16 values."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied,
        ))
    bf16 = model.to(torch.bfloat16)
    return copy.deepcopy(bf16).float().to(device), bf16.to(device)


def grads(model, batch, **kw) -> list[torch.Tensor]:
    """float32 CPU copies of the gradient that accumulate_gradients leaves in ``model``."""
    model.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(model, batch, **LOSS, **kw)
    out = [p.grad.detach().float().cpu() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out, metrics


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over the whole gradient."""
    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(got, want))
    return (num / sum(float((b ** 2).sum()) for b in want)) ** 0.5


def batch_on(device):
    # 3 groups of 4 rows after a shared system prefix; one group has equal rewards (advantage 0, not run)
    return process_rollouts(grouped_rollouts(), pad_token_id=0).to(device)


@pytest.mark.parametrize("packing,chunked", [("prefix", False), ("none", False), ("prefix", True)])  # chunked: packed only
def test_step_gradient_fp32_matches_the_cpu_reference_and_bf16_agrees(device, packing, chunked):
    m32, m16 = model_pair(device)
    cpu_ref = copy.deepcopy(m32).cpu()
    batch = batch_on(device)
    want, want_loss = reference_grads(cpu_ref, batch.to("cpu"), **LOSS)
    kw = {"micro_batch_size": 5, "packing": packing, "chunked_lm_head": chunked, "logprob_chunk_size": 7}
    got32, m = grads(m32, batch, **kw)
    got16, m_16 = grads(m16, batch, **kw)
    e32, e16 = rel_error(got32, want), rel_error(got16, want)
    print(f"{device} packing={packing} chunked={chunked}: fp32 {e32:.1e}, bf16 {e16:.1e} (relative to the CPU reference)")
    assert m["perf/num_skipped_rows"] == 4 and m_16["perf/num_skipped_rows"] == 4
    assert m["loss/total"] == pytest.approx(want_loss, abs=1e-5)
    assert e32 < FP32_GRAD_TOL
    assert e16 < BF16_GRAD_TOL
    assert m_16["loss/total"] == pytest.approx(want_loss, abs=5e-2 * max(1.0, abs(want_loss)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_and_padded_rows_give_the_same_gradient_and_logprobs(device, dtype):
    m32, m16 = model_pair(device, tied=True)
    model = m32 if dtype == torch.float32 else m16
    batch = batch_on(device)
    packed, mp = grads(model, batch, micro_batch_size=12, packing="prefix")
    padded, _ = grads(model, batch, micro_batch_size=12, packing="none")
    err = rel_error(packed, padded)
    lp_p, ent_p = compute_token_logprobs(model, batch.input_ids, batch.attention_mask, packing="prefix",
                                         compute_entropy=True)
    lp_n, ent_n = compute_token_logprobs(model, batch.input_ids, batch.attention_mask, packing="none",
                                         compute_entropy=True)
    real = batch.attention_mask.bool().clone()
    real[:, 0] = False  # no log-prob for a row's first token
    lp_diff = float((lp_p - lp_n).detach()[real].abs().mean())
    print(f"{device} {dtype}: packed vs padded gradient {err:.1e}, log-prob mean |diff| {lp_diff:.1e}")
    # packing computed fewer tokens (shared prefixes once) and still the same function
    assert mp["perf/num_forward_tokens"] < float(batch.attention_mask[batch.advantages != 0].sum())
    assert err < (FP32_GRAD_TOL if dtype == torch.float32 else BF16_GRAD_TOL)
    assert lp_diff < (1e-5 if dtype == torch.float32 else BF16_LOGPROB_TOL)
    assert float((ent_p - ent_n).detach()[real].abs().mean()) < (1e-5 if dtype == torch.float32 else BF16_LOGPROB_TOL)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_logprobs_agree_with_fp32_and_chunked_head_equals_model_logits(device, tied):
    m32, m16 = model_pair(device, tied=tied)
    batch = batch_on(device)
    ids, mask = batch.input_ids, batch.attention_mask
    real = mask.bool().clone()
    real[:, 0] = False
    lp32, _ = compute_token_logprobs(m32, ids, mask, packing="prefix")
    lp16, _ = compute_token_logprobs(m16, ids, mask, packing="prefix")
    lp16_c, _ = compute_token_logprobs(m16, ids, mask, packing="prefix", chunked_head=True, chunk_size=7)
    lp32_c, _ = compute_token_logprobs(m32, ids, mask, packing="prefix", chunked_head=True, chunk_size=7)
    d16 = float((lp16 - lp32)[real].abs().mean())
    print(f"{device} tied={tied}: bf16 vs fp32 log-prob mean |diff| {d16:.1e}")
    assert lp16.dtype == torch.float32  # the log-softmax runs in float32 whatever the weights
    assert d16 < BF16_LOGPROB_TOL
    torch.testing.assert_close(lp32_c, lp32, atol=1e-5, rtol=1e-5)
    assert float((lp16_c - lp16)[real].abs().max()) < 1e-2  # the same bf16 head, in chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_in_backward_gives_the_plain_step_on_device(device, name, dtype):
    pair = model_pair(device, tied=True)
    plain = pair[0] if dtype == torch.float32 else pair[1]
    fused = copy.deepcopy(plain)
    start = [p.detach().clone() for p in plain.parameters()]
    opt_plain = build_optimizer(plain, name, lr=1e-3)
    opt_fused = build_optimizer(fused, name, lr=1e-3, in_backward=True)
    for step in range(2):  # the second step uses the optimizers' state
        batch = process_rollouts(grouped_rollouts(seed=step), pad_token_id=0).to(device)
        kw = {"micro_batch_size": 12, "max_grad_norm": None, "activation_checkpointing": True, **LOSS}
        m_plain = grpo_step(plain, opt_plain, batch, **kw)
        m_fused = grpo_step(fused, opt_fused, batch, **kw)
        # in bfloat16 the plain step's norm (clip_grad_norm_) comes back rounded to bfloat16 (2^-8 relative); the
        # in-backward one is summed in float32
        assert m_fused["perf/grad_norm"] == pytest.approx(m_plain["perf/grad_norm"],
                                                          rel=1e-4 if dtype == torch.float32 else 1e-2)
        assert all(p.grad is None for p in fused.parameters())
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert a.device.type == device.type and a.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        else:  # one bf16 rounding step apart at most
            torch.testing.assert_close(a, b)
    moved = max(float((a - p).abs().max()) for a, p in zip(start, fused.parameters()))
    assert moved > 1e-4  # the steps did move the weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_step_raises_logprob_of_positive_advantage_sequences(device, dtype):
    m32, m16 = model_pair(device)
    model = m32 if dtype == torch.float32 else m16
    batch = random_batch().to(device)  # 2 groups, 4 rows with positive and 4 with negative advantage

    def seq_logprob():
        with torch.no_grad():
            lp, _ = compute_token_logprobs(model, batch.input_ids, batch.attention_mask)
        return (lp * batch.loss_mask).sum(dim=1)  # [B]

    before = seq_logprob()
    grpo_step(model, build_optimizer(model, "adamw", lr=1e-2), batch, micro_batch_size=4, max_grad_norm=1.0)
    delta = (seq_logprob() - before).cpu()
    positive, negative = (batch.advantages > 0).cpu(), (batch.advantages < 0).cpu()
    assert positive.sum() == 4 and negative.sum() == 4
    assert delta[positive].mean() > 0 > delta[negative].mean()
