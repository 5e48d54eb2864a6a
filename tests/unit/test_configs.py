"""Every YAML under conf/ composes and validates.

- conf/grpo.yaml (recipes/grpo.py) with every option of every config group, through Hydra's compose API and
  ``parse_grpo_config`` (the recipe's own path: compose -> to_container(resolve=True) -> parse); the env
  group's ``gym`` servers also go through ``gym_plugin.config.load_config`` (the check GymIntegration does
  when the recipe starts them), so a verifier parameter typo fails here, not at minute 3 of a run;
- conf/gym/*.yaml (Gym environment configs) through ``gym_plugin.config.load_config``;
- a YAML file nobody tests (a new folder under conf/) fails ``test_every_yaml_is_covered``;
- a bad key gives a ConfigError naming the key (and a broken copy of a group file fails the same checks the
  real files pass, so these tests can fail).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gym_plugin.config import load_config
from gym_plugin.errors import ConfigError
from gym_plugin.grpo_config import GRPOConfig, parse_grpo_config

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("env", "policy", "model", "loss", "weight_sync", "memory", "preset")
"""The config groups of conf/grpo.yaml (its defaults list)."""
GYM_DIR = CONF / "gym"
"""Gym environment configs (gym-plugin serve / GymIntegration), not recipe groups."""
ENDPOINT_URL = "http://127.0.0.1:8000/v1"
"""A syntactically valid policy URL; nothing is contacted."""


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_grpo(overrides: list[str], conf_dir: Path = CONF) -> dict:
    """conf/grpo.yaml + overrides, resolved to plain containers exactly as recipes/grpo.py's main() does."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        raw = compose(config_name="grpo", overrides=overrides)
    return OmegaConf.to_container(raw, resolve=True)


def _compatible(group: str, option: str) -> list[str]:
    """Overrides that make ``group=option`` a runnable combination (and nothing else): an endpoints policy
    needs base URLs and a weight sync that reaches servers; an embedded policy syncs in process. These are
    the combinations parse_grpo_config itself rejects (tested in test_bad_combinations_are_named)."""
    extra = [f"{group}={option}"]
    data = compose_grpo(extra)
    kind, ws = data["policy"]["kind"], data["weight_sync"]["kind"]
    if kind == "embedded" and ws not in ("inprocess", "none"):
        extra.append("policy=vllm")
        kind = "endpoints"
    if kind == "endpoints":
        extra.append(f"policy.base_urls=[{ENDPOINT_URL}]")
        if ws == "inprocess":
            extra.append("weight_sync=checkpoint")
    return extra


CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_groups_have_options():
    # 3 envs, 2 policies, 3 models, 2 losses, 4 weight syncs at the time of writing; at least the defaults
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ holds no YAML"
    assert len(CASES) >= 14


def test_every_yaml_is_covered():
    """A YAML outside grpo.yaml, the groups and conf/gym would be tested by nobody: fail instead."""
    covered = {CONF / "grpo.yaml"} | {CONF / g / f"{o}.yaml" for g, o in CASES} | set(GYM_DIR.glob("*.yaml"))
    every = set(CONF.rglob("*.yaml")) | set(CONF.rglob("*.yml"))
    assert every - covered == set()


def test_default_composes():
    cfg = parse_grpo_config(compose_grpo([]))
    assert isinstance(cfg, GRPOConfig)
    # the defaults list of conf/grpo.yaml: capitals env, embedded SmolLM2, GRPO loss, in-process sync
    assert (cfg.env.task, cfg.policy.kind, cfg.model.spec, cfg.advantage_mode, cfg.weight_sync.kind) == (
        "capitals", "embedded", "smollm2", "grpo", "inprocess")
    assert cfg.run_dir.startswith("runs/grpo-")  # ${now:...} resolved
    assert not cfg.train.overlap


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_group_option_composes_and_validates(group, option):
    overrides = _compatible(group, option)
    data = compose_grpo(overrides)
    cfg = parse_grpo_config(data)
    if group == "env":
        assert cfg.env.task == option or cfg.env.data_path
        # the env's servers validate as GymIntegration will load them (plus the policy URL it adds)
        paths = [p if Path(p).is_absolute() else str(CONF.parent / p) for p in cfg.env.config_paths]
        gym = load_config(paths, [f"policy_base_url={ENDPOINT_URL}"], initial=cfg.env.gym)
        assert cfg.env.agent_name in gym.agents
    elif group == "loss":
        assert cfg.advantage_mode == option  # the file name is the advantage mode it sets
    elif group == "weight_sync":
        assert cfg.weight_sync.kind == option
    elif group == "model":
        assert cfg.model.spec and cfg.model.name
    elif group == "memory":  # applied after grpo.yaml's own values (defaults list: after _self_)
        assert (cfg.train.optimizer, cfg.train.optimizer_in_backward, cfg.step.max_grad_norm,
                cfg.step.chunked_lm_head) == ("adafactor", True, None, True)


