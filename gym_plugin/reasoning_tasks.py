"""reasoning-gym's procedural task generators as Gym example rows, and its scoring of a model's reply.

Needs the ``reasoning`` extra (``pip install -e ".[reasoning]"``: reasoning-gym 0.1.25); importing this module
does not import reasoning_gym, the first generate/score call does (a `MissingExtraError` naming the extra when it
is absent).

A *task spec* is one dataset name (``"chain_sum"``) with its generator keywords (``dataset_config``), or a weighted
mix, a list of ``{"name": ..., "weight": ..., "config": {...}}`` built as reasoning-gym's own CompositeDataset.

Rows (`generate_rows`): the question plus an answer-format instruction as the user message, ``expected_answer``
(the dataset's reference answer), ``reasoning_gym`` (the dataset name, the whole reasoning-gym entry and the
answer format: what the verifier needs) and ``agent_ref``.

Train and eval rows never overlap, by construction and by check:
- reasoning-gym generates item ``i`` of a dataset seeded ``s`` from ``Random(s + i)`` (a mix's sub-dataset k from
  ``Random(s + k + 1 + i)``). The train split uses seed ``seed`` (items 0..size-1), the eval split seed
  ``seed + EVAL_SEED_OFFSET`` (10^9), so their generator seeds are disjoint for any train size below 10^9;
- that holds for datasets that follow the convention, and small question spaces repeat questions anyway (there
  are only so many "how many legs do 3 cows have"), so the eval split also drops every row whose question text
  is one of the train split's (``train_size`` rows), and repeats of a question within itself: no eval question
  was ever a train question, and every eval question counts once.

Scoring (`score_reply`): the final answer is the content of the last ``<answer>...</answer>`` (reasoning-gym's
convention, its own ``extract_answer``) or of the last ``\\boxed{...}`` (``answer_format="boxed"``), and the reward
is the dataset's own ``score_answer(answer, entry)`` (partial credit kept: e.g. leg_counting's "500.0" for "500"
scores 3/5). A reply without the answer markup, or with an empty answer, scores 0 with the reason in
``score_reason``; so does a ``score_answer`` that raises on an odd answer (its exception named in the reason).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from gym_plugin.errors import ConfigError, did_you_mean, truncate

EXTRA_INSTALL = "pip install 'gym_plugin[reasoning]'  (or: pip install reasoning-gym==0.1.25)"

ANSWER_FORMATS = ("answer_tag", "boxed")
"""``answer_tag``: <answer>...</answer> (reasoning-gym's convention); ``boxed``: \\boxed{...}."""

INSTRUCTIONS = {
    "answer_tag": "Think step by step. Then write the final answer inside answer tags, like <answer>42</answer>.",
    "boxed": "Think step by step. Then write the final answer as \\boxed{answer}.",
}
"""The answer-format instruction appended to every question (after a blank line)."""

EVAL_SEED_OFFSET = 1_000_000_000
"""The eval split's reasoning-gym seed is ``seed + EVAL_SEED_OFFSET`` (see the module doc)."""

SPLITS = ("train", "eval")

ROW_KEY = "reasoning_gym"
"""The row key holding ``{"dataset", "entry", "answer_format"}`` for the verifier."""

class MissingExtraError(ConfigError):
    """An optional dependency of gym_plugin is not installed; the message names the extra to install."""


def reasoning_gym():
    """The reasoning_gym module (imported on first use); MissingExtraError naming the extra when absent."""
    try:
        import reasoning_gym as rg
    except ImportError as e:
        raise MissingExtraError(
            f"reasoning-gym tasks need the 'reasoning' extra ({e}); install it with {EXTRA_INSTALL}"
        ) from None
    return rg


def dataset_names() -> list[str]:
    """Every dataset reasoning-gym registers (106 in 0.1.25)."""
    reasoning_gym()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _check_name(name: Any, where: str) -> str:
    names = dataset_names()
    if not isinstance(name, str) or name not in names:
        raise ConfigError(f"{where}={name!r} is not a reasoning-gym dataset.{did_you_mean(str(name), names)} "
                          f"Known datasets ({len(names)}): {', '.join(names)}")
    return name


def _check_keywords(name: str, config: Any, where: str) -> dict:
    """The generator keywords of dataset ``name`` as a dict; ConfigError for unknown keys or seed/size."""
    import dataclasses

    from reasoning_gym.factory import DATASETS

    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}={truncate(config, 80)} must be a mapping of {name}'s generator keywords")
    fields = [f.name for f in dataclasses.fields(DATASETS[name][1]) if f.name not in ("seed", "size")]
    problems = []
    for key in config:
        if key in ("seed", "size"):
            problems.append(f"{where}.{key}: set the split's seed/size with the task's own `seed` and `size`, not "
                            "in the generator keywords")
        elif key not in fields:
            problems.append(f"{where}.{key}: {name} has no such generator keyword.{did_you_mean(str(key), fields)} "
                            f"Known: {fields}")
    if problems:
        raise ConfigError(problems)
    return dict(config)


