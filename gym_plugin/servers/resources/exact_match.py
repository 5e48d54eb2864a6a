"""``resources_servers / exact_match``: the final answer must equal the row's ``expected_answer``.

The answer is the content of the last ``\\boxed{}`` in the final assistant message when there is one, else the
whole message. Both sides are normalised when ``normalize`` is on (case-folded, whitespace collapsed,
surrounding punctuation/quotes and a trailing period stripped). Reward 1.0 or 0.0; the reply adds
``extracted_answer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from gym_plugin.servers.registry import register
from gym_plugin.servers.resources.base import (
    ResourceServer,
    ResourceServerConfig,
    expected_answer,
    extract_boxed,
    final_text,
)

_STRIP = " \t\r\n.\"'`*$"


def normalize_answer(text: str) -> str:
    """'  The  Answer. ' -> 'the answer' (case-folded, whitespace collapsed, wrapping punctuation stripped)."""
    return " ".join(text.split()).strip(_STRIP).casefold()


def extract_answer(text: str, use_boxed: bool = True) -> str:
    """The \\boxed{} content when present (and use_boxed), else the whole text, stripped."""
    if use_boxed:
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed.strip()
    return text.strip()


@dataclass
class ExactMatchConfig(ResourceServerConfig):
    """YAML keys under ``resources_servers: exact_match:``."""

    normalize: bool = True
    """Compare normalised strings (case, whitespace, wrapping punctuation); False compares stripped text."""
    use_boxed: bool = True
    """Take the answer from the last \\boxed{} when the message has one."""


@register("resources_servers", "exact_match")
class ExactMatchResourceServer(ResourceServer):
    Config = ExactMatchConfig

    async def verify_row(self, row: Mapping[str, Any], response: Mapping[str, Any], state: dict | None) -> dict:
        expected = expected_answer(row, self.name)
        extracted = extract_answer(final_text(response), self.config.use_boxed)
        if self.config.normalize:
            ok = normalize_answer(extracted) == normalize_answer(expected)
        else:
            ok = extracted == expected.strip()
        return {"reward": 1.0 if ok else 0.0, "extracted_answer": extracted}
