"""``resources_servers / reasoning_gym``: a reply scored by the reasoning-gym dataset's own ``score_answer``.

Rows come from `gym_plugin.reasoning_tasks.generate_rows` (or any row with the same ``reasoning_gym`` key:
``{"dataset": name, "entry": {question, answer, metadata}, "answer_format": "answer_tag" | "boxed"}``). The final
answer is extracted from the last assistant message (``<answer>...</answer>`` by default, ``\\boxed{}`` when the
row or the config says ``boxed``) and scored by the row's dataset, built with the generator keywords this config
gives it (``dataset`` + ``dataset_config``, or a mix as ``dataset``), else with reasoning-gym's defaults; partial credit is
kept. The reply adds ``extracted_answer`` and ``score_reason`` (why a reply scored 0 without being judged: no
answer markup, an empty answer, a scorer that raised; None otherwise). A row without the ``reasoning_gym`` key
cannot be judged: a verifier failure (the rollout fails), never a 0.

YAML (the dataset keys are the ones generate_rows takes; the recipe passes the same values to both)::

    reasoning:
      resources_servers:
        reasoning_gym:
          dataset: chain_sum                 # or a mix: [{name, weight, config}, ...]; null: defaults
          dataset_config: {min_terms: 2, max_terms: 3}
          answer_format: answer_tag          # answer_tag | boxed (a row's own answer_format wins)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from gym_plugin.errors import ConfigError, ProtocolError, truncate
from gym_plugin.reasoning_tasks import ANSWER_FORMATS, ROW_KEY, build_dataset, normalize_spec, score_reply
from gym_plugin.servers.registry import register
from gym_plugin.servers.resources.base import ResourceServer, ResourceServerConfig, final_text


@dataclass
class ReasoningGymConfig(ResourceServerConfig):
    """YAML keys under ``resources_servers: reasoning_gym:``."""

    dataset: str | list | None = None
    """The reasoning-gym dataset (name) or weighted mix (``[{name, weight, config}, ...]``, reasoning-gym's
    composite) whose generator keywords the scorers get; None: every dataset with reasoning-gym's defaults."""
    dataset_config: dict | None = None
    """Generator keywords of a single ``dataset`` (some datasets' ``score_answer`` reads them)."""
    answer_format: str = "answer_tag"
    """How the final answer is marked when a row does not say: 'answer_tag' (<answer>...</answer>) | 'boxed'."""

    def check(self) -> list[str]:
        problems = []
        if self.answer_format not in ANSWER_FORMATS:
            problems.append(f"answer_format={self.answer_format!r} must be one of {list(ANSWER_FORMATS)}")
        if self.dataset is None and self.dataset_config:
            problems.append("dataset_config is set without dataset: name the dataset it configures")
        return problems


@register("resources_servers", "reasoning_gym")
class ReasoningGymResourceServer(ResourceServer):
    Config = ReasoningGymConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        c = self.config
        spec = normalize_spec(c.dataset, c.dataset_config) if c.dataset is not None else []
        self._keywords = {s["name"]: s["config"] for s in spec}  # checked now: a bad config fails at start
        self._scorers: dict[str, Any] = {}

    def scorer(self, name: str) -> Any:
        """The dataset that scores rows of ``name`` (built once, with this config's keywords for it)."""
        if name not in self._scorers:
            spec = normalize_spec(name, self._keywords.get(name))
            self._scorers[name] = build_dataset(spec, seed=0, size=1)
        return self._scorers[name]

    async def verify_row(self, row: Mapping[str, Any], response: Mapping[str, Any], state: dict | None) -> dict:
        info = row.get(ROW_KEY)
        if (not isinstance(info, Mapping) or not isinstance(info.get("dataset"), str)
                or not isinstance(info.get("entry"), Mapping)):
            raise ProtocolError(
                f"{self.name}: the row has no '{ROW_KEY}': {{dataset, entry, answer_format}} (got "
                f"{truncate(info, 200)}); make the rows with gym_plugin.reasoning_tasks.generate_rows")
        answer_format = info.get("answer_format") or self.config.answer_format
        if answer_format not in ANSWER_FORMATS:
            raise ProtocolError(f"{self.name}: the row's answer_format={answer_format!r} is not one of "
                                f"{list(ANSWER_FORMATS)}")
        try:
            scorer = self.scorer(info["dataset"])
        except ConfigError as e:  # the row names a dataset reasoning-gym does not have: it cannot be judged
            raise ProtocolError(f"{self.name}: cannot score the row's dataset {info['dataset']!r}: {e}") from None
        return score_reply(scorer, info["entry"], final_text(response), answer_format)
