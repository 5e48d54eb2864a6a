"""Weight sync against the real vLLM 0.32 (CPU build) serving SmolLM2.

- weight_sync=vllm_reload: after each sync, vLLM's teacher-forced log-probs on fixed ids match the trainer's
  (changed) weights within 1e-3 (they were far off before), /weight_info reports the version, and the policy
  model server puts that version on the rollouts it produces;
- the construction-time checks: vllm_reload passes on a correctly started server; vllm_nccl names the missing
  --weight-transfer-config; checkpoint (the embedded server's route) says to use vllm_reload.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from gym_plugin.http import Transport
from gym_plugin.weight_sync import WeightSyncConfig, WeightSyncError, open_weight_sync
from gym_plugin.weight_sync.vllm import check_nccl_replicas, greedy_token_ids, teacher_forced_logprobs

pytestmark = pytest.mark.vllm


@pytest.fixture
def model(vllm_server):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_server.model_dir, dtype=torch.float32).eval()


def perturb(model, seed: int, scale: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # the tied embedding/head included
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def served_logprobs(server, ids: list[int]) -> list[float]:
    reply = server.post("/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
    return [entry[str(t)]["logprob"] for entry, t in zip(reply["choices"][0]["prompt_logprobs"][1:], ids[1:])]


def max_diff(server, model, ids) -> float:
    return max(abs(a - b) for a, b in zip(served_logprobs(server, ids), teacher_forced_logprobs(model, ids)))


def test_vllm_reload_serves_the_trainers_weights_after_each_sync(vllm_server, model, restore_weights, tmp_path):
    cfg = WeightSyncConfig(kind="vllm_reload", directory=str(tmp_path), verify_logprobs_tol=1e-3)
    ids = greedy_token_ids(model)  # fixed ids: the original model's greedy path from bos

    async def two_syncs():
        sync = await open_weight_sync(cfg, base_urls=[vllm_server.base_url])
        diffs = []
        try:
            for version in (1, 2):
                perturb(model, seed=version)
                before = await asyncio.to_thread(max_diff, vllm_server, model, ids)
                assert await sync.sync(model, version) == version
                after = await asyncio.to_thread(max_diff, vllm_server, model, ids)
                assert vllm_server.get("/weight_info") == {"weight_version": str(version)}
                diffs.append((before, after, sync.last_timings))
        finally:
            await sync.close()
        return diffs

    diffs = asyncio.run(two_syncs())
    for version, (before, after, timings) in enumerate(diffs, start=1):
        print(f"\n[vllm] vllm_reload v{version}: max |log-prob diff| {before:.3g} before -> {after:.2e} after; "
              f"sync {timings['perf/weight_sync_s']:.2f} s (write {timings['perf/weight_sync_write_s']:.2f} s)",
              file=sys.stderr)
        assert before > 0.05  # the check below can fail: the served weights were really different
        assert after < 1e-3
        assert timings["policy/weight_sync_max_logprob_diff"] < 1e-3


def test_construction_checks_against_the_real_server(vllm_server, tmp_path):
    async def checks():
        sync = await open_weight_sync(WeightSyncConfig(kind="vllm_reload", directory=str(tmp_path)),
                                      base_urls=[vllm_server.base_url])
        await sync.close()
        transport = Transport()
        try:
            with pytest.raises(WeightSyncError) as nccl:
                await check_nccl_replicas(transport, [vllm_server.base_url])
        finally:
            await transport.close()
        with pytest.raises(WeightSyncError) as checkpoint:
            await open_weight_sync(WeightSyncConfig(kind="checkpoint", directory=str(tmp_path)),
                                   base_urls=[vllm_server.base_url])
        return nccl.value, checkpoint.value

    nccl, checkpoint = asyncio.run(checks())
    assert "started without a weight transfer config" in str(nccl)
    assert "--weight-transfer-config '{\"backend\": \"nccl\"}'" in str(nccl)
    assert "has no POST /update_weights_from_path" in str(checkpoint) and "weight_sync=vllm_reload" in str(checkpoint)
