"""Built-in task datasets: deterministic lists of example rows for the default GRPO recipe.

A task is a function ``(agent_name) -> list[row]`` where each row is a NeMo Gym example row
(``responses_create_params`` + ``agent_ref`` + the fields its verifier reads). The lists are fixed (no
randomness, no files), so a run's prompts are reproducible and "start vs end on the same prompts" means what
it says.

Why the capital-city task is the default: the default policy (SmolLM2-135M-Instruct, sampled at temperature
1.0) answers it right about 0.33-0.48 of the time at the start (measured here: 14/32 = 0.44 with 32 new
tokens), so GRPO sees groups with both right and wrong answers from the first step, and the reward rose to
~0.9 within 12-15 steps on this CPU (../shared/design/embedded-model.md). ``add_digits`` (a + b with a, b in
0..9, start ~0.14) is the harder alternative.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from gym_plugin.errors import ConfigError, did_you_mean

CAPITALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (country, capital, other accepted spellings of the capital)
    ("France", "Paris", ()),
    ("Germany", "Berlin", ()),
    ("Italy", "Rome", ("Roma",)),
    ("Spain", "Madrid", ()),
    ("Japan", "Tokyo", ()),
    ("China", "Beijing", ("Peking",)),
    ("Russia", "Moscow", ()),
    ("Egypt", "Cairo", ()),
    ("Canada", "Ottawa", ()),
    ("Australia", "Canberra", ()),
    ("Brazil", "Brasilia", ("Brasília",)),
    ("India", "New Delhi", ()),
    ("Mexico", "Mexico City", ()),
    ("Argentina", "Buenos Aires", ()),
    ("the United Kingdom", "London", ()),
    ("Portugal", "Lisbon", ("Lisboa",)),
    ("Greece", "Athens", ()),
    ("Norway", "Oslo", ()),
    ("Sweden", "Stockholm", ()),
    ("Finland", "Helsinki", ()),
    ("Denmark", "Copenhagen", ()),
    ("Poland", "Warsaw", ()),
    ("Austria", "Vienna", ("Wien",)),
    ("Ireland", "Dublin", ()),
    ("the Netherlands", "Amsterdam", ()),
    ("Belgium", "Brussels", ()),
    ("Switzerland", "Bern", ("Berne",)),
    ("Turkey", "Ankara", ()),
    ("Kenya", "Nairobi", ()),
    ("South Korea", "Seoul", ()),
    ("Thailand", "Bangkok", ()),
    ("Peru", "Lima", ()),
)
"""32 well-known countries; the order is the dataset order."""

CAPITAL_PROMPT = "What is the capital of {country}? Reply with only the city name."

ADD_DIGITS_PROMPT = "What is {a} + {b}? Reply with only the number."


def capital_rows(agent_name: str = "capitals_agent") -> list[dict[str, Any]]:
    """One row per country in ``CAPITALS``; the ``capitals`` verifier gives 1.0 when any accepted name of the
    capital appears in the reply (case-insensitive), else 0.0."""
    return [
        {
            "responses_create_params": {
                "input": [{"role": "user", "content": CAPITAL_PROMPT.format(country=country)}],
            },
            "expected_answer": capital,
            "accepted_answers": [capital, *aliases],
            "agent_ref": {"name": agent_name},
            "task_id": f"capitals/{i}",
        }
        for i, (country, capital, aliases) in enumerate(CAPITALS)
    ]


def add_digits_rows(agent_name: str = "add_digits_agent") -> list[dict[str, Any]]:
    """All 100 sums a + b with a, b in 0..9, in a fixed shuffled order; verify with ``exact_match`` style
    checking of the number (``expected_answer`` is the sum as a string)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)  # fixed seed: the order is part of the dataset
    return [
        {
            "responses_create_params": {
                "input": [{"role": "user", "content": ADD_DIGITS_PROMPT.format(a=a, b=b)}],
            },
            "expected_answer": str(a + b),
            "accepted_answers": [str(a + b)],
            "agent_ref": {"name": agent_name},
            "task_id": f"add_digits/{i}",
        }
        for i, (a, b) in enumerate(pairs)
    ]


LETTERS_PROMPT = "Write a word that contains the letter {letter}."


def letter_rows(agent_name: str = "letters_agent") -> list[dict[str, Any]]:
    """16 rows asking for a word with a given letter; verified by ``capitals`` with ``match: substring``.
    Meant for smoke tests with the random tiny model, whose random replies contain the letter some of the
    time, so groups have mixed rewards and the gradient is not zero."""
    return [
        {
            "responses_create_params": {
                "input": [{"role": "user", "content": LETTERS_PROMPT.format(letter=letter)}],
            },
            "expected_answer": letter,
            "accepted_answers": [letter],
            "agent_ref": {"name": agent_name},
            "task_id": f"letters/{i}",
        }
        for i, letter in enumerate("etaoinshrdlucmfw")
    ]


TASKS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "capitals": capital_rows,
    "add_digits": add_digits_rows,
    "letters": letter_rows,
}
"""Built-in task name -> row builder. ``task_rows`` is the lookup with a helpful error."""


def task_rows(name: str, agent_name: str) -> list[dict[str, Any]]:
    """The rows of built-in task ``name``, routed to ``agent_name``. ConfigError for unknown names."""
    try:
        build = TASKS[name]
    except KeyError:
        raise ConfigError(
            f"task.name={name!r} is not a built-in task.{did_you_mean(name, TASKS)} "
            f"Built-in tasks: {sorted(TASKS)}; or set task.path to a JSONL file of example rows."
        ) from None
    return build(agent_name)


def prompt_batches(num_rows: int, prompts_per_step: int, seed: int):
    """Yield, forever, lists of ``prompts_per_step`` row indices: epochs over ``range(num_rows)`` in an order
    shuffled by ``seed`` and the epoch number, so step ``k``'s prompts depend only on (seed, k).

    A batch never repeats a row; when ``prompts_per_step`` does not divide ``num_rows`` a batch spans two
    epochs. ``prompts_per_step > num_rows`` is a ConfigError (a group would appear twice in one step).
    """
    if prompts_per_step > num_rows:
        raise ConfigError(
            f"train.prompts_per_step={prompts_per_step} is larger than the task's {num_rows} rows; "
            f"set train.prompts_per_step <= {num_rows}."
        )
    epoch, queue = 0, []
    while True:
        while len(queue) < prompts_per_step:
            order = list(range(num_rows))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            # never repeat a row inside one batch across the epoch seam
            pending = [i for i in order if i not in queue]
            queue.extend(pending)
            queue.extend(i for i in order if i not in pending)
            epoch += 1
        batch, queue = queue[:prompts_per_step], queue[prompts_per_step:]
        yield batch
