"""gym_plugin.optim: Adafactor's state size, and the optimizer stepped in backward against a plain step."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gym_plugin.errors import ConfigError
from gym_plugin.grpo_config import parse_grpo_config
from gym_plugin.optim import InBackwardOptimizer, build_optimizer
from gym_plugin.step import grpo_step
from tests.unit.test_step import VOCAB, random_batch


def tiny(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=tied,
    ))


def state_numel(optimizer) -> int:
    opts = optimizer.optimizers if isinstance(optimizer, InBackwardOptimizer) else [optimizer]
    return sum(v.numel() for opt in opts for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def test_adafactor_keeps_a_row_and_a_column_per_matrix():
    model = tiny(tied=True)
    optimizer = build_optimizer(model, "adafactor", lr=1e-3)
    grpo_step(model, optimizer, random_batch(), micro_batch_size=8)
    # tied 97x64 embedding: 97 + 64; per layer q,k,v,o 64x64: 4 x 128; gate, up 128x64: 2 x 192; down 64x128: 192;
    # 2 norms of 64; final norm 64
    per_layer = 4 * (64 + 64) + 2 * (128 + 64) + (64 + 128) + 2 * 64
    assert state_numel(optimizer) == (97 + 64) + 2 * per_layer + 64 == 2657
    # parameters: embedding 6208; per layer 4 x 4096 + 3 x 8192 + 2 x 64 = 41088; final norm 64
    assert sum(p.numel() for p in model.parameters()) == 6208 + 2 * 41_088 + 64 == 88_448  # state: 3 %
    model_a = tiny(tied=True)
    adamw = build_optimizer(model_a, "adamw", lr=1e-3)
    grpo_step(model_a, adamw, random_batch(), micro_batch_size=8)
    assert state_numel(adamw) == 2 * 88_448  # two moments per parameter


@pytest.mark.parametrize("name,tied,checkpointing", [("adamw", True, False), ("adamw", False, False),
                                                     ("adafactor", True, False), ("adafactor", False, False),
                                                     ("adafactor", True, True)])  # the recipe's setting
def test_stepping_in_backward_gives_the_plain_step(name, tied, checkpointing):
    plain, fused = tiny(tied), tiny(tied)
    opt_plain = build_optimizer(plain, name, lr=1e-3)
    opt_fused = build_optimizer(fused, name, lr=1e-3, in_backward=True)
    for step in range(2):  # the second step also uses the optimizers' state
        batch = random_batch(seed=step)
        kw = {"micro_batch_size": 8, "max_grad_norm": None, "activation_checkpointing": checkpointing}
        m_plain = grpo_step(plain, opt_plain, batch, **kw)
        m_fused = grpo_step(fused, opt_fused, batch, **kw)
        assert opt_fused.steps_taken == len(list(fused.parameters()))  # every parameter, once (tied: once)
        assert m_fused["perf/grad_norm"] == pytest.approx(m_plain["perf/grad_norm"], rel=1e-5)
        assert m_fused["loss/total"] == pytest.approx(m_plain["loss/total"], abs=1e-7)
        for a, b in zip(plain.parameters(), fused.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert all(p.grad is None for p in fused.parameters())
    moved = sum(float((a - b).detach().abs().sum()) for a, b in zip(tiny(tied).parameters(), fused.parameters()))
    assert moved > 1e-2  # the two steps did move the weights


def test_backward_outside_a_step_leaves_gradients_and_state_dict_round_trips():
    model = tiny(tied=True)
    opt = build_optimizer(model, "adafactor", lr=1e-3, in_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook outside stepping()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.zero_grad()
    grpo_step(model, opt, random_batch(), micro_batch_size=8, max_grad_norm=None)
    again = build_optimizer(model, "adafactor", lr=1e-3, in_backward=True)
    again.load_state_dict(opt.state_dict())
    assert state_numel(again) == state_numel(opt) == 2657
    with pytest.raises(ConfigError, match="train.optimizer_in_backward the run was started with"):
        again.load_state_dict(build_optimizer(model, "adamw", lr=1e-3).state_dict())


def test_what_stepping_in_backward_cannot_do_is_refused_before_any_update():
    model = tiny(tied=True)
    opt = build_optimizer(model, "adafactor", lr=1e-3, in_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"step.max_grad_norm=1.0 clips the global gradient norm"):
        grpo_step(model, opt, random_batch(), micro_batch_size=8, max_grad_norm=1.0)
    # 8 rows, micro-batches of 3: 3 micro-batches would have to accumulate
    with pytest.raises(ConfigError, match=r"an update of 8 rows needs 3 micro-batches .* step.micro_batch_size>=8"):
        grpo_step(model, opt, random_batch(), micro_batch_size=3, max_grad_norm=None)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # two mini-batches of 4 rows fit micro-batches of 4: allowed
    grpo_step(model, opt, random_batch(), micro_batch_size=4, mini_batches=2, max_grad_norm=None)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_recipe_config_checks_the_optimizer():
    with pytest.raises(ConfigError) as err:
        parse_grpo_config({"train": {"optimizer": "adafacter", "optimizer_in_backward": True}})
    text = str(err.value)
    assert "train.optimizer='adafacter' is not one of ['adamw', 'adafactor']. Did you mean 'adafactor'?" in text
    assert "train.optimizer_in_backward=true cannot clip the global gradient norm (step.max_grad_norm=1.0)" in text
    cfg = parse_grpo_config({"train": {"optimizer": "adafactor", "optimizer_in_backward": True},
                             "step": {"max_grad_norm": None}})
    assert cfg.train.optimizer == "adafactor" and cfg.train.optimizer_in_backward
    with pytest.raises(ConfigError, match="train.optimizer=adafactor with distributed.strategy=fsdp is not supported"):
        parse_grpo_config({"train": {"optimizer": "adafactor"}, "distributed": {"strategy": "fsdp"}})


def test_two_ranks_are_refused_with_the_fix():
    from gym_plugin.step import StepConfig, _check_in_backward, _Plan

    plan = _Plan(updates=[], global_len=4, world=2, skipped_rows=0.0)  # what two gloo/NCCL ranks agree on
    with pytest.raises(ConfigError, match="2 ranks: .* set train.optimizer_in_backward=false for distributed runs"):
        _check_in_backward(plan, StepConfig(max_grad_norm=None))


def test_recipe_config_checks_the_embedded_scheduler():
    with pytest.raises(ConfigError) as err:
        parse_grpo_config({"policy": {"scheduler": "batches"}})
    assert "policy.scheduler='batches' is not one of ['continuous', 'batch']. Did you mean 'batch'?" in str(err.value)
    assert parse_grpo_config({"policy": {"scheduler": "batch"}}).policy.scheduler == "batch"
