"""Config schemas: dataclasses with a docstring per field, checked by one mechanism that reports every problem at
once, each with its dotted key, the value and the fix ("Did you mean ...?" for a near miss).

- `check` (keys and types of a mapping against a dataclass: unknown keys, required fields, values of the wrong
  type, nested dataclasses) and `build` (the same, then the instance, then its own value rules) collect problems
  into a list; the caller raises one ConfigError with all of them.
- Value rules live on the dataclass: ``check() -> list[str]`` returns problems relative to the dataclass
  (``"max_turns=0: must be an integer >= 1"``), which `build` and `require` prefix with where the dataclass sits
  (``"math_agent.responses_api_agents.simple_agent."``). A dataclass that derives from `Checked` runs them when it
  is built (``PolicyModelConfig(routing="x")`` raises); others when `require` is called.

Why not a library: pydantic v2 validates stdlib dataclasses with ``extra="forbid"`` and reports every error with
its location, but coerces in lax mode (``True`` for an int, ``"3"`` for 3), refuses plain dicts for dataclasses
in strict mode, has no "did you mean", and its messages are not ours, so a translation layer of this module's size
would sit on a new dependency; OmegaConf structured configs stop at the first error. This module is ~150 lines.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Iterable, Mapping, Sequence

from gym_plugin.errors import ConfigError, did_you_mean, truncate


class Checked:
    """Mixin for a config dataclass with value rules: building it runs ``check()`` and raises one ConfigError
    listing every problem."""

    def check(self) -> list[str]:
        """Problems with the values (relative to this dataclass: ``"field=value: what is wrong, the fix"``)."""
        return []

    def __post_init__(self) -> None:
        problems = self.check()
        if problems:
            raise ConfigError(problems)


def _dotted(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def unknown_key(dotted: str, key: str, known: Iterable[str], value: Any = None, noun: str = "key") -> str:
    """The message for a key a schema does not have: the near miss and the known keys."""
    known = sorted(known)
    shown = "" if value is None else f" (it was set to {truncate(value, 60)})"
    return f"{dotted}: unknown {noun}.{did_you_mean(str(key), known)} Known {noun}s: {known}{shown}."


def type_problem(hint: Any, value: Any) -> str | None:
    """What is wrong when ``value`` clearly does not fit the type ``hint`` (simple types only), else None."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        if any(type_problem(a, value) is None for a in args if a is not type(None)):
            return None
        return f"value {truncate(value, 80)} ({type(value).__name__}) does not fit {hint}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true/false, got {truncate(value, 80)}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {truncate(value, 80)}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {truncate(value, 80)}"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {truncate(value, 80)}"
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return None if isinstance(value, (list, tuple)) else f"expected a list, got {truncate(value, 80)}"
    if origin in (dict, Mapping) or hint is dict:
        return None if isinstance(value, Mapping) else f"expected a mapping, got {truncate(value, 80)}"
    return None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve here: its values are not type-checked
        return {}


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


def _fields(cls: type, data: Mapping[str, Any], where: str, problems: list[str], noun: str,
            extra: Iterable[str]) -> dict[str, Any] | None:
    """The constructor arguments of ``cls`` from ``data`` (nested dataclasses built), every key/type problem
    appended; None when a required field is missing."""
    if not isinstance(data, Mapping):
        problems.append(f"{where or 'config'}: expected a mapping of {cls.__name__} {noun}s, got {truncate(data, 80)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    ignored = set(extra)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = _dotted(where, key)
        if key in ignored:
            continue
        if key not in fields:
            problems.append(unknown_key(dotted, str(key), set(fields) | ignored, value, noun))
            continue
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = build(hint, value, dotted, problems, noun=noun)  # type: ignore[arg-type]
            if value is None:
                continue
        elif hint is not None and value is not None:
            message = type_problem(hint, value)
            if message:
                problems.append(f"{dotted}: {message}")
                continue
        kwargs[key] = value
    missing = [name for name, f in fields.items() if _required(f) and name not in data]
    for name in missing:
        problems.append(f"{_dotted(where, name)}: required {noun} is missing. Add `{name}: ...`"
                        + (f" under {where}." if where else "."))
    return None if missing else kwargs


def check(cls: type, data: Mapping[str, Any], where: str = "", problems: list[str] | None = None, *,
          noun: str = "key", extra: Iterable[str] = ()) -> list[str]:
    """Every key and type problem of ``data`` as the dataclass ``cls`` (nothing is built). ``extra``: keys that
    belong to the section but not to the dataclass (accepted, not checked)."""
    problems = [] if problems is None else problems
    _fields(cls, data, where, problems, noun, extra)
    return problems


def _prefixed(where: str, problems: Iterable[str]) -> list[str]:
    return [_dotted(where, p) for p in problems]


def build(cls: type, data: Mapping[str, Any], where: str = "", problems: list[str] | None = None, *,
          noun: str = "key", extra: Iterable[str] = ()) -> Any:
    """``cls(**data)`` for a dataclass schema, nested dataclasses included. Key, type and value problems (the
    instance's ``check()``) are appended to ``problems`` (a ConfigError listing them is raised when ``problems``
    is None); the instance is returned, or None when it could not be built. Value rules run even when some
    keys were wrong (those keys keep their defaults), so one pass reports everything."""
    raise_now = problems is None
    problems = [] if problems is None else problems
    before = len(problems)
    kwargs = _fields(cls, data, where, problems, noun, extra)
    obj = None
    if kwargs is not None:
        try:
            obj = cls(**kwargs)
        except ConfigError as e:  # a Checked dataclass: its value rules
            problems.extend(_prefixed(where, e.problems))
        except (TypeError, ValueError) as e:
            problems.append(f"{where or cls.__name__}: {e}")
        else:
            if not isinstance(obj, Checked) and callable(getattr(obj, "check", None)):
                problems.extend(_prefixed(where, obj.check()))
    if raise_now and len(problems) > before:
        raise ConfigError(problems)
    return obj


def require(obj: Any, where: str = "") -> None:
    """Raise one ConfigError listing the value problems of a built config (its ``check()``), prefixed with
    ``where``."""
    problems = obj.check()
    if problems:
        raise ConfigError(_prefixed(where, problems))
