"""Every GeoTIFF eojax writes for a user is a valid Cloud Optimized GeoTIFF, lossless, with its nodata,
band descriptions, CRS and transform; `eojax export` refuses a stride that skips ground.

`cog_errors` checks a file against the rules of GDAL's validate_cloud_optimized_geotiff.py (OSGeo/gdal,
swig/python/gdal-utils/osgeo_utils/samples/), reading the TIFF structure itself with struct (GDAL's
Python bindings are not a dependency), plus eojax's own requirements (every level tiled, DEFLATE
with a predictor)."""
import os
import struct
import types
import warnings

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from eojax import config_lib, errors
from eojax.data import cog, synthetic
from eojax.data.raster import Scene

TRANSFORM = Affine(10.0, 0.0, 431000.0, 0.0, -10.0, 5412000.0)

# ------------------------------------------------------------------ the validator

_TAG = dict(subfile=254, width=256, height=257, compression=259, predictor=317, tile_width=322,
            tile_height=323, tile_offsets=324, tile_bytes=325, strip_offsets=273)
_FORMATS = {1: "B", 2: "B", 3: "H", 4: "I", 6: "b", 7: "B", 8: "h", 9: "i", 11: "f", 12: "d", 16: "Q", 17: "q",
            18: "Q"}


def tiff_ifds(data: bytes) -> tuple[bool, list[tuple[int, dict]]]:
    """(BigTIFF?, [(IFD offset, {tag: values})]) of every IFD in the chain, in file order of the chain."""
    order = {b"II": "<", b"MM": ">"}[data[:2]]
    big = struct.unpack(order + "H", data[2:4])[0] == 43
    offset = struct.unpack(order + ("Q" if big else "I"), data[8:16] if big else data[4:8])[0]
    count_fmt, entry, field = ("Q", 20, 8) if big else ("H", 12, 4)
    ifds = []
    while offset:
        (n,) = struct.unpack_from(order + count_fmt, data, offset)
        start = offset + struct.calcsize(count_fmt)
        tags = {}
        for i in range(n):
            tag, typ = struct.unpack_from(order + "HH", data, start + i * entry)
            (count,) = struct.unpack_from(order + ("Q" if big else "I"), data, start + i * entry + 4)
            fmt = _FORMATS.get(typ)
            if fmt is None:  # rationals etc.: not needed
                continue
            size = struct.calcsize(fmt) * count
            where = start + i * entry + (12 if big else 8)
            if size > field:
                (where,) = struct.unpack_from(order + ("Q" if big else "I"), data, where)
            tags[tag] = struct.unpack_from(order + fmt * count, data, where)
        ifds.append((offset, tags))
        (offset,) = struct.unpack_from(order + ("Q" if big else "I"), data, start + n * entry)
    return big, ifds


