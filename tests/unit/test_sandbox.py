"""The code sandbox: hostile answers are contained and scored as failures; correct ones pass.

Each case runs a real child interpreter with ~1 s limits. Hard layers (uid drop + RLIMIT_NPROC, network
namespace) are also tested with the audit hook switched off, where this machine allows them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from gym_plugin.errors import SandboxError
from gym_plugin.servers.resources.sandbox import (
    FLOOD_FACTOR,
    SANDBOX_UID_BASE,
    SANDBOX_UID_POOL,
    probe_isolation,
    run_python,
    run_python_async,
)

LIMITS = dict(cpu_time_s=1, wall_time_s=3, memory_mb=256, max_output_bytes=1000)


def run(code, tests=(), **kw):
    return run_python(code, list(tests) if not isinstance(tests, str) else tests, **{**LIMITS, **kw})


def sandbox_processes() -> list[int]:
    """Live pids owned by any sandbox uid (must be none after a run)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
            except OSError:
                continue
            if SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UID_POOL:
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if state not in ("Z", "X"):  # zombies are dead (their parent, init, reaps them)
                    pids.append(int(entry))
    return pids


def test_correct_solution_passes_with_counts():
    r = run("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert (r.status, r.passed, r.tests_passed, r.tests_total) == ("passed", True, 2, 2)
    assert r.returncode == 0


def test_wrong_solution_fails_and_counts_each_test():
    # add returns a - b: add(1, 2) = -1 != 3 (fails); add(0, 0) = 0 (passes); add(2, 1) = 1 != 3 (fails) -> 1/3
    r = run("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3", "assert add(0, 0) == 0",
                                                      "assert add(2, 1) == 3"])
    assert (r.status, r.passed, r.tests_passed, r.tests_total) == ("failed", False, 1, 3)
    assert "AssertionError" in r.stderr


def test_test_script_string_counts_as_one_test():
    script = "assert sq(3) == 9\nassert sq(-2) == 4\n"
    assert run("def sq(x): return x * x", script).status == "passed"
    r = run("def sq(x): return x + x", script)  # sq(3) = 6 != 9
    assert (r.status, r.tests_passed, r.tests_total) == ("failed", 0, 1)


def test_syntax_error_and_exceptions_fail():
    assert run("def f(:\n  pass", ["assert True"]).status == "failed"
    assert run("raise ValueError('boom')", ["assert True"]).status == "failed"


def test_early_exit_cannot_fake_a_pass():
    # exit status 0 before the tests ran: no result line with the run's nonce -> failed
    r = run("import os\nos._exit(0)", ["assert False"])
    assert (r.status, r.passed, r.returncode) == ("failed", False, 0)
    # a forged result line on stdout (without the nonce) changes nothing either
    r = run("import sys\nprint('R 0 1 1 0.0')\nsys.exit(0)", ["assert False"])
    assert r.status == "failed"


def test_fork_bomb_is_contained():
    t0 = time.monotonic()
    r = run("import os\nwhile True:\n    os.fork()\n")
    assert r.status == "forbidden" and not r.passed
    assert "os.fork" in r.violation
    assert time.monotonic() - t0 < 3
    assert sandbox_processes() == []


def test_forbidden_is_scored_even_if_the_answer_catches_it():
    code = "try:\n    open('/etc/passwd').read()\nexcept Exception:\n    pass\ndef f():\n    return 1\n"
    r = run(code, ["assert f() == 1"])
    assert r.status == "forbidden" and not r.passed


def test_infinite_loop_hits_cpu_limit():
    t0 = time.monotonic()
    r = run("while True:\n    pass\n", ["assert True"])
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 3  # RLIMIT_CPU = 1 s, well before the 3 s wall limit


def test_sleep_hits_wall_limit_and_is_not_starved():
    r = run("import time\ntime.sleep(30)\n", wall_time_s=1)
    assert r.status == "timeout" and not r.starved  # sleeping ("S"), not runnable: the answer's fault
    assert 1.0 <= r.duration_s < 2.5


def test_huge_allocation_is_a_memory_failure():
    r = run("x = bytearray(10**10)\n", ["assert True"])
    assert r.status == "memory" and not r.passed


