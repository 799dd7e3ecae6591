"""Stacking rasters of different resolutions and CRSs onto one grid (eojax.data.stack)."""
import pickle

import ml_collections
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window

from eojax.data import device, pipeline, stats as stats_lib
from eojax.data.raster import RasterError
from eojax.data.stack import StackedScene
from eojax.data.windows import RandomWindowSampler

FINE = "britain_magnetic_tfa_blockmean_0p05deg.tif"  # 224 x 210, 0.05 deg
COARSE = "britain_magnetic_tfa_blockmean_0p2deg.tif"  # 56 x 52, 0.2 deg


@pytest.fixture(scope="module")
def mag(test_data):
    d = test_data / "fatiando"
    return str(d / FINE), str(d / COARSE)


@pytest.fixture(scope="module")
def utm_int(mag, tmp_path_factory):
    """The coarse grid reprojected to UTM 30N as int16 with nodata -32768 where it was NaN."""
    path = str(tmp_path_factory.mktemp("utm") / "mag_utm_int16.tif")
    with rasterio.open(mag[1]) as src:
        crs = "EPSG:32630"
        tr, w, h = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        data = np.full((h, w), np.nan, np.float32)
        reproject(rasterio.band(src, 1), data, dst_transform=tr, dst_crs=crs,
                  resampling=Resampling.nearest, dst_nodata=np.nan)
    out = np.where(np.isnan(data), -32768, np.round(data)).astype(np.int16)
    with rasterio.open(path, "w", driver="GTiff", count=1, height=h, width=w, dtype="int16",
                       nodata=-32768, crs=crs, transform=tr) as dst:
        dst.write(out, 1)
    return path


def _reprojected(path, crs, transform, shape, resampling):
    """Reference: rasterio.warp.reproject of band 1 onto the grid, NaN where GDAL wrote nodata."""
    dst = np.full(shape, np.nan, np.float32)
    with rasterio.open(path) as src:
        reproject(rasterio.band(src, 1), dst, dst_transform=transform, dst_crs=crs,
                  resampling=Resampling[resampling], dst_nodata=np.nan)
    return dst


