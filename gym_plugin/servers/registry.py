"""Which class serves a config's ``<instance>: {<server_type>: {<implementation>: {...}}}``, and which serves its
local ``policy_endpoint: {impl: ...}``.

Servers register themselves: ``@register("resources_servers", "math_verify")`` on the class. A lookup imports
the module that defines a built-in implementation (`BUILTIN_MODULES`, module names only: nothing is imported
until a config names it), so this module imports no server; a server of your own registers when its module is
imported: list it under a config's ``import_modules`` (a module name or a ``.py`` file; `import_server_modules`)
or the NeMo-RL drop-in's ``gym_plugin.import_modules``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from gym_plugin.errors import ConfigError, did_you_mean

SERVER_TYPES = ("responses_api_agents", "resources_servers", "responses_api_models")
"""The NeMo Gym server types gym_plugin starts (``environment_servers`` entries are accepted, never started: see
gym_plugin.envservers)."""
POLICY_ENDPOINT = "policy_endpoint"
"""The kind of the local OpenAI-compatible endpoints a config's ``policy_endpoint`` section starts."""
KINDS = (*SERVER_TYPES, POLICY_ENDPOINT)

BUILTIN_MODULES: dict[tuple[str, str], str] = {
    ("responses_api_agents", "simple_agent"): "gym_plugin.servers.agent",
    ("responses_api_models", "vllm_model"): "gym_plugin.servers.policy.server",
    ("resources_servers", "exact_match"): "gym_plugin.servers.resources.exact_match",
    ("resources_servers", "math_verify"): "gym_plugin.servers.resources.math_verify",
    ("resources_servers", "calculator"): "gym_plugin.servers.resources.calculator",
    ("resources_servers", "capitals"): "gym_plugin.servers.resources.capitals",
    ("resources_servers", "contains_answer"): "gym_plugin.servers.resources.capitals",
    ("resources_servers", "code_exec"): "gym_plugin.servers.resources.code_exec",
    ("resources_servers", "reasoning_gym"): "gym_plugin.servers.resources.reasoning_gym",
    (POLICY_ENDPOINT, "embedded"): "gym_plugin.servers.embedded.app",
    # The scripted fakes (tests, `gym-plugin fake-openai`, trying a config without a model): resolved by name, so
    # that nothing outside gym_plugin.testing imports them.
    (POLICY_ENDPOINT, "fake_openai"): "gym_plugin.testing.fake_openai",
    (POLICY_ENDPOINT, "scripted_tasks"): "gym_plugin.testing.scripted_tasks",
}
"""(kind, implementation) -> the module that registers it, for gym_plugin's own servers."""

SERVER_REGISTRY: dict[tuple[str, str], type] = {}
"""(kind, implementation) -> server class, for every server registered so far."""

T = TypeVar("T", bound=type)


def register(kind: str, impl: str) -> Callable[[T], T]:
    """Class decorator: serve ``impl`` of ``kind`` (a server type, or ``policy_endpoint``) with the class."""
    if kind not in KINDS:
        raise ConfigError(f"register({kind!r}, {impl!r}): the kind must be one of {list(KINDS)}."
                          f"{did_you_mean(kind, KINDS)}")

    def decorate(cls: T) -> T:
        current = SERVER_REGISTRY.get((kind, impl))
        if current is not None and current.__qualname__ != cls.__qualname__:
            raise ConfigError(f"{kind} implementation {impl!r} is already served by {current.__module__}."
                              f"{current.__qualname__}; pick another name for {cls.__module__}.{cls.__qualname__}.")
        SERVER_REGISTRY[(kind, impl)] = cls
        return cls

    return decorate


def known(kind: str) -> list[str]:
    """Every implementation name of ``kind``: registered ones and gym_plugin's own."""
    return sorted({i for k, i in SERVER_REGISTRY if k == kind} | {i for k, i in BUILTIN_MODULES if k == kind})


def get_server_class(kind: str, impl: str) -> type:
    """The class serving ``impl`` of ``kind`` (importing its module when it is one of gym_plugin's own); a
    ConfigError naming the known ones otherwise."""
    cls = SERVER_REGISTRY.get((kind, impl))
    if cls is None and (kind, impl) in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[(kind, impl)])
        cls = SERVER_REGISTRY.get((kind, impl))
    if cls is not None:
        return cls
    if kind not in KINDS:
        raise ConfigError(
            f"server type {kind!r} (implementation {impl!r}) is unknown; expected one of "
            f"{list(SERVER_TYPES)}.{did_you_mean(kind, SERVER_TYPES)}"
        )
    names = known(kind)
    raise ConfigError(
        f"{kind}: implementation {impl!r} is unknown; known: {names}.{did_you_mean(impl, names)} "
        "Fix the name in your config."
    )


def import_server_modules(modules: Any, problems: list[str], key: str = "import_modules") -> None:
    """Import each module name (``my_pkg.my_env``) or Python file (``/path/my_env.py``) of ``modules`` (a list, or
    one string), so that the servers they `register` can be built. What cannot be imported is appended to
    ``problems`` with the fix (a missing file or module, or the error the module raised)."""
    if modules is None:
        return
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, (list, tuple)):
        problems.append(f"{key}: {modules!r} must be a list of module names or .py files")
        return
    for i, module in enumerate(modules):
        where = f"{key}[{i}]"
        if not isinstance(module, str) or not module:
            problems.append(f"{where}: {module!r} must be a module name (my_pkg.my_env) or a .py file")
            continue
        try:
            if module.endswith(".py"):
                _import_file(Path(module))
            else:
                importlib.import_module(module)
        except FileNotFoundError:
            problems.append(f"{where}: the file {module!r} does not exist. Fix the path (a relative one is taken "
                            "from the folder of the YAML file that names it).")
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                problems.append(f"{where}: no module named {module!r} can be imported from here. Install its "
                                "package, add its folder to PYTHONPATH, or give the .py file's path instead.")
            else:
                problems.append(f"{where}: importing {module!r} failed: ModuleNotFoundError: {e}. Install what "
                                "it imports.")
        except Exception as e:  # noqa: BLE001 - the user's module raised: say which, and what
            problems.append(f"{where}: importing {module!r} raised {type(e).__name__}: {e}. Fix the module "
                            "(GYM_PLUGIN_DEBUG=1 python -c 'import ...' shows where).")


def _import_file(path: Path) -> None:
    """Import a .py file once per path, as module ``gym_plugin_user_<stem>`` (kept in sys.modules)."""
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    name = f"gym_plugin_user_{path.stem}"
    current = sys.modules.get(name)
    if current is not None and Path(getattr(current, "__file__", "")).resolve() == path:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
