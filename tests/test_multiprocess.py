"""A real multi-process run: two processes on localhost joined by jax.distributed, two CPU devices each."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from eojax import checkpoint as ckpt_lib
from eojax import metric_writer
from helpers import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config.total_steps=4", "--config.checkpoint_every=2", "--config.eval_steps=1",
        "--config.progress_bar=False"]


def _params(workdir, step):
    return ckpt_lib.read_state(os.path.join(workdir, "checkpoints", str(step)))["params"]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), PYTHON=sys.executable, NPROC="2", DEVICES_PER_PROC="2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "configs/mae.py:runlocal", str(multi), *ARGS],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(open(f"{multi}.proc{i}.log").read() for i in range(2) if os.path.exists(f"{multi}.proc{i}.log"))
    assert proc.returncode == 0, logs[-6000:]
    assert "(2 processes)" in logs, logs  # the mesh really spans two jax processes
    # Only process 0 writes metrics; both processes took the same 4 steps.
    assert [r["step"] for r in metric_writer.read_metrics(str(multi))][-1] == 4

    # The same global batches on one process with four devices give the same parameters.
    env1 = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-m", "eojax.main", "train", "--config=configs/mae.py:runlocal",
                    f"--workdir={single}", *ARGS], cwd=REPO, env=env1, check=True, capture_output=True,
                   timeout=900)
    a, b = _params(multi, 4), _params(single, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
