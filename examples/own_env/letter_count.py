"""An environment of your own in one file: a resource server with one tool and a verifier.

Task: "How many times does the letter 'r' appear in 'strawberry'?". The tool ``count_letter(word, letter)`` answers
the count; the verifier computes the truth from the row's ``word`` and ``letter``, reads the last number of the
final answer, and also reports whether the tool was called in this rollout (kept in the session's state).

A config names this file under ``import_modules`` (env.yaml), which registers the server before it is built.
"""

from dataclasses import dataclass
import re

from gym_plugin.servers.registry import register
from gym_plugin.servers.resources.base import ResourceServer, ResourceServerConfig, final_text

COUNT_LETTER_TOOL = {
    "type": "function", "name": "count_letter", "description": "How many times `letter` occurs in `word`.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}, "letter": {"type": "string"}},
                   "required": ["word", "letter"]},
}
"""Put it in each row's responses_create_params.tools (rows.jsonl does)."""


@dataclass
class LetterCountConfig(ResourceServerConfig):
    """YAML keys under ``resources_servers: letter_count:``."""

    require_tool: bool = False
    """Reward 0 unless count_letter was called in the rollout."""


@register("resources_servers", "letter_count")
class LetterCountServer(ResourceServer):
    Config = LetterCountConfig

    def tools(self):
        return {"count_letter": self.count_letter}

    def new_session(self, row):
        return {"calls": 0}

    async def count_letter(self, args: dict, state: dict) -> dict:
        state["calls"] = state.get("calls", 0) + 1
        return {"count": str(args.get("word", "")).lower().count(str(args.get("letter", "")).lower() or "\0")}

    async def verify_row(self, row, response, state) -> dict:
        truth = row["word"].lower().count(row["letter"].lower())
        numbers = re.findall(r"\d+", final_text(response))
        answer = int(numbers[-1]) if numbers else None
        used_tool = bool((state or {}).get("calls"))
        correct = answer == truth and (used_tool or not self.config.require_tool)
        return {"reward": 1.0 if correct else 0.0, "extracted_answer": answer, "used_tool": used_tool}
