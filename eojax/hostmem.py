"""Host memory: glibc malloc settings that stop XLA:CPU from page-faulting its temporaries every step.

XLA's CPU runtime allocates one buffer for all of a compiled program's temporaries at each execution
(~640 MB for the MAE train step of bench/mae_step.py) and frees it afterwards. glibc serves a request
that large with a fresh mmap and gives it back with munmap, so every step touches ~160k new pages:
on the 2-core bench machine ~0.35 s of kernel time per ~1.1 s step. With mmap disabled, a single
arena and no trimming, the buffer is reused from the heap instead: no page faults, and the step runs
~10% faster (bench/README.md has the numbers).

The price: the process keeps its peak heap (resident memory does not shrink after a large step), and
all threads share one malloc arena. `eojax` CLI runs call `tune_malloc()` before jax is imported; set
EOJAX_MALLOC=system to keep glibc's defaults. A notebook or script can call it as its first line.
"""
from __future__ import annotations

import ctypes
import os
import sys

ENV = "EOJAX_MALLOC"
# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
status = ""  # what the last tune_malloc() did, in words


def tune_malloc() -> str:
    """Applies the settings if it can; returns (and keeps in `status`) what it did, in words."""
    global status
    status = _tune()
    return status


def _tune() -> str:
    if os.environ.get(ENV, "").lower() in ("system", "off", "0"):
        return f"malloc: glibc defaults ({ENV}={os.environ[ENV]})"
    if not sys.platform.startswith("linux"):
        return "malloc: unchanged (not Linux/glibc)"
    if "jax" in sys.modules:
        # Threads that already exist keep their own arenas, which cannot hold the buffer without mmap.
        return "malloc: unchanged (jax was imported first; call eojax.hostmem.tune_malloc() before it)"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "malloc: unchanged (no glibc mallopt)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # One arena: a thread arena (64 MB heaps) cannot hold the buffer, and glibc would mmap it anyway.
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return "malloc: one arena, no mmap, no trimming" if ok else "malloc: unchanged (mallopt refused)"