def test_stack_equals_direct_reprojection(mag, utm_int):
    fine, coarse = mag
    resampling = ("bilinear", "nearest", "bilinear")
    stack = StackedScene([coarse, fine, utm_int], resampling=resampling)
    with rasterio.open(fine) as ref:  # the finest source is the default target grid
        assert (stack.crs, stack.transform, stack.height, stack.width) == (
            ref.crs, ref.transform, ref.height, ref.width)
    assert stack.band_names == ["britain_magnetic_tfa_blockmean_0p2deg",
                                "britain_magnetic_tfa_blockmean_0p05deg", "mag_utm_int16"]
    assert stack.source_channels == [(0,), (1,), (2,)] and stack.dtype == "float32"
    whole, valid = stack.read_pixels(Window(0, 0, stack.width, stack.height))
    for k, (path, rs) in enumerate(zip([coarse, fine, utm_int], resampling)):
        ref = _reprojected(path, stack.crs, stack.transform, (stack.height, stack.width), rs)
        np.testing.assert_array_equal(np.isnan(whole[k]), np.isnan(ref))  # nodata / NaN -> invalid
        ok = ~np.isnan(ref)
        np.testing.assert_allclose(whole[k][ok], ref[ok], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(valid, ~np.isnan(whole).any(0))
    assert 0.3 < valid.mean() < 0.7  # irregular survey coverage, partly outside the UTM copy
    # Windows are the same pixels as the whole grid (the warp does not depend on the window).
    for col, row, w, h in [(0, 0, 17, 23), (40, 51, 64, 48), (150, 170, 60, 54)]:
        win = Window(col, row, w, h)
        pix, v = stack.read_pixels(win)
        np.testing.assert_array_equal(pix, whole[:, row:row + h, col:col + w])
        np.testing.assert_array_equal(v, valid[row:row + h, col:col + w])
    # Into a caller's buffer of another dtype, as the pipeline does.
    buf = np.zeros((3, 16, 16), np.float64)
    stack.read_pixels(Window(40, 51, 16, 16), out=buf)
    np.testing.assert_array_equal(buf, whole[:, 51:67, 40:56].astype(np.float64))
    clone = pickle.loads(pickle.dumps(stack))
    assert "_local" not in stack.__getstate__()
    np.testing.assert_array_equal(clone.read_pixels(Window(5, 5, 9, 9))[0], whole[:, 5:14, 5:14])


def test_explicit_grid_and_reference(mag, utm_int):
    fine, coarse = mag
    with rasterio.open(coarse) as c:
        grid = dict(crs=c.crs, transform=c.transform, shape=(c.height, c.width))
    stack = StackedScene([fine, utm_int], resampling=["average", "nearest"], **grid)
    assert (stack.height, stack.width) == grid["shape"]
    pix, _ = stack.read_pixels(Window(0, 0, stack.width, stack.height))
    for k, (path, rs) in enumerate([(fine, "average"), (utm_int, "nearest")]):
        ref = _reprojected(path, grid["crs"], grid["transform"], grid["shape"], rs)
        np.testing.assert_array_equal(np.isnan(pix[k]), np.isnan(ref))
        np.testing.assert_allclose(pix[k][~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-5, atol=1e-3)
    # A UTM reference: the geographic grids are warped into it.
    by_ref = StackedScene([fine, utm_int], reference=utm_int)
    assert by_ref.crs.to_epsg() == 32630 and by_ref.check()
    with rasterio.open(utm_int) as src:  # the reference itself: its own values, nodata -> NaN
        own = src.read(1).astype(np.float32)
    own[own == -32768] = np.nan
    np.testing.assert_array_equal(by_ref.read_pixels(Window(0, 0, by_ref.width, by_ref.height))[0][1], own)
    assert StackedScene([coarse, fine], reference=0).width == grid["shape"][1]


def test_stats_over_valid_pixels_only(mag, utm_int):
    stack = StackedScene([mag[1], mag[0], utm_int], resampling="bilinear")
    st = stats_lib.compute_stats([stack], block_rows=50)
    image, valid = stack.read_all()
    x = image[valid].astype(np.float64)
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(st.std, x.std(0), rtol=1e-9)
    assert st.count.tolist() == [valid.sum()] * 3 and np.isfinite(st.mean).all()


def test_random_windows_respect_min_valid_fraction(mag, utm_int):
    stack = StackedScene([mag[1], mag[0], utm_int])
    sampler = RandomWindowSampler([stack], 32, min_valid_fraction=0.8)
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(40):
        _, win = sampler.sample(rng)
        assert stack.read_pixels(win)[1].mean() >= 0.8
        corners.add((win.row_off, win.col_off))
    assert len(corners) > 20
    ds = pipeline.random_window_dataset([stack], size=32, num_windows=8, seed=1, min_valid_fraction=0.8)
    batch = next(pipeline.make_iterator(ds, batch_size=8, num_epochs=1))
    assert batch["pixels"].shape == (8, 3, 32, 32) and batch["pixels"].dtype == np.float32
    assert (batch["valid"].mean((1, 2)) >= 0.8).all()
    np.testing.assert_array_equal(~batch["valid"], np.isnan(batch["pixels"]).any(1))
    # A coarse overview (larger scenes) is an estimate but close to the exact fraction.
    exact = stack.validity_overview()[0].mean()
    assert abs(stack.validity_overview(max_size=64)[0].mean() - exact) < 0.05


def test_make_image_input_stacks_paths(mag, utm_int, tmp_path, monkeypatch):
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "cache"))
    cfg = ml_collections.ConfigDict(dict(
        paths=(mag[1], mag[0], utm_int), stack=True, resampling=("bilinear", "bilinear", "nearest"),
        window=32, num_windows=8, min_valid_fraction=0.6, normalize=True, eval_stride=32))
    it, info = pipeline.make_image_input(cfg, split="train", batch_size=4)
    assert info["source_channels"] == [(0,), (1,), (2,)] and info["num_channels"] == 3
    assert len(info["scenes"]) == 1 and isinstance(info["scenes"][0], StackedScene)
    b = next(it)
    assert b["pixels"].shape == (4, 3, 32, 32) and info["dtype"] == np.float32
    image = np.asarray(device.to_model_input(b["pixels"], b["valid"], info["stats"]))
    assert np.isfinite(image).all() and abs(image[b["valid"]].mean()) < 1.5
    # Explicit sources, one multi-band: names <stem>:<band>; the stats cache follows the grid.
    cfg2 = ml_collections.ConfigDict(dict(
        sources=[dict(path=mag[0], resampling="nearest"), dict(path=utm_int, bands=(1,))],
        reference=1, window=8, num_windows=4, min_valid_fraction=0.5, eval_stride=8))
    ev, info2 = pipeline.make_image_input(cfg2, split="eval", batch_size=4)
    assert info2["band_names"] == ["britain_magnetic_tfa_blockmean_0p05deg", "mag_utm_int16:band1"]
    assert info2["scenes"][0].crs.to_epsg() == 32630 and len(list(ev)) > 0
    assert not np.allclose(info2["stats"].mean[:1], info["stats"].mean[1:2])


def test_source_without_crs_is_named(mag, tmp_path):
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", count=1, height=8, width=8, dtype="float32",
                       transform=Affine(1, 0, 0, 0, -1, 8)) as dst:
        dst.write(np.ones((1, 8, 8), np.float32))
    with pytest.raises(RasterError, match="nocrs.tif has no CRS"):
        StackedScene([mag[0], str(path)])


def test_disjoint_source_is_rejected(mag, tmp_path):
    path = tmp_path / "pacific.tif"  # 10 deg square far from Britain
    with rasterio.open(path, "w", driver="GTiff", count=1, height=10, width=10, dtype="float32",
                       crs="EPSG:4326", transform=Affine(1, 0, 150, 0, -1, 10)) as dst:
        dst.write(np.ones((1, 10, 10), np.float32))
    with pytest.raises(RasterError, match="pacific.tif does not overlap the target grid"):
        StackedScene([mag[0], str(path)])
    with pytest.raises(RasterError, match="unknown resampling 'bilinar'"):
        StackedScene([mag[0]], resampling="bilinar")
    with pytest.raises(RasterError, match="collide"):
        StackedScene([mag[0], mag[0]])
