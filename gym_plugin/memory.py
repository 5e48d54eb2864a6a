"""Process memory: give freed tensor memory back to the OS, keep it while the sampler is busy, read the peak RSS.

Why: glibc serves large allocations with mmap only below a *dynamic* threshold that grows (up to 32 MB) each
time such a block is freed; after that, big tensors come from the heap arenas, and a freed activation or logits
block stays in the process (one arena per thread: the embedded engine's generation thread, the trainer's
thread). A training step allocates and frees ~1 GB of activations, so the resident size ratchets up step by
step. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic one off) maps every block
of at least ``threshold`` bytes on its own and unmaps it on free. Measured on the default recipe (SmolLM2 fp32,
8 prompts x 4 samples, under load): peak RSS 3409 -> 2976 MB over 3 steps. The price, measured later
(2026-12-07, memory=low, 640 packed tokens): the step's ~9 GB of freed blocks come back as fresh pages, 2.3 M
page faults and ~4 s of kernel time per step (6.5-6.8 s instead of 4.4 s with blocks kept, which costs +780 MB
of fragmented heap instead). Hence ``gym_plugin.allocator``: the recipe runs under jemalloc where installed
(fast and lean), and all of this module's glibc settings apply only where it is not (``_libc`` is None under
jemalloc).

The other side: a decode step allocates and frees the same blocks every step (logits ``[rows, vocab]`` fp32 and
the sampler's temporaries: 6.3 MB each for 32 rows of SmolLM2). Unmapped on free, or trimmed off the top of the
generation thread's arena, they come back as fresh zeroed pages at the next step: 3,500-6,200 minor page faults
(14-24 MB) per step, 15-50 ms of a ~300 ms step on a 2-core machine. So while the engine generates it holds
freed memory (``keep_freed_memory``: blocks up to 32 MB come from the arena and nothing is trimmed), and when
it goes idle it puts back the process's setting and trims (``release_kept_memory``), so the trainer's resident
size is what ``return_freed_memory_to_os`` made it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import threading

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_DEFAULT = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
_KEEP_MMAP = 32 * 1024 * 1024  # glibc's largest mmap threshold (64-bit)
_KEEP_TRIM = 1 << 30
_TRIM_NUDGE = 256 * 1024  # >= glibc's 64 KiB FASTBIN_CONSOLIDATION_THRESHOLD: its free trims the arena's top

_lock = threading.Lock()
_keepers = 0  # engines generating now (keep_freed_memory calls not yet released)
_mmap_threshold: int | None = None  # what return_freed_memory_to_os set (None: never called)
_libc_handle: ctypes.CDLL | None | bool = None  # False: not glibc


def _libc() -> ctypes.CDLL | None:
    """glibc, when its malloc is the process's; None under jemalloc (``gym_plugin.allocator``: it keeps and
    returns freed memory by itself) and where the C library is not glibc."""
    global _libc_handle
    if _libc_handle is None:
        from gym_plugin.allocator import loaded_allocator

        if loaded_allocator() != "system":
            _libc_handle = False
            return None
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt, lib.malloc_trim  # noqa: B018 (glibc only: musl and macOS have no mallopt)
            lib.malloc.restype, lib.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
            lib.free.argtypes = [ctypes.c_void_p]
            _libc_handle = lib
        except (OSError, AttributeError):
            _libc_handle = False
    return _libc_handle or None


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Serve allocations of at least ``threshold_bytes`` with their own mmap (glibc). Returns False where it
    does not apply (not glibc, e.g. macOS or musl), changing nothing. While an engine generates
    (``keep_freed_memory``) the setting is recorded and applied when the last one goes idle."""
    global _mmap_threshold
    libc = _libc()
    if libc is None:
        return False
    with _lock:
        _mmap_threshold = int(threshold_bytes)
        if _keepers:
            return True
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _mmap_threshold))


def keep_freed_memory() -> bool:
    """The embedded engine starts generating: blocks up to 32 MB come from the heap arenas and freed memory stays
    in the process (no per-step page faults). Pair each call with ``release_kept_memory``. False where it does
    not apply (not glibc)."""
    global _keepers
    libc = _libc()
    if libc is None:
        return False
    with _lock:
        _keepers += 1
        if _keepers == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM)
    return True


def release_kept_memory() -> None:
    """The engine went idle: once no engine generates, put back the mmap threshold ``return_freed_memory_to_os``
    set (glibc's initial 128 KiB if it was never called), the trim threshold's 128 KiB, and give the free memory
    back to the OS: the calling thread's arena top, and every arena's free chunks (``malloc_trim``). Call it from
    the thread that generated (its arena holds the blocks)."""
    global _keepers
    libc = _libc()
    if libc is None:
        return
    with _lock:
        if _keepers == 0:
            return
        _keepers -= 1
        if _keepers:
            return
        libc.mallopt(_M_MMAP_THRESHOLD, _mmap_threshold or _GLIBC_MMAP_DEFAULT)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_MMAP_DEFAULT)
        # malloc_trim gives back the free chunks inside every arena, but a thread arena's free top (where the
        # freed KV buffers end up) shrinks only when a large block of that arena is freed: free one here.
        block = libc.malloc(_TRIM_NUDGE)
        libc.free(block)
        libc.malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
