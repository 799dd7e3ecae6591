"""Synthetic scenes: deterministic, well-formed GeoTIFFs with plausible spectra."""
import os
import threading

import numpy as np
import pytest
import rasterio

from eojax.data import synthetic
from eojax.data.synthetic import FOREST, GRASS, CROP, QA_CLEAR, QA_CLOUD, QA_FILL, WATER


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    path = synthetic.write_scene(d / "s.tif", seed=7, height=192, width=160, cloud_fraction=0.2,
                                 labels_path=d / "labels.tif")
    with rasterio.open(path) as src, rasterio.open(d / "labels.tif") as lab:
        return dict(path=path, data=src.read(), profile=src.profile, desc=src.descriptions,
                    tags=src.tags(), labels=lab.read(1), band_tags=src.tags(1))


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    kw = dict(height=64, width=80, cloud_fraction=0.3)
    a = synthetic.write_scene(tmp_path / "a.tif", seed=3, **kw)
    b = synthetic.write_scene(tmp_path / "b.tif", seed=3, **kw)
    c = synthetic.write_scene(tmp_path / "c.tif", seed=4, **kw)
    read = lambda p: open(p, "rb").read()
    assert read(a) == read(b)
    assert read(a) != read(c)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # temp files renamed


def test_layout_bands_crs_transform_nodata(scene):
    p = scene["profile"]
    s2 = synthetic.SENSORS["sentinel2"]
    assert scene["desc"] == tuple(s2.bands) + ("QA",)
    assert p["count"] == 11 and p["dtype"] == "uint16" and p["nodata"] == 0
    assert p["crs"].to_epsg() == 32633 and (p["height"], p["width"]) == (192, 160)
    assert tuple(p["transform"])[:6] == (10.0, 0.0, 500000.0, 0.0, -10.0, 5200000.0)
    assert scene["tags"]["date"] == "2021-06-15" and scene["tags"]["sensor"] == "sentinel2"
    assert float(scene["band_tags"]["wavelength_nm"]) == s2.wavelengths_nm[0]
    qa = scene["data"][-1]
    fill = (qa & QA_FILL) > 0
    assert 0.02 < fill.mean() < 0.3  # a nodata swath edge exists ...
    assert (scene["data"][:-1, fill] == 0).all() and (scene["data"][:-1, ~fill] > 0).all()
    assert (scene["labels"][fill] == 0).all() and (scene["labels"][~fill] > 0).all()
    assert (qa[~fill] != 0).all()  # QA never collides with nodata 0 on data pixels
    # ... along one side: fill touches the left or the right edge on every row.
    assert fill[:, 0].all() or fill[:, -1].all()


def test_landsat8_sensor(tmp_path):
    p = synthetic.write_scene(tmp_path / "l8.tif", seed=1, height=48, width=48, sensor="landsat8",
                              crs="EPSG:32618")
    with rasterio.open(p) as src:
        assert src.descriptions == ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "QA")
        assert src.res == (30.0, 30.0) and src.crs.to_epsg() == 32618


def test_cloud_fraction_roughly_as_requested(tmp_path):
    for frac in (0.0, 0.1, 0.4):
        p = synthetic.write_scene(tmp_path / f"c{frac}.tif", seed=5, height=96, width=96,
                                  cloud_fraction=frac)
        with rasterio.open(p) as src:
            qa = src.read(src.count)
        data = (qa & QA_FILL) == 0
        got = ((qa & QA_CLOUD) > 0)[data].mean()
        assert abs(got - frac) < 0.03, (frac, got)


def _mean_clear(scene, cls):
    qa, lab = scene["data"][-1], scene["labels"]
    m = (qa == QA_CLEAR) & (lab == cls)
    assert m.sum() > 20, f"class {cls} too rare for the check"
    return scene["data"][:-1, m].astype(float).mean(axis=1)


def test_spectra_are_plausible(scene):
    bands = list(synthetic.SENSORS["sentinel2"].bands)
    red, green, nir, swir = (bands.index(b) for b in ("B4", "B3", "B8", "B11"))
    for cls in (FOREST, GRASS, CROP):
        v = _mean_clear(scene, cls)
        assert v[nir] > 2 * v[red] and (v[nir] - v[red]) / (v[nir] + v[red]) > 0.4  # NDVI
    w = _mean_clear(scene, WATER)
    assert w[nir] < w[green] and w[swir] < w[green] and w.max() < 1500
    cloud = (scene["data"][-1] & QA_CLOUD) > 0
    assert scene["data"][green, cloud].mean() > 2 * _mean_clear(scene, FOREST)[green]


def test_time_series_seasonal_cycle(tmp_path):
    paths = synthetic.write_time_series(tmp_path, seed=2, n_dates=4, height=64, width=64,
                                        cloud_fraction=0.2)
    assert len(paths) == 4 and all(os.path.exists(p) for p in paths)
    labels = rasterio.open(tmp_path / "labels.tif").read(1)
    ndvi, clouds = [], []
    bands = list(synthetic.SENSORS["sentinel2"].bands)
    for p in paths:
        with rasterio.open(p) as src:
            assert src.transform == rasterio.open(paths[0]).transform
            d = src.read().astype(float)
        clear = (d[-1] == QA_CLEAR) & np.isin(labels, (GRASS, CROP))
        red, nir = d[bands.index("B4")], d[bands.index("B8")]
        ndvi.append(((nir[clear] - red[clear]) / (nir[clear] + red[clear])).mean())
        clouds.append(d[-1] == QA_CLOUD)
    dates = [os.path.basename(p)[3:13] for p in paths]
    assert dates[0] == "2021-01-15"
    summer = [i for i, d in enumerate(dates) if d[5:7] in ("06", "07", "08")]
    winter = [i for i, d in enumerate(dates) if d[5:7] in ("12", "01", "02")]
    assert min(ndvi[i] for i in summer) > max(ndvi[i] for i in winter) + 0.15
    assert not all(np.array_equal(clouds[0], c) for c in clouds[1:])  # clouds move between dates


def test_default_dataset_idempotent_and_race_safe(tmp_path):
    t = []
    threads = [threading.Thread(target=lambda: t.append(synthetic.default_dataset(tmp_path)))
               for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t[0] == t[1] and len(t[0]) == 3
    mtimes = [os.stat(p).st_mtime_ns for p in t[0]]
    assert synthetic.default_dataset(tmp_path) == t[0]
    assert [os.stat(p).st_mtime_ns for p in t[0]] == mtimes  # not rewritten
    shapes, crss = set(), set()
    for p in t[0]:
        with rasterio.open(p) as src:
            shapes.add(src.shape)
            crss.add(src.crs.to_epsg())
    assert len(shapes) == 3 and crss == {32633, 32618, 32755}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
