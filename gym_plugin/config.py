"""Configuration: load (OmegaConf compose of YAML files + initial dict + dotlist overrides) and validate (every
problem reported at once).

The merged config has NeMo Gym's shape (see docs/architecture.md): a few global keys (``policy_model_name``,
``policy_base_url``, ``policy_api_key``, the aiohttp connector limits, ``head_server``) and one section per
server instance, ``instance: {server_type: {implementation: {...params}}}``. ``environment_servers`` sections
(NeMo Gym 0.7.0's hop in front of each agent) are accepted, and generated for agents without one; they start
nothing (see gym_plugin.envservers).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gym_plugin import envservers, schema
from gym_plugin.collect import CollectorConfig
from gym_plugin.envservers import ENVIRONMENT_SERVERS, EnvironmentServerSpec
from gym_plugin.errors import ConfigError, did_you_mean, truncate
from gym_plugin.net import free_port, url_list, url_problems
from gym_plugin.servers.registry import POLICY_ENDPOINT, SERVER_TYPES, get_server_class, import_server_modules, known

HEAD_SERVER_KEY_NAME = "head_server"
IMPORT_MODULES_KEY = "import_modules"
"""Global key: modules (``my_pkg.my_env``) or Python files (``my_env.py``, relative to the YAML file that names
it) that register servers of your own (`gym_plugin.servers.registry.register`), imported before validation."""
ALL_SERVER_TYPES = (*SERVER_TYPES, ENVIRONMENT_SERVERS)
"""Server types a config may name: the ones gym_plugin starts, and ``environment_servers`` entries (see
gym_plugin.envservers)."""
GLOBAL_KEYS = {
    "policy_model_name": "name the policy endpoint serves (e.g. 'Qwen/Qwen3-4B')",
    "policy_base_url": "OpenAI-compatible base URL, or a list of them (e.g. 'http://127.0.0.1:8000/v1')",
    "policy_api_key": "API key for the policy endpoint ('dummy_key' for local endpoints)",
    "global_aiohttp_connector_limit_per_host": "max connections per host (e.g. 16384)",
    "global_aiohttp_connector_limit": "max connections in total (e.g. 65536)",
    HEAD_SERVER_KEY_NAME: "{host, port} of the head server",
    "collector": "collector settings (concurrency, timeout_s, max_attempts, ...)",
    "auth_token": "optional shared-secret bearer token between collector and servers",
    "allow_unauthenticated_network": "true: servers may listen on non-loopback addresses without auth_token",
    "policy_endpoint": "optional OpenAI-compatible endpoint served in this process: {impl: embedded|fake_openai, ...}",
    IMPORT_MODULES_KEY: "modules or .py files imported before the servers are built (your own @register servers)",
}
# Keys NeMo Gym puts in a server section that we accept and ignore (they describe NeMo Gym's launcher).
LAUNCHER_KEYS = {"entrypoint", "host", "port", "datasets", "domain", "verified", "description", "value", "license"}

_SEED_ENV_REF = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


@dataclass
class ServerSpec:
    """One server instance of the config."""

    name: str
    """Instance name (top-level key), e.g. 'math_agent'."""
    server_type: str
    """'responses_api_agents' | 'resources_servers' | 'responses_api_models'."""
    impl: str
    """Implementation name (gym_plugin.servers.registry), e.g. 'simple_agent'."""
    host: str = "127.0.0.1"
    """Bind address; 127.0.0.1 unless configured."""
    port: int = 0
    """Port; 0 picks a free one at start."""
    params: dict = field(default_factory=dict)
    """The implementation's parameters (fields of its Config dataclass)."""


@dataclass
class GymConfig:
    """A loaded, resolved and validated config."""

    data: dict
    """The merged config as plain containers (what the head server serves)."""
    servers: dict[str, ServerSpec]
    """Server instances by name (the ones gym_plugin starts)."""
    environment_servers: dict[str, EnvironmentServerSpec] = field(default_factory=dict)
    """Environment server entries by name (served at their agent's address; see gym_plugin.envservers)."""

    @property
    def head_host(self) -> str:
        return str(self.data.get(HEAD_SERVER_KEY_NAME, {}).get("host", "127.0.0.1"))

    @property
    def head_port(self) -> int:
        return int(self.data.get(HEAD_SERVER_KEY_NAME, {}).get("port", 11000))

    def names_of(self, server_type: str) -> list[str]:
        return sorted(n for n, s in self.servers.items() if s.server_type == server_type)

    @property
    def agents(self) -> list[str]:
        return self.names_of("responses_api_agents")

    @property
    def base_urls(self) -> list[str]:
        return url_list(self.data.get("policy_base_url"))


