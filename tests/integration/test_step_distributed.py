"""grpo_step on two CPU ranks (gloo), in real processes: a rank with nothing to train on, uneven ranks, FSDP.

Each scenario: both ranks start from the same tiny model, rank 0 trains on its batch and rank 1 on its own
(sometimes one without a trained token); after one step, both ranks must hold identical parameters, equal to
one process stepping on the two batches together (the loss is normalized by the global token count, so the
number of ranks does not change the update). Before the fix, a rank without trained tokens crashed the step
(IndexError with trim_padding, ZeroDivisionError without) and the other rank died in gloo.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from gym_plugin.process import RolloutBatch, process_rollouts
from tests.unit.test_step import grouped_rollouts, random_batch, tiny_model

SCENARIOS = {
    # name: (strategy, step kwargs, rank 1's batch)
    "ddp_none_trim": ("ddp", {"packing": "none", "trim_padding": True}, "empty"),
    "ddp_none_notrim": ("ddp", {"packing": "none", "trim_padding": False}, "empty"),
    "ddp_prefix": ("ddp", {"packing": "prefix"}, "empty"),
    "ddp_reuse": ("ddp", {"packing": "prefix", "num_iterations": 2, "mini_batches": 2}, "empty"),
    "ddp_uneven": ("ddp", {"packing": "prefix"}, "grouped"),
    "fsdp_uneven": ("fsdp", {"packing": "prefix"}, "grouped"),
    "fsdp_empty": ("fsdp", {"packing": "none", "trim_padding": True}, "empty"),
    "ddp_adafactor": ("ddp", {"packing": "prefix"}, "grouped"),
    # the LM head runs outside DDP's forward: its gradient must still be reduced over the ranks
    "ddp_chunked_head": ("ddp", {"packing": "prefix", "chunked_lm_head": True, "logprob_chunk_size": 4}, "grouped"),
}
ADAFACTOR = {"ddp_adafactor"}
"""Scenarios stepped with train.optimizer=adafactor (not under FSDP: the recipe refuses that combination)."""
STEP = {"micro_batch_size": 3, "max_grad_norm": 1.0, "compute_entropy": True}


def rank_batch(rank: int, kind: str) -> RolloutBatch:
    if rank == 0:
        return random_batch(num_rows=8)  # 8 rows, all trained -> 3 micro-batches of <= 3 rows
    batch = random_batch(num_rows=8, seed=1) if kind == "empty" else process_rollouts(grouped_rollouts(seed=5), pad_token_id=0)
    if kind == "empty":
        batch.sample_mask.zero_()  # e.g. every row truncated: no trained token on this rank
    return batch


def concat(a: RolloutBatch, b: RolloutBatch) -> RolloutBatch:
    """Both batches as one (right padding to the longer T), advantages kept per row."""
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.dim() == 2 else t

    fields = {}
    for name in ("input_ids", "attention_mask", "loss_mask", "rollout_logprobs", "rewards", "advantages",
                 "group_ids", "sample_mask", "rollout_index", "retokenized"):
        fields[name] = torch.cat([pad(getattr(a, name)), pad(getattr(b, name))])
    return RolloutBatch(**fields, num_trained_tokens=a.num_trained_tokens + b.num_trained_tokens, metrics={})


def optimizer_for(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    from gym_plugin.optim import make_optimizer

    if name in ADAFACTOR:
        return make_optimizer(list(model.parameters()), "adafactor", lr=1e-3)
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from gym_plugin.distributed import DistInfo, params_digest, wrap_model
    from gym_plugin.step import grpo_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    results = {}
    for name, (strategy, kwargs, kind) in SCENARIOS.items():
        model = wrap_model(tiny_model(), info, strategy)
        optimizer = optimizer_for(name, model)
        metrics = grpo_step(model, optimizer, rank_batch(rank, kind), **STEP, **kwargs)
        params = {}
        for pname, p in model.named_parameters():
            full = getattr(p, "full_tensor", None)
            params[pname.removeprefix("module.")] = (full() if callable(full) else p).detach().clone()
        results[name] = {"digest": params_digest(model), "params": params, "metrics": metrics}
    # FSDP shards the LM head outside the model's forward: the chunked head is refused before any collective
    from gym_plugin.errors import ConfigError

    try:
        grpo_step(wrap_model(tiny_model(), info, "fsdp"), torch.optim.SGD([torch.zeros(1, requires_grad=True)]),
                  rank_batch(rank, "grouped"), **STEP, packing="prefix", chunked_lm_head=True)
        results["fsdp_chunked_head"] = "no error"
    except ConfigError as exc:
        results["fsdp_chunked_head"] = str(exc)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def reference(name: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    from gym_plugin.step import grpo_step

    _, kwargs, kind = SCENARIOS[name]
    model = tiny_model()
    optimizer = optimizer_for(name, model)
    metrics = grpo_step(model, optimizer, concat(rank_batch(0, kind), rank_batch(1, kind)), **STEP, **kwargs)
    return {k: v.detach() for k, v in model.named_parameters()}, metrics


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_end_identical_and_equal_to_one_process(two_rank_results, name):
    r0, r1 = two_rank_results[0][name], two_rank_results[1][name]
    assert r0["digest"] == r1["digest"]  # bit-identical parameters on both ranks
    want, want_metrics = reference(name)
    start = {k: v.detach() for k, v in tiny_model().named_parameters()}
    assert any(not torch.equal(want[k], start[k]) for k in want)  # the step did move the parameters
    for key, value in want.items():
        torch.testing.assert_close(r0["params"][key], value, atol=2e-6, rtol=1e-5)
    # metrics are reduced over ranks: both report the global figures, equal to the single process's
    for key in ("perf/num_trained_tokens", "perf/num_trained_seqs", "loss/total", "loss/clip_frac", "loss/entropy"):
        assert r0["metrics"][key] == pytest.approx(want_metrics[key], rel=1e-4, abs=1e-6), key
        assert r1["metrics"][key] == r0["metrics"][key], key


def test_chunked_lm_head_under_fsdp_is_refused(two_rank_results):
    for rank in (0, 1):
        assert "step.chunked_lm_head=true does not work with distributed.strategy=fsdp" in \
            two_rank_results[rank]["fsdp_chunked_head"]
