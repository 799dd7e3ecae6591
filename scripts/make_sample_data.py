"""Remakes eojax's packaged sample data (eojax/sample_data/) from the shared data folder.

    python scripts/make_sample_data.py [--data ../shared/data]   # default: $EOJAX_TEST_DATA, else ../shared/data

- eolearn_lulc: eo-learn's Sentinel-2 test patch over Slovenia (eolearn/): its three cloud-free dates
  as 13-band float32 GeoTIFFs (scenes/<date>.tif, the very arrays of REFERENCE_SCENES.npy, losslessly
  compressed), its RABA land-use raster (lulc.tif, the codes of LULC.npy) and, for segmentation, one
  class raster per split (classes_<split>.tif: 0 forest, 1 grassland, 2 other, 255 = not in this
  split or no data), split by location as the classification set is (eojax.classify.datasets).
- landsat8_013032: the 8 dates of Landsat-8 path/row 013/032 of gdalcubes' L8NY18 (bands B1-B7 and
  BQA), the files copied as they are.

Each folder gets a NOTICE: where the data comes from, its licence text, what was done to it. A folder
is written beside the old one and swapped in when complete.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

import numpy as np
import rasterio
from affine import Affine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from eojax.classify import datasets  # noqa: E402

OUT = os.path.join(REPO, "eojax", "sample_data")
LANDSAT_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "BQA")
SPLITS = ("train", "val", "test")
# Lossless and byte-stable: GDAL writes no time stamp unless asked.
COMPRESSION = dict(compress="deflate", zlevel=9)

EOLEARN_NOTICE = """\
eolearn_lulc: eo-learn's Sentinel-2 test patch (Slovenia, EPSG:32633, 101 x 100 pixels of ~10 m) and
its land-use map, from sentinel-hub/eo-learn @ 303e75855880531d519264f847e7c6b2fb97104d, example_data/.

- scenes/<date>.tif: Sentinel-2 L1C top-of-atmosphere reflectance, 13 bands (B1-B12 with B8A), float32,
  on the three cloud-free dates of REFERENCE_SCENES.npy (2015-07-11, 2015-08-30, 2015-09-09); the
  arrays are unchanged, only stored as GeoTIFFs (the grid from TestEOPatch/bbox.geojson).
- lulc.tif: TestEOPatch/mask_timeless/LULC.npy, the Slovenian RABA land-use map rasterised on the
  patch (0 no data, 1 cultivated, 2 forest, 3 grassland, 4 shrubland, 8 artificial), unchanged.
- classes_<train|val|test>.tif: DERIVED from lulc.tif by eojax (scripts/make_sample_data.py): RABA
  grouped into 0 forest, 1 grassland, 2 other (cultivated, shrubland, artificial), the pixels of each
  split's locations (blocks of 16 x 16 pixels, as eojax.classify.datasets splits its chips), 255
  elsewhere and where there is no data.

Contains modified Copernicus Sentinel data (2015). The land-use map is the Slovenian Ministry of
Agriculture, Forestry and Food's RABA map, as redistributed in eo-learn's example data.

eo-learn's licence, which covers its example data:

"""
LANDSAT_NOTICE = """\
landsat8_013032: Landsat-8 OLI/TIRS Collection-1 L1TP scenes of path/row 013/032 (New York area),
2018, strongly downsampled by gdalcubes' authors (about 3 km pixels, 76 x 77, EPSG:32618, uint16 DN),
from appelmar/gdalcubes @ 29e9c3d4200453a913d94f615fb0bf42812dbaf2, inst/L8NY18/.

Bands B1-B7 and the quality band BQA of the 8 dates, copied unchanged (file names as USGS names them).
Landsat data courtesy of the U.S. Geological Survey (public domain).

gdalcubes' licence (the MIT licence; its LICENSE file names the year and holder):

"""
MIT_TEXT = """\
MIT License