DEFAULT_POLICY_INSTANCE = "policy_model"


def with_default_policy_server(data: dict) -> dict:
    """When the config sets ``policy_base_url`` but names no policy model server, add the standard one
    (``policy_model``: vllm_model pointed at policy_base_url/policy_api_key/policy_model_name), as the
    seed's minimal gym_env.yaml expects. Overrides of that default server
    (``policy_model.responses_api_models.vllm_model.max_attempts=1``) are merged over it."""
    if "policy_base_url" not in data:  # present but None (unresolved): still add it, so only the cause is reported
        return data
    current = data.get(DEFAULT_POLICY_INSTANCE)
    if current is None:
        if any(isinstance(v, dict) and "responses_api_models" in v for v in data.values()):
            return data  # the config names its own policy model server
        overrides: dict = {}
    else:
        # Only dotlist overrides of the default server (no base_url of their own) are merged into it.
        models = current.get("responses_api_models") if isinstance(current, dict) and len(current) == 1 else None
        params = models.get("vllm_model") if isinstance(models, dict) and len(models) == 1 else None
        if not isinstance(params, dict) or "base_url" in params:
            return data
        overrides = dict(params)
    data = dict(data)
    data[DEFAULT_POLICY_INSTANCE] = {
        "responses_api_models": {
            "vllm_model": {
                "base_url": data["policy_base_url"],
                "api_key": data.get("policy_api_key", "dummy_key"),
                "model": data.get("policy_model_name", "policy"),
                **overrides,
            }
        }
    }
    return data


# ---- loading ---------------------------------------------------------------------------------------------
def _seed_env_refs(text: str, top_keys: Iterable[str]) -> str:
    """The seed's ``${POLICY_BASE_URL}`` means an environment variable when no such config key exists."""
    keys = set(top_keys)
    return _SEED_ENV_REF.sub(lambda m: m.group(0) if m.group(1) in keys else "${oc.env:" + m.group(1) + "}", text)


def _load_yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist. Fix the path (relative to {os.getcwd()!r}).")
    text = path.read_text()
    try:
        probe = OmegaConf.create(text)
    except OmegaConfBaseException as e:  # includes YAML syntax errors
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}. Fix the syntax there.") from e
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}. Fix the syntax there.") from e
    if not isinstance(probe, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top, got a list.")
    cfg = OmegaConf.create(_seed_env_refs(text, probe.keys()))
    modules = cfg.get(IMPORT_MODULES_KEY)
    if isinstance(modules, ListConfig):  # a .py file is found next to the YAML that names it, wherever one runs
        cfg[IMPORT_MODULES_KEY] = [str((path.parent / m).resolve()) if isinstance(m, str) and m.endswith(".py")
                                   and not Path(m).is_absolute() else m for m in modules]
    return cfg


ConfigSource = Union[str, Path, Mapping[str, Any]]
"""A YAML file's path, or the same content given inline as a mapping (e.g. a trainer's own config section)."""


def compose(
    config_paths: Sequence[ConfigSource] | ConfigSource | None = None,
    overrides: Sequence[str] = (),
    initial: Mapping[str, Any] | None = None,
) -> DictConfig:
    """Merge the config sources (YAML files or inline mappings, in order), then ``initial`` (e.g. GymIntegration's
    model/base URLs), then dotlist overrides (``key.sub=value``, Hydra style). Nothing is resolved yet."""
    if config_paths is None:
        config_paths = []
    elif isinstance(config_paths, (str, Path, Mapping)):
        config_paths = [config_paths]
    parts = [OmegaConf.create(dict(p)) if isinstance(p, Mapping) else _load_yaml(Path(p)) for p in config_paths]
    if initial:
        parts.append(OmegaConf.create(dict(initial)))
    if overrides:
        try:
            parts.append(OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"overrides {list(overrides)} could not be parsed: {e}. Use key.sub=value.") from e
    return OmegaConf.merge(*parts) if parts else OmegaConf.create({})


def _resolve_all(cfg: DictConfig, problems: list[str]) -> dict:
    """Resolve every leaf separately so that every broken interpolation is reported, not just the first."""

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, DictConfig):
            out = {}
            for key in node.keys():
                dotted = f"{prefix}{key}"
                try:
                    value = node[key]  # resolves this key's interpolation, if any
                except OmegaConfBaseException as e:
                    raw = node._get_node(key)._value()  # noqa: SLF001 (the unresolved text, for the message)
                    m = re.search(r"oc\.env:([A-Za-z0-9_]+)", str(raw))
                    hint = f" Set the environment variable {m.group(1)} or override {dotted}=<value>." if m else ""
                    problems.append(f"{dotted}: cannot resolve {raw!r}: {str(e).splitlines()[0]}.{hint}")
                    out[key] = None
                    continue
                out[key] = walk(value, dotted + ".")
            return out
        if isinstance(node, ListConfig):
            items = []
            for i in range(len(node)):
                try:
                    items.append(walk(node[i], f"{prefix.rstrip('.')}[{i}]."))
                except OmegaConfBaseException as e:
                    problems.append(f"{prefix.rstrip('.')}[{i}]: cannot resolve: {str(e).splitlines()[0]}")
                    items.append(None)
            return items
        return node

    return walk(cfg, "")


