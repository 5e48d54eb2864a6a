"""Run untrusted Python (a model's answer) against tests in a child process, with limits.

``await run_python_async(code, tests)`` (or the blocking ``run_python``) starts a fresh interpreter, executes the
answer, then the tests (a list of ``assert`` statements or one test script) in the answer's namespace, and
returns a `SandboxResult` with a ``status``: ``passed`` | ``failed`` | ``timeout`` | ``memory`` | ``crashed`` |
``forbidden``. Hostile answers end as one of these statuses, never as an exception in the caller. A problem of
the sandbox itself (the interpreter cannot be started, no free sandbox uid) raises `SandboxError`: that is not
the answer's fault and must not be scored as reward 0.

What is enforced, and how (on Linux; measured on the development machine, where we run as root):

- **Wall clock**: the parent waits ``wall_time_s`` and then SIGKILLs the child's whole process group (the child
  starts a new session, so ``os.killpg`` reaches everything it spawned that stayed in the group). Hard.
- **CPU time**: ``RLIMIT_CPU`` (soft = limit -> SIGXCPU, hard = limit + 1 -> SIGKILL). Hard (kernel).
- **Memory**: ``RLIMIT_AS`` (address space, includes the interpreter's ~30 MB); allocations beyond it raise
  MemoryError in the child. Hard (kernel).
- **File size / open files / core dumps**: ``RLIMIT_FSIZE`` (16 MB), ``RLIMIT_NOFILE`` (64), ``RLIMIT_CORE`` 0. Hard.
- **Processes**: when the parent runs as root, the child drops to a dedicated unprivileged uid/gid (one per
  concurrent sandbox, from a pool starting at 61000) and sets ``RLIMIT_NPROC``, which the kernel enforces for
  non-root uids only (not for root: that is why we drop privileges). After each run every process left with
  that uid is SIGKILLed (scan of /proc), so nothing outlives the run even if it escaped the process group.
  Not root: the uid is not changed, RLIMIT_NPROC would count all the user's processes and is not set; the
  audit hook below and the process-group kill are then the only fork protection.
- **Network**: when the kernel allows it (root, or a user namespace), the child enters a new, empty network
  namespace (``unshare(CLONE_NEWNET)``): no interface but a down loopback, so no connection anywhere,
  127.0.0.1 included. Hard. Where it is not allowed, only the audit hook blocks sockets.
- **Files**: the child's cwd, HOME and TMPDIR are a fresh temp dir (owned by the sandbox uid, mode 700), removed
  after the run. Reading elsewhere than that dir and the standard library, and writing anywhere but that dir,
  is refused by the audit hook. With the uid drop, the kernel also refuses writes to root-owned paths, but
  world-readable files (/etc/passwd) are protected only by the audit hook.
- **Interpreter**: ``python -I -S -B`` (no environment variables, no site-packages, no user site, no .pyc
  writes) with an emptied environment; stdin is /dev/null once the runner has read its input.
- **Audit hook** (``sys.addaudithook``, installed before the answer runs): raises PermissionError on
  ``socket.*``, ``subprocess.Popen``, ``os.system``/``exec``/``fork``/``forkpty``/``posix_spawn``/``spawn``/
  ``kill``, ``ctypes.*``, imports of ``ctypes``/``socket``/``_posixsubprocess``/``multiprocessing``/... (also
  pre-blocked in ``sys.modules``), file opens outside the allowed dirs, and path mutations outside the temp dir.
  The first violation is reported to the parent on a private pipe and the run is scored ``forbidden`` even if
  the answer catches the error. **An audit hook is not a security boundary**: code in the same interpreter
  can reach around it (e.g. find the runner's objects through ``gc``); it stops accidents and casual
  attempts. The hard limits above are what contain a determined answer; for hostile models at scale, also
  run the resource server itself in a container/VM without credentials.

How a pass is recognised: the runner writes ``R <nonce> <passed> <total>`` to a private pipe after the tests
ran; the nonce is random per run and never touches the answer's namespace, so an answer that exits early with
status 0 (``os._exit(0)``) scores ``failed``. (An answer that digs the nonce out of the runner's frames can
forge a pass; see the audit-hook caveat.)
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import resource
import secrets
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Sequence

from gym_plugin.errors import SandboxError

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "memory", "crashed", "forbidden")

SANDBOX_UID_BASE = 61000
"""First uid/gid of the pool the child drops to when the parent is root (no passwd entry needed)."""
SANDBOX_UID_POOL = 64
"""Size of that pool = the most sandboxes that can run at once in one process."""
_CLONE_NEWNET = 0x40000000
_FILE_SIZE_LIMIT = 16 * 1024 * 1024
_MAX_FDS = 64
_TRUNCATED_NOTE = "\n[... {n} more bytes truncated]"


@dataclass
class SandboxResult:
    """What one sandboxed run did."""

    passed: bool
    """True only when the answer ran and every test passed, with no forbidden operation."""
    status: str
    """One of STATUSES: passed | failed | timeout | memory | crashed | forbidden."""
    stdout: str
    """The child's stdout, cut to max_output_bytes (a note says how much was dropped)."""
    stderr: str
    """The child's stderr (tracebacks), cut to max_output_bytes."""
    duration_s: float
    """Wall-clock seconds from spawn to exit (or kill)."""
    tests_passed: int = 0
    """Tests that passed (a test script counts as one test)."""
    tests_total: int = 0
    """Tests run or attempted."""
    returncode: int | None = None
    """Child exit status; negative = killed by that signal."""
    cpu_s: float | None = None
    """CPU seconds the child used (reported by the runner, or sampled before a kill); None if unknown."""
    violation: str | None = None
    """The first forbidden operation (audit event and detail), when status is 'forbidden'."""
    starved: bool = False
    """Wall timeout while the child was runnable but got under half the CPU: the machine was overloaded,
    which is not the answer's fault (callers should not score it as a wrong answer)."""
    detail: str = ""
    """One line on why this status (for logs and failure reasons)."""


