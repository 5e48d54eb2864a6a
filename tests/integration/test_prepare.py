"""`gym-plugin prepare` and the recipe's env.data_path, through the real commands, on the same file with several
kinds of bad rows: both name every bad line; prepare writes seeded splits and prints the stats."""

from __future__ import annotations

import json
import re

import pytest

from tests.integration.test_user_errors import CLI, RECIPE, assert_one_block, run

pytestmark = pytest.mark.timeout(180)


def good(content: str, agent: str = "math_agent") -> str:
    return json.dumps({"responses_create_params": {"input": [{"role": "user", "content": content}]},
                       "expected_answer": "3", "agent_ref": {"name": agent}})


BAD_LINES = [
    good("~"),                                                                          # 1
    '{"responses_create_params": {"input": "What is 1 + 2?"}',                          # 2 not JSON (no closing brace)
    good("~~~"),                                                                        # 3
    json.dumps({"responses_create_params": {"input": []}, "agent_ref": "math_agent"}),  # 4 empty input
    "",                                                                                 # 5 blank: skipped
    good("~~~", agent="math_agnet"),                                                    # 6 unknown agent (--config)
    json.dumps(["not", "a", "row"]),                                                    # 7 not an object
    json.dumps({"responses_create_params": {"input": [{"role": "usr", "content": "hi"}]},
                "agent_ref": "math_agent"}),                                            # 8 bad input item
    good("~" * 8),                                                                      # 9
]


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    return path


def problem_lines(out: str, path) -> list[str]:
    return re.findall(rf"^  - {re.escape(str(path))}:(\d+): (.*)$", out, flags=re.MULTILINE)


def test_prepare_reports_every_bad_row_with_its_line(bad_file, tmp_path):
    proc = run(CLI + ["prepare", "--input", str(bad_file), "--config", "conf/gym/math.yaml",
                      "--output", str(tmp_path / "out.jsonl")])
    out = assert_one_block(proc, rf"DataError: 5 of 8 rows of {re.escape(str(bad_file))} are unusable \(")
    found = problem_lines(out, bad_file)
    assert [line for line, _ in found] == ["2", "4", "6", "7", "8"]
    messages = dict(found)
    assert messages["2"].startswith("not valid JSON: Expecting ',' delimiter")
    assert messages["4"].startswith("responses_create_params.input must be a non-empty string or list of items, "
                                    "got []")
    assert "agent_ref 'math_agnet' is not a configured agent" in messages["6"] and "Did you mean 'math_agent'?" \
        in messages["6"]
    assert messages["7"].startswith("the row is a list, not a JSON object")
    assert messages["8"].startswith("responses_create_params.input[0]: has role 'usr'")
    assert "pass --drop-invalid to leave them out" in out
    assert not (tmp_path / "out.jsonl").exists()  # nothing written from a bad file


def test_recipe_on_the_same_file_is_one_block_naming_the_lines(bad_file, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(RECIPE + ["model=tiny", "env=letters", "env.task=null", f"env.data_path={bad_file}",
                         "train.steps=1", f"run_dir={run_dir}"])
    # the recipe routes every row to env.agent_name (letters_agent): the agent_ref on line 6 is replaced, not bad
    out = assert_one_block(proc, rf"DataError: 4 of 8 rows of {re.escape(str(bad_file))} are unusable",
                           rf"Fix these rows of env\.data_path={re.escape(str(bad_file))} \(`gym-plugin prepare")
    assert [line for line, _ in problem_lines(out, bad_file)] == ["2", "4", "7", "8"]
    assert "JSONDecodeError" not in out
    assert not run_dir.exists()  # stopped before anything was loaded or written


def test_prepare_drops_bad_rows_splits_and_prints_stats(bad_file, tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    args = CLI + ["prepare", "--input", str(bad_file), "--agent", "math_agent", "--drop-invalid", "--tokenizer",
                  "tiny", "--val-size", "1", "--seed", "0", "--output", str(train), "--val-output", str(val)]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # --agent re-routes line 6 (math_agnet -> math_agent): 4 bad rows (2, 4, 7, 8), 4 usable (1, 3, 6, 9)
    assert "read 8 rows from" in out and "dropped 4 unusable rows" in out
    assert "agent_ref set to 'math_agent' on 1 rows that named 'math_agnet' (--agent)" in out
    # prompts '~', '~~~', '~~~', '~'*8: 8 template tokens + 1 per tilde (tests/unit/test_datasets.py) -> 9, 11,
    # 11, 16: min 9, median 11, max 16; lines 3 and 6 share a prompt
    assert "rows per agent: math_agent 4" in out
    assert "prompt tokens (tiny): min 9, median 11, max 16" in out
    assert "duplicate prompts: 1 " in out
    assert "split (seed 0): 3 train, 1 validation rows" in out
    train_rows = [json.loads(x) for x in train.read_text().splitlines()]
    val_rows = [json.loads(x) for x in val.read_text().splitlines()]
    assert len(train_rows) == 3 and len(val_rows) == 1
    contents = [r["responses_create_params"]["input"][0]["content"] for r in train_rows + val_rows]
    assert sorted(contents) == ["~", "~~~", "~~~", "~" * 8]
    assert contents[3] in ("~", "~" * 8)  # the '~~~' pair stays together: 2 rows do not fit a validation size of 1
    assert all(r["agent_ref"] == {"name": "math_agent"} for r in train_rows + val_rows)
    # the same command again writes the same files
    first = (train.read_text(), val.read_text())
    assert run(args).returncode == 0 and (train.read_text(), val.read_text()) == first


def test_prepare_generates_reasoning_gym_rows(tmp_path):
    pytest.importorskip("reasoning_gym", reason="needs the 'reasoning' extra (pip install -e '.[reasoning]')")
    out, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    proc = run(CLI + ["prepare", "--reasoning-gym", "chain_sum", "--dataset-config", '{"min_terms": 2, "max_terms": 2}',
                      "--size", "6", "--output", str(out), "--val-size", "2", "--val-output", str(val)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "read 6 rows from reasoning_gym:chain_sum" in proc.stdout
    assert "split (seed 0): 4 train, 2 validation rows" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    val_rows = [json.loads(line) for line in val.read_text().splitlines()]
    assert len(rows) == 4 and len(val_rows) == 2
    for row in rows + val_rows:  # the rows the reasoning_gym server verifies: its entry, two terms, routed
        assert row["agent_ref"] == {"name": "reasoning_gym_agent"}
        assert row["reasoning_gym"]["dataset"] == "chain_sum"
        assert row["reasoning_gym"]["entry"]["metadata"]["num_terms"] == 2
    # a typo in the dataset name and a non-JSON config: one block each, exit 2
    assert_one_block(run(CLI + ["prepare", "--reasoning-gym", "chain_sun"]), r"Did you mean 'chain_sum'\?")
    assert_one_block(run(CLI + ["prepare", "--reasoning-gym", "chain_sum", "--dataset-config", "{bad"]),
                     r"--dataset-config='\{bad' is not JSON")