# ---- validation ------------------------------------------------------------------------------------------
def _check_params(spec: ServerSpec, problems: list[str]) -> None:
    """Keys and types of a server section against its class's Config (value rules run when the server is built:
    an unresolved ``${...}`` is reported once, as its cause)."""
    where = f"{spec.name}.{spec.server_type}.{spec.impl}"
    try:
        cls = get_server_class(spec.server_type, spec.impl)
    except ConfigError as e:
        problems.append(f"{where}: {' '.join(e.problems)}")
        return
    if cls.Config is not None:
        schema.check(cls.Config, spec.params, where, problems, noun="parameter")


def validate(data: dict, problems: list[str] | None = None) -> GymConfig:
    """Check a resolved config; raise ConfigError listing every problem (dotted key, value, fix)."""
    problems = list(problems or [])
    servers: dict[str, ServerSpec] = {}
    base = data.get("policy_base_url")
    if base is not None:
        problems.extend(url_problems(base, "policy_base_url"))
    if data.get("collector") is not None:
        schema.build(CollectorConfig, data["collector"], "collector", problems)
    for key in ("global_aiohttp_connector_limit_per_host", "global_aiohttp_connector_limit"):
        v = data.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            problems.append(f"{key}: {v!r} must be a non-negative integer (0 = unlimited)")
    allow = data.get("allow_unauthenticated_network")
    if allow is not None and not isinstance(allow, bool):
        problems.append(f"allow_unauthenticated_network: {allow!r} must be true or false")
    token = data.get("auth_token")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        problems.append(f"auth_token: {truncate(token, 20)} must be a non-empty string (a shared secret), or unset")
    head = data.get(HEAD_SERVER_KEY_NAME)
    if head is not None:
        if not isinstance(head, dict):
            problems.append(f"{HEAD_SERVER_KEY_NAME}: must be a mapping {{host, port}}, got {truncate(head, 80)}")
        else:
            port = head.get("port", 11000)
            if not isinstance(port, int) or not 0 <= port <= 65535:
                problems.append(f"{HEAD_SERVER_KEY_NAME}.port: {port!r} must be an integer 0..65535")
    env_sections: list[tuple[str, dict]] = []
    for name, section in data.items():
        if name in GLOBAL_KEYS or name.startswith("_"):
            continue
        if not isinstance(section, dict):
            problems.append(
                f"{name}: {truncate(section, 60)} is neither a known global key ({sorted(GLOBAL_KEYS)})"
                f"{did_you_mean(name, GLOBAL_KEYS)} nor a server section "
                f"({{server_type: {{implementation: {{...}}}}}} with server_type in {list(ALL_SERVER_TYPES)})"
            )
            continue
        if ENVIRONMENT_SERVERS in section:
            env_sections.append((name, section))  # checked below, once the agents are known
            continue
        types = [k for k in section if k in SERVER_TYPES]
        if len(types) != 1 or len(section) != 1:
            bad = [k for k in section if k not in SERVER_TYPES]
            hint = "".join(did_you_mean(b, ALL_SERVER_TYPES) for b in bad)
            problems.append(
                f"{name}: a server section needs exactly one server type key out of {list(ALL_SERVER_TYPES)}, "
                f"got {sorted(section)}.{hint}"
            )
            continue
        stype = types[0]
        impls = section[stype]
        if not isinstance(impls, dict) or len(impls) != 1:
            problems.append(f"{name}.{stype}: needs exactly one implementation name, got {truncate(impls, 80)}")
            continue
        impl, params = next(iter(impls.items()))
        params = dict(params or {})
        host = params.pop("host", "127.0.0.1")
        port = params.pop("port", 0)
        for k in LAUNCHER_KEYS - {"host", "port"}:
            params.pop(k, None)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            problems.append(f"{name}.{stype}.{impl}.port: {port!r} must be an integer 0..65535 (0 = any free)")
            port = 0
        spec = ServerSpec(name=name, server_type=stype, impl=impl, host=str(host), port=port, params=params)
        servers[name] = spec
        _check_params(spec, problems)
    # references between servers: {type, name}
    for spec in servers.values():
        for key, value in spec.params.items():
            if isinstance(value, dict) and set(value) == {"type", "name"}:
                target = servers.get(value["name"])
                where = f"{spec.name}.{spec.server_type}.{spec.impl}.{key}"
                if target is None and value["name"] == DEFAULT_POLICY_INSTANCE and data.get("policy_base_url") is None:
                    problems.append(
                        f"{where}.name: {DEFAULT_POLICY_INSTANCE!r} is the policy model server that is added when "
                        "policy_base_url is set, and policy_base_url is not set. Set it to your OpenAI-compatible "
                        "endpoint(s): policy_base_url=http://127.0.0.1:8000/v1 (GymIntegration(base_urls=[...]), "
                        "or a list for several replicas), or add policy_endpoint: {impl: embedded} to serve a "
                        "local model."
                    )
                elif target is None:
                    problems.append(
                        f"{where}.name: {value['name']!r} is not a configured server.{did_you_mean(value['name'], servers)} "
                        f"Configured: {sorted(servers)}."
                    )
                elif target.server_type != value["type"]:
                    problems.append(
                        f"{where}.type: {value['type']!r} but {value['name']!r} is a {target.server_type}; "
                        f"set type: {target.server_type}"
                    )
    agents = {n: s.impl for n, s in servers.items() if s.server_type == "responses_api_agents"}
    environment_servers = {}
    for name, section in env_sections:
        spec_env = envservers.check(name, section, agents, problems)
        if spec_env is not None:
            environment_servers[name] = spec_env
    envservers.check_one_per_agent(environment_servers, problems)
    if problems:
        raise ConfigError(problems)
    return GymConfig(data=data, servers=servers, environment_servers=environment_servers)


