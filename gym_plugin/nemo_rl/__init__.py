"""NeMo-RL integration (docs/nemo_rl.md): both of NeMo-RL's environment paths run on gym_plugin's Gym servers.

- `gym`: NeMo-RL's Gym path: `NemoGymDropIn`, a drop-in for its ``NemoGym`` actor (``use_in_nemo_rl``);
- `env`: NeMo-RL's classic ``step()`` path: `GymEnvironment` behind its ``EnvironmentInterface``;
- `launch`: ``python -m gym_plugin.nemo_rl.launch SCRIPT ARGS`` runs an unchanged NeMo-RL launch script with both.

Neither ray nor nemo_rl is imported by this package; the Ray actor classes are built on first access.
"""
