"""reasoning-gym through the recipe (model=tiny, a few seconds each) and through ``gym-plugin collect`` (rows
written to JSONL by generate_rows, the scripted fake as the policy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed: pip install -e '.[reasoning]'")

from gym_plugin.reasoning_tasks import generate_rows  # noqa: E402
from tests.integration.test_recipe import read_jsonl, run_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny", "env=reasoning_gym", "env.size=16", "train.steps=1", "train.prompts_per_step=2",
        "train.group_size=2", "policy.max_output_tokens=8", "eval.num_prompts=4", "eval.samples=1",
        "logging.progress=false"]


@pytest.mark.parametrize("dataset", [
    ["env.dataset=leg_counting", "env.dataset_config={min_animals: 1, max_animals: 2}"],
    pytest.param(["env.dataset=[{name: chain_sum, weight: 1, config: {max_terms: 3}}, {name: spell_backward, "
                  "weight: 2}]", "env.answer_format=boxed"], marks=pytest.mark.slow),  # the fast suite's time budget
], ids=["one_dataset", "mix_boxed"])
def test_recipe_trains_on_reasoning_gym_rows(tmp_path, dataset):
    run_recipe(TINY + dataset, tmp_path / "run")
    (step,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert step["rollout/num_rollouts"] == 4 and step["rollout/num_failed"] == 0  # 2 prompts x 2 samples
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1] and all(e["eval/num_rollouts"] == 4 for e in evals)
    rollouts = read_jsonl(tmp_path / "run" / "rollouts" / "step_000001.jsonl")
    fmt = "boxed" if "env.answer_format=boxed" in dataset else "answer_tag"
    for r in rollouts:
        assert r["task_id"].startswith("reasoning_gym/train/") and r["reasoning_gym"]["answer_format"] == fmt
        # the random tiny model never writes the answer markup: 0, and the verifier says why
        assert r["reward"] == 0.0 and r["score_reason"].startswith("no ")


def test_recipe_without_a_dataset_is_one_error_block(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "recipes/grpo.py"), "model=tiny", "env=reasoning_gym",
                           "env.dataset=null", f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "env.task=reasoning_gym needs env.dataset=" in proc.stderr and "Traceback" not in proc.stderr


def test_generated_jsonl_through_gym_plugin_collect(tmp_path):
    # leg_counting with one animal of one instance: the answer is that animal's leg count. The fake answers
    # "<answer>6</answer>" to everything, so (base scorer: exact match 1, gold inside the answer len(gold)/len(answer))
    # a row scores 1 exactly when its expected answer is "6" (an insect), else 0 ("6" contains no other count).
    rows = generate_rows("leg_counting", dataset_config={"min_animals": 1, "max_animals": 1, "max_instances": 1},
                         size=12, split="eval", train_size=30)
    path, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "gym_plugin.cli", "collect", "--config", str(ROOT / "conf/gym/reasoning_gym.yaml"),
         "--input", str(path), "--output", str(out), "--quiet", "policy_endpoint.impl=fake_openai",
         "policy_endpoint.default=<answer>6</answer>", "head_server.port=0"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["_ng_task_index"])
    assert len(records) == 12
    expected = [1.0 if r["expected_answer"] == "6" else 0.0 for r in rows]
    assert 0 < sum(expected) < 12  # both outcomes occur in these 12 rows
    assert [r["reward"] for r in records] == expected
    assert all(r["extracted_answer"] == "6" and r["score_reason"] is None for r in records)


@pytest.mark.slow  # 8 s: the fast suite stays near 3 minutes
def test_reasoning_preset_runs_on_the_tiny_model(tmp_path):
    # the preset's own rows (basic_arithmetic a + b with its worked example), on the tiny model for speed
    run_recipe(["preset=reasoning", "model=tiny", "train.steps=1", "train.prompts_per_step=2", "train.group_size=2",
                "policy.max_output_tokens=8", "eval.num_prompts=2", "eval.samples=1", "logging.progress=false"],
               tmp_path / "run")
    row = read_jsonl(tmp_path / "run" / "rollouts" / "step_000001.jsonl")[0]
    prompt = row["responses_create_params"]["input"][0]["content"]
    assert prompt.startswith("Calculate 5 + 1.\n") and "Step 4: Check: 6 - 1 = 5" in prompt
    assert row["reasoning_gym"]["dataset"] == "basic_arithmetic" and row["reasoning_gym"]["answer_format"] == "boxed"
    assert row["responses_create_params"]["temperature"] == 0.6