def load_config(
    config_paths: Sequence[ConfigSource] | ConfigSource | None = None,
    overrides: Sequence[str] = (),
    initial: Mapping[str, Any] | None = None,
) -> GymConfig:
    """Compose, resolve and validate. Raises ConfigError listing every problem found."""
    cfg = compose(config_paths, overrides, initial)
    problems: list[str] = []
    _place_local_endpoint(cfg, problems)
    data = envservers.with_environment_servers(with_default_policy_server(_resolve_all(cfg, problems)))
    import_server_modules(data.get(IMPORT_MODULES_KEY), problems)
    return validate(data, problems)


def configured_agents(
    config_paths: Sequence[ConfigSource] | ConfigSource | None = None, overrides: Sequence[str] = ()
) -> list[str]:
    """The agent instances a config names (top-level sections with ``responses_api_agents``), without resolving or
    validating the rest (an unset ``policy_base_url`` does not matter for checking rows against it)."""
    data = OmegaConf.to_container(compose(config_paths, overrides), resolve=False)
    return sorted(name for name, section in data.items()
                  if isinstance(section, dict) and "responses_api_agents" in section)


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _place_local_endpoint(cfg: DictConfig, problems: list[str]) -> None:
    """With ``policy_endpoint`` set, fix its port now (a free one if 0) and point ``policy_base_url`` at it
    (unless set), before interpolations like ``${policy_base_url}`` are resolved."""
    ep = cfg.get("policy_endpoint")
    if ep is None:
        return
    impls = known(POLICY_ENDPOINT)
    if not isinstance(ep, DictConfig) or ep.get("impl") not in impls:
        problems.append(
            f"policy_endpoint.impl: {ep.get('impl') if isinstance(ep, DictConfig) else ep!r} must be one of "
            f"{impls} (or remove policy_endpoint and set policy_base_url)"
        )
        return
    cls = get_server_class(POLICY_ENDPOINT, str(ep.get("impl")))
    options = OmegaConf.to_container(ep, resolve=False)
    # resolved later: an interpolated value is checked for its key only
    schema.check(cls.Config, {k: None if _is_interpolation(v) else v for k, v in options.items()}, "policy_endpoint",
                 problems, noun="option", extra=("impl", "host", "port"))
    host = str(ep.get("host", "127.0.0.1"))
    port = ep.get("port", 0) or free_port(host)
    ep.port = port
    if cfg.get("policy_base_url") in (None, "local"):
        cfg.policy_base_url = f"http://{host}:{port}/v1"


def to_yaml(data: Mapping[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dict(data)))
