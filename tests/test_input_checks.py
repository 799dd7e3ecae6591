"""Bad pixel values and damaged files are refused before training, in one line naming the file and band.

Small GeoTIFFs written with rasterio in tmp_path: +inf / -inf pixels, a NaN-only band, float32-max
fill values, a truncated tiled file that still opens, an all-nodata file; plus the statistics cache
(nothing non-finite is written, a cached non-finite file is recomputed) and the MAE set-up.
"""
import json
import logging
import os

import jax
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from eojax import train
from eojax.data import pipeline, stats as stats_lib
from eojax.data.raster import RasterError, Scene
from eojax.data.stack import StackedScene
from helpers import cli, load_config

F32_MAX = float(np.finfo(np.float32).max)


def _write(path, array, nodata=None, names=None, tiled=False):
    """(C, H, W) array -> GeoTIFF (band descriptions `names`; tiled 32 x 32 and compressed if asked)."""
    c, h, w = array.shape
    extra = dict(tiled=True, blockxsize=32, blockysize=32, compress="deflate") if tiled else {}
    with rasterio.open(path, "w", driver="GTiff", count=c, height=h, width=w, dtype=array.dtype,
                       nodata=nodata, crs="EPSG:32633",
                       transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5200000.0), **extra) as dst:
        dst.write(array)
        for i, n in enumerate(names or []):
            dst.set_band_description(i + 1, n)
    return str(path)


def _float_scene(tmp_path, name, band2=None, shape=(40, 48)):
    """Two float32 bands 'red', 'nir' of smooth values; `band2(array)` edits the second in place."""
    rng = np.random.default_rng(0)
    a = rng.uniform(100, 3000, (2, *shape)).astype(np.float32)
    if band2 is not None:
        band2(a[1])
    return _write(tmp_path / name, a, names=["red", "nir"]), a


