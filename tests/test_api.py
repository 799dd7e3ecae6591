"""`eojax.load(workdir)`: the saved config read back with its types, the checkpoint's evaluation
parameters, and `predict` giving what the family's own infer plug-in writes, as numpy or as an
xarray.DataArray georeferenced like the raster (rioxarray)."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import rasterio

import eojax
from eojax import api, errors, tasks, train
from eojax import checkpoint as ckpt_lib
from eojax.seg import data as segdata
from helpers import REPO, load_config

# configs/<name>.py arguments whose saved JSON must read back as the same config (values and types).
CONFIGS = [("mae", ""), ("mae", "runlocal"), ("satmae", "runlocal"), ("gridmae", "runlocal"), ("seg", ""),
           ("seg", "encoder=resnet,decoder=unet,runlocal"), ("classify", "runlocal"), ("diffusion", "runlocal"),
           ("prompt_writer", "runlocal"), ("vsat", "runlocal"), ("vsat", "mode=great,runlocal"), ("geo", ""),
           ("geo", "runlocal")]


def _typed(value):
    """A config as plain data with every value's type, so 3 != 3.0 and (1,) != [1]."""
    if hasattr(value, "items"):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value).__name__, [_typed(v) for v in value]
    return type(value).__name__, value


@pytest.mark.parametrize("name,arg", CONFIGS, ids=[f"{n}:{a}" for n, a in CONFIGS])
def test_saved_config_reads_back_with_its_types(name, arg, tmp_path):
    config = load_config(name, arg)
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))  # as the trainer writes it
    again = api.read_config(str(tmp_path))
    assert _typed(again.to_dict()) == _typed(config.to_dict())
    with pytest.raises(AttributeError):  # locked, as the command line's config: a typo is an error
        again.totl_steps = 3


