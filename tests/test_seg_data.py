"""Segmentation data: HLS Burn Scars layout and splits, pairing rules, labels, normalisation, bad input,
the solaris building chips."""

import pathlib

import numpy as np
import pytest
import rasterio
from affine import Affine

from eojax.seg import data as segdata
from eojax.data import synthetic
from eojax.data.raster import RasterError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return segdata.synthetic_burnscars(tmp_path_factory.mktemp("bs"), size=48, n_train=10, n_test=3)


def _write(path, array, dtype, nodata=None, transform=Affine(30, 0, 0, 0, -30, 0)):
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                       dtype=dtype, nodata=nodata, crs="EPSG:32610", transform=transform) as dst:
        dst.write(array.astype(dtype))
    return str(path)


def test_synthetic_chips_follow_the_hls_burn_scars_layout(root):
    images = sorted((pathlib.Path(root) / "training").glob("*_merged.tif"))
    assert len(images) == 10
    with rasterio.open(images[0]) as src:
        assert src.count == 6 and src.descriptions == segdata.BURNSCARS_BANDS and src.dtypes[0] == "float32"
        nbr_img = src.read()
    with rasterio.open(str(images[0]).replace("_merged.tif", ".mask.tif")) as m:
        mask = m.read(1)
    assert set(np.unique(mask)) <= {-1, 0, 1} and (mask == 1).any() and (mask == 0).any()
    # Burned ground has a lower normalised burn ratio (B8A vs B12) than unburned land.
    nbr = (nbr_img[3] - nbr_img[5]) / (nbr_img[3] + nbr_img[5])
    assert nbr[mask == 1].mean() < nbr[mask == 0].mean() - 0.2
    again = synthetic.write_burn_scar_chips(str(images[0].parent.parent / "again"), n=1, size=48, seed=1)
    with rasterio.open(again[0]) as a:
        np.testing.assert_array_equal(a.read(), rasterio.open(min(images, key=str)).read())


def test_pangaea_splits(root):
    splits = segdata.burnscars_splits(root)
    assert len(splits["train"]) == 9 and len(splits["val"]) == 1 and len(splits["test"]) == 3
    names = lambda s: {p.image for p in splits[s]}
    assert not names("train") & names("val") and all("validation" in p for p in names("test"))
    train, val = segdata.holdout_split(486)
    assert len(val) == 49 and len(train) == 437 and sorted(np.concatenate([train, val])) == list(range(486))


def test_labels_ignore_missing_and_nodata(tmp_path):
    img = np.full((6, 8, 8), 0.1, np.float32)
    img[:, 0, 0] = 9999.0  # PANGAEA's missing value
    mask = np.zeros((1, 8, 8), np.int16)
    mask[0, 1, :] = 1
    mask[0, 2, :] = -1
    pair = segdata.Pair(_write(tmp_path / "a_merged.tif", img, "float32"), _write(tmp_path / "a.mask.tif", mask, "int16"))
    el = segdata.PairSet([pair], nodata=9999.0, num_classes=2, ignore_index=255).read(0)
    assert el["label"][0, 0] == 255 and not el["valid"][0, 0]
    assert (el["label"][1] == 1).all() and (el["label"][2] == 255).all() and el["label"][3, 0] == 0
    # 0/255 masks with mask_values.
    pair2 = segdata.Pair(pair.image, _write(tmp_path / "b.tif", (mask == 1) * 255, "uint8"))
    el2 = segdata.PairSet([pair2], num_classes=2, mask_values=(0, 255)).read(0)
    assert (el2["label"][1] == 1).all() and el2["label"][2, 0] == 0
    # A uint8 class mask with 255 = no class: ignored as -1, not wrapped to the ignore index's uint8 (255).
    pair3 = segdata.Pair(pair.image, _write(tmp_path / "c.tif", np.where(mask < 0, 255, mask), "uint8"))
    el3 = segdata.PairSet([pair3], num_classes=2).read(0)
    assert (el3["label"][2] == -1).all() and (el3["label"][1] == 1).all() and el3["label"][3, 0] == 0


def test_bad_input_is_named(tmp_path):
    img = _write(tmp_path / "x_merged.tif", np.ones((6, 8, 8)), "float32")
    with pytest.raises(FileNotFoundError, match="x.mask.tif"):
        segdata.pair_files(str(tmp_path / "*_merged.tif"))
    small = _write(tmp_path / "x.mask.tif", np.ones((1, 4, 8)), "int16")
    with pytest.raises(RasterError, match="4x8 but its image"):
        segdata.PairSet([segdata.Pair(img, small)], num_classes=2)
    two = _write(tmp_path / "two.tif", np.ones((2, 8, 8)), "int16")
    with pytest.raises(RasterError, match="has 2 bands"):
        segdata.PairSet([segdata.Pair(img, two)], num_classes=2)
    img3 = _write(tmp_path / "y_merged.tif", np.ones((3, 8, 8)), "float32")
    ok = _write(tmp_path / "m.tif", np.ones((1, 8, 8)), "int16")
    with pytest.raises(RasterError, match="has 3 bands"):
        segdata.PairSet([segdata.Pair(img, ok), segdata.Pair(img3, ok)], num_classes=2)
    with pytest.raises(FileNotFoundError, match="1 images .* 2 masks"):
        segdata.pair_files(img, [ok, small])


