"""The common part of gym_plugin.trackers: the ``Tracker`` interface each backend implements, the sampled rollouts
they show, and the checks and conversions every backend shares."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

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


def yaml_text(config: Mapping[str, Any]) -> str:
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
def replaced_argv(argv: list[str]):
    """sys.argv replaced for the block only."""
    old = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = old


@contextlib.contextmanager
def temporary_env(**values: str):
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
