"""eojax.hostmem: with the malloc settings a large buffer freed and allocated again is reused from
the heap (no new page faults), as XLA:CPU's per-step temporaries are; without them glibc maps fresh
pages every time. Each case runs in a fresh interpreter (the settings are process-wide)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")

PROBE = r"""
import ctypes, resource, sys
from eojax import hostmem
if sys.argv[1] == "late":
    import jax  # noqa: F401  (imported first: too late to tune)
print(hostmem.tune_malloc())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
size = 200 << 20
def touch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)  # first touch of each page is what faults
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    touch()
print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(mode, **env):
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    return lines[0], int(lines[-1].split()[1])


def test_tuned_malloc_reuses_a_freed_large_buffer():
    pages = (200 << 20) // 4096  # one 200 MB buffer, touched 3 more times
    status, tuned = _probe("early")
    assert status == "malloc: one arena, no mmap, no trimming"
    assert tuned < 0.05 * pages, tuned
    # glibc's default maps the buffer afresh each time: 3 x 51k faults with 4 KB pages (3 x ~100 if the
    # kernel backs it with transparent huge pages), against ~0 when tuned.
    status, faults = _probe("early", EOJAX_MALLOC="system")
    assert "glibc defaults" in status
    assert faults > max(10 * tuned, 200), (faults, tuned)
    status, faults = _probe("late")
    assert "jax was imported first" in status and faults > max(10 * tuned, 200), (status, faults, tuned)
