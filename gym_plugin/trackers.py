"""Experiment trackers beside a run's own files: TensorBoard, Weights & Biases and MLflow.

Each backend is one small class behind the ``Tracker`` interface and comes from its own optional extra
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
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from gym_plugin.errors import TrackerError, did_you_mean

TRACKER_BACKENDS = ("tensorboard", "wandb", "mlflow")
"""The names ``logging.backends`` accepts."""

_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",),
            "mlflow": ("mlflow.tracking",)}
"""The modules each backend imports (the extra of the same name installs them)."""


@dataclass(frozen=True)
class RolloutSample:
    """One sampled rollout as the trackers show it."""

    step: int
    prompt: str
    """The last user message of the request (the whole input when it is a string)."""
    completion: str
    """The last assistant message's text, or what went wrong for a failure record."""
    reward: float | None
    """None for a failure record."""


def _prompt_text(record: Mapping[str, Any]) -> str:
    from gym_plugin.responses import content_text

    inp = (record.get("responses_create_params") or {}).get("input")
    if isinstance(inp, str):
        return inp
    users = [m for m in inp or () if isinstance(m, Mapping) and m.get("role") == "user"]
    return content_text(users[-1].get("content")) if users else ""


def sample_rollouts(step: int, records: Sequence[Mapping[str, Any]], k: int) -> list[RolloutSample]:
    """``k`` records spread evenly over ``records`` (first, ..., last: records come sorted by prompt, so the
    samples cover different prompts), as (prompt, completion, reward)."""
    from gym_plugin.protocol import describe_failure, is_failure
    from gym_plugin.responses import output_text

    n = len(records)
    if n == 0 or k <= 0:
        return []
    m = min(k, n)
    picks = sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})
    out = []
    for i in picks:
        r = records[i]
        failed = is_failure(r)
        completion = describe_failure(r) if failed else output_text((r.get("response") or {}).get("output") or [])
        reward = None if failed or r.get("reward") is None else float(r["reward"])
        out.append(RolloutSample(step, _prompt_text(r), completion, reward))
    return out


def check_installed(backends: Iterable[str]) -> None:
    """Import each backend's package now (before any model loads); one TrackerError naming the extra of every
    backend that cannot be imported."""
    problems = []
    for name in backends:
        for module in _MODULES[name]:
            try:
                importlib.import_module(module)
            except ImportError as e:
                problems.append(f"logging.backends has {name!r} but {module} cannot be imported ({e}); install it "
                                f"with pip install 'gym_plugin[{name}]' (or remove {name!r} from logging.backends).")
                break
    if problems:
        raise TrackerError("\n".join(problems))


def backend_problems(backends: Any) -> list[str]:
    """Config problems of ``logging.backends`` (unknown or repeated names)."""
    problems = []
    for name in backends:
        if name not in TRACKER_BACKENDS:
            problems.append(f"logging.backends: {name!r} is not one of {list(TRACKER_BACKENDS)}."
                            f"{did_you_mean(str(name), TRACKER_BACKENDS)}")
    if len(set(map(str, backends))) != len(backends):
        problems.append(f"logging.backends={list(backends)} names a backend twice; list each once.")
    return problems


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-5}} -> {'train.lr': 1e-5}; lists and None become JSON text (trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[dotted] = value
        else:
            out[dotted] = json.dumps(value, default=str)
    return out


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics as floats (None, as metrics.jsonl writes NaN, becomes NaN); TrackerError names a value that
    is not a number."""
    out = {}
    for key, value in metrics.items():
        if value is None:
            out[key] = math.nan
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise TrackerError(f"metric {key!r}={value!r} is not a number; trackers log scalars only (log text "
                               "with log_rollouts, or leave it out).") from None
    return out


def _yaml(config: Mapping[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(config)


class Tracker:
    """One backend. ``run_id`` is what a resumed run needs to continue the same tracker run."""

    name = ""
    run_id = ""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def log_rollouts(self, step: int, samples: Sequence[RolloutSample]) -> None:
        raise NotImplementedError

    def log_image(self, step: int, name: str, path: Path) -> None:
        raise NotImplementedError

    def log_facts(self, facts: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self, finished: bool) -> None:
        raise NotImplementedError


def _markdown_cell(text: str, limit: int = 1000) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir`` via torch's SummaryWriter. On resume the same folder is continued and
    ``purge_step`` hides the events of steps after the checkpoint (they are redone)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, config: Mapping[str, Any], resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = str(log_dir)
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1,
                                    flush_secs=10)
        if resume_step is None:
            from torch.utils.tensorboard.summary import hparams

            flat = {k: v for k, v in flatten(config).items()}
            for summary in hparams(flat, {"rollout/reward_mean": math.nan, "eval/reward_mean": math.nan}):
                self.writer._get_file_writer().add_summary(summary)
        self.writer.add_text("config", "    " + _yaml(config).replace("\n", "\n    "), 0 if resume_step is None
                             else resume_step)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_rollouts(self, step: int, samples: Sequence[RolloutSample]) -> None:
        rows = ["| prompt | completion | reward |", "|---|---|---|"]
        rows += [f"| {_markdown_cell(s.prompt)} | {_markdown_cell(s.completion)} | {s.reward} |" for s in samples]
        self.writer.add_text("rollouts", "\n".join(rows), step)

    def log_image(self, step: int, name: str, path: Path) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        png = path.read_bytes()
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)

    def log_facts(self, facts: Mapping[str, Any]) -> None:
        self.writer.add_text("run/facts", "\n".join(f"- {k}: {v}" for k, v in facts.items()), 0)

    def close(self, finished: bool) -> None:
        self.writer.close()


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
            with _argv(redact_args(sys.argv)):
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


def redact_args(argv: Sequence[str]) -> list[str]:
    """A command line with the values of secret-like ``key=value`` overrides (``policy.api_key=sk-..``) and URL
    passwords masked (gym_plugin.redact's rules)."""
    from gym_plugin.redact import REDACTED, is_secret_key, redact_url

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        secret = sep and value and is_secret_key(key.lstrip("+~").rsplit(".", 1)[-1])
        out.append(f"{key}={REDACTED}" if secret else redact_url(arg))
    return out


@contextlib.contextmanager
def _argv(argv: list[str]):
    """sys.argv replaced for the block only."""
    old = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = old


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the block only."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
            with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="15"):
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
        self.client.log_text(run_id, _yaml(config), name)

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
                    opened.append(TensorBoardTracker(Path(rid) if rid else run_dir / "tensorboard", config,
                                                     resume_step if rid else None))
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
        return trackers

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
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
        for tracker in self.trackers:
            try:
                tracker.close(finished)
            except Exception as e:
                if tracker.name not in self.failed:
                    self.on_error(f"warning: tracker {tracker.name} failed to close ({type(e).__name__}: {e}).")

    def _close_at_exit(self) -> None:
        self.close(finished=False)
