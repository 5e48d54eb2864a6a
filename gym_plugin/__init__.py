"""gym_plugin: NeMo-Gym-style environments over HTTP -> rollouts with token ids -> PyTorch RL training.

The names users reach for are importable from the package root; they load lazily, so ``import gym_plugin``
(and the CLI) stays cheap and torch is imported only when a tensor function is used.

    from gym_plugin import GymIntegration, process_rollouts, grpo_step
"""

from __future__ import annotations

from gym_plugin.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "GymIntegration": "gym_plugin.integration",
    "RolloutCollectionHelper": "gym_plugin.integration",
    "BaseServerConfig": "gym_plugin.integration",
    "HEAD_SERVER_KEY_NAME": "gym_plugin.integration",
    "RolloutCollector": "gym_plugin.collect",
    "CollectorConfig": "gym_plugin.collect",
    "load_config": "gym_plugin.config",
    "process_rollouts": "gym_plugin.process",
    "RolloutBatch": "gym_plugin.process",
    "compute_advantages": "gym_plugin.advantages",
    "LossConfig": "gym_plugin.loss",
    "policy_loss": "gym_plugin.loss",
    "StepConfig": "gym_plugin.step",
    "grpo_step": "gym_plugin.step",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
