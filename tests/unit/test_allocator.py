"""gym_plugin.allocator: the recipe re-executes itself once with jemalloc preloaded, and only once.

The re-exec cases run a small program in a fresh interpreter: it prints its PID, calls ``use_jemalloc`` and
prints what it returned, what is mapped, its argv, LD_PRELOAD and what a child process it starts has mapped. A
process that re-executed itself prints its PID twice (the same PID: execve keeps it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gym_plugin import allocator
from gym_plugin.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
JEMALLOC = allocator.find_jemalloc() if not os.environ.get(allocator.PATH_ENV) else None
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc is not installed here "
                                    "(apt-get install libjemalloc2): the re-exec paths cannot run")

PROGRAM = textwrap.dedent(
    """
    import json, os, subprocess, sys
    print("pid", os.getpid(), flush=True)
    from gym_plugin import allocator, memory
    used = allocator.use_jemalloc()
    child = subprocess.run([sys.executable, "-c", "from gym_plugin.allocator import loaded_allocator as l; print(l())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(json.dumps({"used": used, "mapped": allocator.loaded_allocator(), "argv": sys.argv[1:],
                      "preload": os.environ.get("LD_PRELOAD"), "mark": os.environ.get("_GYM_PLUGIN_PRELOADED"),
                      "child": child, "glibc_settings": memory.return_freed_memory_to_os()}))
    """
)


def run_program(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV, allocator.PATH_ENV)}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-c", PROGRAM, "a1", "--b=2"], capture_output=True, text=True, env=env,
                          timeout=120)


def parse(out: str) -> tuple[list[str], dict]:
    lines = out.strip().splitlines()
    return [ln for ln in lines if ln.startswith("pid ")], json.loads(lines[-1])


def test_unknown_choice_names_the_variable_the_value_and_the_choices(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "tcmalloc")
    with pytest.raises(ConfigError) as err:
        allocator.use_jemalloc()
    assert "GYM_PLUGIN_ALLOCATOR='tcmalloc'" in str(err.value)
    assert "['auto', 'jemalloc', 'system']" in str(err.value)


def test_a_missing_library_path_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv(allocator.PATH_ENV, str(tmp_path / "libjemalloc.so.2"))
    with pytest.raises(ConfigError, match="GYM_PLUGIN_JEMALLOC=.*libjemalloc.so.2'?: no such file"):
        allocator.find_jemalloc()


def test_system_keeps_the_c_library_malloc_and_does_not_re_execute():
    proc = run_program({allocator.ENV: "system"})
    assert proc.returncode == 0, proc.stderr
    pids, res = parse(proc.stdout)
    assert len(pids) == 1
    assert res == {"used": "system", "mapped": "system", "argv": ["a1", "--b=2"], "preload": None, "mark": None,
                   "child": "system", "glibc_settings": True}


@needs_jemalloc
def test_auto_re_executes_once_with_jemalloc_and_children_do_not_inherit_it():
    proc = run_program({})
    assert proc.returncode == 0, proc.stderr
    pids, res = parse(proc.stdout)
    assert len(pids) == 2 and pids[0] == pids[1]  # re-executed once, same PID
    # same arguments; LD_PRELOAD back to unset for the children, which run on the C library's malloc; glibc's
    # mallopt settings do not apply under jemalloc
    assert res == {"used": "jemalloc", "mapped": "jemalloc", "argv": ["a1", "--b=2"], "preload": None,
                   "mark": None, "child": "system", "glibc_settings": False}


@needs_jemalloc
def test_a_preload_the_loader_ignores_falls_back_once_or_fails_when_required(tmp_path):
    not_a_library = tmp_path / "libjemalloc.so.2"
    not_a_library.write_text("not an ELF file\n")
    proc = run_program({allocator.PATH_ENV: str(not_a_library)})
    assert proc.returncode == 0, proc.stderr
    pids, res = parse(proc.stdout)
    assert len(pids) == 2  # one try, no loop
    assert res["used"] == "system" and res["mapped"] == "system" and res["mark"] is None
    required = run_program({allocator.PATH_ENV: str(not_a_library), allocator.ENV: "jemalloc"})
    assert required.returncode != 0
    assert f"GYM_PLUGIN_ALLOCATOR=jemalloc: {not_a_library} did not load" in required.stderr
