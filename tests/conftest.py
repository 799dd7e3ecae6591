"""Test setup: 8 simulated CPU devices, shared data location, tiny models.

XLA_FLAGS must be set before jax is imported anywhere, so it is done at the top of conftest.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Test programs are tiny and compiled far more than they run: LLVM at -O0 compiles them ~25% faster
# (the diffusion CLI run: 70 s instead of 92 s, same losses). Libraries do the heavy ops (dots, convs)
# either way. Subprocesses and notebook kernels inherit these flags (helpers.xla_flags).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole suite, inherited by the xdist workers, the CLI
# subprocesses and the notebook kernels: many tests compile the same tiny programs (a resumed run, a
# second process, the same runlocal step in another test), and compiling dominates their time. The
# cache key is the whole program plus compiler options and versions, so a hit cannot change a result.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"eojax-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))  # bytes; oldest entries go first

import pathlib

import pytest


def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (`-n 2 --dist loadgroup`): each test file runs whole on one worker (its
    module fixtures and compiled functions are reused), except the notebooks, which are long and
    independent, so each is a group of its own and they spread over the workers."""
    for item in items:
        module = item.nodeid.split("::")[0]
        group = item.nodeid if module.endswith("test_notebook.py") else module
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
    """../shared/data, found through EOJAX_TEST_DATA (set by .ci/run)."""
    root = os.environ.get("EOJAX_TEST_DATA")
    if not root:
        guess = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
        root = str(guess) if guess.is_dir() else ""
    if not root or not pathlib.Path(root).is_dir():
        pytest.fail("EOJAX_TEST_DATA does not point at the shared data folder (../shared/data)")
    return pathlib.Path(root)