@pytest.mark.parametrize(
    "code",
    [
        "print(open('/etc/passwd').read())",
        "import os\nprint(os.listdir('/root'))",
        "open('/tmp/gym_sandbox_escape.txt', 'w').write('x')",
        "open('../escape.txt', 'w').write('x')",
        "import os\nos.remove('/tmp/anything')",
    ],
)
def test_files_outside_the_temp_dir_are_forbidden(code):
    r = run(code)
    assert r.status == "forbidden", (r.status, r.stderr)
    assert not os.path.exists("/tmp/gym_sandbox_escape.txt")


def test_files_inside_the_temp_dir_work_and_the_dir_is_removed():
    r = run("import os\nopen('a.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(open('a.txt').read())")
    assert r.status == "passed"
    cwd, content = r.stdout.split()
    assert content == "hi"
    assert os.path.basename(cwd).startswith("gym_sandbox_") and not os.path.exists(cwd)


def test_stdlib_imports_work():
    code = "import math, json, re, collections, itertools, functools, heapq, dataclasses, typing, random\n"
    assert run(code + "print(math.factorial(5))").stdout.strip() == "120"  # 5! = 120


def _listening_socket():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    return srv


def test_socket_to_loopback_is_forbidden():
    srv = _listening_socket()
    try:
        port = srv.getsockname()[1]
        r = run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
        assert r.status == "forbidden"
    finally:
        srv.close()


@pytest.mark.skipif(not probe_isolation().netns, reason="network namespaces not permitted here")
def test_network_namespace_blocks_loopback_without_the_hook():
    srv = _listening_socket()
    try:
        port = srv.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
        r = run(code, audit_hook=False)
        assert r.status == "failed" and "connected" not in r.stdout
        assert "OSError" in r.stderr or "unreachable" in r.stderr.lower()
    finally:
        srv.close()


@pytest.mark.skipif(not probe_isolation().drop_uid, reason="not root: no dedicated sandbox uid")
def test_nproc_limit_stops_a_fork_bomb_without_the_hook():
    t0 = time.monotonic()
    r = run("import os\nwhile True:\n    os.fork()\n", audit_hook=False, wall_time_s=2)
    assert not r.passed and r.status in ("failed", "timeout", "crashed")
    assert time.monotonic() - t0 < 4
    assert sandbox_processes() == []  # every leftover was killed by uid


@pytest.mark.skipif(not probe_isolation().drop_uid, reason="not root: no dedicated sandbox uid")
def test_uid_drop_blocks_writes_to_root_files_without_the_hook():
    r = run("open('/etc/gym_sandbox_probe', 'w').write('x')\n", audit_hook=False)
    assert r.status == "failed" and "PermissionError" in r.stderr
    assert not os.path.exists("/etc/gym_sandbox_probe")


def test_output_flood_is_truncated_and_killed():
    r = run("while True:\n    print('x' * 1000)\n")
    assert not r.passed and "output flood" in r.detail
    kept, note = r.stdout.split("\n[... ")
    assert len(kept.encode()) == 1000  # max_output_bytes
    assert int(note.split()[0]) > FLOOD_FACTOR * 1000 - 1000


def test_large_but_bounded_output_is_truncated_not_killed():
    # 3 x 1001 bytes of output with a 1000-byte cap: 2003 bytes dropped, far under the flood limit of 16000
    r = run("for _ in range(3):\n    print('y' * 1000)\n", ["assert True"])
    assert r.status == "passed"
    assert r.stdout.endswith("[... 2003 more bytes truncated]")


def test_async_runs_concurrently_without_blocking_the_loop():
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        rs = await asyncio.gather(*[run_python_async("import time\ntime.sleep(0.3)", ["assert True"], **LIMITS)
                                    for _ in range(4)])
        t.cancel()
        return rs, ticks

    rs, ticks = asyncio.run(main())
    assert [r.status for r in rs] == ["passed"] * 4
    assert ticks >= 20  # >= 0.3 s of sandboxes ran while the loop kept ticking every 10 ms


def test_infrastructure_problems_raise_sandbox_error():
    with pytest.raises(SandboxError, match="could not start"):
        run("pass", python="/nonexistent/python3")
    with pytest.raises(SandboxError, match="tests must be"):
        run("pass", [1, 2])

    async def inside_loop():
        run_python("pass", [])

    with pytest.raises(SandboxError, match="run_python_async"):
        asyncio.run(inside_loop())