def cog_errors(path: str) -> list[str]:
    """What makes `path` not a COG, in the words of GDAL's validator (empty: valid)."""
    with open(path, "rb") as f:
        data = f.read()
    big, ifds = tiff_ifds(data)
    errors_ = []
    if os.path.exists(path + ".ovr"):
        errors_.append("Overviews found in external .ovr file. They should be internal")
    levels = [(off, t) for off, t in ifds if not t.get(_TAG["subfile"], (0,))[0] & 4]  # masks aside
    main_off, main = levels[0]
    overviews = levels[1:]
    width, height = main[_TAG["width"]][0], main[_TAG["height"]][0]
    for i, (_, t) in enumerate(levels):
        if _TAG["tile_width"] not in t:
            errors_.append(f"{'main image' if i == 0 else f'overview {i - 1}'} is not tiled")
        if t.get(_TAG["compression"], (1,))[0] not in (8, 32946):
            errors_.append(f"level {i} is not DEFLATE compressed")
        if t.get(_TAG["predictor"], (1,))[0] == 1:
            errors_.append(f"level {i} has no predictor")
    if (width > 512 or height > 512) and not overviews:
        errors_.append("The file is greater than 512xH or Wx512, it is recommended to include internal overviews")

    # The ghost header GDAL's COG driver writes right after the TIFF header, then the main IFD.
    expected = 16 if big else 8
    pattern = b"GDAL_STRUCTURAL_METADATA_SIZE="
    ghost = ""
    if data[expected:expected + len(pattern)] == pattern:
        size = int(data[expected + len(pattern):expected + len(pattern) + 6])
        line = len("GDAL_STRUCTURAL_METADATA_SIZE=000000 bytes\n")
        ghost = data[expected + line:expected + line + size].decode("latin1")
        expected += line + size
        expected += expected % 2
    else:
        errors_.append("no GDAL_STRUCTURAL_METADATA header: not written by GDAL's COG driver")
    if "KNOWN_INCOMPATIBLE_EDITION=YES" in ghost:
        errors_.append("KNOWN_INCOMPATIBLE_EDITION=YES is declared in the file")
    if main_off != expected:
        errors_.append(f"The offset of the main IFD should be {expected}. It is {main_off} instead")

    previous = (width, height, main_off)
    for i, (off, t) in enumerate(overviews):
        w, h = t[_TAG["width"]][0], t[_TAG["height"]][0]
        if w > previous[0] or h > previous[1]:
            errors_.append(f"Overview of index {i} has larger dimension than the level before")
        if off < previous[2]:
            errors_.append(f"The offset of the IFD for overview of index {i} is {off}, before the level before's")
        previous = (w, h, off)

    def offsets(t):
        return t.get(_TAG["tile_offsets"]) or t.get(_TAG["strip_offsets"]) or (0,)

    def first_block(t):
        return next((o for o in offsets(t) if o), 0)

    data_offsets = [first_block(t) for _, t in levels]
    if data_offsets[-1] and data_offsets[-1] < levels[-1][0]:
        errors_.append("The offset of the first block of the smallest level should be after its IFD")
    for i in range(len(data_offsets) - 2, -1, -1):  # the smallest overview's data first, the main image last
        if data_offsets[i] and data_offsets[i] < data_offsets[i + 1]:
            errors_.append(f"The first block of level {i} should be after the one of level {i + 1}")

    # Full check: blocks in row-major order, each with its size before it and its last 4 bytes repeated.
    for i, (_, t) in enumerate(levels):
        blocks = offsets(t)
        sizes = t.get(_TAG["tile_bytes"], ())
        tw, th = t.get(_TAG["tile_width"], (1,))[0], t.get(_TAG["tile_height"], (1,))[0]
        per_band = -(-t[_TAG["width"]][0] // tw) * -(-t[_TAG["height"]][0] // th)
        first_band = [o for o in blocks[:per_band] if o]
        if "BLOCK_ORDER=ROW_MAJOR" in ghost and first_band != sorted(first_band):
            errors_.append(f"level {i}: a block's offset is smaller than the previous block's")
        for o, n in zip(blocks, sizes):
            if not o:
                continue
            if "BLOCK_LEADER=SIZE_AS_UINT4" in ghost and struct.unpack_from("<I", data, o - 4)[0] != n:
                errors_.append(f"level {i}: block at {o}: the size in its leader bytes is not {n}")
            if "BLOCK_TRAILER=LAST_4_BYTES_REPEATED" in ghost and n >= 4 and \
                    data[o + n - 4:o + n] != data[o + n:o + n + 4]:
                errors_.append(f"level {i}: block at {o}: invalid trailer bytes")
    return errors_


def assert_cog(path, *, crs=None, transform=None, nodata=None, descriptions=None, overviews=None):
    """A valid COG with these properties (None: not checked; overviews: whether it must have some)."""
    assert cog_errors(path) == []
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        if crs is not None:
            assert src.crs == rasterio.crs.CRS.from_user_input(crs)
        if transform is not None:
            assert src.transform == transform
        if nodata is not None:
            assert src.nodata == nodata or (np.isnan(nodata) and np.isnan(src.nodata))
        if descriptions is not None:
            assert src.descriptions == tuple(descriptions)
        if overviews is not None:
            assert bool(src.overviews(1)) == overviews
        expected_predictor = "3" if np.dtype(src.dtypes[0]).kind == "f" else "2"
        assert src.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == expected_predictor
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")] == []  # no leftovers


def test_validator_finds_what_makes_a_geotiff_not_a_cog(tmp_path):
    """The validator can fail: a plain GeoTIFF, and a tiled one whose overviews were added afterwards
    (their IFDs and data after the main image's), are refused for the reasons GDAL gives."""
    a = np.random.default_rng(0).integers(0, 200, (1, 600, 530)).astype(np.uint8)
    plain = str(tmp_path / "plain.tif")
    with rasterio.open(plain, "w", driver="GTiff", height=600, width=530, count=1, dtype="uint8",
                       crs="EPSG:32631", transform=TRANSFORM) as dst:
        dst.write(a)
    found = cog_errors(plain)
    assert any("not tiled" in e for e in found) and any("overviews" in e for e in found)
    assert any("GDAL_STRUCTURAL_METADATA" in e for e in found)

    late = str(tmp_path / "late.tif")
    with rasterio.open(late, "w", driver="GTiff", height=600, width=530, count=1, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", predictor=2, crs="EPSG:32631",
                       transform=TRANSFORM) as dst:
        dst.write(a)
    with rasterio.open(late, "r+") as dst:
        dst.build_overviews([2, 4], rasterio.enums.Resampling.nearest)
    found = cog_errors(late)
    assert not any("not tiled" in e for e in found)
    assert any("should be after the one of level 1" in e for e in found)  # main data before the overviews'


# ------------------------------------------------------------------ the writer


@pytest.mark.parametrize("dtype,nodata,categorical", [("uint8", 255, True), ("int16", -9999, False),
                                                      ("uint16", 0, False), ("float32", float("nan"), False)])
def test_write_cog_is_valid_lossless_and_keeps_metadata(tmp_path, dtype, nodata, categorical):
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    a = (rng.integers(max(info.min, -3000), min(info.max, 3000), (2, 600, 530)) if info
         else rng.normal(size=(2, 600, 530))).astype(dtype)
    a[:, :7, :9] = nodata
    path = str(tmp_path / "out" / "x.tif")
    assert cog.write_cog(path, a, crs="EPSG:32631", transform=TRANSFORM, nodata=nodata, descriptions=("b1", "b2"),
                         tags={"source": "test"}, categorical=categorical) == path
    assert_cog(path, crs="EPSG:32631", transform=TRANSFORM, nodata=nodata, descriptions=("b1", "b2"),
               overviews=True)
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.read(), a)  # lossless, NaN where NaN
        assert src.tags()["source"] == "test" and src.block_shapes[0] == (256, 256)
        assert src.compression.value == "DEFLATE"


