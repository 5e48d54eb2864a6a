"""Example-row data: read it, check every row, split train/validation, count what is in it.

The one reader behind ``gym-plugin prepare`` and the recipe's ``env.data_path``:

- a *row source* is any iterable of ``(origin, row)`` pairs, ``origin`` naming where the row came from in
  messages ('rows.jsonl:12', 'rows.parquet#12', 'reasoning_gym:chain_sum#12'). `file_rows` reads JSONL (a line
  that is not JSON becomes a `NotJSON` row, reported with its line number) or Parquet (needs pyarrow: the
  ``parquet`` extra); a generator of rows is a source as it is;
- `check_rows` applies `gym_plugin.rows.row_problems` (the check behind the collector's ``invalid_row``
  records) to every row and keeps every problem; `CheckedRows.raise_if_invalid` makes them one `DataError`;
- `split_rows` draws a seeded validation split that keeps rows with the same prompt on one side;
- `row_stats` counts rows per agent, duplicate prompts and, given a tokenizer, the prompt tokens the policy sees.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping, NamedTuple

from gym_plugin.errors import ConfigError, DataError, did_you_mean, truncate
from gym_plugin.protocol import agent_name
from gym_plugin.responses import create_params_to_chat, input_to_messages
from gym_plugin.rows import row_problems

RowSource = Iterable[tuple[str, Any]]
"""``(origin, row)`` pairs: where the row came from (for messages) and the row as parsed."""

PARQUET_SUFFIXES = (".parquet", ".pq")
"""File names read as Parquet; every other file is read as JSONL."""

PROBLEM_KINDS = {
    "json": "not JSON",
    "row": "not an object",
    "responses_create_params": "no responses_create_params",
    "responses_create_params.input": "bad input",
    "responses_create_params.input[]": "bad input item",
    "responses_create_params.tools": "bad tools",
    "agent_ref": "bad agent_ref",
}
"""Problem field (`row_problems`, item indexes dropped) -> the name counted in summaries."""


class NotJSON(NamedTuple):
    """A JSONL line that did not parse (kept as a row, so that it is reported with its line number)."""

    error: str
    """The parser's message, e.g. "Expecting ',' delimiter (column 41)"."""
    text: str
    """The line itself."""


# ---- reading ---------------------------------------------------------------------------------------------------
def jsonl_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``('<path>:<line>', row)`` for every non-blank line of a JSONL file (a `NotJSON` for one that does not
    parse)."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", NotJSON(f"{e.msg} (column {e.colno})", line)


def parquet_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``('<path>#<row>', row)`` for every row of a Parquet file (row numbers from 0; nested columns as dicts and
    lists). Needs pyarrow (``pip install 'gym_plugin[parquet]'``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed. Install it "
                        "(pip install 'gym_plugin[parquet]'), or give the rows as JSONL.") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot be read as Parquet ({type(e).__name__}: {e}). Check the file, or give "
                        "the rows as JSONL.") from e
    yield from numbered_rows(str(path), table.to_pylist())