@pytest.mark.parametrize("path", sorted(GYM_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_gym_yaml_loads_and_validates(path):
    gym = load_config([path], [f"policy_base_url={ENDPOINT_URL}"])
    assert gym.agents, f"{path.name} defines no agent"
    # policy_base_url without a policy server section adds the standard vllm_model one
    assert gym.base_urls == [ENDPOINT_URL]
    assert "policy_model" in gym.servers


def test_gym_yaml_needs_a_policy():
    """Without policy_base_url (or a policy_endpoint) the agents' model_server reference dangles."""
    with pytest.raises(ConfigError) as exc:
        load_config([GYM_DIR / "math.yaml"], [])
    assert "policy_model" in str(exc.value)


def test_gym_yaml_bad_key_is_named():
    with pytest.raises(ConfigError) as exc:
        load_config([GYM_DIR / "math.yaml"],
                    [f"policy_base_url={ENDPOINT_URL}", "math_agent.responses_api_agents.simple_agent.max_turnz=2"])
    assert "math_agent.responses_api_agents.simple_agent.max_turnz" in str(exc.value)
    assert "max_turns" in str(exc.value)  # did-you-mean


def test_bad_key_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as exc:
        parse_grpo_config(compose_grpo(["+train.stepz=3", "+policy.temprature=0.5"]))
    # both problems at once, each with its dotted key and the near miss
    assert len(exc.value.problems) == 2
    text = str(exc.value)
    assert "train.stepz" in text and "'steps'" in text
    assert "policy.temprature" in text and "'temperature'" in text


def test_bad_values_are_named():
    with pytest.raises(ConfigError) as exc:
        parse_grpo_config(compose_grpo(["train.group_size=1", "train.lr=fast", "policy.temperature=0"]))
    text = str(exc.value)
    assert "train.group_size=1" in text  # advantages would all be 0
    assert "train.lr: expected a number" in text
    assert "policy.temperature=0" in text


def test_bad_combinations_are_named():
    with pytest.raises(ConfigError, match="policy.kind=endpoints needs policy.base_urls"):
        parse_grpo_config(compose_grpo(["policy=vllm", "weight_sync=checkpoint"]))
    with pytest.raises(ConfigError, match="weight_sync=checkpoint .* policy.kind=embedded"):
        parse_grpo_config(compose_grpo(["weight_sync=checkpoint"]))
    with pytest.raises(ConfigError, match="weight_sync=inprocess needs policy=embedded"):
        parse_grpo_config(compose_grpo(["policy=vllm", f"policy.base_urls=[{ENDPOINT_URL}]"]))


def test_a_broken_group_file_fails(tmp_path):
    """The checks above catch a broken YAML: a copy of conf/ with a typo in the loss group fails with the key
    named, and a YAML syntax error fails to compose at all."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    path = conf / "loss" / "grpo.yaml"
    path.write_text(path.read_text().replace("clip_eps_low:", "clip_eps_lo:"))
    with pytest.raises(ConfigError) as exc:
        parse_grpo_config(compose_grpo([], conf))
    assert "loss.clip_eps_lo" in str(exc.value)

    (conf / "model" / "tiny.yaml").write_text("spec: [tiny\n")
    with pytest.raises(Exception):  # Hydra's own error for a YAML that does not parse
        compose_grpo(["model=tiny"], conf)


def test_yaml_defaults_match_the_schema_defaults():
    """conf/grpo.yaml and the GRPOConfig dataclasses state the same defaults (one name and one value
    everywhere), so code that builds GRPOConfig() directly runs what `python recipes/grpo.py` runs."""
    composed = parse_grpo_config(compose_grpo([]))
    schema = GRPOConfig()
    # the sections whose schema is the recipe's own (gym_plugin.grpo_config); ``loss``, ``step`` and
    # ``weight_sync`` are library configs whose defaults the recipe overrides on purpose (token-level TIS,
    # no entropy pass on CPU), and ``env.gym`` holds the env group's servers
    for section in ("train", "process", "distributed", "eval", "logging", "policy", "model"):
        assert getattr(composed, section) == getattr(schema, section), section
    assert (composed.env.task, composed.env.agent_name) == (schema.env.task, schema.env.agent_name)
    assert composed.advantage_mode == schema.advantage_mode


# ---- command-line overrides, checked before Hydra composes them --------------------------------------------------
def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every field of the recipe schema, down to (not into) free-form mappings."""
    import dataclasses
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_schema_keys(hints[f.name], key + "."))
    return keys


@pytest.mark.parametrize("override", [[]] + [[f"{g}={o}"] for g in GROUPS for o in _options(g)],
                         ids=lambda o: o[0] if o else "defaults")
def test_every_schema_key_is_in_the_composed_yaml(override):
    # check_overrides accepts exactly the schema's keys; Hydra accepts only keys present in the YAML. Were a
    # field missing from conf/ (or from one option of a group), `train.<field>=x` would pass our check and then
    # fail in Hydra.
    data = compose_grpo(override)
    for key in _schema_keys(GRPOConfig):
        node = data
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is in the schema but not in {override or 'conf'}"
            node = node[part]


def test_override_typos_get_did_you_mean_and_the_known_keys():
    from gym_plugin.grpo_config import check_overrides

    check_overrides(["train.steps=3", "model=tiny", "env.gym.x.y=1", "+foo=1", "~eval", "hydra.run.dir=/x",
                     "--cfg", "job", "policy.base_urls=[http://h:8000/v1]", "loss=dr_grpo"], CONF)
    with pytest.raises(ConfigError) as err:
        check_overrides(["train.step=3", "model=tinyy", "trian.steps=2", "eval.sample=4", "train.lr=1e-5"], CONF)
    problems = err.value.problems
    assert len(problems) == 4  # the good override (train.lr) is not among them
    assert problems[0].startswith("train.step=3: unknown key 'train.step'. Did you mean 'steps'? Known keys at "
                                  "train: ['checkpoint_every',")
    assert problems[1] == ("model=tinyy: 'tinyy' is not a model config. Did you mean 'tiny'? Known: "
                           f"{_options('model')} (files in {CONF / 'model'}).")
    # a group name is a known top-level key too
    assert problems[2].startswith("trian.steps=2: unknown key 'trian'. Did you mean 'train'? Known keys at the "
                                  "top level: ['advantage_mode', 'distributed', 'env', 'eval',")
    assert problems[3].startswith("eval.sample=4: unknown key 'eval.sample'. Did you mean 'samples'?")
