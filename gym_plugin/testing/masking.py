"""``resources_servers / exact_match_masking``: exact match that flags some rollouts ``mask_sample: true``.

Stands for the Gym environments that judge a rollout but ask the trainer not to learn from it (NeMo Gym flags
e.g. rollouts that hit the turn limit): rows with ``"flag_mask_sample": true`` get the exact-match reward and
``mask_sample: true``. Importing this module registers it (a NeMo-RL drop-in names it in
``gym_plugin.import_modules``).
"""

from __future__ import annotations

from typing import Any, Mapping

from gym_plugin.servers.registry import register
from gym_plugin.servers.resources.exact_match import ExactMatchResourceServer


@register("resources_servers", "exact_match_masking")
class MaskingExactMatchResourceServer(ExactMatchResourceServer):
    async def verify_row(self, row: Mapping[str, Any], response: Mapping[str, Any], state: dict | None) -> dict:
        out = await super().verify_row(row, response, state)
        if row.get("flag_mask_sample"):
            out["mask_sample"] = True
        return out

