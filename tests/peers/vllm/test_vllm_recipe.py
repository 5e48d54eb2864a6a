"""The GRPO recipe with the real vLLM 0.32 (CPU build) as its policy and weight_sync=vllm_reload:

    python recipes/grpo.py policy=vllm policy.base_urls=[<server>] weight_sync=vllm_reload model=smollm2 train.steps=2

(plus small batch sizes and weight_sync.verify_logprobs_tol=1e-3). It runs 2 steps; after each sync the replica's
teacher-forced log-probs on fixed ids match the trainer's weights within 1e-3 (checked inside the sync, logged,
and a failure would stop the run); /weight_info reports the last step's version; every rollout carries the
version that generated it (step k's rollouts come from version k-1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[3]


def test_recipe_two_steps_with_vllm_reload(vllm_server, restore_weights, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "recipes/grpo.py", "policy=vllm", f"policy.base_urls=[{vllm_server.base_url}]",
           "weight_sync=vllm_reload", "model=smollm2", "train.steps=2",
           # small: 4 prompts x 2 samples of <= 24 tokens, 4 eval prompts
           "train.prompts_per_step=4", "train.group_size=2", "policy.max_output_tokens=24", "eval.num_prompts=4",
           "eval.samples=1", "logging.progress=false", "weight_sync.verify_logprobs_tol=1e-3", f"run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    checks = re.findall(r"serves version (\d+): max \|log-prob - trainer's\| = ([0-9.e+-]+)", out)
    print(f"\n[vllm] recipe syncs: {checks}", file=sys.stderr)
    assert [v for v, _ in checks] == ["1", "2"] and all(float(d) < 1e-3 for _, d in checks)
    assert "token_mode completions" in out  # the policy model server talks token ids to vLLM
    assert vllm_server.get("/weight_info") == {"weight_version": "2"}

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and [m["policy/version"] for m in metrics] == [1, 2]
    for step, version in ((1, 0), (2, 1)):
        records = [json.loads(line) for line in (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        versions = {it.get("policy_version") for r in records for it in r["response"]["output"]
                    if "generation_token_ids" in it}
        assert versions == {version}, (step, versions)
        assert all(r.get("failure") is None for r in records)
    assert (run_dir / "checkpoints" / "last" / "trainer_state.json").is_file()
