"""Ray actor classes of the NeMo-RL integration, built on first access so that importing gym_plugin.nemo_rl never
imports ray."""

from __future__ import annotations

from typing import Any

from gym_plugin.errors import GymPluginError

_BUILT: dict[type, Any] = {}


def ray_actor_class(cls: type, qualname: str, without_ray: str, **options: Any) -> Any:
    """``ray.remote(**options)(cls)``, built once. Where ray is missing: GymPluginError naming ``qualname`` and
    ``without_ray`` (what to use instead)."""
    actor = _BUILT.get(cls)
    if actor is None:
        try:
            import ray
        except ImportError as e:
            raise GymPluginError(f"{qualname} needs ray (NeMo-RL's actor framework), which is not installed. "
                                 f"Install NeMo-RL (it brings ray), or {without_ray}.") from e
        actor = _BUILT[cls] = ray.remote(**options)(cls)
    return actor
