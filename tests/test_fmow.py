"""fMoW-Sentinel: Grain source over the released layout, TFDS builder without TensorFlow."""
import csv
import importlib.util
import os

import grain
import numpy as np
import pytest
import rasterio
from affine import Affine

from eojax.data import device, fmow, pipeline
from eojax.data.fmow import FMOW_BANDS, FMOW_CATEGORIES, FMoWSentinelSource
from eojax.data.raster import RasterError

# (category, location, image, height, width): three categories, varied sizes (square, wide, tall).
IMAGES = {
    "train": [("airport", 3, 0, 16, 16), ("airport", 3, 1, 20, 24), ("crop_field", 7, 0, 31, 17),
              ("zoo", 12, 2, 18, 18), ("crop_field", 8, 5, 40, 40)],
    "val": [("zoo", 40, 0, 16, 21), ("airport", 41, 3, 16, 16)],
}


def _pixels(key, h, w):
    """13 uint16 bands; band b holds 1000 * (b + 1) + a per-image ramp (band order is checkable)."""
    ramp = (np.arange(h * w).reshape(h, w) % 97 + key).astype(np.uint16)
    return np.stack([1000 * (b + 1) + ramp for b in range(13)]).astype(np.uint16)


def _write(path, array, nodata=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    c, h, w = array.shape
    with rasterio.open(path, "w", driver="GTiff", count=c, height=h, width=w, dtype=array.dtype,
                       nodata=nodata, crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 5000000)) as dst:
        dst.write(array)


def _tree(root, images=IMAGES):
    for split, rows in images.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["", "category", "location_id", "image_id", "timestamp", "polygon"])
            for i, (cat, loc, img, h, w) in enumerate(rows):
                wr.writerow([i, cat, loc, img, f"2017-0{img + 1}-15T10:20:30Z",
                             "POLYGON ((0 0, 1 0, 1 1, 0 0))"])
                px = _pixels(loc + img, h, w)
                nodata = None
                if (cat, loc, img) == ("zoo", 12, 2):
                    px[:, :, :6] = 0  # a third of the image is nodata
                    nodata = 0
                _write(fmow.image_path(str(root), split, cat, loc, img), px, nodata)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return _tree(tmp_path_factory.mktemp("fmow-sentinel"))


def test_labels_bands_and_metadata(root):
    src = FMoWSentinelSource(str(root), "train", size=16)
    assert len(src) == 5 and src.num_classes == 62
    assert src.band_names == ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
    for i, (cat, loc, img, h, w) in enumerate(IMAGES["train"]):
        el = src[i]
        assert el["pixels"].shape == (10, 16, 16) and el["pixels"].dtype == np.float32
        assert el["label"] == FMOW_CATEGORIES.index(cat) and el["index"] == i
        assert (el["location_id"], el["image_id"]) == (loc, img)
        assert el["timestamp"] == int(np.datetime64(f"2017-0{img + 1}-15T10:20:30", "s").astype(int))
        assert src.metadata(i)["path"].endswith(f"train/{cat}/{cat}_{loc}/{cat}_{loc}_{img}.tif")
    # A 16 x 16 image at size 16 is read exactly: B2 .. B12 without B9 / B10 (file bands 2-9, 12, 13).
    raw = _pixels(3, 16, 16)
    np.testing.assert_array_equal(src[0]["pixels"], raw[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]])
    assert src[0]["valid"].all()
    # A 20 x 24 image: its centred 20 x 20 square (columns 2..21) at size 20 is exact too.
    wide = FMoWSentinelSource(str(root), "train", size=20, bands=("B4", "B3", "B2"))[1]
    np.testing.assert_array_equal(wide["pixels"], _pixels(4, 20, 24)[[3, 2, 1], :, 2:22])
    # Explicit categories: labels index that list.
    sub = FMoWSentinelSource(str(root), "val", categories=("airport", "zoo"), size=8)
    assert [sub[i]["label"] for i in range(2)] == [1, 0]


def test_resize_and_validity(root):
    src = FMoWSentinelSource(str(root), "train", size=8)
    big = src[4]  # 40 x 40 -> 8 x 8: 5 x 5 averages (wider kernel), band offsets kept
    assert np.all(np.abs(big["pixels"][0] - 2000 - 8 - 48) < 49)
    assert np.all(np.diff(big["pixels"].mean((1, 2))) > 0)  # band order preserved
    zoo = FMoWSentinelSource(str(root), "train", size=18)[3]  # file nodata 0 in columns 0..5
    assert not zoo["valid"][:, :6].any() and zoo["valid"][:, 6:].all()
    assert (zoo["pixels"][:, ~zoo["valid"]] == 0).all()
    # A half-pixel crop offset (5 rows -> centred 4) averages neighbours; the >= half-weight rule.
    x = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    out, ok = fmow.center_resize(x, np.ones((5, 4), bool), 4)
    np.testing.assert_allclose(out, (x[:, :4] + x[:, 1:]) / 2)
    y = np.arange(64, dtype=np.float32).reshape(1, 8, 8)  # crop 0.5: the centred 4 x 4, exactly
    np.testing.assert_array_equal(fmow.center_resize(y, np.ones((8, 8), bool), 4, crop=0.5)[0],
                                  y[:, 2:6, 2:6])
    v = np.ones((4, 4), bool)
    v[:, :1] = False
    out, ok = fmow.center_resize(np.ones((1, 4, 4), np.float32), v, 2)
    assert ok.tolist() == [[True, True], [True, True]] and np.allclose(out, 1)
    v[:, :2] = False
    assert not fmow.center_resize(np.ones((1, 4, 4), np.float32), v, 2)[1][:, 0].any()


