"""gym_plugin: NeMo-Gym-style environments over HTTP -> rollouts with token ids -> PyTorch RL training."""

__version__ = "0.1.0"