def numbered_rows(name: str, rows: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """A row source from plain rows: ``('<name>#<i>', row)``, i from 0 (e.g. generated rows:
    ``numbered_rows('reasoning_gym:chain_sum', rows)`` names row 12 'reasoning_gym:chain_sum#12')."""
    for i, row in enumerate(rows):
        yield f"{name}#{i}", row


def file_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """The rows of a JSONL or Parquet file (by its suffix); DataError when it is missing."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"{path} {what}: give a JSONL (or Parquet) file of example rows.")
    return parquet_rows(path) if path.suffix.lower() in PARQUET_SUFFIXES else jsonl_rows(path)


# ---- checking --------------------------------------------------------------------------------------------------
@dataclass
class CheckedRows:
    """What `check_rows` made of a source."""

    rows: list[dict] = field(default_factory=list)
    """The usable rows, in source order (``agent_ref`` set when an agent was given)."""
    origins: list[str] = field(default_factory=list)
    """Where each usable row came from (same order)."""
    problems: list[tuple[str, str]] = field(default_factory=list)
    """``(origin, message)`` of every problem, in source order (a row can have several)."""
    kinds: Counter = field(default_factory=Counter)
    """Problem kind (`PROBLEM_KINDS` values) -> how many."""
    read: int = 0
    """Rows read (usable or not)."""
    invalid: int = 0
    """Rows with at least one problem."""
    agent_replaced: Counter = field(default_factory=Counter)
    """With ``agent``: the agent_ref a row had (another agent's name) -> how many rows were re-routed."""

    def raise_if_invalid(self, source: str, fix: str) -> None:
        """One DataError listing every problem (``fix`` ends it), or when there were no rows at all."""
        if self.read == 0:
            raise DataError(f"{source} holds no rows: give one JSON object per line, e.g. "
                            '{"responses_create_params": {"input": [{"role": "user", "content": "..."}]}}')
        if self.problems:
            kinds = ", ".join(f"{k} {n}" for k, n in self.kinds.most_common())
            raise DataError(f"{self.invalid} of {self.read} rows of {source} are unusable ({kinds}):",
                            self.problems, fix)


def check_rows(source: RowSource, *, agents: Collection[str] | None = None, agent: str | None = None) -> CheckedRows:
    """Check every row of ``source`` and keep every problem (nothing is raised for a bad row).

    ``agent``: route every row to this agent (its ``agent_ref`` is set; rows that named another agent are counted
    in ``agent_replaced``). ``agents``: the configured agent names; every ``agent_ref`` (and ``agent``) must name
    one of them. ConfigError when ``agent`` is not among ``agents``.
    """
    if agent is not None and agents is not None and agent not in agents:
        raise ConfigError(f"agent {agent!r} is not an agent of the config.{did_you_mean(agent, agents)} "
                          f"Configured agents: {sorted(agents)}.")
    out = CheckedRows()
    for origin, row in source:
        out.read += 1
        if isinstance(row, NotJSON):
            found = [("json", f"not valid JSON: {row.error}: {truncate(row.text, 200)}; fix the line (one JSON "
                              "object per line)")]
        else:
            if agent is not None and isinstance(row, Mapping):
                ref = row.get("agent_ref")
                had = ref.get("name") if isinstance(ref, Mapping) else ref
                if had is not None and had != agent:
                    out.agent_replaced[str(had)] += 1
                row = {**row, "agent_ref": {"name": agent}}
            found = row_problems(row, agents)
        if found:
            out.invalid += 1
            for kind, message in found:
                out.kinds[PROBLEM_KINDS[kind.split("[", 1)[0] + ("[]" if "[" in kind else "")]] += 1
                out.problems.append((origin, message))
            continue
        out.rows.append(dict(row))
        out.origins.append(origin)
    return out


def load_rows(path: str | Path, *, agent: str | None = None, agents: Collection[str] | None = None,
              fix: str = "Fix these rows; `gym-plugin prepare --input FILE` checks a file without running anything.",
              ) -> list[dict]:
    """Every row of a JSONL/Parquet file, checked (`check_rows`); one DataError naming each bad row's
    ``file:line`` and ending with ``fix`` when any is unusable."""
    checked = check_rows(file_rows(path), agents=agents, agent=agent)
    checked.raise_if_invalid(str(path), fix)
    return checked.rows


# ---- splitting -------------------------------------------------------------------------------------------------
def prompt_key(row: Mapping[str, Any]) -> str:
    """What the policy is asked, as one string: the chat messages the input becomes (a string input and the same
    text as one user message are the same prompt) plus the tools. Rows with equal keys are duplicate prompts."""
    params = row["responses_create_params"]
    messages = input_to_messages(params["input"], params.get("instructions"), carry_tokens=False)
    return json.dumps([messages, params.get("tools")], sort_keys=True, default=str)


def split_rows(rows: list[Mapping[str, Any]], *, val_fraction: float | None = None, val_size: int | None = None,
               seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, validation) row indexes, each in source order. The same rows and seed give the same split.

    Rows that share a prompt (`prompt_key`) land on the same side, so no validation prompt is trained on: prompt
    groups are shuffled with ``seed`` and taken into validation while they fit the target size (``val_size``, or
    ``round(val_fraction * len(rows))``); without duplicate prompts the size is exact. ConfigError for a size
    that leaves either side empty.
    """
    n = len(rows)
    if (val_fraction is None) == (val_size is None):
        raise ConfigError("give one of val_fraction (e.g. 0.1) and val_size (e.g. 32) to split off validation rows.")
    if val_fraction is not None:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction={val_fraction}: must be between 0 and 1 (e.g. 0.1).")
        target = round(val_fraction * n)
        what = f"val_fraction={val_fraction} of {n} rows is {target} rows"
    else:
        target = val_size
        what = f"val_size={val_size} of {n} rows"
    if not 1 <= target < n:
        raise ConfigError(f"{what}: both sides need at least one row (validation 1..{max(n - 1, 0)} rows).")
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(prompt_key(row), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    val: list[int] = []
    for group in order:
        if len(val) + len(group) <= target:
            val.extend(group)
            if len(val) == target:
                break
    if not val:
        raise ConfigError(f"{what}: every prompt is repeated more often than that (rows with the same prompt stay "
                          "together); ask for a larger validation split.")
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], sorted(val)


# ---- stats -----------------------------------------------------------------------------------------------------
@dataclass
class RowStats:
    """What a set of checked rows holds."""

    rows: int
    """Number of rows."""
    per_agent: dict[str, int]
    """Agent name -> rows routed to it (most rows first)."""
    duplicate_prompts: int
    """Rows whose prompt (`prompt_key`) an earlier row already has."""
    prompt_tokens: list[int] | None = None
    """Tokens of each row's prompt as the policy sees it (chat template, tools, generation prompt), with the
    tokenizer given; None without one."""

    def lines(self, tokenizer_name: str | None = None) -> list[str]:
        """The stats as printed by ``gym-plugin prepare``."""
        agents = ", ".join(f"{name} {count}" for name, count in self.per_agent.items())
        out = [f"rows per agent: {agents}"]
        if self.prompt_tokens:
            t = self.prompt_tokens
            median = statistics.median(t)
            out.append(f"prompt tokens ({tokenizer_name or 'tokenizer'}): min {min(t)}, "
                       f"median {median:g}, max {max(t)}")
        out.append(f"duplicate prompts: {self.duplicate_prompts} "
                   f"(rows whose prompt an earlier row already has)")
        return out


def prompt_token_counts(rows: Iterable[Mapping[str, Any]], tokenizer) -> list[int]:
    """Tokens of each row's prompt rendered as the policy model server renders it in token mode (the chat template
    with the row's tools and the generation prompt; `gym_plugin.models.chat_template.ChatRenderer`)."""
    from gym_plugin.models.chat_template import ChatRenderer

    renderer = ChatRenderer(tokenizer)
    counts = []
    for row in rows:
        chat = create_params_to_chat(row["responses_create_params"], "", carry_tokens=False)
        counts.append(len(renderer.encode(renderer.render_text(chat["messages"], chat.get("tools")))))
    return counts


def row_stats(rows: list[Mapping[str, Any]], tokenizer=None) -> RowStats:
    """`RowStats` of checked rows (their ``agent_ref`` set); prompt tokens only with a ``tokenizer``."""
    per_agent = Counter(agent_name(row) for row in rows)
    keys = {prompt_key(row) for row in rows}
    tokens = prompt_token_counts(rows, tokenizer) if tokenizer is not None else None
    return RowStats(rows=len(rows), per_agent=dict(per_agent.most_common()), duplicate_prompts=len(rows) - len(keys),
                    prompt_tokens=tokens)


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSONL (folders created); returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
