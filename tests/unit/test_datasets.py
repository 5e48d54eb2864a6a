"""gym_plugin.datasets (the reader behind `gym-plugin prepare` and the recipe's env.data_path) and the row check it
shares with the collector (gym_plugin.rows.row_problems); config import_modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gym_plugin.config import configured_agents, load_config
from gym_plugin.datasets import (
    check_rows,
    file_rows,
    load_rows,
    numbered_rows,
    prompt_key,
    row_stats,
    split_rows,
)
from gym_plugin.errors import ConfigError, DataError
from gym_plugin.rows import row_problems, validate_example

ROOT = Path(__file__).resolve().parents[2]


def row(content, agent="math_agent", **extra):
    return {"responses_create_params": {"input": [{"role": "user", "content": content}]},
            "agent_ref": {"name": agent}, **extra}


def write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# ---- the row check ---------------------------------------------------------------------------------------------
def test_row_problems_lists_every_problem_of_a_row():
    bad = {"responses_create_params": {"input": [{"role": "usr", "content": "a"}, 3, {"role": "user", "content": 5}],
                                       "tools": {"name": "add"}},
           "agent_ref": {"name": "math_agnet"}}
    fields = [f for f, _ in row_problems(bad, agents=["math_agent"])]
    # items 0 (role), 1 (not an object), 2 (content not text or parts); tools not a list; agent unknown
    assert fields == ["responses_create_params.input[0]", "responses_create_params.input[1]",
                      "responses_create_params.input[2]", "responses_create_params.tools", "agent_ref"]
    messages = dict(row_problems(bad, agents=["math_agent"]))
    assert "has role 'usr'" in messages["responses_create_params.input[0]"]
    assert "Did you mean 'math_agent'?" in messages["agent_ref"]
    assert row_problems(row("hi"), agents=["math_agent"]) == []
    assert row_problems({"responses_create_params": {"input": "  "}, "agent_ref": "a"}) == [
        ("responses_create_params.input", "responses_create_params.input must be a non-empty string or list of "
         "items, got '  '; give the prompt, e.g. [{\"role\": \"user\", \"content\": \"...\"}]")]


def test_validate_example_joins_every_problem_of_the_row():
    with pytest.raises(Exception, match=r"example row 3: responses_create_params.input must be .*; no usable "
                                        r"'agent_ref' \(got None\)"):
        validate_example({"responses_create_params": {"input": []}}, 3)


def test_collector_check_is_shape_only():
    # an item type our policy server does not render (NeMo Gym's item_reference) is the receiver's business: the
    # collector (render=False) passes it on, prepare and the recipe (render=True) name it
    ref = {"responses_create_params": {"input": [{"type": "item_reference", "id": "msg_1"}]}, "agent_ref": "a"}
    assert validate_example(ref, 0) == ref
    assert [f for f, _ in row_problems(ref)] == ["responses_create_params.input[0]"]
    assert row_problems(ref, render=False) == []


# ---- reading and checking --------------------------------------------------------------------------------------
def test_check_rows_reports_every_bad_row_with_its_line(tmp_path):
    path = write(tmp_path / "rows.jsonl", [
        row("a"),                                   # 1 ok
        '{"responses_create_params": ',             # 2 not JSON
        "",                                         # 3 blank: skipped, not counted
        [1, 2],                                     # 4 not an object
        row("b", agent="math_agnet"),               # 5 unknown agent
        {"responses_create_params": {"input": []}, "agent_ref": "math_agent"},  # 6 empty input
        row("c"),                                   # 7 ok
    ])
    checked = check_rows(file_rows(path), agents=["math_agent"])
    assert checked.read == 6 and checked.invalid == 4 and len(checked.rows) == 2
    assert checked.origins == [f"{path}:1", f"{path}:7"]
    assert [origin for origin, _ in checked.problems] == [f"{path}:{n}" for n in (2, 4, 5, 6)]
    assert dict(checked.kinds) == {"not JSON": 1, "not an object": 1, "bad agent_ref": 1, "bad input": 1}
    with pytest.raises(DataError) as err:
        checked.raise_if_invalid(str(path), "Fix them.")
    text = str(err.value)
    assert text.startswith(f"4 of 6 rows of {path} are unusable (")
    assert f"  - {path}:2: not valid JSON: Expecting value (column 29)" in text  # after the 28 characters
    assert text.endswith("Fix them.") and len(err.value.problems) == 4


def test_agent_sets_agent_ref_and_counts_rerouted_rows(tmp_path):
    path = write(tmp_path / "rows.jsonl", [row("a", agent="other"), {"responses_create_params": {"input": "b"}},
                                           row("c", agent="calc")])
    checked = check_rows(file_rows(path), agent="calc")
    assert [r["agent_ref"] for r in checked.rows] == [{"name": "calc"}] * 3
    assert dict(checked.agent_replaced) == {"other": 1}  # the row without agent_ref and the one naming calc: not
    with pytest.raises(ConfigError, match=r"agent 'calk' is not an agent of the config\. Did you mean 'calc'\?"):
        check_rows(file_rows(path), agent="calk", agents=["calc"])


def test_load_rows_of_a_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="does not exist: give a JSONL"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no rows"):
        load_rows(write(tmp_path / "empty.jsonl", [""]))


def test_parquet_rows_are_read_and_named_by_row_number(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs pyarrow (extra 'parquet')")
    import pyarrow as pa

    rows = [row("a"), row("b"), {"responses_create_params": {"input": []}, "agent_ref": {"name": "math_agent"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    checked = check_rows(file_rows(tmp_path / "rows.parquet"))
    assert [r["responses_create_params"]["input"][0]["content"] for r in checked.rows] == ["a", "b"]
    assert [origin for origin, _ in checked.problems] == [f"{tmp_path / 'rows.parquet'}#2"]


# ---- splitting ---------------------------------------------------------------------------------------------------
def test_split_is_seeded_deterministic_and_exact_without_duplicates():
    rows = [row(f"q{i}") for i in range(20)]
    train, val = split_rows(rows, val_fraction=0.25, seed=3)
    assert len(val) == 5 and len(train) == 15  # round(0.25 * 20)
    assert sorted(train + val) == list(range(20)) and train == sorted(train) and val == sorted(val)
    assert split_rows(rows, val_fraction=0.25, seed=3) == (train, val)  # same rows, same seed: same split
    assert split_rows(rows, val_size=5, seed=3) == (train, val)
    assert split_rows(rows, val_size=5, seed=4)[1] != val  # another seed draws other rows
    assert len(split_rows(rows, val_size=1)[1]) == 1 and len(split_rows(rows, val_size=19)[1]) == 19


def test_split_keeps_rows_with_the_same_prompt_on_one_side():
    # prompts a a a b c d e f: 8 rows, 6 prompt groups; a string input equals the same text as a user message
    rows = [row("a"), {"responses_create_params": {"input": "a"}, "agent_ref": "math_agent"}, row("a")]
    rows += [row(x) for x in "bcdef"]
    for seed in range(10):
        train, val = split_rows(rows, val_size=3, seed=seed)
        assert {0, 1, 2} <= set(train) or {0, 1, 2} <= set(val)
        assert len(val) == 3  # either the group of 3, or three single prompts


def test_split_sizes_that_leave_a_side_empty_are_refused():
    rows = [row(f"q{i}") for i in range(10)]
    with pytest.raises(ConfigError, match=r"val_fraction=0.01 of 10 rows is 0 rows: both sides need"):
        split_rows(rows, val_fraction=0.01)
    with pytest.raises(ConfigError, match=r"val_size=10 of 10 rows: both sides need at least one row"):
        split_rows(rows, val_size=10)
    with pytest.raises(ConfigError, match="give one of val_fraction"):
        split_rows(rows, val_fraction=0.1, val_size=1)


# ---- stats -------------------------------------------------------------------------------------------------------
def test_stats_with_the_tiny_tokenizer_by_hand():
    from gym_plugin.models.tiny import build_tiny_tokenizer

    # The tiny ChatML template renders '<|im_start|>user\n{c}<|im_end|>\n<|im_start|>assistant\n': 8 tokens around
    # the content (<|im_start|>, 'user', '\n', <|im_end|>, '\n', <|im_start|>, 'assistant', '\n'); '~' is in no
    # BPE merge of the tiny corpus, so n tildes are n tokens. Contents 1, 3, 3, 8 tildes -> 9, 11, 11, 16 tokens:
    # min 9, median 11, max 16. Rows 2 and 3 have the same prompt: 1 duplicate.
    rows = [row("~"), row("~~~"), row("~~~", agent="calc_agent"), row("~" * 8)]
    stats = row_stats(rows, build_tiny_tokenizer())
    assert stats.prompt_tokens == [9, 11, 11, 16]
    assert stats.per_agent == {"math_agent": 3, "calc_agent": 1} and stats.duplicate_prompts == 1
    assert stats.lines("tiny") == ["rows per agent: math_agent 3, calc_agent 1",
                                   "prompt tokens (tiny): min 9, median 11, max 16",
                                   "duplicate prompts: 1 (rows whose prompt an earlier row already has)"]
    assert row_stats(rows[:2]).prompt_tokens is None  # no tokenizer, no token counts
    two = row_stats(rows[:2], build_tiny_tokenizer())  # 9 and 11 tokens: the median of two is their mean, 10
    assert two.lines()[1] == "prompt tokens (tokenizer): min 9, median 10, max 11"


def test_prompt_key_counts_tools_as_part_of_the_prompt():
    tools = [{"type": "function", "name": "add", "parameters": {"type": "object", "properties": {}}}]
    with_tools = row("a")
    with_tools["responses_create_params"]["tools"] = tools
    assert prompt_key(row("a")) != prompt_key(with_tools)
    assert prompt_key(row("a")) == prompt_key({"responses_create_params": {"input": "a"}})


# ---- config: import_modules and agents ------------------------------------------------------------------------
SERVER = '''
from gym_plugin.servers.registry import register
from gym_plugin.servers.resources.base import ResourceServer

@register("resources_servers", "always_one_{tag}")
class AlwaysOne(ResourceServer):
    async def verify_row(self, row, response, state):
        return {{"reward": 1.0}}
'''


def test_import_modules_loads_a_py_file_next_to_the_yaml(tmp_path):
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "mine.py").write_text(SERVER.format(tag="a"))
    cfg = tmp_path / "envs" / "env.yaml"
    cfg.write_text("import_modules: [mine.py]\nmine:\n  resources_servers:\n    always_one_a: {}\n")
    loaded = load_config(cfg)  # from any working directory: the path is the YAML file's folder
    assert loaded.servers["mine"].impl == "always_one_a"


def test_import_modules_problems_name_the_entry_and_the_fix(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    cfg = tmp_path / "env.yaml"
    cfg.write_text("import_modules: [missing.py, no_such_module_xyz, broken.py]\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    problems = err.value.problems
    assert problems[0].startswith(f"import_modules[0]: the file '{tmp_path / 'missing.py'}' does not exist.")
    assert problems[1].startswith("import_modules[1]: no module named 'no_such_module_xyz' can be imported")
    assert problems[2].startswith(f"import_modules[2]: importing '{tmp_path / 'broken.py'}' raised RuntimeError: boom")


def test_configured_agents_needs_no_policy_url():
    assert configured_agents(ROOT / "conf/gym/math.yaml") == ["math_agent"]  # policy_base_url unset: still readable


def test_generated_rows_are_a_source_named_by_index():
    rows = [row("a"), {"responses_create_params": {"input": "b"}}, row("c")]
    checked = check_rows(numbered_rows("gen:task", rows), agents=["math_agent"])
    assert checked.origins == ["gen:task#0", "gen:task#2"]
    assert [origin for origin, _ in checked.problems] == ["gen:task#1"]  # no agent_ref
