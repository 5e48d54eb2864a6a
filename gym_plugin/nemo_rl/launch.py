"""Run a NeMo-RL launch script with gym_plugin plugged in, without editing or copying it:

    python -m gym_plugin.nemo_rl.launch [--env-name NAME] SCRIPT [SCRIPT ARGS...]

e.g. ``python -m gym_plugin.nemo_rl.launch examples/nemo_gym/run_grpo_nemo_gym.py --config my.yaml``. Before
SCRIPT runs (as ``__main__``, with ``sys.argv = [SCRIPT, *ARGS]``), NeMo-RL's Gym path is pointed at
gym_plugin's NemoGym drop-in (`gym_plugin.nemo_rl.gym.use_in_nemo_rl`) and the classic environment is registered
as ``NAME`` (default ``gym_plugin``; `gym_plugin.nemo_rl.env.register_with_nemo_rl`). Both only take effect when
the config uses them (``env.should_use_nemo_gym: true`` / ``env_name: gym_plugin``). docs/nemo_rl.md.
"""

from __future__ import annotations

import argparse
import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gym_plugin.nemo_rl.launch",
        description="Run a NeMo-RL launch script with gym_plugin's environments plugged in.")
    parser.add_argument("--env-name", default="gym_plugin",
                        help="env name for the classic step() environment (data.*.env_name); default gym_plugin")
    parser.add_argument("script", help="the NeMo-RL launch script, e.g. examples/nemo_gym/run_grpo_nemo_gym.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    ns = parser.parse_args(argv)

    # Imported by their package names: a class defined in __main__ could not be found by Ray's workers.
    from gym_plugin.nemo_rl.env import register_with_nemo_rl
    from gym_plugin.nemo_rl.gym import use_in_nemo_rl

    use_in_nemo_rl()
    register_with_nemo_rl(ns.env_name)
    sys.argv = [ns.script, *ns.args]
    runpy.run_path(ns.script, run_name="__main__")


if __name__ == "__main__":
    main()
