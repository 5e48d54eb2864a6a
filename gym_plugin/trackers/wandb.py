"""A Weights & Biases run (extra ``wandb``): online with a key, or offline files for ``wandb sync``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from gym_plugin.errors import TrackerError
from gym_plugin.trackers.base import RolloutSample, Tracker, redact_args, replaced_argv

class WandbTracker(Tracker):
    """A W&B run (online with a key; ``WANDB_MODE=offline`` writes it under ``<dir>/wandb``). On resume the run
    with ``run_id`` is continued (``resume='allow'``)."""

    name = "wandb"

    def __init__(self, directory: Path, project: str, run_name: str, config: Mapping[str, Any],
                 entity: str | None = None, run_id: str | None = None):
        import wandb

        self.wandb = wandb
        # console capture off (the run's own log has the console), no system-metrics thread (it would compete
        # with training for CPU), no history dump at the end; each is W&B's WANDB_* variable when that is set.
        defaults = {"console": "off", "x_disable_stats": True, "quiet": True}
        settings = wandb.Settings(**{k: v for k, v in defaults.items() if f"WANDB_{k.upper()}" not in os.environ})
        try:  # W&B records the command line: secrets given there are masked as in the config
            with replaced_argv(redact_args(sys.argv)):
                self.run = wandb.init(project=project, entity=entity, name=run_name, dir=str(directory),
                                      id=run_id, resume="allow" if run_id else None, config=dict(config),
                                      settings=settings, reinit="create_new")
        except Exception as e:  # no key, no network, a bad entity: wandb raises several types
            raise TrackerError(f"logging.backends has 'wandb' but W&B could not start a run ({type(e).__name__}: "
                               f"{e}); log in (wandb login, or WANDB_API_KEY), or run offline with "
                               "WANDB_MODE=offline (then wandb sync <run_dir>/wandb/offline-run-*).") from None
        self.run_id = self.run.id

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_rollouts(self, step: int, samples: Sequence[RolloutSample]) -> None:
        table = self.wandb.Table(columns=["step", "prompt", "completion", "reward"],
                                 data=[[s.step, s.prompt, s.completion, s.reward] for s in samples])
        self.run.log({"rollouts": table}, step=step)

    def log_image(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def log_facts(self, facts: Mapping[str, Any]) -> None:
        merged = {**dict(self.run.config.get("run") or {}), **facts}  # W&B replaces a key's whole value
        self.run.config.update({"run": merged}, allow_val_change=True)
        self.run.summary.update({f"run/{k}": v for k, v in facts.items() if isinstance(v, (int, float))})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