def test_keys_missing_from_an_older_run_get_their_defaults(tmp_path):
    saved = json.loads(load_config("mae", "runlocal").to_json_best_effort())
    del saved["lora"], saved["kernels"], saved["optim"]["ema_decay"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = api.read_config(str(tmp_path))
    assert config.lora.targets == "" and config.kernels == "auto" and config.optim.ema_decay == 0.0
    assert config.input.window == saved["input"]["window"]


def test_import_eojax_stays_free_of_jax():
    code = ("import sys, eojax; assert callable(eojax.load); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'jax'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_folders_that_are_not_runs_are_refused_in_one_line(tmp_path):
    with pytest.raises(errors.WorkdirError, match=r"no config\.json, so not an eojax run folder \(`eojax train`"):
        eojax.load(tmp_path)
    (tmp_path / "config.json").write_text(load_config("mae", "runlocal").to_json_best_effort())
    with pytest.raises(errors.CheckpointError, match="has no checkpoint$"):
        eojax.load(tmp_path)
    with pytest.raises(errors.CheckpointError, match="no best parameters"):
        eojax.load(tmp_path, best=True)
    with pytest.raises(errors.ConfigError, match="not both"):
        eojax.load(tmp_path, best=True, step=2)


# ------------------------------------------------------------------ a trained seg run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step seg run (tiny MAE encoder + linear decoder, EMA kept, best params kept) and a scene."""
    root = tmp_path_factory.mktemp("api")
    chips = segdata.synthetic_burnscars(root / "chips", size=64, n_train=4, n_test=2)
    config = load_config("seg", "encoder=mae,decoder=linear,mode=frozen,runlocal", total_steps=2,
                         checkpoint_every=2, eval_every=0, eval_steps=1, batch_size=8,
                         **{"optim.ema_decay": 0.9})
    config.input.update(root=str(chips), crop=32, eval_batch_size=8)
    config.model.encoder_args.update(depth=1, layers=(0, 0, 0, 0), width=16, mlp_dim=32)
    config.model.pictures = False
    workdir = str(root / "run")
    train.train_and_evaluate(config, workdir)
    scene = sorted(glob.glob(os.path.join(chips, "validation", "*_merged.tif")))[0]
    return config, workdir, scene, eojax.load(workdir)


def test_load_gives_back_the_config_spec_and_ema_params(trained):
    config, workdir, _, run = trained
    assert _typed(run.config.to_dict()) == _typed(config.to_dict())
    assert run.task.name == "seg" and run.step == 2 and run.checkpoint == os.path.join(workdir, "checkpoints", "2")
    assert run.spec == train.saved_spec(workdir)
    # The evaluation variables as every other reader gets them: the EMA, not the live params.
    params, model_state = ckpt_lib.host_numpy(ckpt_lib.load_variables(workdir, None))
    live = ckpt_lib.read_state(run.checkpoint)["params"]
    loaded = ckpt_lib.host_numpy(run.params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(live)))
    best = eojax.load(workdir, best=True)
    assert best.checkpoint.startswith(os.path.join(workdir, "best"))
    with pytest.raises(errors.CheckpointError, match=r"no checkpoint of step 7 \(its steps: 2\)"):
        eojax.load(workdir, step=7)


def test_predict_is_the_infer_plugins_output_with_coordinates_and_crs(trained, tmp_path):
    config, workdir, scene, run = trained
    # The plug-in as `eojax infer` runs it, on the config the run was trained with.
    reference, variables = train.load_for_inference(config, workdir)
    with reference.scope():
        written = tasks.require_plugin(reference.task, "infer", "eojax infer")(
            reference, variables, workdir, {"input": scene, "output": str(tmp_path), "probabilities": True})
    with rasterio.open(written["outputs"]["classes"]) as src:
        classes = src.read(1)
    with rasterio.open(written["outputs"]["probabilities"]) as src:
        probabilities = src.read()
    np.testing.assert_array_equal(run.predict(scene), classes)

    da = run.predict(scene, as_xarray=True, probabilities=True)
    np.testing.assert_array_equal(da.values, probabilities)
    with rasterio.open(scene) as src:  # the input's own grid: pixel centres and CRS
        xs, _ = rasterio.transform.xy(src.transform, np.zeros(src.width), np.arange(src.width))
        _, ys = rasterio.transform.xy(src.transform, np.arange(src.height), np.zeros(src.height))
        crs, pixels, transform = src.crs, src.read(), src.transform
    assert da.dims == ("band", "y", "x")
    np.testing.assert_allclose(da.x.values, xs)
    np.testing.assert_allclose(da.y.values, ys)
    assert da.rio.crs == crs and da.rio.transform() == transform

    # An array with the raster's transform and CRS predicts the same classes on the same grid.
    from_array = run.predict(pixels, as_xarray=True, transform=transform, crs=crs)
    assert from_array.dims == ("y", "x") and from_array.rio.crs == crs
    np.testing.assert_array_equal(from_array.values, classes)
    np.testing.assert_allclose(from_array.x.values, xs)


def test_predict_refuses_an_array_without_the_models_bands(trained):
    run = trained[3]
    with pytest.raises(errors.DataError, match=r"band-first \(C, H, W\) with the model's 6 bands"):
        run.predict(np.zeros((2, 8, 8), np.float32))


def test_mae_predict_is_the_export_plugins_embeddings(tmp_path):
    """A MAE run (its init checkpoint, written as the trainer writes one): predict on a raster and on
    its pixels as an array gives exactly what `eojax export --input` writes, on the export grid."""
    from eojax.data import synthetic
    from eojax.mae import export as features

    config = load_config("mae", "runlocal", batch_size=8, **{"input.window": 16})
    config.model.update(width=16, depth=1, heads=2, mlp_dim=32, decoder_width=16, decoder_depth=1, decoder_heads=2)
    workdir = tmp_path / "run"
    run = train.setup(config)
    saver = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
    saver.save(1, run.init_state(), force=True)
    saver.close()
    train.save_spec(run.task.spec, str(workdir))
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    with rasterio.open(synthetic.default_dataset()[1]) as src:  # its 10 spectral bands (no QA band)
        profile, pixels = dict(src.profile, count=10), src.read(list(range(1, 11)))
    scene = str(tmp_path / "scene.tif")
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(pixels)
    (written,) = features.export_run_features(config, str(workdir), str(tmp_path / "export"), raster=scene)
    with rasterio.open(written) as src:
        embeddings, transform, crs = src.read(), src.transform, src.crs
        xs, _ = rasterio.transform.xy(transform, np.zeros(src.width), np.arange(src.width))
    assert np.isnan(embeddings).any() and not np.isnan(embeddings).all()  # nodata windows are NaN

    trained = eojax.load(workdir)
    np.testing.assert_array_equal(trained.predict(scene), embeddings)
    da = trained.predict(pixels, as_xarray=True, transform=profile["transform"], crs=profile["crs"],
                         nodata=profile["nodata"])
    np.testing.assert_array_equal(da.values, embeddings)
    assert da.rio.crs == crs and da.rio.transform() == transform
    np.testing.assert_allclose(da.x.values, xs)
