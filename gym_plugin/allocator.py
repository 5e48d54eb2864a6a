"""The process's memory allocator: jemalloc for the recipe's processes where the machine has it.

Why: a training step allocates and frees gigabytes of short-lived blocks (activations, their gradients, the
recomputed layers, the optimizer's temporaries: ~9 GB per step for SmolLM2 on 640 packed tokens, mostly 1-4 MB
blocks). glibc's malloc either gives such blocks back to the OS on free (``gym_plugin.memory``'s fixed mmap
threshold), so every one comes back as fresh zeroed pages (2.3 M page faults and ~4 s of kernel time per step,
35-45% of the step's CPU), or keeps them and fragments (+780 MB peak RSS for the same step). jemalloc keeps
freed blocks in size classes and returns what stays unused after a few seconds: measured in the recipe
(memory=low, 48-token answers, same sitting) the step ran at 8.2-10.1 ms per forward token instead of
11.1-15.1, at the same peak RSS (1,504-1,519 vs 1,499 MB).

How: an allocator must be in place before the process's first malloc, so ``use_jemalloc`` re-executes the
process once with ``LD_PRELOAD`` naming libjemalloc: same interpreter, arguments, environment and PID (torchrun's
agent keeps watching the rank). In the new process it puts ``LD_PRELOAD`` back as it was, so the servers and
tools the recipe starts run with their usual allocator.

``GYM_PLUGIN_ALLOCATOR``: ``auto`` (default: jemalloc where found, else the system's), ``jemalloc`` (an error
if it cannot be loaded), ``system`` (no re-exec). ``GYM_PLUGIN_JEMALLOC``: the library's path where it is not in
a standard place (e.g. ``$CONDA_PREFIX/lib/libjemalloc.so.2``). Install it with ``apt-get install libjemalloc2``
(Debian/Ubuntu), ``dnf install jemalloc`` or ``conda install jemalloc``.
"""

from __future__ import annotations

import os
import sys

from gym_plugin.errors import ConfigError

ENV = "GYM_PLUGIN_ALLOCATOR"
PATH_ENV = "GYM_PLUGIN_JEMALLOC"
CHOICES = ("auto", "jemalloc", "system")
_MARK = "_GYM_PLUGIN_PRELOADED"
"""Set in the re-executed process's environment to the ``LD_PRELOAD`` it had before (``-`` for none)."""
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")
_LIB_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
_INSTALL = ("install it (Debian/Ubuntu: apt-get install libjemalloc2; Fedora: dnf install jemalloc; conda: "
            "conda install jemalloc) or set GYM_PLUGIN_ALLOCATOR=system")


def find_jemalloc() -> str | None:
    """Path of the jemalloc shared library: ``$GYM_PLUGIN_JEMALLOC`` if set (it must exist), else the first
    of the usual library folders (and ``$CONDA_PREFIX/lib``) that has it; None if none has."""
    given = os.environ.get(PATH_ENV)
    if given:
        if not os.path.isfile(given):
            raise ConfigError(f"{PATH_ENV}={given!r}: no such file. Point it at libjemalloc.so.2, or unset it "
                              f"to search the usual folders.")
        return given
    dirs = list(_LIB_DIRS)
    if os.environ.get("CONDA_PREFIX"):
        dirs.insert(0, os.path.join(os.environ["CONDA_PREFIX"], "lib"))
    for folder in dirs:
        for name in _LIB_NAMES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def loaded_allocator() -> str:
    """``"jemalloc"`` when libjemalloc is mapped into this process, else ``"system"``."""
    try:
        with open("/proc/self/maps") as maps:
            return "jemalloc" if any("libjemalloc" in line for line in maps) else "system"
    except OSError:  # not Linux
        return "system"


def _choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={os.environ.get(ENV)!r} is not one of {list(CHOICES)}: auto uses jemalloc where "
                          f"it is installed, jemalloc requires it, system keeps the C library's malloc.")
    return value


def use_jemalloc() -> str:
    """Call first thing in a program's ``__main__`` (before torch allocates anything worth keeping): where
    ``GYM_PLUGIN_ALLOCATOR`` allows and jemalloc is installed but not loaded, re-execute this process with it
    preloaded (does not return). Otherwise return the allocator in use, ``"jemalloc"`` or ``"system"``.

    Raises ``ConfigError`` for an unknown ``GYM_PLUGIN_ALLOCATOR``, a missing ``GYM_PLUGIN_JEMALLOC`` file, or
    ``GYM_PLUGIN_ALLOCATOR=jemalloc`` where jemalloc cannot be found or loaded."""
    choice = _choice()
    previous = os.environ.pop(_MARK, None)
    if previous is not None:  # the re-executed process: children get the LD_PRELOAD this one started with
        if previous == "-":
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = previous
    if loaded_allocator() == "jemalloc":
        return "jemalloc"
    if choice == "system":
        return "system"
    path = find_jemalloc() if sys.platform.startswith("linux") else None
    if path is None or previous is not None:  # not installed, or preloading it did not take (ld.so ignored it)
        if choice == "jemalloc":
            why = (f"{path} did not load (see the ld.so message above)" if path else
                   f"no libjemalloc in {', '.join(_LIB_DIRS)}" if sys.platform.startswith("linux") else
                   f"preloading it needs Linux (this is {sys.platform})")
            raise ConfigError(f"{ENV}=jemalloc: {why}; {_INSTALL}.")
        return "system"
    env = dict(os.environ)
    old = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{path}:{old}" if old else path
    env[_MARK] = old or "-"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # does not return
    except OSError as exc:
        if choice == "jemalloc":
            raise ConfigError(f"{ENV}=jemalloc: re-executing {sys.executable} with {path} preloaded failed "
                              f"({exc}); set {ENV}=system to run with the C library's malloc.") from exc
        print(f"[gym_plugin] could not re-execute with jemalloc ({exc}): the C library's malloc stays",
              file=sys.stderr, flush=True)
    return "system"
