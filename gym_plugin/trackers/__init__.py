"""Experiment trackers beside a run's own files: TensorBoard, Weights & Biases and MLflow.

Each backend is one small class behind the ``Tracker`` interface (base.py), in a module of its own
(tensorboard.py, wandb.py, mlflow.py), and comes from its own optional extra
(``pip install 'gym_plugin[tensorboard]'``, ``[wandb]``, ``[mlflow]``); nothing here imports them until a run
asks for them. ``Trackers`` is the set a run writes to: the recipe hands it to ``RunLogger``, and your own loop
can use it the same way::

    from gym_plugin.trackers import Trackers

    trackers = Trackers.open(["tensorboard", "mlflow"], run_dir, config=my_config_dict,
                             facts={"model": "smollm2", "task": "capitals", "ranks": 1})
    for step in range(1, steps + 1):
        ...
        trackers.log_metrics(step, metrics)     # {"rollout/reward_mean": 0.4, ...}: one scalar per key
        trackers.log_rollouts(step, records)    # collector records; a few are sampled (prompt, completion, reward)
    trackers.close(image=run_dir / "reward_curve.png", finished=True)

What goes where (``run_dir`` is the run's folder):

- tensorboard: ``<run_dir>/tensorboard`` (torch's SummaryWriter): every metric as a scalar; the config as
  hyperparameters (HParams tab) and as YAML text ``config``; ``run/facts`` text; ``rollouts`` text per step (a
  markdown table); the reward curve as image ``reward_curve``. ``tensorboard --logdir <run_dir>/tensorboard``.
- wandb: a W&B run (``WANDB_MODE=offline`` writes it under ``<run_dir>/wandb`` for ``wandb sync``): metrics in
  its history, the config as the run config (facts under ``run``), a ``rollouts`` table per step, the image
  ``reward_curve`` at the last step, ``run/peak_rss_mb`` in the summary.
- mlflow: a run in experiment ``project`` at the tracking URI (default ``$MLFLOW_TRACKING_URI``, else the file
  store ``<run_dir>/mlruns``): metrics, the config flattened to params (``train.lr``) and as artifact
  ``config.yaml``, facts as tags ``run.*``, ``rollouts/step_000001.jsonl`` artifacts, ``reward_curve.png``.

A tracker that fails mid-run (network, disk) is reported once through ``on_error`` and gets nothing more; the
run's own files keep everything. ``ids()`` is what a checkpoint keeps so that a resumed run continues the same
tracker runs (``Trackers.open(..., resume_ids=..., resume_step=...)``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from gym_plugin.errors import TrackerError
from gym_plugin.trackers.base import (TRACKER_BACKENDS, RolloutSample, Tracker, backend_problems, check_installed,
                                      flatten, redact_args, sample_rollouts, scalars)
from gym_plugin.trackers.mlflow import MlflowTracker
from gym_plugin.trackers.tensorboard import TensorBoardTracker
from gym_plugin.trackers.wandb import WandbTracker

__all__ = ["TRACKER_BACKENDS", "MlflowTracker", "RolloutSample", "TensorBoardTracker", "Tracker", "Trackers",
           "WandbTracker", "backend_problems", "check_installed", "flatten", "redact_args", "sample_rollouts",
           "scalars"]


class Trackers:
    """The trackers one run writes to; every call goes to each of them. A tracker that raises is reported once
    (``on_error``, default: print to stderr) and gets nothing more. An empty set does nothing."""

    def __init__(self, trackers: Sequence[Tracker] = (), on_error: Callable[[str], None] | None = None,
                 rollouts_per_step: int = 4):
        self.trackers = list(trackers)
        self.on_error = on_error or (lambda message: print(message, flush=True, file=sys.stderr))
        self.rollouts_per_step = rollouts_per_step
        self.failed: dict[str, str] = {}
        """Tracker name -> the error that stopped it."""
        self._last_step = 0
        self._closed = False
        self.seconds = 0.0
        """Wall time spent inside the trackers so far (opening them, every log call, closing): what they cost a
        run; ``RunLogger`` prints it at the end."""
        if self.trackers:
            atexit.register(self._close_at_exit)  # a run that stops before RunLogger.close still ends its runs

    @classmethod
    def open(cls, backends: Sequence[str], run_dir: str | Path, *, config: Mapping[str, Any],
             facts: Mapping[str, Any] | None = None, project: str = "gym_plugin", run_name: str | None = None,
             mlflow_tracking_uri: str | None = None, wandb_entity: str | None = None,
             resume_ids: Mapping[str, str] | None = None, resume_step: int | None = None,
             rollouts_per_step: int = 4, on_error: Callable[[str], None] | None = None) -> "Trackers":
        """Start (or, with ``resume_ids`` from a checkpoint, continue) a run in each backend. ``config`` should
        be redacted already (``gym_plugin.redact.redact``). Raises TrackerError when a package is missing or a
        backend cannot start; the backends opened before it are closed."""
        started = time.perf_counter()
        problems = backend_problems(backends)
        if problems:
            raise TrackerError("\n".join(problems))
        check_installed(backends)
        run_dir = Path(run_dir)
        run_name = run_name or run_dir.resolve().name
        resume_ids = resume_ids or {}
        opened: list[Tracker] = []
        try:
            for name in backends:
                rid = resume_ids.get(name) if resume_step is not None else None
                if name == "tensorboard":
                    # always the run's own folder (a moved run_dir stays whole); the id only says it was used
                    opened.append(TensorBoardTracker(run_dir / "tensorboard", config, resume_step if rid else None))
                elif name == "wandb":
                    opened.append(WandbTracker(run_dir, project, run_name, config, wandb_entity, rid))
                else:
                    uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") \
                        or (run_dir / "mlruns").resolve().as_uri()
                    opened.append(MlflowTracker(uri, project, run_name, config, rid, resume_step if rid else None))
        except BaseException:
            for tracker in opened:
                with contextlib.suppress(Exception):
                    tracker.close(finished=False)
            raise
        trackers = cls(opened, on_error, rollouts_per_step)
        if facts:
            trackers.log_facts(facts)
        trackers.seconds += time.perf_counter() - started
        return trackers

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        started = time.perf_counter()
        try:
            self._call_each(what, call)
        finally:
            self.seconds += time.perf_counter() - started

    def _call_each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in self.trackers:
            if tracker.name in self.failed:
                continue
            try:
                call(tracker)
            except Exception as e:
                self.failed[tracker.name] = f"{type(e).__name__}: {e}"
                self.on_error(f"warning: tracker {tracker.name} failed while logging {what} "
                              f"({type(e).__name__}: {str(e)[:300]}); it gets nothing more in this run, training "
                              "goes on (metrics.jsonl, eval.jsonl and rollouts/ keep everything).")

    def ids(self) -> dict[str, str]:
        """Backend -> its run id (a checkpoint keeps these so that resume=true continues the same runs)."""
        return {t.name: t.run_id for t in self.trackers}

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Every metric as a scalar at ``step`` (the names as given; None is NaN)."""
        if not self.trackers:
            return
        values = scalars(metrics)
        self._last_step = max(self._last_step, step)
        self._each(f"step {step}'s metrics", lambda t: t.log_metrics(step, values))

    def log_rollouts(self, step: int, records: Sequence[Mapping[str, Any]]) -> None:
        """``rollouts_per_step`` of the step's collector records (see ``sample_rollouts``)."""
        if not self.trackers or self.rollouts_per_step <= 0:
            return
        samples = sample_rollouts(step, records, self.rollouts_per_step)
        self._each(f"step {step}'s rollouts", lambda t: t.log_rollouts(step, samples))

    def log_facts(self, facts: Mapping[str, Any]) -> None:
        """Facts about the run (model, task, ranks, peak RSS): text, config and tags, not a time series."""
        self._each("the run facts", lambda t: t.log_facts(facts))

    def close(self, image: str | Path | None = None, facts: Mapping[str, Any] | None = None,
              finished: bool = True) -> None:
        """Log the final ``image`` (e.g. reward_curve.png, when it exists) at the last step and the final
        ``facts``, then end each tracker run (MLflow: FINISHED, or FAILED when not ``finished``)."""
        if self._closed:
            return
        self._closed = True
        if image is not None and Path(image).is_file():
            self._each("the reward curve", lambda t: t.log_image(self._last_step, Path(image).stem, Path(image)))
        if facts:
            self.log_facts(facts)
        started = time.perf_counter()
        for tracker in self.trackers:
            try:
                tracker.close(finished)
            except Exception as e:
                if tracker.name not in self.failed:
                    self.on_error(f"warning: tracker {tracker.name} failed to close ({type(e).__name__}: {e}).")
        self.seconds += time.perf_counter() - started

    def _close_at_exit(self) -> None:
        self.close(finished=False)