def test_random_crops_and_whole_scenes(root):
    pairs = segdata.PairSet(segdata.burnscars_splits(root)["train"], nodata=9999.0, num_classes=2)
    crops = segdata.RandomCrops(pairs, size=32, num_crops=5, seed=0)
    a, b = crops[3], crops[3]
    np.testing.assert_array_equal(a["pixels"], b["pixels"])
    assert a["pixels"].shape == (6, 32, 32) and a["label"].shape == (32, 32) and a["label"].dtype == np.int32
    assert not np.array_equal(crops[3]["pixels"], crops[3 + 5]["pixels"])  # next epoch, new crop
    big = segdata.RandomCrops(pairs, size=64, num_crops=1, seed=0)[0]  # chips are 48: padded, ignored
    assert big["pixels"].shape == (6, 64, 64) and (big["label"][48:] == -1).all() and not big["valid"][48:].any()
    whole = segdata.WholeScenes(pairs, min_size=32)
    assert whole[0]["pixels"].shape == (6, 48, 48)


def test_normalisation_choices(root, tmp_path):
    from ml_collections import ConfigDict
    pairs = segdata.PairSet(segdata.burnscars_splits(root)["train"], nodata=9999.0, num_classes=2)
    cfg = ConfigDict(dict(mean=(), std=(), normalize="pangaea"))
    assert np.allclose(segdata.band_stats(cfg, pairs).mean, segdata.PANGAEA_BURNSCARS_MEAN)
    cfg.normalize = "data"
    stats = segdata.band_stats(cfg, pairs)
    stack = np.concatenate([s.read_pixels(rasterio.windows.Window(0, 0, 48, 48))[0].reshape(6, -1)
                            for s in pairs.scenes], axis=1)
    np.testing.assert_allclose(stats.mean, stack.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats.std, stack.std(axis=1), rtol=1e-4)
    pan = _write(tmp_path / "p_merged.tif", np.ones((1, 8, 8)), "uint16")
    one = segdata.PairSet([segdata.Pair(pan, _write(tmp_path / "p.mask.tif", np.ones((1, 8, 8)), "uint8"))],
                          num_classes=2)
    with pytest.raises(ValueError, match="HLS burn scars statistics"):
        segdata.band_stats(ConfigDict(dict(mean=(), std=(), normalize="pangaea")), one)


def test_solaris_chips_are_georeferenced(test_data, tmp_path):
    splits = segdata.solaris_chips(str(test_data / "solaris"), tmp_path)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 1, 2]
    with rasterio.open(test_data / "solaris" / "sample_geotiff.tif") as src:
        full_transform, crs = src.transform, src.crs
    chip = splits["test"][0]  # row 2, col 1
    with rasterio.open(chip.image) as img, rasterio.open(chip.mask) as m:
        assert img.crs == crs and m.transform == img.transform == full_transform @ Affine.translation(300, 600)
        assert set(np.unique(m.read(1))) <= {0, 1}
    total = sum(rasterio.open(p.mask).read(1).sum() for s in splits.values() for p in s)
    assert 0.10 < total / 900 ** 2 < 0.20  # the footprint mask is 14.6 % buildings


def test_tfds_builder_matches_the_files(root, tmp_path):
    import tensorflow_datasets as tfds
    from eojax.seg.burnscars_tfds import BurnScarsTFDSSource, HLSBurnScars
    builder = HLSBurnScars(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    assert {s: builder.info.splits[s].num_examples for s in ("train", "val", "test")} == \
        {"train": 9, "val": 1, "test": 3}
    splits = segdata.burnscars_splits(root)
    direct = segdata.PairSet(splits["test"], nodata=9999.0, num_classes=2)
    by_name = {pathlib.Path(p.image).name[:-len("_merged.tif")]: i for i, p in enumerate(splits["test"])}
    records = builder.as_data_source(split="test")
    source = BurnScarsTFDSSource(records)
    for i in range(len(source)):
        ref = direct.read(by_name[records[i]["name"].decode() if isinstance(records[i]["name"], bytes)
                                   else records[i]["name"]])
        for k, v in source[i].items():
            np.testing.assert_array_equal(v, ref[k], err_msg=k)


def test_whole_scene_preprocessings(root, tmp_path):
    """seg_resize_input_layer / seg_resize train on whole scenes (every scene once per epoch); the
    element size is the crop, the largest side (padded, square) or the scenes' one size; seg_resize
    refuses scenes of several sizes, naming them."""
    from ml_collections import ConfigDict
    pairs = segdata.PairSet(segdata.burnscars_splits(root)["train"], nodata=9999.0, num_classes=2)
    assert segdata.scene_size(pairs, "seg_default", 32) == (32, 32)
    assert segdata.scene_size(pairs, "seg_resize_input_layer", 32) == (48, 48)
    assert segdata.scene_size(pairs, "seg_resize", 32) == (48, 48)
    cfg = ConfigDict(dict(preprocessing="seg_resize", crop=32, num_crops=4, worker_count=0))
    it = segdata.make_input(cfg, pairs, split="train", batch_size=3, seed=0)
    epoch = [next(it) for _ in range(len(pairs.scenes) // 3)]
    whole = [pairs.read(i)["pixels"] for i in range(len(pairs.scenes))]
    found = [next(i for i, w in enumerate(whole) if np.array_equal(w, p)) for b in epoch for p in b["pixels"]]
    assert sorted(found) == list(range(len(pairs.scenes)))  # 9 scenes, 3 batches: each once
    wide = np.full((6, 48, 56), 0.1, np.float32)
    odd = segdata.Pair(_write(tmp_path / "w_merged.tif", wide, "float32"),
                       _write(tmp_path / "w.mask.tif", np.zeros((1, 48, 56)), "int16"))
    mixed = segdata.PairSet(pairs.pairs + [odd], nodata=9999.0, num_classes=2)
    assert segdata.scene_size(mixed, "seg_resize_input_layer", 32) == (56, 56)
    with pytest.raises(RasterError, match="one size.*48x56"):
        segdata.scene_size(mixed, "seg_resize", 32)
