"""Real classification sets made from the shared data.

`write_eolearn_lulc` (source 'eolearn_lulc'): land use of eo-learn's Sentinel-2 test patch (Slovenia,
101 x 100 pixels at 10 m). The image chips are its 13-band L1C reflectance on the three cloud-free
dates of REFERENCE_SCENES (2015-07-11, 08-30, 09-09); the labels come from its LULC raster (the
Slovenian RABA land-use map). How the set is made:
- chips of 8 x 8 pixels (80 m) on a grid from the top-left corner (12 x 12 locations);
- classes: forest, grassland, other (RABA's cultivated, shrubland and artificial land, too rare to
  stand alone here: 11, 358 and 198 pixels); a chip's label is its majority class, chips more than
  half no-data are left out;
- the split is spatial, so that no location is in two splits (the three dates of a location are
  near-copies): blocks of 2 x 2 chips, shuffled with seed 0, 60 % train, 20 % val, 20 % test;
- each chip of each date is a georeferenced GeoTIFF (EPSG:32633) under `<class>/`; `labels.csv`
  holds path, label, split; `scenes/<date>.tif` are the three whole scenes (for pretraining).
The source is eo-learn's example_data folder or eojax's packaged sample of it (eojax.sample_data
'eolearn_lulc': the same three scenes and LULC raster as GeoTIFFs, so the set made from either is
the same, bit for bit).
"""
from __future__ import annotations

import csv
import json
import os
import pathlib

import numpy as np
import rasterio
from affine import Affine

EOLEARN_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
# REFERENCE_SCENES indices of the cloud-free dates (the file stores its 5 dates out of order).
EOLEARN_CLEAR = {2: "2015-09-09", 3: "2015-08-30", 4: "2015-07-11"}
LULC_CLASSES = ("forest", "grassland", "other")
_RABA_TO_CLASS = {1: 2, 2: 0, 3: 1, 4: 2, 8: 2}  # RABA code -> index in LULC_CLASSES (0 = no data)
CHIP, BLOCK = 8, 2


def _grid(root: str):
    with open(os.path.join(root, "TestEOPatch", "bbox.geojson")) as f:
        ring = json.load(f)["coordinates"][0]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    return min(xs), max(ys), (max(xs) - min(xs)), (max(ys) - min(ys))


def read_patch(root: str) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[float, float, float]]:
    """({date: (13, H, W) float32 reflectance} of the clear dates, (H, W) RABA codes, (x0, y0, gsd))
    from eo-learn's example_data (REFERENCE_SCENES.npy, TestEOPatch/) or from eojax's sample of it
    (scenes/<date>.tif and lulc.tif, written by scripts/make_sample_data.py from the former)."""
    if os.path.isfile(os.path.join(root, "lulc.tif")):
        scenes = {}
        for date in EOLEARN_CLEAR.values():
            with rasterio.open(os.path.join(root, "scenes", f"{date}.tif")) as src:
                scenes[date], transform = src.read(), src.transform
        with rasterio.open(os.path.join(root, "lulc.tif")) as src:
            raba = src.read(1)
        return scenes, raba, (transform.c, transform.f, transform.a)
    src = os.path.join(root, "REFERENCE_SCENES.npy")
    lulc_path = os.path.join(root, "TestEOPatch", "mask_timeless", "LULC.npy")
    for p in (src, lulc_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"eolearn_lulc needs {p} (eo-learn's example_data, or eojax's sample "
                                    "of it with lulc.tif; config.input.root)")
    stack = np.load(src, allow_pickle=False)  # (5, H, W, 13) reflectance
    raba = np.load(lulc_path, allow_pickle=False)[..., 0]
    if stack.shape[1:3] != raba.shape or stack.shape[-1] != len(EOLEARN_BANDS):
        raise ValueError(f"{src} {stack.shape} and {lulc_path} {raba.shape} do not match")
    x0, y0, width, _ = _grid(root)
    scenes = {date: np.moveaxis(stack[i], -1, 0).astype(np.float32) for i, date in EOLEARN_CLEAR.items()}
    return scenes, raba, (x0, y0, width / raba.shape[1])


def pixel_classes(raba: np.ndarray) -> np.ndarray:
    """RABA codes -> index in LULC_CLASSES, -1 where no class (no data)."""
    classes = np.full(raba.shape, -1, np.int64)
    for code, cls in _RABA_TO_CLASS.items():
        classes[raba == code] = cls
    return classes


def location_splits(rows: int, cols: int) -> np.ndarray:
    """(rows, cols) split name of each chip location: blocks of BLOCK x BLOCK locations shuffled
    with seed 0, the first 60 % train, the next 20 % val, the rest test."""
    brows, bcols = -(-rows // BLOCK), -(-cols // BLOCK)
    n = brows * bcols
    rank = np.empty(n, np.int64)
    rank[np.random.default_rng(0).permutation(n)] = np.arange(n)
    names = np.where(rank < 0.6 * n, "train", np.where(rank < 0.8 * n, "val", "test")).reshape(brows, bcols)
    return names.repeat(BLOCK, 0).repeat(BLOCK, 1)[:rows, :cols]


def _write(path, array, x0, y0, gsd, descriptions, tags):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    c, h, w = array.shape
    with rasterio.open(path, "w", driver="GTiff", count=c, height=h, width=w, dtype=array.dtype.name,
                       crs="EPSG:32633", transform=Affine(gsd, 0.0, x0, 0.0, -gsd, y0)) as dst:
        dst.write(array)
        for i, d in enumerate(descriptions):
            dst.set_band_description(i + 1, d)
        dst.update_tags(**tags)


def write_eolearn_lulc(out_dir, data_root: str) -> str:
    """Writes the set (module docstring) under out_dir -> the path of labels.csv."""
    scenes, raba, (x0, y0, gsd) = read_patch(data_root)
    labels = pixel_classes(raba) + 1  # 0 = no data, else class index + 1
    out = pathlib.Path(out_dir)
    rows, cols = raba.shape[0] // CHIP, raba.shape[1] // CHIP
    splits = location_splits(rows, cols)
    entries = []
    for date, image in scenes.items():
        _write(str(out / "scenes" / f"{date}.tif"), image, x0, y0, gsd, EOLEARN_BANDS,
               {"date": date, "sensor": "sentinel2 L1C (eo-learn TestEOPatch)"})
        for r in range(rows):
            for c in range(cols):
                counts = np.bincount(labels[r * CHIP:(r + 1) * CHIP, c * CHIP:(c + 1) * CHIP].ravel(),
                                     minlength=len(LULC_CLASSES) + 1)
                if counts[0] > CHIP * CHIP / 2:
                    continue
                name = LULC_CLASSES[int(counts[1:].argmax())]
                rel = f"{name}/r{r:02d}c{c:02d}_{date}.tif"
                _write(str(out / rel), image[:, r * CHIP:(r + 1) * CHIP, c * CHIP:(c + 1) * CHIP],
                       x0 + c * CHIP * gsd, y0 - r * CHIP * gsd, gsd, EOLEARN_BANDS,
                       {"date": date, "class": name})
                entries.append((rel, name, str(splits[r, c])))
    table = out / "labels.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *entries])
    return str(table)