def test_overviews_average_continuous_values_and_keep_classes(tmp_path):
    """Continuous values: each overview pixel is the mean of its 2x2 block without the nodata pixels
    (numpy's nanmean); class maps: nearest, so an overview holds only classes of the map."""
    rng = np.random.default_rng(2)
    f = rng.normal(size=(1, 512, 512)).astype(np.float32)
    f[0, rng.random((512, 512)) < 0.2] = np.nan
    grid = dict(crs="EPSG:32631", transform=TRANSFORM)
    cog.write_cog(str(tmp_path / "f.tif"), f, nodata=float("nan"), **grid)
    classes = np.where(rng.random((1, 512, 512)) < 0.5, 0, 6).astype(np.uint8)
    cog.write_cog(str(tmp_path / "c.tif"), classes, nodata=255, categorical=True, **grid)
    with rasterio.open(tmp_path / "f.tif") as src:
        assert src.overviews(1)[0] == 2
        half = src.read(1, out_shape=(256, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nodata blocks: NaN, as GDAL's nodata
        expected = np.nanmean(f[0].reshape(256, 2, 256, 2), axis=(1, 3))
    assert np.isnan(expected).any()
    np.testing.assert_allclose(half, expected, rtol=1e-5, atol=1e-6)
    with rasterio.open(tmp_path / "c.tif") as src:
        half = src.read(1, out_shape=(256, 256))
    assert set(np.unique(half)) == {0, 6}  # an average would give 1.5 -> 2, 3, 4 where the classes mix


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.tif"
    path.write_bytes(b"an earlier result")
    with pytest.raises(RuntimeError, match="stop"):
        with cog.CogWriter(str(path), height=300, width=300, count=1, dtype="uint8") as out:
            out.write(np.zeros((1, 100, 300), np.uint8), Window(0, 0, 300, 100))
            raise RuntimeError("stop")
    assert path.read_bytes() == b"an earlier result" and os.listdir(tmp_path) == ["x.tif"]


# ------------------------------------------------------------------ eojax's writers


def test_seg_infer_writes_cogs_window_row_by_row(tmp_path):
    """`eojax infer` for seg streams rows of windows into its COGs; a stand-in model whose logits are
    the pixels' bands gives classes = argmax over the bands, probabilities = their softmax."""
    from eojax.seg import infer

    rng = np.random.default_rng(3)
    h, w = 600, 530
    pixels = rng.uniform(0, 1, (3, h, w)).astype(np.float32)
    pixels[:, :40, :50] = -1.0  # nodata corner
    src = str(tmp_path / "scene.tif")
    with rasterio.open(src, "w", driver="GTiff", height=h, width=w, count=3, dtype="float32", crs="EPSG:32611",
                       transform=TRANSFORM, nodata=-1.0) as dst:
        dst.write(pixels)
        dst.descriptions = ("B2", "B3", "B4")
    config = ml_collections.ConfigDict(dict(
        input=dict(bands=(), nodata=None, eval_stride=0), infer=dict(probabilities=True),
        model=dict(num_classes=3, class_names=("water", "field", "forest"))))
    task = types.SimpleNamespace(band_names=["B2", "B3", "B4"], config=config, window=(64, 64), k=0,
                                 images=lambda b: b["pixels"], logits=lambda p, s, x: (jnp.moveaxis(x, 1, -1), s))
    summary = infer.predict_geotiff(types.SimpleNamespace(task=task), ({}, {}), str(tmp_path),
                                    {"input": src, "output": str(tmp_path / "out")})
    valid = pixels[0] != -1.0
    assert_cog(summary["outputs"]["classes"], crs="EPSG:32611", transform=TRANSFORM, nodata=255,
               descriptions=("class",), overviews=True)
    assert_cog(summary["outputs"]["probabilities"], crs="EPSG:32611", transform=TRANSFORM, nodata=float("nan"),
               descriptions=("p(water)", "p(field)", "p(forest)"), overviews=True)
    with rasterio.open(summary["outputs"]["classes"]) as out:
        np.testing.assert_array_equal(out.read(1), np.where(valid, pixels.argmax(0), 255))
        assert out.tags()["classes"] == "0 water, 1 field, 2 forest, 255 no data"
    with rasterio.open(summary["outputs"]["probabilities"]) as out:
        e = np.exp(pixels - pixels.max(0))
        np.testing.assert_allclose(out.read(), np.where(valid, e / e.sum(0), np.nan), rtol=1e-5)


def test_mae_export_writes_a_cog(tmp_path):
    from eojax.mae import export

    path = tmp_path / "s.tif"
    synthetic.write_scene(str(path), seed=4, height=96, width=80, crs="EPSG:32631", origin=(431000.0, 5412000.0))
    scene = Scene(str(path), bands=("B2", "B3", "B4"))
    out = export.export_features(scene, lambda p, v: p.mean(axis=(2, 3)), str(tmp_path / "f" / "f.tif"),
                                 window=16, stride=16, batch_size=8)
    assert_cog(out, crs="EPSG:32631", transform=export.feature_transform(scene.transform, 16, 16),
               nodata=float("nan"), descriptions=("emb0", "emb1", "emb2"))
    with rasterio.open(out) as src:
        assert src.shape == (6, 5) and src.tags()["stride"] == "16"
        raw, _ = scene.read_pixels(Window(16, 32, 16, 16))
        np.testing.assert_allclose(src.read()[:, 2, 1], raw.mean(axis=(1, 2)), rtol=1e-6)


def test_vsat_outputs_are_cogs(tmp_path):
    from eojax.vsat import infill, timeseries

    rng = np.random.default_rng(5)
    ts = types.SimpleNamespace(dtype="int16", nodata=-9999, crs=rasterio.crs.CRS.from_epsg(32631),
                               transform=TRANSFORM, band_names=("B4", "B8"))
    values = rng.integers(-200, 3000, (2, 40, 30)).astype(np.float64)
    values[:, :3, :3] = np.nan
    path = timeseries.write_date(ts, values, str(tmp_path / "d.tif"))
    assert_cog(path, crs="EPSG:32631", transform=TRANSFORM, nodata=-9999, descriptions=("B4", "B8"))
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.read(), np.where(np.isnan(values), -9999, values).astype(np.int16))
    status = rng.integers(0, 4, (40, 30)).astype(np.uint8)
    infill._write_status(ts, status, str(tmp_path / "status.tif"))
    assert_cog(str(tmp_path / "status.tif"), crs="EPSG:32631", transform=TRANSFORM, nodata=infill.NODATA,
               descriptions=("0 observed, 1 filled, 2 failed, 3 no data",))
    with rasterio.open(tmp_path / "status.tif") as src:
        np.testing.assert_array_equal(src.read(1), status)


def test_diffusion_sample_geotiff_is_a_cog(tmp_path):
    from eojax.diffusion import pictures

    image = np.random.default_rng(6).uniform(-1, 1, (300, 280, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rasterio.errors.NotGeoreferencedWarning)  # not on Earth, on purpose
        path = pictures._write_geotiff(str(tmp_path / "s.tif"), image, ("B2", "B3", "B4", "B8"), 10000.0,
                                       "a field")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        assert_cog(path, descriptions=("B2", "B3", "B4", "B8"), overviews=True)
        with rasterio.open(path) as src:
            assert src.crs is None and src.tags()["prompt"] == "a field"
            np.testing.assert_array_equal(src.read(), ((image + 1) / 2 * 10000.0).astype(np.float32).transpose(2, 0, 1))


# ------------------------------------------------------------------ export stride


def test_export_default_stride_is_the_window_and_a_gap_is_refused():
    from eojax.mae import export
    from helpers import load_config

    for arg in (("mae", "runlocal"), ("mae", ""), ("satmae", "runlocal"), ("gridmae", "")):
        config = load_config(*arg)
        assert export.export_stride(config) == config.input.window  # the default leaves no gap
    config = load_config("mae", "runlocal")
    config.export.stride = 64
    with pytest.raises(errors.ConfigError, match=r"config.export.stride=64 is larger than config.input.window=32"):
        export.export_stride(config)
    from eojax.mae.task import MAETask
    with pytest.raises(errors.ConfigError, match="export.stride=64"):
        MAETask.check_config(config)  # before any data or checkpoint is read
    config.export.allow_gaps = True
    assert export.export_stride(config) == 64
    config.export.stride = 16  # overlapping windows are fine
    config.export.allow_gaps = False
    assert export.export_stride(config) == 16
    legacy = ml_collections.ConfigDict({"input": {"window": 32, "eval_stride": 64}})  # a run from before `export`
    assert export.export_stride(legacy) == 32
    with pytest.raises(errors.ConfigError, match="stride=24 is larger than window=16"):
        export.export_features(None, None, "unused.tif", window=16, stride=24)
    assert config_lib.export_defaults().stride == 0


def test_export_cli_refuses_a_gap_in_one_line_before_reading_a_checkpoint(tmp_path):
    from helpers import cli

    proc = cli("export", "mae:runlocal", tmp_path, "--config.export.stride=64", check=False, devices=1)
    assert proc.returncode == errors.USAGE and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "eojax: error: config.export.stride=64 is larger than config.input.window=32: the 32 px between windows "
        "would get no embedding; use a stride <= 32 or config.export.allow_gaps=True to skip them on purpose")
    assert os.listdir(tmp_path) == []  # the empty workdir is left as it was