def normalize_spec(dataset: Any, dataset_config: Mapping[str, Any] | None = None) -> list[dict]:
    """A task spec as a list of ``{"name", "weight", "config"}`` (one entry for a single dataset), checked: known
    names, known generator keywords, positive weights, no duplicates. ConfigError listing the problem."""
    reasoning_gym()
    if isinstance(dataset, str):
        return [{"name": _check_name(dataset, "dataset"), "weight": 1.0,
                 "config": _check_keywords(dataset, dataset_config, "dataset_config")}]
    if not isinstance(dataset, Sequence) or not dataset:
        raise ConfigError(f"dataset={truncate(dataset, 80)} must be a reasoning-gym dataset name or a non-empty "
                          "list of {name, weight, config} (a weighted mix)")
    if dataset_config:
        raise ConfigError("dataset_config is for a single dataset; in a mix give each entry its own 'config'")
    spec, seen = [], set()
    for i, item in enumerate(dataset):
        where = f"mix[{i}]"
        if not isinstance(item, Mapping) or "name" not in item:
            raise ConfigError(f"{where}={truncate(item, 80)} must be a mapping {{name, weight, config}}")
        extra = sorted(set(item) - {"name", "weight", "config"})
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {extra}; an entry has name, weight (default 1), config")
        name = _check_name(item["name"], f"{where}.name")
        if name in seen:
            raise ConfigError(f"{where}.name={name!r} appears twice in the mix; merge the entries (weights add)")
        seen.add(name)
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{where}.weight={weight!r} must be a number > 0")
        spec.append({"name": name, "weight": float(weight),
                     "config": _check_keywords(name, item.get("config"), f"{where}.config")})
    return spec


def build_dataset(spec: Sequence[Mapping[str, Any]], *, seed: int, size: int):
    """The reasoning-gym dataset of a normalized spec: the dataset itself, or a CompositeDataset for a mix."""
    rg = reasoning_gym()
    try:
        if len(spec) == 1:
            return rg.create_dataset(spec[0]["name"], seed=seed, size=size, **spec[0]["config"])
        from reasoning_gym.composite import CompositeConfig, CompositeDataset, DatasetSpec

        return CompositeDataset(CompositeConfig(size=size, seed=seed, datasets=[
            DatasetSpec(name=s["name"], weight=s["weight"], config=dict(s["config"])) for s in spec]))
    except (AssertionError, ValueError, TypeError) as e:  # reasoning-gym's own config validation
        names = [s["name"] for s in spec]
        raise ConfigError(f"reasoning-gym refused the generator keywords of {names} "
                          f"({[s['config'] for s in spec]}): {type(e).__name__}: {e or 'a validate() assertion'}; "
                          "fix the value (see the dataset's config class in reasoning_gym)") from None


def _entries(spec, *, seed: int, size: int) -> list[dict]:
    dataset = build_dataset(spec, seed=seed, size=size)
    return [dataset[i] for i in range(size)]


def prompt_text(question: str, instruction: str) -> str:
    """The user message: ``instruction`` with ``{question}`` replaced when it holds that placeholder (a template,
    e.g. a worked example first), else the question, a blank line and the instruction."""
    if "{question}" in instruction:
        return instruction.replace("{question}", question.rstrip())
    return f"{question.rstrip()}\n\n{instruction}".rstrip()


