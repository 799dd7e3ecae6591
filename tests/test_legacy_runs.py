"""Runs written by an earlier eojax (tests/fixtures/legacy_runs, made by
scripts/fixtures/make_legacy_runs.sh at the revision in REVISION) still evaluate and resume: the CLI,
config keys and checkpoint layout stay compatible across redesigns of the code above the trainer."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from eojax import checkpoint as ckpt_lib
from eojax import train
from helpers import REPO, load_config

LEGACY = os.path.join(REPO, "tests", "fixtures", "legacy_runs")
# The overrides make_legacy_runs.sh gave both runs.
COMMON = {"total_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2, "eval_every": 0, "log_every": 2,
          "batch_size": 4, "mesh": (("data", 2), ("fsdp", 1), ("model", 4))}


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(LEGACY, name), dst)
    with open(dst / "results.json") as f:
        return str(dst), json.load(f)


def mae_config():
    return load_config("mae", "runlocal", **COMMON, **{"optim.ema_decay": 0.9})


def seg_config():
    # Written before the decoders had BatchNorm (model.norm='batch', now the default): its channel
    # LayerNorm is one option away.
    return load_config("seg", "encoder=mae,decoder=upernet,mode=frozen,runlocal", **COMMON,
                       **{"input.eval_batch_size": 4, "input.num_crops": 16, "model.norm": "layer"})


@pytest.mark.slow
def test_legacy_mae_run_evaluates_and_resumes_to_the_same_params(tmp_path):
    workdir, results = _copy("mae", tmp_path)
    # Eval of the latest checkpoint (with its EMA params) gives the loss the old code recorded.
    metrics = train.evaluate_checkpoint(mae_config(), workdir)
    np.testing.assert_allclose(metrics["loss"], results["eval"]["loss"], rtol=1e-4)

    # Resume from step 2 (step 4 removed): the new code reaches the old step-4 state.
    saved4 = ckpt_lib.read_state(os.path.join(workdir, "checkpoints", "4"))
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    config = mae_config()
    config.eval_every = 0
    state = train.train_and_evaluate(config, workdir)["state"]
    assert int(state.step) == 4
    new = ckpt_lib.host_numpy(state.params)
    saved2 = ckpt_lib.read_state(os.path.join(workdir, "checkpoints", "2"))
    # Bit-identical on the one device that wrote the run; on this 8-device mesh reductions run in another
    # order, and Adam turns near-zero gradients (the attention key bias) into updates of up to ~lr. So
    # the tolerance is a small fraction of the largest update of the two resumed steps.
    step = max(np.max(np.abs(b - c)) for b, c in zip(jax.tree.leaves(saved4["params"]),
                                                     jax.tree.leaves(saved2["params"])))
    assert step > 1e-4  # the two steps did move the params
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(saved4["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * step)


def test_legacy_seg_run_evaluates_to_its_recorded_metrics(tmp_path):
    workdir, results = _copy("seg", tmp_path)
    metrics = train.evaluate_checkpoint(seg_config(), workdir)
    for key in ("miou", "accuracy", "loss"):
        np.testing.assert_allclose(metrics[key], results["eval"][key], rtol=1e-4, atol=1e-6)
    # The test split is scored on the kept best params.
    for key in ("miou", "accuracy"):
        np.testing.assert_allclose(metrics[f"test_{key}"], results["test"][key], rtol=1e-4, atol=1e-6)
