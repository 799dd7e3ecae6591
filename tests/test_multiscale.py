"""Multi-scale windows: real native pixels as the 2x / 4x targets, block means as the input."""
import ml_collections
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from eojax.data import device, pipeline, synthetic
from eojax.data.multiscale import block_mean, check_scales
from eojax.data.raster import Scene, open_scenes
from eojax.data.windows import grid_offsets

S2_BANDS = synthetic.SENSORS["sentinel2"].bands


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ms")
    synthetic.write_scene(d / "a.tif", seed=4, height=144, width=160)
    return open_scenes([str(d / "a.tif")], bands=S2_BANDS[:3])


def _loop_block_mean(x, valid, f):
    """Reference written block by block: mean of valid sub-pixels, valid if >= half are valid."""
    c, h, w = x.shape
    out, ok = np.zeros((c, h // f, w // f), np.float64), np.zeros((h // f, w // f), bool)
    for i in range(h // f):
        for j in range(w // f):
            v = valid[i * f:(i + 1) * f, j * f:(j + 1) * f]
            if 2 * v.sum() >= f * f:
                ok[i, j] = True
                out[:, i, j] = x[:, i * f:(i + 1) * f, j * f:(j + 1) * f][:, v].astype(np.float64).mean(1)
    return out, ok


def test_targets_are_native_pixels_and_input_is_their_block_mean(scenes):
    # Grid windows (native stride 4 * 6) from the top edge, where the nodata border is.
    ds = pipeline.grid_window_dataset(scenes, size=8, stride=6, scales=(1, 2, 4))
    batch = next(pipeline.make_iterator(ds, batch_size=6, shuffle=False, num_epochs=1))
    assert batch["pixels"].shape == (6, 3, 8, 8) and batch["pixels_2x"].shape == (6, 3, 16, 16)
    assert batch["pixels_4x"].shape == (6, 3, 32, 32) and batch["valid_4x"].shape == (6, 32, 32)
    assert all(batch[k].dtype == np.float32 for k in ("pixels", "pixels_2x", "pixels_4x"))
    partial = 0
    for k in range(6):
        win = Window(int(batch["col"][k]), int(batch["row"][k]), 32, 32)  # native coordinates
        with rasterio.open(scenes[0].path) as src:
            raw = src.read([1, 2, 3], window=win)
        valid = (raw != 0).all(0)
        np.testing.assert_array_equal(batch["pixels_4x"][k], raw.astype(np.float32))
        np.testing.assert_array_equal(batch["valid_4x"][k], valid)
        for key, f in (("", 4), ("_2x", 2)):
            ref, ok = _loop_block_mean(raw, valid, f)
            np.testing.assert_array_equal(batch["valid" + key][k], ok)
            np.testing.assert_allclose(batch["pixels" + key][k], ref, rtol=1e-6)
        partial += 0 < valid.mean() < 1
    assert partial > 0  # some windows straddle nodata, so the rule was exercised


def test_validity_rule_on_hand_made_nodata(tmp_path):
    data = np.arange(1, 65, dtype=np.float32).reshape(1, 8, 8)
    data[0, 0:2, 0:4] = -1  # top-left 4x4 block: 8 of 16 invalid -> still valid (half)
    data[0, 0:3, 4:7] = -1  # top-right: 9 invalid -> invalid
    data[0, 4, 0] = np.nan  # bottom-left: 1 NaN -> valid, the NaN is left out of the mean
    path = tmp_path / "holes.tif"
    with rasterio.open(path, "w", driver="GTiff", count=1, height=8, width=8, dtype="float32",
                       nodata=-1, crs="EPSG:32633", transform=Affine(10, 0, 0, 0, -10, 80)) as dst:
        dst.write(data)
    ds = pipeline.grid_window_dataset([Scene(str(path))], size=2, stride=2, scales=(1, 4))
    assert len(ds) == 1
    el = ds[0]
    assert set(el) >= {"pixels", "valid", "pixels_4x", "valid_4x"} and "pixels_2x" not in el
    assert el["valid"].tolist() == [[True, False], [True, True]]
    x = data[0]
    assert el["pixels"][0, 0, 0] == pytest.approx(x[2:4, 0:4].mean())
    assert el["pixels"][0, 0, 1] == 0  # invalid block
    assert el["pixels"][0, 1, 0] == pytest.approx(np.nanmean(x[4:8, 0:4]))
    assert el["pixels"][0, 1, 1] == pytest.approx(x[4:8, 4:8].mean())
    # The same rule for 2 x 2 blocks: exactly 2 of 4 valid is valid.
    y, ok = block_mean(np.array([[[1, 5], [3, 7]]], np.float32), np.array([[True, False], [True, False]]), 2)
    assert ok.tolist() == [[True]] and y[0, 0, 0] == 2.0
    with pytest.raises(ValueError, match="starting at 1"):
        check_scales((2, 4))
    with pytest.raises(ValueError, match="dividing"):
        check_scales((1, 3, 4))


def test_eval_grid_and_config(scenes, tmp_path, monkeypatch):
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path))
    cfg = ml_collections.ConfigDict(dict(
        paths=(scenes[0].path,), bands=S2_BANDS[:3], window=8, scales=(1, 2, 4), num_windows=4,
        min_valid_fraction=0.0, normalize=True, eval_stride=8))
    ev, info = pipeline.make_image_input(cfg, split="eval", batch_size=5)
    assert info["scales"] == (1, 2, 4) and info["element_spec"]["pixels_2x"] == ((3, 16, 16), np.float32)
    batches = list(ev)
    corners = {(int(r), int(c)) for b in batches for r, c, w in zip(b["row"], b["col"], b["weight"]) if w}
    # Native windows of 8 * 4 pixels at a native stride of 8 * 4, the last flush with the edge.
    assert corners == {(r, c) for r in grid_offsets(144, 32, 32) for c in grid_offsets(160, 32, 32)}
    last = batches[-1]
    pad = last["weight"] == 0
    for key in ("pixels", "pixels_2x", "pixels_4x"):
        assert last[key].shape[0] == 5  # static shapes, padding included
    if pad.any():
        assert not last["valid_4x"][pad].any() and (last["pixels"][pad] == 0).all()
    images = device.model_inputs(batches[0], info["stats"])
    assert {k: v.shape for k, v in images.items()} == {
        "image": (5, 8, 8, 3), "image_2x": (5, 16, 16, 3), "image_4x": (5, 32, 32, 3)}
    it, _ = pipeline.make_image_input(cfg, split="train", batch_size=2)
    assert next(it)["pixels_4x"].shape == (2, 3, 32, 32)
