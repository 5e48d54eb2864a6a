"""Smoke runs of the real recipe (recipes/grpo.py through Hydra, in a subprocess as a user launches it) on the
tiny random model and the ``letters`` task, with tiny budgets:

- 2 steps: parameters change, the loss is finite, the run directory holds metrics.jsonl (2 lines), the
  rollouts of each step, a PNG and a checkpoint; then ``resume=true train.steps=3`` continues from that
  checkpoint (same weights, same optimizer state) and adds step 3;
- ``train.overlap=true``: rollouts of step k+1 are collected by policy version k-1 while step k trains, so
  they arrive one version stale and are still trained on (max_staleness=1);
- ``torchrun --nproc_per_node 2`` on CPU (gloo, DDP): both ranks end with bit-identical parameters.

Why ``letters`` with the random tiny model: its replies contain the asked letter some of the time, so groups
have mixed rewards and the gradient is not zero (a group of equal rewards has advantages 0).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gym_plugin.allocator import ENV as ALLOCATOR_ENV, find_jemalloc
from gym_plugin.distributed import params_digest
from gym_plugin.models import load_policy_model

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "grpo.py"

PROMPTS, GROUP, MAX_TOKENS = 4, 4, 8
"""4 prompts x 4 samples = 16 rollouts per step, at most 8 new tokens each."""
SMOKE = [
    "model=tiny", "env=letters", f"train.prompts_per_step={PROMPTS}", f"train.group_size={GROUP}",
    f"policy.max_output_tokens={MAX_TOKENS}",
    # 1e-3 (not the default 1e-5) so one Adam step moves every trained weight by ~1e-3, far above float32
    # rounding of the tiny model's weights (|w| ~ 0.1): "parameters changed" cannot be a rounding accident.
    "train.lr=1e-3", "logging.progress=false",
]


def run_recipe(overrides: list[str], run_dir: Path, torchrun: int = 0, timeout: float = 180) -> str:
    """Run recipes/grpo.py (or torchrun with ``torchrun`` processes) with ``overrides``; returns its output.
    Fails the test with the output when the run fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", str(RECIPE)]
    else:
        cmd = [sys.executable, str(RECIPE)]
    proc = subprocess.run(cmd + overrides + [f"run_dir={run_dir}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"recipe failed (rc {proc.returncode}):\n{out[-6000:]}"
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def initial_params() -> dict[str, torch.Tensor]:
    """The tiny model's starting weights (they depend only on its fixed seed, as in the recipe)."""
    model, _ = load_policy_model("tiny")
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def checkpoint_params(ckpt: Path) -> dict[str, torch.Tensor]:
    model, _ = load_policy_model(ckpt)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_finite_steps(rows: list[dict], steps: list[int]) -> None:
    assert [r["step"] for r in rows] == steps
    for r in rows:
        assert math.isfinite(r["loss/total"]), r
        assert math.isfinite(r["perf/grad_norm"]) and r["perf/grad_norm"] >= 0, r
        assert r["rollout/num_failed"] == 0, r
        assert r["rollout/num_rollouts"] == PROMPTS * GROUP  # 4 x 4 = 16, every one answered


def test_two_steps_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    # train.save_optimizer: resume below continues Adam's moments exactly (by default a checkpoint is the model only)
    out = run_recipe(SMOKE + ["train.steps=2", "train.save_optimizer=true"], run_dir)
    assert "step 2/2 | reward" in out  # the per-step line
    # the process re-executed itself with jemalloc where this machine has it (gym_plugin/allocator.py)
    malloc = "system" if find_jemalloc() is None or os.environ.get(ALLOCATOR_ENV) == "system" else "jemalloc"
    assert f"(float32, cpu, {malloc} malloc)" in out

    # ---- files: metrics (2 lines), rollouts of each step, the PNG, the checkpoint -----------------------------
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert_finite_steps(rows, [1, 2])
    # a zero gradient in both steps would mean every group had equal rewards: then nothing could be learned
    assert max(r["perf/grad_norm"] for r in rows) > 0
    for step in (1, 2):
        records = read_jsonl(run_dir / "rollouts" / f"step_{step:06d}.jsonl")
        assert len(records) == PROMPTS * GROUP
        assert all(r["reward"] in (0.0, 1.0) for r in records)
        # every rollout's output carries the sampler's tokens (what process_rollouts trained on)
        assert all(1 <= sum(len(i.get("generation_token_ids") or []) for i in r["response"]["output"]) <= MAX_TOKENS
                   for r in records)
    assert (run_dir / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # eval.at_start/at_end (defaults): all 16 letters prompts x eval.samples=2 = 32 rollouts, before step 1
    # (logged as step 0) and after step 2
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [(e["step"], e["eval/num_rollouts"]) for e in evals] == [(0, 32), (2, 32)]
    ckpt = run_dir / "checkpoints" / "last"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2

    # ---- parameters changed: the checkpoint differs from the starting weights ------------------------------
    start, trained = initial_params(), checkpoint_params(ckpt)
    assert start.keys() == trained.keys()
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    assert len(changed) >= len(start) // 2, f"only {len(changed)}/{len(start)} tensors changed"
    # two Adam steps of lr 1e-3 move a weight by at most ~2e-3 (|update| <= lr per step, roughly)
    biggest = max((start[k] - trained[k]).abs().max().item() for k in start)
    assert 1e-4 < biggest < 1e-2

    # ---- resume: step 3 starts from checkpoints/last (same weights, same Adam state) ------------------------
    ckpt_digest = params_digest(load_policy_model(ckpt)[0])
    step2_opt = torch.load(ckpt / "optimizer.pt")
    out = run_recipe(SMOKE + ["train.steps=3", "resume=true", "train.save_optimizer=true"], run_dir)
    assert f"resumed at step 2 from {ckpt} (params sha256 {ckpt_digest})" in out
    rows3 = read_jsonl(run_dir / "metrics.jsonl")
    assert_finite_steps(rows3, [1, 2, 3])
    assert rows3[:2] == rows  # the finished steps are kept as they were
    # policy versions go on from the checkpoint's (2 syncs before, the 3rd now), as do the rollouts' versions
    assert [r["policy/version"] for r in rows3] == [1, 2, 3]
    assert {i["policy_version"] for r in read_jsonl(run_dir / "rollouts" / "step_000003.jsonl")
            for i in r["response"]["output"] if "policy_version" in i} == {2}
    assert (run_dir / "rollouts" / "step_000003.jsonl").is_file()
    # the evaluations of the first run are kept (no new step-0 eval on resume), step 3's is added
    assert [e["step"] for e in read_jsonl(run_dir / "eval.jsonl")] == [0, 2, 3]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    # Adam's per-parameter step count went on from 2 (restored optimizer), not from 0
    steps3 = {float(s["step"]) for s in torch.load(ckpt / "optimizer.pt")["state"].values()}
    assert {float(s["step"]) for s in step2_opt["state"].values()} == {2.0}
    assert steps3 == {3.0}


@pytest.mark.slow  # 19 s on a slow 2-core machine: the fast suite's ~3 min budget
def test_low_memory_optimizer_trains_and_resumes(tmp_path):
    """memory=low (Adafactor stepped in backward, chunked LM head): the weights move, and the per-parameter
    optimizer state is saved and continued by resume."""
    run_dir = tmp_path / "run"
    low = ["memory=low", "train.save_optimizer=true", "eval.at_start=false", "eval.at_end=false", "logging.plot=false"]
    run_recipe(SMOKE + low + ["train.steps=2"], run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert_finite_steps(rows, [1, 2])
    ckpt = run_dir / "checkpoints" / "last"
    start, trained = initial_params(), checkpoint_params(ckpt)
    assert sum(not torch.equal(start[k], trained[k]) for k in start) >= len(start) // 2
    state = torch.load(ckpt / "optimizer.pt")
    assert len(state["per_param"]) == len(start)  # one Adafactor per parameter (the tiny model is untied)
    assert {s["state"][0]["step"] for s in state["per_param"]} == {2}
    run_recipe(SMOKE + low + ["train.steps=3", "resume=true"], run_dir)
    assert_finite_steps(read_jsonl(run_dir / "metrics.jsonl"), [1, 2, 3])
    assert {s["state"][0]["step"] for s in torch.load(ckpt / "optimizer.pt")["per_param"]} == {3}


def test_resume_without_checkpoint_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(RECIPE), *SMOKE, "resume=true", f"run_dir={tmp_path / 'empty'}"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "resume=true but" in proc.stderr and "holds no checkpoint" in proc.stderr


@pytest.mark.slow  # 11 s on a slow 2-core machine: the fast suite's ~3 min budget
def test_overlap_trains_on_one_version_old_rollouts(tmp_path):
    run_dir = tmp_path / "run"
    out = run_recipe(SMOKE + ["train.steps=3", "train.overlap=true"], run_dir)
    # by default a checkpoint is the model only: the optimizer's moments (2x the model) need train.save_optimizer
    ckpt = run_dir / "checkpoints" / "last"
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "optimizer.pt").exists()
    # the run ends with a summary: the eval rewards and every file written, with the folder's size
    assert re.search(r"eval reward \d\.\d{3} \(step 0\) -> \d\.\d{3} \(step 3\)", out)
    for name in ("metrics.jsonl", "eval.jsonl", "rollouts/", "checkpoints/", "reward_curve.png"):
        assert re.search(rf"^  {re.escape(name)} +\d", out, flags=re.M), name
    assert re.search(rf"run dir {re.escape(str(run_dir))} \(\d+\.\d (KB|MB)\):", out)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert_finite_steps(rows, [1, 2, 3])
    # step 1's rollouts come from version 0 and train version 0 -> staleness 0; step k+1's were collected by
    # version k-1 while step k trained, and the trainer is at version k when they arrive -> staleness 1,
    # within max_staleness=1, so none is dropped
    assert [r["policy/staleness"] for r in rows] == [0, 1, 1]
    assert [r["policy/num_too_stale"] for r in rows] == [0, 0, 0]
    assert [r["policy/version"] for r in rows] == [1, 2, 3]
    # the stale rollouts were importance-corrected: sampler and trainer log-probs differ on them
    assert rows[0]["loss/rollout_logprob_abs_diff"] < 1e-4
    assert rows[1]["loss/rollout_logprob_abs_diff"] > rows[0]["loss/rollout_logprob_abs_diff"]
    start, trained = initial_params(), checkpoint_params(run_dir / "checkpoints" / "last")
    assert any(not torch.equal(start[k], trained[k]) for k in start)


@pytest.mark.slow  # 15 s on a slow 2-core machine: the fast suite's ~3 min budget
def test_torchrun_two_ranks_end_identical(tmp_path):
    run_dir = tmp_path / "run"
    out = run_recipe(SMOKE + ["train.steps=2", "distributed.backend=gloo"], run_dir, torchrun=2)
    assert "ranks 2" in out
    digests = json.loads((run_dir / "param_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    # ... and they trained: not the starting weights, and exactly what rank 0 checkpointed
    start_model, _ = load_policy_model("tiny")
    assert digests[0] != params_digest(start_model)
    assert digests[0] == params_digest(load_policy_model(run_dir / "checkpoints" / "last")[0])
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert_finite_steps(rows, [1, 2])  # rank 0 logged every rank's rollouts: 16 per step
    records = read_jsonl(run_dir / "rollouts" / "step_000001.jsonl")
    # each rank collected whole groups: 2 prompts x 4 samples each, 4 distinct prompts in all
    # the eval's 16 prompts were split over the ranks too and gathered by rank 0: 16 x 2 = 32 rollouts
    assert [(e["step"], e["eval/num_rollouts"]) for e in read_jsonl(run_dir / "eval.jsonl")] == [(0, 32), (2, 32)]
    tasks = {r["task_id"] for r in records}
    assert len(tasks) == PROMPTS
    assert all(sum(r["task_id"] == t for r in records) == GROUP for t in tasks)
    assert re.search(r"step 2/2 \| reward", out)