def _cache_files(tmp_path):
    """Every statistics cache file under tmp_path (data folder and $EOJAX_CACHE)."""
    return [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
            if f.startswith(".eojax_stats-") or (f.endswith(".json") and "stats" in d)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "home_cache"))


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _truncated(tmp_path, name="cut.tif"):
    """A valid tiled GeoTIFF cut where its last row of 32 x 32 tiles starts: the header (written
    first, as no band description rewrites it at the end) opens, reads of rows 96..127 fail."""
    a = np.random.default_rng(1).integers(1, 1000, (2, 128, 128)).astype(np.uint16)
    path = _write(tmp_path / name, a, tiled=True)
    with rasterio.open(path) as src:
        cut = int(src.get_tag_item("BLOCK_OFFSET_0_3", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        assert int.from_bytes(f.read(8)[4:], "little") < cut  # the first IFD survives
        f.truncate(cut)
    return path


# -- infinities and the plausible range ------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_inf_pixels_name_file_and_band_and_are_not_cached(tmp_path, value):
    def put_inf(b):
        b[7, 9] = b[30, 1] = value
    path, _ = _float_scene(tmp_path, "inf.tif", put_inf)
    with pytest.raises(RasterError) as e:
        stats_lib.load_or_compute_stats([Scene(path)])
    msg = _one_line(e)
    assert "inf.tif" in msg and "band 'nir'" in msg and "inf" in msg.lower() and "rows 0..39" in msg, msg
    assert _cache_files(tmp_path) == []


def test_float32_max_fill_refused_by_the_default_range(tmp_path, monkeypatch):
    def fill(b):
        b[:4, :] = F32_MAX  # a fill value left unmarked: the band's std becomes ~1e37
    path, a = _float_scene(tmp_path, "fill.tif", fill)
    with pytest.raises(RasterError) as e:
        stats_lib.load_or_compute_stats([Scene(path)])
    msg = _one_line(e)
    assert "fill.tif" in msg and "band 'nir'" in msg and "3.402823e+38" in msg and "valid_range" in msg, msg
    expected_std = a[1].astype(np.float64).std()  # independent: numpy over the whole band
    assert expected_std > 1e37 and f"{expected_std:.3g}" in msg, msg
    # An explicit range that admits the values: accepted, and the statistics equal numpy's.
    st, cache = stats_lib.load_or_compute_stats([Scene(path)], valid_range=(None, 1e39))
    np.testing.assert_allclose(st.std, a.astype(np.float64).reshape(2, -1).std(1), rtol=1e-12)
    assert st.max[1] == F32_MAX and st.max_file[1] == path
    # The cached min / max are checked on load: the default range refuses again without re-reading.
    def no_recompute(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(stats_lib, "compute_stats", no_recompute)
    with pytest.raises(RasterError, match=r"fill.tif: band 'nir' holds 3.402823e\+38"):
        stats_lib.load_or_compute_stats([Scene(path)])


def test_valid_range_for_integers_and_explicit_ranges(tmp_path):
    a = np.random.default_rng(2).integers(1, 60000, (2, 16, 16)).astype(np.uint16)
    a[0, 3, 3] = 65535
    path = _write(tmp_path / "ints.tif", a, nodata=0, names=["B1", "B2"])
    st, _ = stats_lib.load_or_compute_stats([Scene(path)])  # integers: the dtype's whole range is plausible
    assert st.max[0] == 65535 and st.min.tolist() == a.reshape(2, -1).min(1).tolist()
    with pytest.raises(RasterError) as e:
        stats_lib.load_or_compute_stats([Scene(path)], valid_range=(1, 10000))
    msg = _one_line(e)
    assert "ints.tif" in msg and "band 'B1'" in msg and "65535" in msg, msg
    for bad in [(5,), 5.0, "1,2", ("a", 3)]:
        with pytest.raises(RasterError, match=r"valid_range must be \(lo, hi\)"):
            stats_lib.load_or_compute_stats([Scene(path)], valid_range=bad)
    with pytest.raises(RasterError, match="lo must be below hi"):
        stats_lib.load_or_compute_stats([Scene(path)], valid_range=(10, 1))


def test_band_files_of_a_template_are_named(tmp_path):
    good = np.full((1, 16, 16), 5.0, np.float32)
    bad = good.copy()
    bad[0, 2, 2] = np.inf
    _write(tmp_path / "t_B2.tif", good)
    _write(tmp_path / "t_B3.tif", bad)
    with pytest.raises(RasterError, match=r"t_B3.tif: band 'B3' holds inf"):
        stats_lib.compute_stats([Scene(str(tmp_path / "t_{band}.tif"), bands=("B2", "B3"))])


# -- NaN / nodata -------------------------------------------------------------------------------------

def test_nan_only_band_names_file_and_band(tmp_path):
    path, _ = _float_scene(tmp_path, "nanband.tif", lambda b: b.fill(np.nan))
    scene = Scene(path)
    with pytest.raises(RasterError) as e:
        scene.check()
    msg = _one_line(e)
    assert "nanband.tif" in msg and "['nir']" in msg and "'red'" not in msg, msg
    cfg = dict(paths=(path,), window=16)
    with pytest.raises(RasterError, match=r"nanband.tif: every pixel is nodata/NaN in band\(s\) \['nir'\]"):
        pipeline.image_input_info(cfg)
    with pytest.raises(RasterError, match="nanband.tif: no valid pixel"):  # the statistics alone
        stats_lib.compute_stats([scene])
    assert _cache_files(tmp_path) == []


def test_all_nodata_file_is_one_line_naming_file(tmp_path):
    path = _write(tmp_path / "empty.tif", np.zeros((2, 16, 16), np.uint16), nodata=0, names=["B1", "B2"])
    with pytest.raises(RasterError) as e:
        pipeline.image_input_info(dict(paths=(path,), window=8))
    msg = _one_line(e)
    assert msg.startswith(path) and "every pixel is nodata" in msg and "['B1', 'B2']" in msg, msg
    # Bands each valid somewhere but never together: no band is named empty.
    a = np.ones((2, 16, 16), np.uint16)
    a[0, :8], a[1, 8:] = 0, 0
    split = _write(tmp_path / "split.tif", a, nodata=0)
    with pytest.raises(RasterError, match="split.tif: every pixel is nodata/NaN in at least one of the bands"):
        Scene(split).check()


def test_cached_nan_statistics_are_ignored_and_recomputed(tmp_path, caplog):
    path, a = _float_scene(tmp_path, "ok.tif")
    st, cache = stats_lib.load_or_compute_stats([Scene(path)])
    d = json.loads(open(cache).read())
    d["mean"][1] = float("nan")  # as an older eojax could leave it
    with open(cache, "w") as f:
        f.write(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="eojax.data.stats"):
        st2, cache2 = stats_lib.load_or_compute_stats([Scene(path)])
    assert cache2 == cache and any("not finite" in r.getMessage() and cache in r.getMessage()
                                   for r in caplog.records)
    np.testing.assert_allclose(st2.mean, a.astype(np.float64).reshape(2, -1).mean(1), rtol=1e-12)
    assert np.isfinite(json.loads(open(cache).read())["mean"]).all()  # rewritten, finite


def test_overflowing_statistics_are_never_cached(tmp_path):
    a = np.full((1, 8, 8), 1e300, np.float64)
    a[0, 0, 0] = -1e300
    path = _write(tmp_path / "huge.tif", a, names=["g"])
    with pytest.raises(RasterError, match=r"huge.tif: band 'g' holds -1e\+300, outside the plausible range"):
        stats_lib.load_or_compute_stats([Scene(path)])
    with pytest.raises(RasterError, match="huge.tif: band 'g' has non-finite statistics"):
        stats_lib.load_or_compute_stats([Scene(path)], valid_range=(None, None))  # squares overflow float64
    assert _cache_files(tmp_path) == []


# -- damaged files ----------------------------------------------------------------------------------

def test_truncated_file_reads_name_file_and_window(tmp_path):
    path = _truncated(tmp_path)
    scene = Scene(path)  # the header still opens
    scene.read_pixels(Window(0, 0, 32, 32))  # the first tiles are intact
    with pytest.raises(RasterError) as e:
        scene.read_pixels(Window(64, 96, 32, 32))
    msg = _one_line(e)
    assert msg.startswith(f"{path}: read failed in window rows 96..127, cols 64..95") and "truncated" in msg, msg
    with pytest.raises(RasterError, match=f"{path}: read failed"):
        scene.check()  # the overview read
    with pytest.raises(RasterError, match=f"{path}: read failed in window rows"):
        stats_lib.compute_stats([scene], block_rows=32)  # the statistics' block reads
    with pytest.raises(RasterError, match=f"{path}: read failed in window"):
        StackedScene([path]).read_pixels(Window(64, 96, 32, 32))  # the stacked reader names its source


def test_mae_setup_refuses_bad_inputs_before_compiling(tmp_path, monkeypatch):
    def put_inf(b):
        b[5, 5] = np.inf
    inf_path, _ = _float_scene(tmp_path, "inf.tif", put_inf, shape=(64, 64))
    cut = _truncated(tmp_path)

    def no_compile(*a, **k):
        raise AssertionError("compiled before the input was checked")
    monkeypatch.setattr(jax, "jit", no_compile)
    monkeypatch.setattr(jax, "eval_shape", no_compile)
    for path, pattern in [(inf_path, "inf.tif: band 'nir' holds inf"), (cut, "cut.tif: read failed")]:
        config = load_config("mae", **{"input.paths": (path,), "input.bands": ()})
        with pytest.raises(RasterError, match=pattern):
            train.setup(config)
        with pytest.raises(RasterError, match=pattern):
            pipeline.make_image_input(config.input, split="train", batch_size=2)
    assert _cache_files(tmp_path) == []


def test_eojax_stats_exits_nonzero_naming_the_file(tmp_path):
    def put_inf(b):
        b[3, 4] = np.inf
    path, _ = _float_scene(tmp_path, "inf.tif", put_inf)
    proc = cli("stats", "mae:runlocal", str(tmp_path / "wd"), f"--config.input.paths=('{path}',)",
               "--config.input.bands=()", check=False, env_extra={"EOJAX_CACHE": str(tmp_path / "home_cache")})
    assert proc.returncode != 0, proc.stdout
    assert "inf.tif: band 'nir' holds inf" in proc.stderr, proc.stderr[-2000:]
    assert "nan" not in proc.stdout.lower()
    assert _cache_files(tmp_path) == []
