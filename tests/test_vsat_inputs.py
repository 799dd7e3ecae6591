"""Issue 20 "Inputs": the Virtual Satellite time-series readers (eojax.vsat.timeseries).

Small GeoTIFFs / CSVs / EOPatch folders written in tmp_path, plus the real shared data (skipped
without EOJAX_TEST_DATA): the gdalcubes Landsat path/rows and the eo-learn NDVI patch. Every error
test checks that the one-line message names the culprit (file, key or date).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
import rasterio
from affine import Affine

from eojax.data import qa
from eojax.vsat import timeseries as ts_lib

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}$")
GRID = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 5200000.0)
LANDSAT_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")


def write_tif(path, bands: dict, *, dtype, date=None, nodata=None, transform=GRID):
    """bands {description: (H, W) array} -> a GeoTIFF (EPSG:32633) -> str(path)."""
    arr = np.stack([np.asarray(a) for a in bands.values()]).astype(dtype)
    c, h, w = arr.shape
    with rasterio.open(path, "w", driver="GTiff", count=c, height=h, width=w, dtype=dtype, crs="EPSG:32633",
                       transform=transform, nodata=nodata) as dst:
        dst.write(arr)
        for i, name in enumerate(bands):
            dst.set_band_description(i + 1, name)
        if date:
            dst.update_tags(date=date)
    return str(path)


def cfg(**kw):
    """A config.input like configs/vsat.py's, with the new keys' defaults, overridden by kw."""
    base = dict(source="multiband", root="", pathrow="", paths=(), csv="", bands=(), qa_format="eojax_synthetic",
                target_date="", holdout_box=(0.3, 0.3, 0.6, 0.6), synthetic_dir="")
    return ml_collections.ConfigDict({**base, **ts_lib.INPUT_DEFAULTS, **kw})


def clm(h=3, w=4, cloudy=()):
    m = np.zeros((h, w), np.uint8)
    for y, x in cloudy:
        m[y, x] = 1
    return m


@pytest.fixture
def shared():
    root = os.environ.get("EOJAX_TEST_DATA")
    if not root or not os.path.isdir(root):
        pytest.skip("EOJAX_TEST_DATA (the shared real data) is not available")
    return root


# ---------------------------------------------------------------- 1. declared precision

def test_float_raster_needs_declared_decimals(tmp_path):
    ndvi = np.array([[0.1234, -0.5, 0.75, 0.0], [0.9999, -0.0001, 0.3, 0.25], [0.5, 0.6, 0.7, 0.8]], np.float32)
    paths = [write_tif(tmp_path / f"ndvi_2021-0{m}-01.tif", {"NDVI": ndvi + 0.1 * (m - 1), "CLM": clm(cloudy=[(0, 0)])},
                       dtype="float32") for m in (1, 2, 3)]
    base = dict(paths=[str(tmp_path / "ndvi_*.tif")], mask_band="CLM")
    # decimals=0 (the default): an error naming the file, the first offending value and the key to set.
    with pytest.raises(ValueError) as e:
        ts_lib.load_series(cfg(**base))
    msg = str(e.value)
    assert paths[0] in msg and "0.1234" in msg and "config.input.decimals" in msg and "\n" not in msg
    # decimals=4 holds them: the values stay the true floats, rows hold value x 10^4.
    ts = ts_lib.load_series(cfg(decimals=4, **base))
    assert ts.dtype == "float32" and ts.decimals == 4 and ts.scale == pytest.approx(1e-4)
    np.testing.assert_array_equal(ts.values[0, 0], ndvi)
    usable = qa.usable(ts.classes)
    rows = ts.rows(usable)
    assert rows[0].tolist() == [1, 0, 1, -5000]  # t 0, y 0, x 1: -0.5 (x 0 is cloud)
    np.testing.assert_allclose(ts.from_codes(rows[:, 3]), ts.values[:, 0][usable], atol=1e-7)
    assert ts.value_digits() == {"NDVI": 6}  # 5 digits (values up to 9.9999 at 4 decimals) + the sign
    # One value with a 5th decimal: refused at decimals=4, naming that file and value ...
    ndvi5 = ndvi.copy()
    ndvi5[2, 3] = 0.12345
    write_tif(paths[1], {"NDVI": ndvi5, "CLM": clm()}, dtype="float32")
    with pytest.raises(ValueError, match=re.escape(paths[1]) + ".*row 2, column 3.*0.12345.* more than 4 decimals"):
        ts_lib.load_series(cfg(decimals=4, **base))
    # ... and accepted when rounding is declared (rows round, values stay true).
    ts = ts_lib.load_series(cfg(decimals=4, rounding="nearest", **base))
    assert ts.values[1, 0, 2, 3] == np.float32(0.12345)
    assert ts.codes(ts.values[1, 0, 2, 3]) == 1235  # float32(0.12345) = 0.1234500036...
    with pytest.raises(ValueError, match="config.input.decimals=-1"):
        ts_lib.load_series(cfg(decimals=-1, **base))
    with pytest.raises(ValueError, match="config.input.rounding='floor'"):
        ts_lib.load_series(cfg(decimals=4, rounding="floor", **base))


def test_precision_rule_is_float32_exact_at_the_declared_decimals():
    assert ts_lib.precision_problem(np.float32([0.1, 0.25, -3.7, np.nan]), 2) is None
    assert ts_lib.precision_problem(np.float32([7421.0, -12.0]), 0) is None
    i, v, why = ts_lib.precision_problem(np.float32([0.5, 0.15]), 1)
    assert i == 1 and v == pytest.approx(0.15) and "more than 1 decimals" in why
    assert "not an integer" in ts_lib.precision_problem(np.float32([2.5]), 0)[2]
    assert ts_lib.precision_problem(np.float32([2.5]), 0, "nearest") is None
    # Codes float64 cannot hold exactly are refused even with rounding declared.
    assert "too large" in ts_lib.precision_problem(np.array([1e12]), 6, "nearest")[2]
    ts = ts_lib.TimeSeries(np.full((2, 1, 1, 1), 0.5, np.float32), np.zeros((2, 1, 1), np.uint8),
                           ("2020-01-01", "2020-01-02"), ("B",))
    with pytest.raises(ValueError, match="0.5 is not an integer"):  # built directly: still never silent
        ts.rows(np.ones((2, 1, 1), bool))


# ---------------------------------------------------------------- 2. negative values, writing

def test_negative_values_are_read_and_written(tmp_path):
    b = np.array([[-1200, -1, 0, 350], [-9999, 7, -32000, 32000]], np.int16)
    paths = [write_tif(tmp_path / f"s_{d}.tif", {"SAR": b + i, "QA": np.full(b.shape, 8)}, dtype="int16",
                       nodata=-9999, date=d) for i, d in enumerate(["2020-05-01", "2020-06-01"])]
    ts = ts_lib.load_series(cfg(paths=paths))
    assert ts.dtype == "int16" and ts.nodata == -9999
    assert ts.values[0, 0, 0, 0] == -1200 and ts.values[0, 0, 1, 2] == -32000 and np.isnan(ts.values[0, 0, 1, 0])
    assert ts.classes[0, 1, 0] == qa.FILL and ts.classes[0, 0, 0] == qa.CLEAR
    rows = ts.rows(qa.usable(ts.classes))
    assert rows[0].tolist() == [0, 0, ts.doy[0], -1200]
    assert ts.value_digits() == {"SAR": 6}
    out = ts_lib.write_date(ts, ts.values[0], str(tmp_path / "out" / "int.tif"))
    with rasterio.open(out) as src:
        assert src.dtypes[0] == "int16" and src.nodata == -9999
        np.testing.assert_array_equal(src.read(1), b)
    # Floats (negative ones too) are written as they are; NaN becomes a NaN nodata (0 is a real NDVI).
    f = ts_lib.TimeSeries(np.array([[[[-0.25, 0.5], [np.nan, 0.0]]]] * 2, np.float32),
                          np.zeros((2, 2, 2), np.uint8), ("2020-01-01", "2021-01-01"), ("NDVI",), rasterio.CRS.from_epsg(32633),
                          GRID, "float32", None, decimals=2)
    out = ts_lib.write_date(f, f.values[0], str(tmp_path / "float.tif"))
    with rasterio.open(out) as src:
        got = src.read(1)
        assert src.dtypes[0] == "float32" and np.isnan(src.nodata)
    np.testing.assert_array_equal(got[0], [-0.25, 0.5])
    assert np.isnan(got[1, 0]) and got[1, 1] == 0.0
    np.testing.assert_array_equal(f.days, [0.0, 366.0])


# ---------------------------------------------------------------- 3. dates with years

def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


def test_csv_dates_with_years(tmp_path):
    # DATE column: DOY 10 of 2020 and of 2021 are two dates.
    p = _write_csv(tmp_path / "date.csv", ["B01", "B02", "X", "Y", "DATE"],
                   [[100, -5, 0, 0, "2020-01-10"], [101, -6, 1, 0, "2020-01-10"], [102, 7, 0, 0, "2021-01-10"],
                    [103, 8, 1, 0, "2021-03-01"]])
    ts = ts_lib.load_series(cfg(source="csv", csv=p))
    assert ts.dates == ("2020-01-10", "2021-01-10", "2021-03-01")
    np.testing.assert_array_equal(ts.days, [0, 366, 416])
    np.testing.assert_array_equal(ts.doy, [10, 10, 60])
    assert ts.values[0, 1, 0, 1] == -6 and ts.dtype == "int16"
    # YEAR + DOY columns.
    p = _write_csv(tmp_path / "year.csv", ["B01", "X", "Y", "YEAR", "DOY"], [[1, 0, 0, 2019, 365], [2, 0, 0, 2020, 366]])
    assert ts_lib.load_series(cfg(source="csv", csv=p)).dates == ("2019-12-31", "2020-12-31")
    # DOY alone: the declared year (documented: one year only).
    p = _write_csv(tmp_path / "doy.csv", ["B01", "X", "Y", "DOY"], [[1, 0, 0, 5], [2, 0, 0, 40]])
    assert ts_lib.load_series(cfg(source="csv", csv=p, year=2018)).dates == ("2018-01-05", "2018-02-09")
    # Errors name the file and the line.
    p = _write_csv(tmp_path / "bad_doy.csv", ["B01", "X", "Y", "YEAR", "DOY"], [[1, 0, 0, 2019, 3], [1, 0, 0, 2019, 366]])
    with pytest.raises(ValueError, match=re.escape(p) + ", line 3: DOY 366 is not a day of 2019"):
        ts_lib.load_series(cfg(source="csv", csv=p))
    p = _write_csv(tmp_path / "mismatch.csv", ["B01", "X", "Y", "DATE", "DOY"], [[1, 0, 0, "2020-02-01", 31]])
    with pytest.raises(ValueError, match=re.escape(p) + ", line 2: DOY 31 is not the day of year"):
        ts_lib.from_csv(p)
    p = _write_csv(tmp_path / "twice.csv", ["B01", "X", "Y", "DATE"], [[1, 0, 0, "2020-01-01"], [2, 0, 0, "2020-01-01"]])
    with pytest.raises(ValueError, match=re.escape(p) + ": lines 2 and 3 are both X 0, Y 0 on 2020-01-01"):
        ts_lib.from_csv(p)
    # Float reflectances in a CSV: declared decimals, or an error naming the file, line and column.
    p = _write_csv(tmp_path / "float.csv", ["B01", "X", "Y", "DATE"], [[0.125, 0, 0, "2020-01-01"], [0.5, 0, 0, "2020-02-01"]])
    with pytest.raises(ValueError, match=re.escape(p) + ", line 2 column B01: the value 0.125 is not an integer"):
        ts_lib.load_series(cfg(source="csv", csv=p))
    ts = ts_lib.load_series(cfg(source="csv", csv=str(tmp_path / "fl*.csv"), decimals=3))
    assert ts.dtype == "float32" and ts.rows(np.ones((2, 1, 1), bool))[:, 3].tolist() == [125, 500]


# ---------------------------------------------------------------- 4. cloud masks

def test_binary_mask_band_polarity_and_errors(tmp_path):
    b = np.arange(12, dtype=np.uint16).reshape(3, 4) + 100
    paths = [write_tif(tmp_path / f"x_2020-0{m}-01.tif", {"B1": b, "B2": b + 1, "CLM": clm(cloudy=[(1, 1), (2, 3)])},
                       dtype="uint16", nodata=0) for m in (1, 2)]
    ts = ts_lib.load_series(cfg(paths=paths, mask_band="CLM", mask_format="binary"))
    assert ts.band_names == ("B1", "B2")  # the mask band is not a band of the series
    assert ts.classes[0, 1, 1] == qa.CLOUD and ts.classes[0, 2, 3] == qa.CLOUD and ts.classes[0, 0, 0] == qa.CLEAR
    assert (ts.classes == qa.CLOUD).sum() == 4  # 0 stays clear although 0 is the bands' nodata
    # mask_format '' with a named band is binary too; mask_cloud_value=0: 0 = cloud (a 1 = valid mask).
    inv = ts_lib.load_series(cfg(paths=paths, mask_band="CLM", mask_cloud_value=0))
    np.testing.assert_array_equal(inv.classes == qa.CLOUD, ts.classes == qa.CLEAR)
    # A band missing from a file: the file and its bands.
    with pytest.raises(Exception, match=re.escape(paths[0]) + r": no mask band 'SCL'.*\['B1', 'B2', 'CLM'\]"):
        ts_lib.load_series(cfg(paths=paths, mask_band="SCL"))
    # A non-binary band given as binary (a probability, a QA band): the file and the values.
    write_tif(paths[1], {"B1": b, "B2": b, "CLM": np.full((3, 4), 37)}, dtype="uint16")
    with pytest.raises(ValueError, match=re.escape(paths[1]) + r": a binary mask holds only 0 / 1.*\[37\]"):
        ts_lib.load_series(cfg(paths=paths, mask_band="CLM"))


def test_mask_files_matched_by_date(tmp_path):
    b = np.full((3, 4), 500, np.uint16)
    dates = ["2020-03-01", "2020-04-01", "2020-05-01"]
    data = [write_tif(tmp_path / f"scene_{d}.tif", {"B1": b, "B2": b}, dtype="uint16") for d in dates]
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, d in enumerate(dates):  # YYYYMMDD names, one cloudy pixel at (0, i)
        write_tif(masks / f"cloud_{d.replace('-', '')}.tif", {"m": clm(cloudy=[(0, i)])}, dtype="uint8")
    ts = ts_lib.load_series(cfg(paths=[str(tmp_path / "scene_*.tif")], mask_paths=str(masks / "cloud_*.tif")))
    assert ts.dates == tuple(dates)
    for i in range(3):
        assert list(zip(*np.nonzero(ts.classes[i] == qa.CLOUD))) == [(0, i)]
    assert sum(f.startswith(str(masks)) for f in ts.files) == 3
    # A date without a mask file: the date and its file.
    os.remove(masks / "cloud_20200401.tif")
    with pytest.raises(ValueError, match="no mask file for the date 2020-04-01 .*" + re.escape(data[1])):
        ts_lib.load_series(cfg(paths=data, mask_paths=[str(masks / "*.tif")]))
    # Two mask files of one date: both named.
    write_tif(masks / "cloud_2020-04-01.tif", {"m": clm()}, dtype="uint8")
    write_tif(masks / "other_20200401.tif", {"m": clm()}, dtype="uint8")
    with pytest.raises(ValueError, match=r"cloud_2020-04-01.tif and .*other_20200401.tif have the same date 2020-04-01"):
        ts_lib.load_series(cfg(paths=data, mask_paths=[str(masks / "*.tif")]))
    # A mask file of no date of the series.
    os.remove(masks / "other_20200401.tif")
    write_tif(masks / "cloud_20200601.tif", {"m": clm()}, dtype="uint8")
    with pytest.raises(ValueError, match=r"mask file .*cloud_20200601.tif has date 2020-06-01, which is not a date"):
        ts_lib.load_series(cfg(paths=data, mask_paths=[str(masks / "*.tif")]))
    with pytest.raises(FileNotFoundError, match=r"config.input.mask_paths: the pattern '.*nomask_\*.tif' matches no file"):
        ts_lib.load_series(cfg(paths=data, mask_paths=[str(masks / "nomask_*.tif")]))


# ---------------------------------------------------------------- 5-7. globs, duplicate dates, bad input

def test_globs_duplicates_and_bad_input(tmp_path):
    b = np.full((3, 4), 500, np.uint16)
    qa8 = np.full((3, 4), 8)  # eojax_synthetic: bit 3 = clear
    qa_cloud = qa8 | 2
    for d in ("2020-01-01", "2020-02-01", "2020-03-01"):
        write_tif(tmp_path / f"t_{d}.tif", {"B1": b, "QA": qa8}, dtype="uint16", date=d)
    ts = ts_lib.load_series(cfg(paths=[str(tmp_path / "t_2020-0[12]*.tif"), str(tmp_path / "t_2020-03*.tif")]))
    assert ts.dates == ("2020-01-01", "2020-02-01", "2020-03-01") and all(ISO.match(d) for d in ts.dates)
    with pytest.raises(FileNotFoundError, match=r"config.input.paths: the pattern '.*u_\*.tif' matches no file"):
        ts_lib.load_series(cfg(paths=[str(tmp_path / "u_*.tif")]))
    # The same date twice (the date tag wins over the name): both files named; 'mosaic' merges them.
    dup = write_tif(tmp_path / "t_copy.tif", {"B1": b + 7, "QA": qa_cloud}, dtype="uint16", date="2020-02-01")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "t_2020-02-01.tif")) + " and " + re.escape(dup)
                       + " have the same date 2020-02-01"):
        ts_lib.load_series(cfg(paths=[str(tmp_path / "t_*.tif")]))
    write_tif(tmp_path / "t_2020-02-01.tif", {"B1": b, "QA": np.where(np.arange(4) < 2, qa_cloud, qa8)},
              dtype="uint16", date="2020-02-01")
    write_tif(dup, {"B1": b + 7, "QA": np.where(np.arange(4) == 0, qa_cloud, qa8)}, dtype="uint16",
              date="2020-02-01")
    m = ts_lib.load_series(cfg(paths=[str(tmp_path / "t_*.tif")], same_day="mosaic"))
    assert m.dates == ("2020-01-01", "2020-02-01", "2020-03-01")
    # columns 0: both cloudy -> the first (cloud); 1: the copy is clear; 2, 3: the first is clear
    assert m.classes[1, 0].tolist() == [qa.CLOUD, qa.CLEAR, qa.CLEAR, qa.CLEAR]
    assert m.values[1, 0, 0].tolist() == [500, 507, 500, 500]
    os.remove(dup)
    # One date; a target date not in the series; a bad source.
    with pytest.raises(ValueError, match=r"the series has 1 date \['2020-01-01'\].*t_2020-01-01.tif.*needs at least 2 dates"):
        ts_lib.load_series(cfg(paths=[str(tmp_path / "t_2020-01*.tif")]))
    with pytest.raises(ValueError, match=r"config.input.target_date='2020-02-02' is not a date of the series.*2020-02-01"):
        ts_lib.load_series(cfg(paths=[str(tmp_path / "t_*.tif")], target_date="2020-02-02"))
    with pytest.raises(ValueError, match="config.input.source='sentinel'"):
        ts_lib.load_series(cfg(source="sentinel"))
    with pytest.raises(ValueError, match="config.input.same_day='last'"):
        ts_lib.load_series(cfg(paths=[str(tmp_path / "t_*.tif")], same_day="last"))


def _landsat(root, pr, date, value, qa_value=0):
    names = {}
    for band in (*LANDSAT_BANDS, "BQA"):
        names[band] = write_tif(root / f"LC08_L1TP_{pr}_{date}_20200101_01_T1_{band}.TIF",
                                {band: np.full((3, 4), qa_value if band == "BQA" else value)}, dtype="uint16")
    return names


def test_landsat_globs_duplicates_and_mask_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _landsat(tmp_path / "a", "013032", "20180131", 100)
    _landsat(tmp_path / "a", "013032", "20180304", 200, qa_value=16)  # bit 4: cloud
    ts = ts_lib.load_series(cfg(source="landsat", root=str(tmp_path), pathrow="013032", bands=LANDSAT_BANDS,
                                qa_format="landsat_c1"))
    assert ts.dates == ("2018-01-31", "2018-03-04") and (ts.classes[1] == qa.CLOUD).all()
    # paths with wildcards instead of a root
    g = ts_lib.load_series(cfg(source="landsat", paths=[str(tmp_path / "a" / "LC08*0131*.TIF"),
                                                        str(tmp_path / "a" / "LC08*0304*.TIF")],
                               pathrow="", bands=LANDSAT_BANDS, qa_format="landsat_c1"))
    assert g.dates == ts.dates
    # binary mask files instead of BQA (1 = cloud)
    for d in ("2018-01-31", "2018-03-04"):
        write_tif(tmp_path / f"mask_{d}.tif", {"m": clm(cloudy=[(2, 2)])}, dtype="uint8")
    mk = ts_lib.load_series(cfg(source="landsat", root=str(tmp_path / "a"), pathrow="013032", bands=LANDSAT_BANDS,
                                qa_format="landsat_c1", mask_paths=[str(tmp_path / "mask_*.tif")]))
    assert (mk.classes == qa.CLOUD).sum() == 2 and mk.classes[1, 2, 2] == qa.CLOUD
    # A second copy of one scene under root: both files named.
    first = str(tmp_path / "a" / "LC08_L1TP_013032_20180131_20200101_01_T1_B1.TIF")
    shutil.copy(first, tmp_path / "b")
    with pytest.raises(ValueError, match=r"_B1.TIF and .*_B1.TIF are both band B1 of path/row 013032 on 20180131"):
        ts_lib.load_series(cfg(source="landsat", root=str(tmp_path), pathrow="013032", bands=LANDSAT_BANDS,
                               qa_format="landsat_c1"))
    # from_band_files given two scenes of one date: both named.
    s = ts_lib.landsat_scenes(str(tmp_path / "a"), "013032", LANDSAT_BANDS)
    with pytest.raises(ValueError, match=re.escape(first) + " and .*_B1.TIF have the same date 2018-01-31"):
        ts_lib.from_band_files([s[0], {**s[1], "date": "2018-01-31"}], qa_format="landsat_c1")


# ---------------------------------------------------------------- 8. eo-learn EOPatch

def _eopatch(folder, ndvi, clm_, is_data=None, stamps=(), gz=False):
    for sub in ("data", "mask"):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    def save(path, a):
        if gz:
            with gzip.open(f"{path}.gz", "wb") as f:
                np.save(f, a)
        else:
            np.save(path, a)
    save(folder / "data" / "S1.npy", ndvi)
    save(folder / "mask" / "CLM.npy", clm_)
    if is_data is not None:
        save(folder / "mask" / "IS_DATA.npy", is_data)
    (folder / "timestamps.json").write_text(json.dumps(list(stamps)))
    return str(folder)


def test_eopatch_small_gz_without_bbox(tmp_path):
    v = np.arange(2 * 3 * 4 * 2, dtype=np.int16).reshape(2, 3, 4, 2) - 10
    c = np.zeros((2, 3, 4, 1), np.uint8)
    c[1, 0, 0] = 1
    d = np.ones((2, 3, 4, 1), bool)
    d[0, 2, 3] = False
    folder = _eopatch(tmp_path / "patch", v, c, d, ["2019-12-30T10:00:00", "2020-01-04T10:00:00"], gz=True)
    ts = ts_lib.load_series(cfg(source="eopatch", root=str(tmp_path / "pat*")))
    assert ts.band_names == ("S1_1", "S1_2") and ts.dtype == "int16" and ts.crs is None
    assert ts.dates == ("2019-12-30", "2020-01-04") and ts.days.tolist() == [0.0, 5.0]
    np.testing.assert_array_equal(ts.values[0, :, 0, 0], [-10, -9])  # negatives kept
    assert ts.classes[1, 0, 0] == qa.CLOUD and ts.classes[0, 2, 3] == qa.FILL and np.isnan(ts.values[0, :, 2, 3]).all()
    named = ts_lib.load_series(cfg(source="eopatch", root=folder, feature="S1", bands=("VV", "VH")))
    assert named.band_names == ("VV", "VH")
    with pytest.raises(ValueError, match=re.escape(folder) + r": no mask feature 'SCL' \(config.input.mask_band\).*\['CLM', 'IS_DATA'\]"):
        ts_lib.load_series(cfg(source="eopatch", root=folder, mask_band="SCL"))
    with pytest.raises(ValueError, match=r"S1.npy.gz has 2 channels, config.input.bands names 1"):
        ts_lib.load_series(cfg(source="eopatch", root=folder, bands=("VV",)))
    # Pickled arrays are not loaded (allow_pickle=False): an error naming the file.
    with gzip.open(tmp_path / "patch" / "mask" / "CLM.npy.gz", "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"CLM.npy.gz is not a readable numpy array.*pickled arrays are not loaded"):
        ts_lib.load_series(cfg(source="eopatch", root=folder))


def test_eopatch_real_ndvi(shared):
    folder = os.path.join(shared, "eolearn", "TestEOPatch")
    base = dict(source="eopatch", root=folder)
    with pytest.raises(ValueError, match=re.escape(folder) + r": set config.input.feature to one of its data features \['CLP', 'NDVI'\]"):
        ts_lib.load_series(cfg(**base))
    ndvi_file = os.path.join(folder, "data", "NDVI.npy")
    with pytest.raises(ValueError, match=re.escape(ndvi_file) + r" \(date 0 = 2015-07-11T10:00:08.*0.760057926 is not an integer"):
        ts_lib.load_series(cfg(feature="NDVI", **base))
    with pytest.raises(ValueError, match=r"timestamp 2015-12-08T10:04:09 and .*timestamp 2015-12-08T10:11:25 have the same "
                                         r"date 2015-12-08.*same_day='mosaic'"):
        ts_lib.load_series(cfg(feature="NDVI", decimals=4, rounding="nearest", **base))
    ts = ts_lib.load_series(cfg(feature="NDVI", decimals=4, rounding="nearest", same_day="mosaic",
                                target_date="2016-07-25", **base))
    ndvi = np.load(ndvi_file, allow_pickle=False)
    cloud = np.load(os.path.join(folder, "mask", "CLM.npy"), allow_pickle=False)
    stamps = json.load(open(os.path.join(folder, "timestamps.json")))
    assert len(ts.dates) == 67 and ts.dates[0] == "2015-07-11" and ts.dates[-1] == "2017-12-22"
    assert all(ISO.match(d) for d in ts.dates) and ts.days[-1] == 895
    assert ts.band_names == ("NDVI",) and ts.values.shape == (67, 1, 101, 100) and ts.dtype == "float32"
    np.testing.assert_array_equal(ts.values[0, 0], ndvi[0, ..., 0])  # true floats, not rounded
    t = ts.date_index("2016-07-25")
    k = [i for i, s in enumerate(stamps) if s.startswith("2016-07-25")][0]
    np.testing.assert_array_equal(ts.values[t, 0], ndvi[k, ..., 0])
    np.testing.assert_array_equal(ts.classes[t] == qa.CLOUD, cloud[k, ..., 0] == 1)
    assert ts.crs.to_epsg() == 32633
    np.testing.assert_allclose(rasterio.transform.array_bounds(101, 100, ts.transform),
                               [465181.05, 5079244.89, 466180.53, 5080254.63], atol=0.01)
    with pytest.raises(ValueError, match=r"config.input.target_date='2016-07-28' is not a date of the series \(its 67 "
                                         r"dates run from 2015-07-11 to 2017-12-22; the nearest are 2016-07-25 and 2016-08-04\)"):
        ts_lib.load_series(cfg(feature="NDVI", decimals=4, rounding="nearest", same_day="mosaic",
                               target_date="2016-07-28", **base))
    codes = ts.rows(qa.usable(ts.classes))[:, 3]
    assert codes.min() >= -1511 and codes.max() <= 8603 and ts.value_digits() == {"NDVI": 6}


# ---------------------------------------------------------------- real Landsat path/rows, keys

@pytest.mark.parametrize("pathrow,n_dates", [("013032", 8), ("014031", 5), ("014032", 6)])
def test_real_landsat_path_rows_load(shared, pathrow, n_dates):
    root = os.path.join(shared, "gdalcubes_L8NY18")
    scenes = ts_lib.landsat_scenes(root, pathrow, LANDSAT_BANDS)
    assert len(scenes) == n_dates
    ts = ts_lib.load_series(cfg(source="landsat", root=root, pathrow=pathrow, bands=LANDSAT_BANDS,
                                qa_format="landsat_c1"))
    assert len(ts.dates) == n_dates and all(ISO.match(d) and d.startswith("2018") for d in ts.dates)
    assert ts.dtype == "uint16" and ts.band_names == LANDSAT_BANDS and ts.crs.to_epsg() == 32618
    assert (ts.classes == qa.CLEAR).any() and (ts.classes == qa.CLOUD).any()
    assert ts.rows(qa.usable(ts.classes)).dtype == np.int64


def test_input_keys_extend_the_old_ones_and_old_configs_still_load(shared):
    old_keys = {"source", "root", "pathrow", "paths", "csv", "bands", "qa_format", "target_date", "holdout_box",
                "synthetic_dir"}  # eojax.vsat.task._INPUT_KEYS before issue 20
    assert old_keys <= ts_lib.INPUT_KEYS and set(ts_lib.INPUT_DEFAULTS) <= ts_lib.INPUT_KEYS
    old = ml_collections.ConfigDict(dict(source="landsat", root="", pathrow="014031", paths=(), csv="",
                                         bands=LANDSAT_BANDS, qa_format="landsat_c1", target_date="2018-04-28",
                                         holdout_box=(0.3, 0.3, 0.6, 0.6), synthetic_dir=""))
    ts = ts_lib.load_series(old)  # no new keys: their defaults; root '' = $EOJAX_TEST_DATA/gdalcubes_L8NY18
    assert len(ts.dates) == 5 and ts.decimals == 0
