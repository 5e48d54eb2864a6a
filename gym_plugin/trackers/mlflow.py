"""An MLflow run through MlflowClient (extra ``mlflow``, i.e. mlflow-skinny): a tracking server, a database or a
file store."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from gym_plugin.errors import TrackerError
from gym_plugin.trackers.base import RolloutSample, Tracker, flatten, temporary_env, yaml_text

class MlflowTracker(Tracker):
    """An MLflow run through ``MlflowClient`` (no global active run, so it sits beside your own MLflow use). A
    file-store URI (``file:...``, a path) is allowed explicitly: MLflow >= 3.7 refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for this process when the URI is one."""

    name = "mlflow"
    MAX_BATCH = 100  # MLflow's limit of params per log_batch call (metrics: 1000)

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, config: Mapping[str, Any],
                 run_id: str | None = None, resume_step: int | None = None):
        from mlflow.tracking import MlflowClient

        if "://" not in tracking_uri or tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)  # raises for a scheme MLflow does not know
            # the first request answers whether the URI works: fail fast (MLflow retries ~7 times otherwise)
            with temporary_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="15"):
                exp = self.client.get_experiment_by_name(experiment)
                experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
                if run_id is not None:
                    self.client.get_run(run_id)
                    self.client.update_run(run_id, status="RUNNING")
        except Exception as e:
            raise TrackerError(f"logging.mlflow_tracking_uri={tracking_uri!r} does not work for MLflow "
                               f"({type(e).__name__}: {str(e)[:300]}); set it to a running tracking server "
                               "(http://host:5000), a database URI (sqlite:///mlflow.db) or a folder "
                               "(file:/path/mlruns), or unset it for <run_dir>/mlruns.") from None
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            known: dict[str, str] = {}
        else:
            known = self.client.get_run(run_id).data.params
        self.run_id = run_id
        self._log_params(flatten(config), known)
        name = "config.yaml" if resume_step is None else f"config_resumed_at_step_{resume_step}.yaml"
        self.client.log_text(run_id, yaml_text(config), name)

    def _log_params(self, flat: Mapping[str, Any], known: Mapping[str, str]) -> None:
        """Params are write-once in MLflow: a resumed run adds the keys it did not have; its whole config is in
        config_resumed_at_step_N.yaml."""
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flat.items() if k not in known]
        for i in range(0, len(params), self.MAX_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.MAX_BATCH])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_rollouts(self, step: int, samples: Sequence[RolloutSample]) -> None:
        text = "".join(json.dumps(s.__dict__) + "\n" for s in samples)
        self.client.log_text(self.run_id, text, f"rollouts/step_{step:06d}.jsonl")

    def log_image(self, step: int, name: str, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_facts(self, facts: Mapping[str, Any]) -> None:
        for key, value in facts.items():
            self.client.set_tag(self.run_id, f"run.{key}", str(value))

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")
