"""Test setup: 8 simulated CPU devices, shared data location, tiny models.

XLA_FLAGS must be set before jax is imported anywhere, so it is done at the top of conftest.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest


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
