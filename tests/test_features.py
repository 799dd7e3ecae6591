"""Feature export: per-window embeddings land over the ground they describe."""
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from eojax.data import synthetic
from eojax.data.raster import RasterError, Scene
from eojax.mae import export as features


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("feat") / "s.tif"
    synthetic.write_scene(str(path), seed=4, height=100, width=90, crs="EPSG:32631",
                          origin=(431000.0, 5412000.0))
    return Scene(str(path), bands=("B2", "B3", "B4"))


def _window_means(pixels, valid):
    """A stand-in encoder whose embedding is checkable: the per-band mean of the valid pixels."""
    w = valid[:, None].astype(np.float64)
    return (pixels * w).sum(axis=(2, 3)) / np.maximum(w.sum(axis=(2, 3)), 1)


@pytest.mark.parametrize("window,stride", [(20, 20), (20, 10), (16, 24)])
def test_feature_geotiff_is_georeferenced(scene, tmp_path, window, stride):
    out = features.export_features(scene, _window_means, str(tmp_path / "f.tif"), window=window,
                                   stride=stride, batch_size=7, allow_gaps=stride > window)
    rows, cols = features.feature_grid(scene.height, scene.width, window, stride)
    with rasterio.open(out) as dst:
        assert dst.crs == scene.crs and dst.count == 3 and dst.shape == (len(rows), len(cols))
        emb = dst.read()
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                # The centre of output pixel (i, j) is the centre of its window, in map coordinates.
                centre_out = dst.transform @ (j + 0.5, i + 0.5)
                centre_in = scene.transform @ (c + window / 2, r + window / 2)
                np.testing.assert_allclose(centre_out, centre_in, atol=1e-6)
                raw, valid = scene.read_pixels(Window(c, r, window, window))
                if valid.any():
                    np.testing.assert_allclose(emb[:, i, j], _window_means(raw[None], valid[None])[0],
                                               rtol=1e-5)
                else:
                    assert np.isnan(emb[:, i, j]).all()
        # Pixel size = stride in input pixels.
        assert dst.transform.a == pytest.approx(scene.transform.a * stride)


def test_feature_transform_tiles_input_when_stride_equals_window():
    t = Affine(10.0, 0, 500000.0, 0, -10.0, 4200000.0)
    assert features.feature_transform(t, 32, 32) == t @ Affine.scale(32)


def test_raster_smaller_than_window_is_refused():
    with pytest.raises(RasterError, match="smaller than"):
        features.feature_grid(10, 50, 16, 16)


def test_export_needs_no_training_data(tmp_path):
    """A run keeps its DataSpec (data_spec.json): with the training scenes gone, `eojax export` of a
    new raster builds the model from it and gives the features it gave with the data present."""
    import shutil

    from eojax import tasks, train
    from helpers import load_config

    data, other = tmp_path / "data", tmp_path / "other"
    for folder, seed in ((data, 1), (other, 2)):
        folder.mkdir()
        synthetic.write_scene(str(folder / "s.tif"), seed=seed, height=96, width=96, crs="EPSG:32631",
                              origin=(431000.0, 5412000.0))
    config = load_config("mae", "runlocal", batch_size=8, total_steps=2, eval_every=0,
                         checkpoint_every=2, **{"input.paths": (str(data / "s.tif"),), "input.bands": ("B2", "B3", "B4"),
                                                "input.num_windows": 16, "model.variant": "mu"})
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)

    def export(name):
        run, variables = train.load_for_inference(config, workdir)
        plug_in = tasks.require_plugin(run.task, "export", "eojax export")
        with run.scope():
            [path] = plug_in(run, variables, workdir, {"input": str(other / "s.tif"), "output": str(tmp_path / name)})
        with rasterio.open(path) as f:
            return f.read()

    with_data = export("with_data")
    shutil.rmtree(data)
    without = export("without_data")
    assert np.isfinite(without).all() and without.shape[0] > 4
    np.testing.assert_array_equal(without, with_data)