Copyright (c) {year} {holder}

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def _write_tif(path, array, transform, *, nodata=None, descriptions=(), tags=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    predictor = 3 if array.dtype.kind == "f" else 2
    with rasterio.open(path, "w", driver="GTiff", count=array.shape[0], height=array.shape[1],
                       width=array.shape[2], dtype=array.dtype.name, crs="EPSG:32633", transform=transform,
                       nodata=nodata, predictor=predictor, **COMPRESSION) as dst:
        dst.write(array)
        for i, d in enumerate(descriptions):
            dst.set_band_description(i + 1, d)
        dst.update_tags(**(tags or {}))


def make_eolearn(source: str, out: str) -> None:
    scenes, raba, (x0, y0, gsd) = datasets.read_patch(source)
    transform = Affine(gsd, 0.0, x0, 0.0, -gsd, y0)
    for date, image in scenes.items():
        _write_tif(os.path.join(out, "scenes", f"{date}.tif"), image, transform,
                   descriptions=datasets.EOLEARN_BANDS, tags={"date": date, "sensor": "sentinel2 L1C"})
    _write_tif(os.path.join(out, "lulc.tif"), raba[None].astype(np.uint16), transform, nodata=0,
               descriptions=("RABA land use",))
    classes = datasets.pixel_classes(raba)
    chip = datasets.CHIP
    rows, cols = raba.shape[0] // chip, raba.shape[1] // chip
    split = np.full(raba.shape, "", "<U5")  # pixels past the last whole chip belong to no split
    split[:rows * chip, :cols * chip] = datasets.location_splits(rows, cols).repeat(chip, 0).repeat(chip, 1)
    legend = ", ".join(f"{i} {c}" for i, c in enumerate(datasets.LULC_CLASSES)) + ", 255 not in this split"
    for name in SPLITS:
        mask = np.where((split == name) & (classes >= 0), classes, 255).astype(np.uint8)
        _write_tif(os.path.join(out, f"classes_{name}.tif"), mask[None], transform, nodata=255,
                   descriptions=("land use class",), tags={"classes": legend, "split": name})
    licence = open(os.path.join(source, "LICENSE.repo")).read()
    with open(os.path.join(out, "NOTICE"), "w") as f:
        f.write(EOLEARN_NOTICE + licence)


def make_landsat(source: str, out: str) -> None:
    files = sorted(f for b in LANDSAT_BANDS for f in glob.glob(os.path.join(source, "*_013032_*", f"*_{b}.TIF")))
    if len(files) != 8 * len(LANDSAT_BANDS):
        raise SystemExit(f"expected 8 dates x {len(LANDSAT_BANDS)} bands of path/row 013032 in {source}, "
                         f"found {len(files)} files")
    for f in files:
        target = os.path.join(out, os.path.basename(os.path.dirname(f)), os.path.basename(f))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(f, target)
    fields = dict(line.split(":", 1) for line in open(os.path.join(source, "LICENSE.repo")) if ":" in line)
    with open(os.path.join(out, "NOTICE"), "w") as f:
        f.write(LANDSAT_NOTICE + MIT_TEXT.format(year=fields["YEAR"].strip(), holder=fields["COPYRIGHT HOLDER"].strip()))


def _replace(name: str, make, source: str) -> None:
    """Writes the folder beside the old one, then swaps it in: never half a sample in place."""
    final, tmp = os.path.join(OUT, name), os.path.join(OUT, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make(source, tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(final) for f in fs)
    print(f"{final}: {size:,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("EOJAX_TEST_DATA")
                        or os.path.join(os.path.dirname(REPO), "shared", "data"))
    data = parser.parse_args().data
    _replace("eolearn_lulc", make_eolearn, os.path.join(data, "eolearn"))
    _replace("landsat8_013032", make_landsat, os.path.join(data, "gdalcubes_L8NY18"))


if __name__ == "__main__":
    main()