@dataclass
class Isolation:
    """Which of the hard isolation layers this machine allows (probed once per process)."""

    drop_uid: bool
    """Parent is root: children run as a pool uid with RLIMIT_NPROC."""
    netns: bool
    """unshare(CLONE_NEWNET) works: children get an empty network namespace."""
    python: str
    """Interpreter the children run (this one, or the system python3 when the sandbox uid cannot run this one)."""
    read_dirs: list[str]
    """That interpreter's sys.path under -I -S (its stdlib): the only places outside the temp dir it may read."""
    notes: list[str] = field(default_factory=list)
    """Why a layer is off."""


# --------------------------------------------------------------------------------------------------------------
# The child: a runner script passed with -c. It reads {code, tests, nonce, ...} as JSON on stdin, installs the
# audit hook, runs the answer and the tests, and reports on fd `report_fd`. It imports what it needs *before*
# the hook, so the hook can refuse imports of dangerous modules.
_RUNNER = r'''
import sys, os, json, builtins, traceback, posixpath
def _runner():
    spec = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    fd = spec["report_fd"]
    nonce = spec["nonce"]
    tmp = posixpath.realpath(spec["tmp"])
    read_dirs = tuple(posixpath.realpath(d) for d in spec["read_dirs"])
    blocked_modules = frozenset(spec["blocked_modules"])
    state = {"busy": False, "violation": False}

    def report(line):
        try:
            os.write(fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    def inside(path, dirs):
        if isinstance(path, int):
            return True  # an fd the process already holds
        try:
            p = posixpath.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(p == d or p.startswith(d + "/") for d in dirs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    deny_prefixes = ("socket.", "ctypes.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty",
                     "os.posix_spawn", "os.spawn", "os.kill", "os.killpg", "pty.", "resource.setrlimit",
                     "sys.addaudithook", "os.setuid", "os.setgid", "os.chroot", "winreg.", "_winapi.")
    mutating = frozenset(("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                          "os.link", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo",
                          "os.mknod", "shutil.rmtree", "shutil.copyfile", "shutil.move"))
    listing = frozenset(("os.listdir", "os.scandir", "glob.glob", "glob.glob/2"))
    tmp_dirs = (tmp,)
    all_dirs = (tmp,) + read_dirs

    def deny(event, detail):
        if not state["violation"]:
            state["violation"] = True
            report("V " + event + " " + detail[:300].replace("\n", " "))
        raise PermissionError("sandbox: " + event + " is not allowed here (" + detail[:200] + ")")

    def hook(event, args):
        if state["busy"]:
            return
        state["busy"] = True
        try:
            if event == "open":
                path, mode, flags = args
                writes = (flags or 0) & write_flags or (isinstance(mode, str) and any(c in mode for c in "wax+"))
                if not inside(path, tmp_dirs if writes else all_dirs):
                    deny(event, repr(path) + " mode " + repr(mode))
            elif event == "import":
                if args[0].split(".")[0] in blocked_modules:
                    deny(event, args[0])
            elif event in mutating:
                for a in args:
                    if isinstance(a, (str, bytes)) and not inside(a, tmp_dirs):
                        deny(event, repr(a))
            elif event in listing:
                if args and isinstance(args[0], (str, bytes)) and not inside(args[0], all_dirs):
                    deny(event, repr(args[0]))
            elif event.startswith(deny_prefixes):
                deny(event, repr(args)[:200])
        finally:
            state["busy"] = False

    if spec["audit_hook"]:
        for name in blocked_modules:
            sys.modules[name] = None  # `import name` now raises ImportError without even reaching the hook
        sys.addaudithook(hook)

    ns = {"__name__": "__main__", "__builtins__": builtins}
    tests = spec["tests"]
    total = len(tests)

    def finish(passed, code):
        sys.stdout.flush()
        sys.stderr.flush()
        report("R %s %d %d %.4f" % (nonce, passed, total, sum(os.times()[:2])))
        os._exit(code)

    try:
        exec(compile(spec["code"], "<answer>", "exec"), ns)
    except MemoryError:
        report("M answer")
        traceback.print_exc()
        finish(0, 1)
    except BaseException:  # SystemExit and KeyboardInterrupt too: the tests did not run
        traceback.print_exc()
        finish(0, 1)
    passed = 0
    for i, test in enumerate(tests):
        try:
            exec(compile(test, "<test %d>" % i, "exec"), ns)
            passed += 1
        except MemoryError:
            report("M test")
            traceback.print_exc()
        except BaseException:
            print("--- test %d failed: %s" % (i, test[:200]), file=sys.stderr)
            traceback.print_exc()
    finish(passed, 0 if passed == total else 1)
_runner()
'''