def _row(entry: Mapping[str, Any], spec, instruction: str, answer_format: str, agent_name: str, task_id: str) -> dict:
    name = (entry.get("metadata") or {}).get("source_dataset") or spec[0]["name"]
    try:
        plain = json.loads(json.dumps({"question": entry["question"], "answer": entry["answer"],
                                       "metadata": entry.get("metadata") or {}}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reasoning-gym dataset {name!r}: an entry is not JSON ({e}); this dataset cannot be "
                          "served as Gym rows, pick another") from None
    return {
        "responses_create_params": {
            "input": [{"role": "user", "content": prompt_text(entry["question"], instruction)}],
        },
        "expected_answer": plain["answer"],
        ROW_KEY: {"dataset": name, "entry": plain, "answer_format": answer_format},
        "agent_ref": {"name": agent_name},
        "task_id": task_id,
    }


def generate_rows(dataset: str | Sequence[Mapping[str, Any]], *, dataset_config: Mapping[str, Any] | None = None,
                  size: int, seed: int = 0, split: str = "train", train_size: int | None = None,
                  answer_format: str = "answer_tag", instruction: str | None = None,
                  agent_name: str = "reasoning_gym_agent") -> list[dict]:
    """``size`` Gym example rows of a reasoning-gym dataset (or weighted mix), deterministic in its arguments.

    dataset: a reasoning-gym dataset name ("chain_sum") or a mix ``[{"name", "weight", "config"}, ...]``.
    dataset_config: the single dataset's generator keywords (``{"min_terms": 2, "max_terms": 3}``).
    split: "train" (reasoning-gym seed ``seed``) or "eval" (seed ``seed + EVAL_SEED_OFFSET``, and no question of
    the train split's first ``train_size`` rows; ``train_size`` is required for "eval").
    answer_format: "answer_tag" (<answer>...</answer>) or "boxed" (\\boxed{...}): the prompt's instruction and
    the verifier's extraction. instruction: the text after the question, or a template holding ``{question}`` (None:
    ``INSTRUCTIONS[answer_format]``).
    agent_name: the rows' ``agent_ref``.
    Raises ConfigError (unknown dataset / keyword, bad size, an eval split the question space cannot fill) and
    MissingExtraError without reasoning-gym.
    """
    problems = []
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        problems.append(f"size={size!r} must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r} must be an integer >= 0")
    if split not in SPLITS:
        problems.append(f"split={split!r} must be one of {list(SPLITS)}.{did_you_mean(str(split), SPLITS)}")
    if answer_format not in ANSWER_FORMATS:
        problems.append(f"answer_format={answer_format!r} must be one of {list(ANSWER_FORMATS)}."
                        f"{did_you_mean(str(answer_format), ANSWER_FORMATS)}")
    if split == "eval" and (isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 0):
        problems.append(f"split='eval' needs train_size (the train split's row count, >= 0) so that no train "
                        f"question is an eval question; got train_size={train_size!r}")
    if isinstance(train_size, int) and train_size >= EVAL_SEED_OFFSET:
        problems.append(f"train_size={train_size} must be < {EVAL_SEED_OFFSET} (the eval split's seed offset)")
    if problems:
        raise ConfigError(problems)
    spec = normalize_spec(dataset, dataset_config)
    if split == "train":
        entries = _entries(spec, seed=seed, size=size)
    else:
        train_questions = {e["question"] for e in _entries(spec, seed=seed, size=train_size)} if train_size else set()
        pool = build_dataset(spec, seed=seed + EVAL_SEED_OFFSET, size=10 * size + 100)  # items made on demand
        entries, seen = [], set(train_questions)
        for i in range(len(pool)):  # held-out and distinct questions, in generation order
            entry = pool[i]
            if entry["question"] not in seen:
                seen.add(entry["question"])
                entries.append(entry)
                if len(entries) == size:
                    break
        if len(entries) < size:
            raise ConfigError(
                f"eval split of {[s['name'] for s in spec]}: only {len(entries)} distinct questions of {len(pool)} "
                f"generated are not train questions (train_size={train_size}), {size} needed; the question space is too small: "
                "lower the sizes or widen the generator keywords")
    instruction = INSTRUCTIONS[answer_format] if instruction is None else instruction
    return [_row(e, spec, instruction, answer_format, agent_name, f"reasoning_gym/{split}/{i}")
            for i, e in enumerate(entries)]


def extract_answer(text: str, answer_format: str) -> tuple[str | None, str | None]:
    """(answer, None) or (None, why there is none): the last <answer>...</answer> or \\boxed{...} of ``text``."""
    if answer_format == "boxed":
        from gym_plugin.servers.resources.base import extract_boxed

        answer = extract_boxed(text)
        missing = "no \\boxed{...} in the reply"
    else:
        from reasoning_gym.utils import extract_answer as rg_extract

        answer = rg_extract(text, tag_name="answer")
        missing = "no <answer>...</answer> in the reply" + (" (an <answer> tag is never closed)"
                                                            if "<answer>" in text else "")
    if answer is None:
        return None, missing
    answer = answer.strip()
    if not answer:
        return None, "the answer markup is empty"
    return answer, None


def score_reply(scorer: Any, entry: Mapping[str, Any], text: str, answer_format: str) -> dict:
    """``{"reward", "extracted_answer", "score_reason"}`` for the reply ``text`` to ``entry``: the dataset's own
    ``scorer.score_answer`` of the extracted answer; 0 with the reason for a missing/empty answer or a scorer
    that raised (``score_reason`` is None when the answer was scored normally)."""
    reasoning_gym()
    answer, reason = extract_answer(text, answer_format)
    if answer is None:
        return {"reward": 0.0, "extracted_answer": None, "score_reason": reason}
    try:
        reward = float(scorer.score_answer(answer, dict(entry)))
    except Exception as e:  # a dataset's scorer choking on an odd answer: a wrong answer, recorded why
        return {"reward": 0.0, "extracted_answer": answer,
                "score_reason": f"score_answer raised {type(e).__name__}: {truncate(str(e), 200)}"}
    return {"reward": reward, "extracted_answer": answer, "score_reason": None}
