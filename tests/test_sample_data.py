"""The packaged sample data (eojax.sample_data) is what scripts/make_sample_data.py says: the shared data's
arrays and files unchanged, the derived class rasters made by the documented rule, a NOTICE each."""
import hashlib
import os

import numpy as np
import pytest
import rasterio

from eojax import sample_data
from eojax.classify import datasets
from eojax.errors import DataError


def test_every_sample_is_installed_with_its_notice():
    for name in sample_data.NAMES:
        notice = open(os.path.join(sample_data.path(name), "NOTICE")).read()
        assert "Permission is hereby granted" in notice and "@" in notice  # the licence and the source commit
    with pytest.raises(DataError, match="no sample named 'nope'"):
        sample_data.path("nope")


def test_eolearn_sample_holds_the_source_arrays_and_the_split_class_rasters(test_data):
    root = sample_data.path("eolearn_lulc")
    scenes, raba, grid = datasets.read_patch(root)
    source_scenes, source_raba, source_grid = datasets.read_patch(str(test_data / "eolearn"))
    assert scenes.keys() == source_scenes.keys() and grid == source_grid
    for date in scenes:
        np.testing.assert_array_equal(scenes[date], source_scenes[date])  # lossless, same dtype
    np.testing.assert_array_equal(raba, source_raba)
    # Each pixel of a whole 8-px chip is in the class raster of its location's split (as the
    # classification set splits its chips), no pixel in two, 255 where no split or no data.
    classes = datasets.pixel_classes(source_raba)
    splits = datasets.location_splits(raba.shape[0] // 8, raba.shape[1] // 8)
    masks = {}
    for split in ("train", "val", "test"):
        with rasterio.open(os.path.join(root, f"classes_{split}.tif")) as src:
            masks[split] = src.read(1)
            assert src.crs.to_epsg() == 32633 and src.transform.c == grid[0] and src.nodata == 255
    assert ((np.stack(list(masks.values())) != 255).sum(0) <= 1).all()
    for y, x in [(0, 0), (17, 40), (50, 99), (95, 95), (100, 3)]:
        split = splits[y // 8, x // 8] if y < 96 and x < 96 else None
        for name, mask in masks.items():
            expected = classes[y, x] if name == split and classes[y, x] >= 0 else 255
            assert mask[y, x] == expected, (y, x, name)


def test_landsat_sample_is_the_source_files_unchanged(test_data):
    root = sample_data.path("landsat8_013032")
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if f != "NOTICE")
    assert len(files) == 8 * 8  # 8 dates x B1-B7 + BQA
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    for rel in files:
        assert digest(os.path.join(root, rel)) == digest(test_data / "gdalcubes_L8NY18" / rel), rel