def test_grain_batches(root):
    src = FMoWSentinelSource(str(root), "train", size=12)
    it = pipeline.make_iterator(grain.MapDataset.source(src), batch_size=2, shuffle=False,
                                num_epochs=1, drop_remainder=False)
    batches = list(it)
    assert len(batches) == 3 and batches[-1]["weight"].tolist() == [1, 0]
    assert batches[0]["pixels"].shape == (2, 10, 12, 12)
    labels = np.concatenate([b["label"][b["weight"] > 0] for b in batches])
    assert labels.tolist() == [FMOW_CATEGORIES.index(r[0]) for r in IMAGES["train"]]


def test_satmae_normalisation_on_device(root):
    el = FMoWSentinelSource(str(root), "train", size=16)[3]
    st = fmow.satmae_stats()
    assert st.band_names == ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
    out = np.asarray(device.to_model_input(el["pixels"][None], el["valid"][None], st,
                                           mode="satmae_minmax"))[0]
    x = el["pixels"].transpose(1, 2, 0).astype(np.float64)
    ref = np.clip((x - (st.mean - 2 * st.std)) / (4 * st.std), 0, 1)
    np.testing.assert_allclose(out[el["valid"]], ref[el["valid"]], rtol=1e-5, atol=1e-6)
    assert (out[~el["valid"]] == 0).all() and out.max() <= 1 and out.min() >= 0
    with pytest.raises(ValueError, match="unknown normalisation mode"):
        device.to_model_input(el["pixels"][None], el["valid"][None], st, mode="minmax")


def test_clear_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test\.csv not found.*train\.csv"):
        FMoWSentinelSource(str(root), "test")
    bad = _tree(tmp_path, {"train": [("airport", 1, 0, 16, 16), ("zoo", 2, 0, 16, 16)]})
    missing = fmow.image_path(str(bad), "train", "zoo", 2, 0)
    os.remove(missing)
    src = FMoWSentinelSource(str(bad), "train")
    with pytest.raises(FileNotFoundError, match="zoo_2_0.tif"):
        src[1]
    _write(missing, np.ones((12, 8, 8), np.uint16))
    with pytest.raises(RasterError, match=r"zoo_2_0.tif has 12 bands; fMoW-Sentinel images have 13"):
        src[1]
    with pytest.raises(RasterError, match="unknown fMoW-Sentinel band"):
        FMoWSentinelSource(str(bad), "train", bands=("B2", "B13"))
    (tmp_path / "val.csv").write_text("category,location_id,image_id,timestamp,polygon\n"
                                      "castle,1,0,2017-01-01,POLYGON EMPTY\n")
    with pytest.raises(ValueError, match=r"val.csv line 2: unknown category 'castle'"):
        FMoWSentinelSource(str(bad), "val")


def test_tfds_builder_without_tensorflow(root, tmp_path):
    assert importlib.util.find_spec("tensorflow") is None  # the point of this test
    import tensorflow_datasets as tfds
    from eojax.data.fmow_tfds import FMoWSentinel, FMoWSentinelTFDSSource
    builder = FMoWSentinel(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    assert set(builder.info.splits.keys()) == {"train", "val"}
    assert builder.info.splits["train"].num_examples == 5
    direct = FMoWSentinelSource(str(root), "train", size=16)
    records = builder.as_data_source(split="train")
    via_tfds = FMoWSentinelTFDSSource(records, size=16)
    seen = set()
    for i in range(len(via_tfds)):
        el = via_tfds[i]
        ref = direct[int(el["index"])]
        for k in ref:
            np.testing.assert_array_equal(el[k], ref[k], err_msg=k)
        seen.add(int(el["index"]))
    assert seen == set(range(5))
    raw = records[0]["image"]
    assert raw.shape[0] == len(FMOW_BANDS) and raw.dtype == np.uint16  # all bands, native size
    batch = next(pipeline.make_iterator(grain.MapDataset.source(via_tfds), batch_size=4))
    assert batch["pixels"].shape == (4, 10, 16, 16)


def test_classification_source(root):
    """configs/classify.py's default source: the release's splits, SatMAE's 10 bands, the 62 labels."""
    from eojax.classify import data as cdata
    from helpers import load_config

    cfg = load_config("classify", "data=fmow")
    cfg.input.update(root=str(root), size=16)
    classes, sets = cdata.open_splits(cfg.input)
    assert classes == list(FMOW_CATEGORIES) and set(sets) == {"train", "val"}
    assert sets["train"].band_names == [b for b in FMOW_BANDS if b not in ("B1", "B9", "B10")]
    element = sets["val"][0]
    assert element["pixels"].shape == (10, 16, 16) and element["label"] == FMOW_CATEGORIES.index("zoo")
    assert [sets["train"][i]["label"] for i in range(len(sets["train"]))] == [
        FMOW_CATEGORIES.index(row[0]) for row in IMAGES["train"]]
