"""gym_plugin.memory: the engine keeps freed blocks while it generates and gives them back when idle.

Each case runs in a fresh interpreter (the malloc settings are process-wide). The probe: in a worker thread (the
engine's situation: a non-main glibc arena), malloc an 8 MiB block, touch every page, free it, four times, and
count the thread's minor page faults per round. A block served by its own mmap is unmapped on free, so every
round faults its pages in again (2048 pages of 4 KiB; fewer faults where transparent huge pages back it, but
never 0); a block kept in the arena is resident from the second round on: 0 faults.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import ctypes, json, resource, sys, threading
    from gym_plugin import memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    SIZE = 8 << 20

    def rounds():
        out = []
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            p = libc.malloc(SIZE)
            ctypes.memset(p, 1, SIZE)
            libc.free(p)
            out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        return out

    res = {}
    def work():
        for step in sys.argv[1].split(","):
            if step == "fixed":
                res["fixed_ok"] = memory.return_freed_memory_to_os()
            elif step == "keep":
                res.setdefault("keep_ok", []).append(memory.keep_freed_memory())
            elif step == "release":
                memory.release_kept_memory()
            else:
                res[step] = rounds()
    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(json.dumps(res))
    """
)


def probe(steps: str) -> dict:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc settings: Linux only")
    done = subprocess.run([sys.executable, "-c", PROBE, steps], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_kept_blocks_stay_resident_and_released_ones_go_back():
    res = probe("fixed,before,keep,kept,release,after")
    if not res["fixed_ok"]:
        pytest.skip("not glibc: mallopt does not apply")
    assert res["keep_ok"] == [True]
    # the recipe's 128 KiB threshold: every round maps the block afresh
    assert all(f > 0 for f in res["before"]), res
    # kept: the first round may fault (the arena grows), the next three reuse the same resident block
    assert res["kept"][1:] == [0, 0, 0], res
    # idle again: the recipe's threshold is back, every round maps afresh
    assert all(f > 0 for f in res["after"]), res


def test_nested_keepers_release_on_the_last():
    res = probe("fixed,keep,keep,warm,release,one_left,release,none_left")
    if not res["fixed_ok"]:
        pytest.skip("not glibc: mallopt does not apply")
    assert res["one_left"] == [0, 0, 0, 0], res  # one engine still generates: still kept
    assert all(f > 0 for f in res["none_left"]), res


def test_release_without_keep_changes_nothing():
    res = probe("fixed,release,release,before")
    if not res["fixed_ok"]:
        pytest.skip("not glibc: mallopt does not apply")
    assert all(f > 0 for f in res["before"]), res  # the count never goes negative: the fixed threshold holds
