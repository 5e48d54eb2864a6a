"""examples/own_env/ (the README's "Your own environment in one file"): the letter_count server, loaded through the
config's import_modules, runs under `gym-plugin collect` (from another working directory), the recipe (tiny model)
and GymIntegration with a policy that calls its tool."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from gym_plugin import GymIntegration
from gym_plugin.testing.fake_openai import Behaviour, ToolCall, Turn
from tests.integration.test_seed_api import fake_endpoint
from tests.integration.test_user_errors import CLI, ENV, RECIPE, ROOT, run

pytestmark = pytest.mark.timeout(240)

OWN = ROOT / "examples/own_env"
ROWS = [json.loads(line) for line in (OWN / "rows.jsonl").read_text().splitlines()]


def test_collect_from_another_folder_loads_the_server_and_scores_by_hand(tmp_path):
    out = tmp_path / "rollouts.jsonl"
    # a fake policy answering "3" to every prompt, started by the same command; run from tmp_path, so the server
    # file is found next to env.yaml, not through the working directory
    proc = subprocess.run(
        CLI + ["collect", "--config", str(OWN / "env.yaml"), "--input", str(OWN / "rows.jsonl"), "--output", str(out),
               "--quiet", "policy_endpoint.impl=fake_openai", "policy_endpoint.default=3"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda r: r["_ng_task_index"])
    # truth: strawberry r 3, banana a 3, mississippi s 4, letter t 2, bookkeeper e 3, committee m 2, parallel l 3,
    # assessment s 4: "3" is right on rows 0, 1, 4, 6 -> reward mean 4/8 = 0.5
    assert [r["reward"] for r in records] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert all(r["extracted_answer"] == 3 and r["used_tool"] is False for r in records)
    assert re.search(r"collected 8 records \(8 rollouts, 0 failures: none\) .* reward mean 0\.500", proc.stdout)


def test_policy_that_calls_the_tool_gets_the_count_and_reward_1():
    def script(messages, body):
        """Call count_letter with the word and letter of the question, then answer with the tool's count."""
        tool_results = [m for m in messages if m.get("role") == "tool"]
        if tool_results:
            return Turn(text=f"The answer is {json.loads(tool_results[-1]['content'])['count']}.")
        letter, word = re.search(r"letter '(\w)' appear in '(\w+)'", messages[-1]["content"]).groups()
        return Turn(tool_calls=[ToolCall("count_letter", {"word": word, "letter": letter})])

    with fake_endpoint(script) as fake:
        with GymIntegration("fake-model", fake.base_url, OWN / "env.yaml", head_server_port=0) as gym:
            records = gym.collect(ROWS)
    assert [r["reward"] for r in records] == [1.0] * 8
    assert [r["extracted_answer"] for r in records] == [3, 3, 4, 2, 3, 2, 3, 4]  # the truths listed above
    assert all(r["used_tool"] for r in records)
    output = records[2]["response"]["output"]
    outputs = [json.loads(it["output"]) for it in output if it["type"] == "function_call_output"]
    assert outputs == [{"count": 4}]  # mississippi has 4 s


def test_recipe_trains_on_the_own_environment_with_the_tiny_model(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(RECIPE + ["model=tiny", "env.task=null", "env.data_path=examples/own_env/rows.jsonl",
                         "env.config_paths=[examples/own_env/env.yaml]", "env.agent_name=letter_count_agent",
                         "env.gym=null", "train.steps=1", "train.prompts_per_step=4", "train.group_size=2",
                         "eval.num_prompts=2", "eval.samples=1", "policy.max_output_tokens=8", f"run_dir={run_dir}"],
               timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (run_dir / "rollouts/step_000001.jsonl").read_text().splitlines()]
    assert len(records) == 8  # 4 prompts x 2 samples, each judged by letter_count's verifier (no failure)
    assert all(r.get("failure") is None and r["reward"] in (0.0, 1.0) and "used_tool" in r for r in records)
    assert {r["word"] for r in records} <= {row["word"] for row in ROWS}
