"""``resources_servers / capitals``: the reply must name the expected answer (the default GRPO task's verifier).

Reward 1.0 when any of the row's ``accepted_answers`` (else its ``expected_answer``) appears in the final
assistant message as a whole word or phrase, case-insensitive ("The capital of France is Paris." -> 1.0 for
"Paris"; "Parisian" -> 0.0), else 0.0. This is the partial-credit-friendly check the default task needs: the
135M default policy often answers in a sentence, and a first-word check starts it near 0 (see
../shared/design/embedded-model.md). ``max_answer_words`` optionally refuses long replies, so a policy cannot
learn to list every city it knows. The reply adds ``extracted_answer`` (the matched name or None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from gym_plugin.errors import ProtocolError, did_you_mean
from gym_plugin.servers.registry import register
from gym_plugin.servers.resources.base import ResourceServer, ResourceServerConfig, expected_answer, final_text


MATCH_MODES = ("word", "substring")


def find_answer(text: str, accepted: list[str], match: str = "word") -> str | None:
    """The first accepted name found in ``text`` (case-insensitive), else None. ``match="word"``: as a whole
    word/phrase ("Paris" not in "Parisian"); ``"substring"``: anywhere."""
    for name in accepted:
        if match == "substring":
            if name.casefold() in text.casefold():
                return name
        # (?<!\w) / (?!\w) instead of \b: names may start or end with non-word characters ("St. John's").
        elif re.search(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text, flags=re.IGNORECASE):
            return name
    return None


@dataclass
class CapitalsConfig(ResourceServerConfig):
    """YAML keys under ``resources_servers: capitals:``."""

    max_answer_words: int | None = None
    """Replies longer than this many words get reward 0 (None: any length)."""
    match: str = "word"
    """'word' (the name as a whole word or phrase) or 'substring' (anywhere in the reply)."""

    def check(self) -> list[str]:
        if self.match not in MATCH_MODES:
            return [f"match={self.match!r} must be one of {list(MATCH_MODES)}.{did_you_mean(str(self.match), MATCH_MODES)}"]
        return []


@register("resources_servers", "capitals")
class CapitalsResourceServer(ResourceServer):
    Config = CapitalsConfig

    async def verify_row(self, row: Mapping[str, Any], response: Mapping[str, Any], state: dict | None) -> dict:
        accepted = row.get("accepted_answers")
        if accepted is None:
            accepted = [expected_answer(row, self.name)]
        if not isinstance(accepted, list) or not accepted or not all(isinstance(a, str) and a for a in accepted):
            raise ProtocolError(
                f"{self.name}: the row's 'accepted_answers' must be a non-empty list of strings, got {accepted!r}"
            )
        text = final_text(response)
        limit = self.config.max_answer_words
        if limit is not None and len(text.split()) > limit:
            return {"reward": 0.0, "extracted_answer": None}
        found = find_answer(text, accepted, self.config.match)
        return {"reward": 1.0 if found is not None else 0.0, "extracted_answer": found}


@register("resources_servers", "contains_answer")
class ContainsAnswerResourceServer(CapitalsResourceServer):
    """``resources_servers / contains_answer``: the same check under a task-neutral name, for tasks that are not
    about capitals (the ``letters`` smoke task uses it with ``match: substring``)."""