_BLOCKED_MODULES = (
    "socket", "_socket", "ssl", "_ssl", "ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing",
    "_multiprocessing", "pty", "asyncio", "http", "urllib", "ftplib", "smtplib", "telnetlib", "xmlrpc", "select",
    "selectors", "mmap", "resource", "fcntl", "signal", "_signal", "faulthandler", "pdb", "gc",
)
"""Modules the answer may not import (network, processes, FFI, signals, gc). `inspect` stays allowed because
`dataclasses` and `typing` need it; `sys._getframe` cannot be blocked for the same reason."""


# --------------------------------------------------------------------------------------------------------------
# Parent side.
_libc = None
_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def _libc_unshare(flags: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ask_interpreter(python: str, uid: int | None) -> list[str] | None:
    """Run `python -I -S` (as `uid` when given) and return its sys.path, or None when it cannot run."""
    def drop() -> None:
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", "import sys, json; print(json.dumps(sys.path))"],
            capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, cwd="/", preexec_fn=drop,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        return [p for p in json.loads(out.stdout) if isinstance(p, str) and p]
    except ValueError:
        return None


def probe_isolation() -> Isolation:
    """Find out once which hard layers work here (root? an interpreter the sandbox uid can run? network
    namespaces?) and which interpreter the sandbox uses."""
    global _isolation
    with _isolation_lock:
        if _isolation is not None:
            return _isolation
        notes: list[str] = []
        root = hasattr(os, "geteuid") and os.geteuid() == 0
        python, read_dirs, drop_uid = sys.executable, None, False
        if root:
            # The sandbox uid must be able to execute the interpreter and read its stdlib: a Python under a
            # root-only home (pyenv in /root) cannot be used; fall back to the system python3.
            candidates = [sys.executable] + [p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                                             if os.path.exists(p)]
            for cand in candidates:
                read_dirs = _ask_interpreter(cand, SANDBOX_UID_BASE)
                if read_dirs is not None:
                    python, drop_uid = cand, True
                    break
            if not drop_uid:
                notes.append(f"no interpreter runs as the sandbox uid (tried {candidates}): children stay root, "
                             f"RLIMIT_NPROC is not enforced for root; forks are stopped by the audit hook only")
        else:
            notes.append("not root: children keep this uid; RLIMIT_NPROC not set (it would count all your processes)")
        if read_dirs is None:
            read_dirs = _ask_interpreter(python, None) or _stdlib_dirs()
        netns = False
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    _libc_unshare(_CLONE_NEWNET)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            netns = os.waitstatus_to_exitcode(status) == 0
        except OSError as e:
            notes.append(f"network namespace probe failed: {e}")
        if not netns:
            notes.append("unshare(CLONE_NEWNET) not permitted: network is blocked by the audit hook only")
        _isolation = Isolation(drop_uid=drop_uid, netns=netns, python=python, read_dirs=read_dirs, notes=notes)
        for n in notes:
            logger.warning("sandbox: %s", n)
        logger.info("sandbox: interpreter %s, uid drop %s, network namespace %s", python, drop_uid, netns)
        return _isolation


class _UidPool:
    """Process-wide pool of sandbox uids: each running sandbox has its own, so RLIMIT_NPROC and the post-run
    kill of leftover processes concern that sandbox only."""

    def __init__(self, base: int, size: int):
        self._free = list(range(base, base + size))
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise SandboxError(
                    f"all {SANDBOX_UID_POOL} sandbox uids are in use: more than {SANDBOX_UID_POOL} sandboxes run at "
                    f"once in this process. Lower max_concurrency (it bounds concurrent sandboxes)."
                )
            return self._free.pop()

    def release(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)


_UIDS = _UidPool(SANDBOX_UID_BASE, SANDBOX_UID_POOL)
_semaphores: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = weakref.WeakKeyDictionary()


def default_concurrency() -> int:
    """Concurrent sandboxes per event loop by default: one per CPU core, so sandboxes do not starve each other
    into wall-clock timeouts (the failure NeMo Gym users saw with a forking verifier under load)."""
    return max(1, min(os.cpu_count() or 1, SANDBOX_UID_POOL))


def _semaphore(limit: int | None) -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    sem = _semaphores.get(loop)
    if sem is None:
        sem = asyncio.Semaphore(limit or default_concurrency())
        _semaphores[loop] = sem
    return sem


def _stdlib_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    dirs = {paths["stdlib"], paths["platstdlib"], os.path.join(paths["platstdlib"], "lib-dynload")}
    return sorted(d for d in dirs if d and os.path.isdir(d))


def _make_preexec(cpu_time_s: float, memory_mb: int, uid: int | None, netns: bool, max_procs: int):
    cpu = max(1, int(-(-cpu_time_s // 1)))  # RLIMIT_CPU has 1 s granularity: round up
    mem = int(memory_mb) * 1024 * 1024

    def preexec() -> None:  # runs in the forked child before exec: only async-signal-safe-ish calls
        if netns:
            _libc_unshare(_CLONE_NEWNET)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_NOFILE, (_MAX_FDS, _MAX_FDS))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return preexec


def _proc_sample(pid: int) -> tuple[str, float] | None:
    """(state letter, CPU seconds) of a live process from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 3 of stat
    ticks = os.sysconf("SC_CLK_TCK")
    return fields[0], (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)


def _kill_uid(uid: int) -> int:
    """SIGKILL every live (non-zombie) process owned by `uid`; returns how many were found."""
    found = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
        except OSError:
            continue
        sample = _proc_sample(int(entry))
        if sample is None or sample[0] in ("Z", "X"):  # gone, or dead and waiting to be reaped
            continue
        found += 1
        try:
            os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass
    return found


async def _kill_uid_until_gone(uid: int, max_wait_s: float = 2.0) -> None:
    """Kill leftovers of a run until none is alive: a fork bomb may fork between two passes, and SIGKILL takes
    effect asynchronously. Raises SandboxError if the uid is still busy after max_wait_s (it goes back to the
    pool only once clean)."""
    deadline = time.monotonic() + max_wait_s
    while _kill_uid(uid):
        if time.monotonic() > deadline:
            raise SandboxError(f"processes of sandbox uid {uid} survive SIGKILL after {max_wait_s:g} s")
        await asyncio.sleep(0.01)


FLOOD_FACTOR = 16
"""A child that writes more than FLOOD_FACTOR x max_output_bytes to one stream is killed: draining a flood costs
the parent as much CPU as the child, for output nobody keeps."""


async def _drain(stream: asyncio.StreamReader, cap: int, pid: int, flooded: list[bool]) -> tuple[bytes, int]:
    """Read a pipe to EOF keeping the first `cap` bytes; returns (kept, dropped byte count). Kills the child's
    process group (and sets flooded[0]) past FLOOD_FACTOR x cap."""
    kept = bytearray()
    dropped = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return bytes(kept), dropped
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
        dropped += max(0, len(chunk) - max(room, 0))
        if dropped > FLOOD_FACTOR * cap and not flooded[0]:
            flooded[0] = True
            _killpg(pid)


def _text(kept: bytes, dropped: int) -> str:
    s = kept.decode("utf-8", "replace")
    return s + _TRUNCATED_NOTE.format(n=dropped) if dropped else s


def _normalize_tests(tests: str | Sequence[str]) -> list[str]:
    if isinstance(tests, str):
        return [tests] if tests.strip() else []
    if not all(isinstance(t, str) for t in tests):
        raise SandboxError(
            f"tests must be a string (a test script) or a list of strings (assert statements); got "
            f"{[type(t).__name__ for t in tests][:5]}. Fix the row's tests."
        )
    return [t for t in tests if t.strip()]


async def run_python_async(
    code: str,
    tests: str | Sequence[str],
    *,
    cpu_time_s: float = 2.0,
    wall_time_s: float | None = None,
    memory_mb: int = 512,
    max_output_bytes: int = 64 * 1024,
    max_procs: int = 16,
    max_concurrency: int | None = None,
    python: str | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run `code` then `tests` in a sandboxed child; never blocks the event loop.

    cpu_time_s: CPU budget (RLIMIT_CPU, whole seconds, rounded up). wall_time_s: wall-clock budget, default
    2 x cpu_time_s + 1 (interpreter start-up and load). memory_mb: address-space limit. max_output_bytes: kept
    per stream. max_procs: RLIMIT_NPROC (threads count) when the uid is dropped. max_concurrency: sandboxes
    running at once on this event loop (fixed by the first call on the loop; default one per CPU core).
    audit_hook: False leaves only the hard layers (kernel limits, uid, network namespace); for testing them.
    python: interpreter (default: the probed one, see `probe_isolation`; its stdlib dirs are the readable ones). Raises SandboxError only for problems of the sandbox itself.
    """
    if not isinstance(code, str):
        raise SandboxError(f"code must be a str, got {type(code).__name__}")
    test_list = _normalize_tests(tests)
    wall = float(wall_time_s) if wall_time_s is not None else 2.0 * cpu_time_s + 1.0
    iso = probe_isolation()
    async with _semaphore(max_concurrency):
        uid = _UIDS.acquire() if iso.drop_uid else None
        try:
            return await _run_once(code, test_list, cpu_time_s, wall, memory_mb, max_output_bytes, max_procs,
                                   python or iso.python, uid, iso, audit_hook)
        finally:
            if uid is not None:
                await _kill_uid_until_gone(uid)
                _UIDS.release(uid)


async def _run_once(code, tests, cpu_time_s, wall, memory_mb, max_output_bytes, max_procs, python, uid, iso,
                    audit_hook):
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="gym_sandbox_") as tmp:
        if uid is not None:
            os.chown(tmp, uid, uid)
        os.chmod(tmp, 0o700)
        r_fd, w_fd = os.pipe()
        spec = {"code": code, "tests": tests, "nonce": nonce, "tmp": tmp, "report_fd": w_fd,
                "read_dirs": iso.read_dirs, "blocked_modules": list(_BLOCKED_MODULES), "audit_hook": bool(audit_hook)}
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        t0 = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                python, "-I", "-S", "-B", "-c", _RUNNER,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                cwd=tmp, env=env, pass_fds=(w_fd,), start_new_session=True,
                preexec_fn=_make_preexec(cpu_time_s, memory_mb, uid, iso.netns, max_procs),
            )
        except (OSError, ValueError, RuntimeError) as e:  # SubprocessError (preexec failed) is a RuntimeError
            os.close(r_fd)
            os.close(w_fd)
            raise SandboxError(f"could not start the sandbox interpreter {python!r}: {type(e).__name__}: {e}") from e
        os.close(w_fd)
        try:
            return await _supervise(proc, spec, r_fd, wall, cpu_time_s, max_output_bytes, t0)
        finally:
            os.close(r_fd)
            if proc.returncode is None:
                _killpg(proc.pid)
                await proc.wait()


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child is its own session leader: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


async def _supervise(proc, spec, r_fd, wall, cpu_time_s, max_output_bytes, t0) -> SandboxResult:
    async def feed() -> None:
        try:
            proc.stdin.write(json.dumps(spec).encode())
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child died before reading (e.g. preexec limits); its status says why

    flooded = [False]
    out_task = asyncio.ensure_future(_drain(proc.stdout, max_output_bytes, proc.pid, flooded))
    err_task = asyncio.ensure_future(_drain(proc.stderr, max_output_bytes, proc.pid, flooded))
    timed_out = False
    starved = False
    sampled_cpu = None
    try:
        await asyncio.wait_for(asyncio.gather(feed(), proc.wait()), wall)
    except asyncio.TimeoutError:
        timed_out = True
        sample = _proc_sample(proc.pid)
        elapsed = time.monotonic() - t0
        if sample is not None:
            state, sampled_cpu = sample
            # Runnable ("R") but got less than half the wall time on a CPU: the machine was overloaded.
            starved = state == "R" and sampled_cpu < 0.5 * elapsed
    finally:
        if proc.returncode is None:
            _killpg(proc.pid)
    await proc.wait()
    duration = time.monotonic() - t0
    # The pipes reach EOF when every holder exited; a descendant that escaped the group is killed by uid later,
    # so do not wait on them forever.
    try:
        (out, out_drop), (err, err_drop) = await asyncio.wait_for(asyncio.gather(out_task, err_task), 2.0)
    except asyncio.TimeoutError:
        out_task.cancel()
        err_task.cancel()
        out, out_drop, err, err_drop = b"", 0, b"[output pipes still held open after exit]", 0
    os.set_blocking(r_fd, False)
    report = b""
    while True:
        try:
            chunk = os.read(r_fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        report += chunk
    return _classify(proc.returncode, report.decode("utf-8", "replace"), spec["nonce"], len(spec["tests"]),
                     timed_out, starved, sampled_cpu, cpu_time_s, wall, duration,
                     _text(out, out_drop), _text(err, err_drop), flooded[0], max_output_bytes)


def _classify(rc, report, nonce, total, timed_out, starved, sampled_cpu, cpu_time_s, wall, duration, out, err,
              flooded, max_output_bytes):
    violation = None
    memory = False
    result_line = None
    for line in report.splitlines():
        if line.startswith("V ") and violation is None:
            violation = line[2:]
        elif line.startswith("M "):
            memory = True
        elif line.startswith("R "):
            parts = line.split()
            if len(parts) == 5 and parts[1] == nonce:  # a forged line without the nonce is ignored
                result_line = parts
    passed_n = int(result_line[2]) if result_line else 0
    cpu = float(result_line[4]) if result_line else sampled_cpu

    def res(status: str, detail: str) -> SandboxResult:
        return SandboxResult(
            passed=status == "passed", status=status, stdout=out, stderr=err, duration_s=duration,
            tests_passed=passed_n, tests_total=total, returncode=rc, cpu_s=cpu, violation=violation,
            starved=starved and status == "timeout", detail=detail,
        )

    if violation is not None:
        return res("forbidden", f"forbidden operation: {violation}")
    if flooded:
        return res("failed", f"output flood: more than {FLOOD_FACTOR * max_output_bytes} bytes on one stream; "
                             f"killed")
    if timed_out:
        how = "starved of CPU by an overloaded machine" if starved else "still running"
        return res("timeout", f"killed after the wall-clock limit of {wall:g} s ({how})")
    if rc is not None and rc in (-signal.SIGXCPU, -signal.SIGKILL) and result_line is None and not memory:
        cpu = cpu if cpu is not None else float(cpu_time_s)
        return res("timeout", f"CPU-time limit of {cpu_time_s:g} s reached (signal {-rc})")
    if memory:
        return res("memory", "MemoryError: the memory limit was reached")
    if result_line is not None:
        if rc == 0 and passed_n == total:
            return res("passed", f"{passed_n}/{total} tests passed")
        return res("failed", f"{passed_n}/{total} tests passed")
    if rc is not None and rc < 0:
        return res("crashed", f"killed by signal {-rc} ({signal.Signals(-rc).name})")
    return res("failed", f"the answer exited (status {rc}) before the tests completed")


def run_python(code: str, tests: str | Sequence[str], **limits) -> SandboxResult:
    """Blocking form of `run_python_async` (same arguments), for scripts and tests. Inside a running event loop
    use `await run_python_async(...)` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_python_async(code, tests, **limits))
    raise SandboxError("run_python() was called inside a running event loop; use `await run_python_async(...)`")
